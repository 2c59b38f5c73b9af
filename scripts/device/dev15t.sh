# One H200, 2026-12-03, calls T and U (issue 15): the loop's expert GEMMs on rows rounded up to
# 128 (experts.ROW_QUANTUM) against exact shapes, and the predictions with the optimizer's fixed
# cost split at its host sync. From the repository root, runs/ from make_manifests15.sh, wheels
# in .whl/cp312/:
#   bash scripts/device/dev15t.sh T   # check_row_quantum.py; calibrate (kept as cal-h200-dev15t.json);
#                                     # medium off with ROW_QUANTUM 0 / 128 / 0 / 128, seed dims 0 / 128;
#                                     # medium on; the block and the Megatron-Core peer
#   bash scripts/device/dev15t.sh U   # calibrate again (cal-h200-dev15u.json) and the five one-GPU
#                                     # runs for the predictions, each metrics file to $OUT as it ends
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log M=/tmp/metrics
mkdir -p $M
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # manifest micro-batches overlap limit steps quantum
  date; ROW_QUANTUM=$6 timeout $4 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$1-$3 --steps $5 --device cuda --seed 3 --micro-batches $2 --overlap $3 --async-checkpoints off >> $L 2>&1; echo $1 $3 q$6 rc=$?
  F=$M/m-$1-$3-q$6-$(date +%s).jsonl; cp /tmp/t-$1-$3/metrics.jsonl $F 2>/dev/null
  python3 scripts/device/train_components.py $F
  rm -rf /tmp/t-$1-$3; }
bench() {
  date; timeout 75 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
  grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-$1.json 2>/dev/null; }
if [ "$1" = T ]; then
  date; timeout 60 python3 scripts/device/check_row_quantum.py 2>&1 | tee -a $L
  MODELS="--model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml"
  date; /usr/bin/time -f "calibrate %e s" timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 $MODELS --out $OUT/cal-t.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
  train medium 1 off 40 20 0; train medium 1 off 40 20 128; train medium 1 off 40 20 0; train medium 1 off 40 20 128
  train seed2 2 off 90 8 0; train seed2 2 off 90 8 128
  train medium 1 on 40 20 128
  bench t
else
  MODELS="--model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml"
  date; /usr/bin/time -f "calibrate %e s" timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 $MODELS --out $OUT/cal-u.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
  for spec in "mixtral2 2 off 75 6" "seed4 4 off 95 6" "medium 1 off 40 20" "seed2 2 off 90 8" "medium 1 on 40 20"; do
    train $spec 128; cp $M/m-${spec%% *}-*.jsonl $OUT/ 2>/dev/null; done
fi
[ "$1" = T ] && tar -czf $OUT/metrics.tar.gz -C $M .
date
