# One H200, 2026-12-04, call AB (issue 15): AdamW's moments in bf16 (optimizer_state_dtype),
# checked against the eager step, and the seed dims trained with fp32 moments (2 micro-batches),
# bf16 moments (2 micro-batches) and bf16 moments in the 1 micro-batch `epplan estimate` picks
# for them, beside the block (the loop against the block), one call.
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15ab.sh
# Results in $OUT: m-seed2-*.jsonl, bench-ab.json, all.log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
date; timeout 90 python3 scripts/device/check_adamw_bf16.py 2>&1 | tee -a $L | tail -12
train() {  # manifest micro-batches label
  date; timeout 120 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$3 --steps 8 --device cuda --seed 3 --micro-batches $2 --overlap off --async-checkpoints off >> $L 2>&1; echo $3 rc=$?
  cp /tmp/t-$3/metrics.jsonl $OUT/m-$3.jsonl 2>/dev/null
  python3 scripts/device/train_components.py $OUT/m-$3.jsonl; grep -o "\"peak_memory_gb\":[0-9.]*" /tmp/t-$3/metrics.jsonl | tail -1
  rm -rf /tmp/t-$3; }
train seed2 2 seed2-fp32
date; timeout 80 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-ab.json 2>/dev/null
train seed2-bf16 2 seed2-bf16
train seed2-bf16 1 seed2-bf16-mb1
date
