# One H200, second call: calibrate again (the same call's rates); the one-GPU manifests of
# make_manifests15.sh trained through epplan run's worker without checkpoints (train_nockpt.py:
# a seed-dims checkpoint is ~57 GB, the disk 64 GB), medium with overlap on and off; the block
# and the Megatron-Core peer (bench_runtime.py --peer megatron). At most 8 files come back.
source scripts/device/setup.sh
L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # manifest micro-batches overlap
  date; timeout 60 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$1-$3 --steps 8 --device cuda --seed 3 --micro-batches $2 --overlap $3 >> $L 2>&1; echo $1 $3 rc=$?
  cp /tmp/t-$1-$3/metrics.jsonl $OUT/m-$1-$3.jsonl 2>/dev/null; rm -rf /tmp/t-$1-$3
  python3 scripts/device/train_components.py $OUT/m-$1-$3.jsonl; }
date; timeout 60 python3 -m epplan calibrate --model seed --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-h200-2.json >> $L 2>&1; echo calibrate rc=$?
train seed2 2 off
date; timeout 75 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 3 --iters 4 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out $OUT > $OUT/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves|peer) " $OUT/bench.log | cut -c1-330; cat $OUT/bench.log >> $L; rm $OUT/bench.log
train mixtral2 2 off
train medium 1 off
train medium 1 on
train seed4 4 off
rmdir $OUT/r 2>/dev/null; date
