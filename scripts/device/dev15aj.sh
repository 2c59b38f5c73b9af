# One H100, 2026-12-06, call AJ (issue 15): call AI's plan where only an H100 was lent: the
# calibration of 6d57e28 (the MoE layer and the LM head timed behind queued work, the routing work
# at two token counts), then the five configurations it predicts on the H100 manifests of
# make_manifests15.sh (the seed dims with 8 experts and 4 sequences, 2 and 4 layers; Mixtral's dims
# in 8 sequences; the medium model with overlap off and on).
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15aj.sh
# Results in $OUT: cal-aj.json, m-*.jsonl, all.log.
source scripts/device/lib15.sh
MANIFESTS=h100
echo "t=$(( $(date +%s) - T0 )) s: calibrate"
/usr/bin/time -f "calibrate %e s" timeout 200 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model scripts/device/seed2e8.yaml --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-aj.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
train medium 1 off 50 20 medium-off
train medium 1 on 40 20 medium-on
train seed2-auto auto off 90 8 seed2-auto
train mixtral2 2 off 75 6 mixtral2
train seed4 auto off 100 6 seed4
echo "t=$(( $(date +%s) - T0 )) s: end"
