# One H200, 2026-12-04, call Y (issue 15): call W's runs again, on the multi-tensor AdamW
# (78d5c73 on): one calibration and, in the same call, the five one-GPU runs it predicts (seed
# dims 2 and 4 layers, Mixtral-8x7b dims, medium overlap off and on), the block and the
# Megatron-Core peer beside the seed-dims run (the loop against the block).
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15y.sh
# Each result goes to $OUT as it ends (8 files: cal-y.json, bench-y.json, m-*.jsonl, all.log).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # manifest micro-batches overlap limit steps
  date; timeout $4 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$1-$3 --steps $5 --device cuda --seed 3 --micro-batches $2 --overlap $3 --async-checkpoints off >> $L 2>&1; echo $1 $3 rc=$?
  cp /tmp/t-$1-$3/metrics.jsonl $OUT/m-$1-$3.jsonl 2>/dev/null
  python3 scripts/device/train_components.py $OUT/m-$1-$3.jsonl
  rm -rf /tmp/t-$1-$3; }
MODELS="--model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml"
date; /usr/bin/time -f "calibrate %e s" timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 $MODELS --out $OUT/cal-y.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
train seed2 2 off 120 8
date; timeout 80 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-y.json 2>/dev/null
train mixtral2 2 off 75 6
train seed4 4 off 90 6
train medium 1 off 40 20
train medium 1 on 40 20
date
