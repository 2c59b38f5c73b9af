# Not run: no H200 could be started on 2026-12-06 (call AJ ran this plan on an H100). One H200,
# call AI (issue 15): the calibration of call AH (the MoE layer and the LM head timed behind
# queued work, the routing work at two token counts) on the card the seed-dims manifests were
# made for (call AH got an H100, where they do not fit), then the five configurations it
# predicts, the medium model first.
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15ai.sh
# Results in $OUT: cal-ai.json, m-*.jsonl, all.log.
source scripts/device/lib15.sh
echo "t=$(( $(date +%s) - T0 )) s: calibrate"
/usr/bin/time -f "calibrate %e s" timeout 200 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-ai.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
train medium 1 off 50 20 medium-off
train medium 1 on 40 20 medium-on
train seed2-auto auto off 110 8 seed2-auto
train mixtral2 2 off 75 6 mixtral2
train seed4 4 off 90 6 seed4
echo "t=$(( $(date +%s) - T0 )) s: end"
