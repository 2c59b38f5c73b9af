# One H200, 2026-12-05, call AG (issue 15), right after AF on the same machine where it stays
# warm: where the MoE layer's over-prediction comes from (probe_moe15.py, the three shapes at
# their training tokens), the optimizer's host parts at full size (probe_fixed.py), the
# Megatron-Core 0.19.2 peer again and the loop in the settings `epplan place` picks again.
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15ag.sh
# Results in $OUT: m-*.jsonl, bench-ag.json, all.log.
source scripts/device/lib15.sh
echo "t=$(( $(date +%s) - T0 )) s: probe"
timeout 150 torchrun --nproc-per-node 1 scripts/device/probe_moe15.py scripts/device/medium.yaml 32768 seed 80000 scripts/device/seed4.yaml 20000 2>&1 | grep -v Warning | tee -a $L | tail -4
timeout 60 python3 scripts/device/probe_fixed.py scripts/device/medium.yaml --full 2>&1 | tee -a $L | tail -12
echo "t=$(( $(date +%s) - T0 )) s: bench"
timeout 90 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-ag.json 2>/dev/null
train seed2-auto auto off 110 8 seed2-auto
echo "t=$(( $(date +%s) - T0 )) s: end"
