# Not run: no machine could be started for it on 2026-12-07 (01:38-02:35 UTC, seven tries; one start
# was taken back mid-call); dev15am.sh is its cut to the device time left. One GPU, call AL
# (issue 15): AK's plan (the calibration in the same call, the five configurations on the H100
# manifests, the 4-layer run with the manifest's 4 micro-batches and
# attention recompute passed to the worker) with the card's SM clock, power and throttle reasons
# logged every 100 ms for the whole call, and first the LM head timed after GEMMs (as calibrate
# did before) and after its model's own block (as it does now; probe_head15.py): call AJ's medium
# head was calibrated at 588 TFLOP/s and ran at 667 in training.
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15al.sh
# Results in $OUT: smi.csv, cal-al.json, m-*.jsonl, all.log.
source scripts/device/lib15.sh
MANIFESTS=h100
clock_log
stamp "probe_head15"
timeout 60 python3 scripts/device/probe_head15.py 2>&1 | tee -a $L | grep head
stamp "calibrate"
/usr/bin/time -f "calibrate %e s" timeout 200 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model scripts/device/seed2e8.yaml --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-al.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
stamp "medium-off"; train medium 1 off 50 20 medium-off
stamp "medium-on"; train medium 1 on 40 20 medium-on
stamp "seed2-auto"; train seed2-auto auto off 90 8 seed2-auto
stamp "mixtral2"; train mixtral2 2 off 75 6 mixtral2
stamp "seed4"; train seed4 4 off 110 6 seed4 --recompute attention
stamp "end"
