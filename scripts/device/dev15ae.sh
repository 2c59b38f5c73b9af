# One H200, 2026-12-04, call AE (issue 15): the seed dims again with the settings `epplan place`
# picks (fp32 moments, 1 micro-batch) and with 2 micro-batches (the setting before the memory
# model counted the step's peak), beside the block and the Megatron-Core 0.19.2 peer.
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15ae.sh
# Results in $OUT: m-*.jsonl, bench-ae.json, all.log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # manifest micro-batches(auto: the manifest's) overlap limit steps label
  echo "t=$(( $(date +%s) - T0 )) s: $6"; local mb="--micro-batches $2"; [ "$2" = auto ] && mb=""
  timeout $4 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$6 --steps $5 --device cuda --seed 3 $mb --overlap $3 --async-checkpoints off >> $L 2>&1; echo $6 rc=$?
  cp /tmp/t-$6/metrics.jsonl $OUT/m-$6.jsonl 2>/dev/null
  python3 scripts/device/train_components.py $OUT/m-$6.jsonl; grep -o "\"peak_memory_gb\":[0-9.]*" /tmp/t-$6/metrics.jsonl | tail -1
  rm -rf /tmp/t-$6; }
train seed2-auto auto off 110 8 seed2-auto
echo "t=$(( $(date +%s) - T0 )) s: bench"
timeout 90 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-ae.json 2>/dev/null
train seed2 2 off 110 8 seed2-mb2
train seed2-auto auto off 110 8 seed2-auto-again
echo "t=$(( $(date +%s) - T0 )) s: end"
