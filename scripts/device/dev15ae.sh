# One H200, 2026-12-04, call AE (issue 15): the seed dims again with the settings `epplan place`
# picks (fp32 moments, 1 micro-batch) and with 2 micro-batches (the setting before the memory
# model counted the step's peak), beside the block and the Megatron-Core 0.19.2 peer.
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15ae.sh
# Results in $OUT: m-*.jsonl, bench-ae.json, all.log.
source scripts/device/lib15.sh
train seed2-auto auto off 110 8 seed2-auto
echo "t=$(( $(date +%s) - T0 )) s: bench"
timeout 90 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-ae.json 2>/dev/null
train seed2 2 off 110 8 seed2-mb2
train seed2-auto auto off 110 8 seed2-auto-again
echo "t=$(( $(date +%s) - T0 )) s: end"
