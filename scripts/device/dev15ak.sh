# Not run: no machine could be started after AJ on 2026-12-06. One H100, call AK (issue 15):
# after AJ, whose 4-layer seed run ran out of memory (the worker, run without `epplan run`, does
# not take the manifest's 4 micro-batches and attention recompute: here they are passed), with
# the calibration again in the same call and the medium runs again beside it (a second sample
# of AJ's).
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15ak.sh
# Results in $OUT: cal-ak.json, m-*.jsonl, all.log.
source scripts/device/lib15.sh
MANIFESTS=h100
echo "t=$(( $(date +%s) - T0 )) s: calibrate"
/usr/bin/time -f "calibrate %e s" timeout 200 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model scripts/device/seed2e8.yaml --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-ak.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
train seed4 4 off 110 6 seed4 --recompute attention
train medium 1 off 50 20 medium-off
train medium 1 on 40 20 medium-on
echo "t=$(( $(date +%s) - T0 )) s: end"
