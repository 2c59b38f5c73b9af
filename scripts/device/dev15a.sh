# One H200: calibrate; the block, the Megatron-Core peer and where the MoE layer's time goes;
# epplan run on the four one-GPU manifests of make_manifests15.sh (medium with overlap on and off).
source scripts/device/setup.sh
{
nvidia-smi --query-gpu=index,name,memory.total,power.limit,clocks.max.sm --format=csv
python3 -c "import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())"
} 2>&1 | tee $OUT/r/info.log
date; timeout 200 python3 -m epplan calibrate --model seed --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-h200.json 2>&1 | tee $OUT/r/calibrate.log | grep -v -i warn; echo calibrate rc=$?
date; timeout 200 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 4 --variants reference --skip nccl,check,interference,a2a --sdpa CUDNN_ATTENTION --peer megatron --out $OUT/r > $OUT/r/bench.log 2>&1; echo bench rc=$?; grep -v -i warn $OUT/r/bench.log | tail -12
date; timeout 120 torchrun --nproc-per-node 1 scripts/device/profile_moe.py --out $OUT/r > $OUT/r/profile.log 2>&1; echo profile rc=$?; grep -E "^(megatron|ours)" $OUT/r/profile.log
for spec in "seed2 2 off" "seed4 4 off" "mixtral2 2 off" "medium 1 off" "medium 1 on"; do set -- $spec
  date; timeout 150 python3 -m epplan run runs/h200-$1.json --out /tmp/t-$1-$3 --steps 10 --device cuda --seed 3 --micro-batches $2 --overlap $3 > /tmp/train-$1-$3.log 2>&1; echo $1 $3 rc=$?; grep -v -i warn /tmp/train-$1-$3.log | tail -1
  cp /tmp/t-$1-$3/metrics.jsonl $OUT/r/metrics-$1-$3.jsonl 2>/dev/null; done
python3 scripts/device/train_components.py $OUT/r/metrics-*.jsonl
cd $OUT/r && tar czf ../r.tgz * && cd .. && rm -rf r; date
