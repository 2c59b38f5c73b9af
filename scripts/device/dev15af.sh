# One H200, 2026-12-05, call AF (issue 15): call AD again on the final tree (a8c957d) with the
# Megatron-Core 0.19.2 peer beside the block: the loop at the seed dims in the settings `epplan
# place` picks, one calibration and the five configurations it predicts.
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15af.sh
# Results in $OUT: cal-af.json, m-*.jsonl, bench-af.json, all.log.
source scripts/device/lib15.sh
train seed2-auto auto off 110 8 seed2-auto
echo "t=$(( $(date +%s) - T0 )) s: bench"
timeout 90 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-af.json 2>/dev/null
echo "t=$(( $(date +%s) - T0 )) s: calibrate"
/usr/bin/time -f "calibrate %e s" timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-af.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
train medium 1 off 40 20 medium-off
train medium 1 on 40 20 medium-on
train mixtral2 2 off 75 6 mixtral2
train seed4 4 off 90 6 seed4
echo "t=$(( $(date +%s) - T0 )) s: end"
