# One GPU, call AM (issue 15): call AL's plan cut to the 464 s of device time left on 2026-12-07
# (AL never started): the LM head after GEMMs and after its model's own block (probe_head15.py),
# the calibration of the seed dims' and the medium model (the head now timed after its block)
# and the three runs it predicts, with the card's SM clock and power logged every 100 ms.
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15am.sh
# Results in $OUT: smi.csv, cal-am.json, m-*.jsonl, all.log. (As run, but for its clock log and
# stamp lines, since moved into lib15.sh as clock_log and stamp: the same commands.)
source scripts/device/lib15.sh
MANIFESTS=h100
clock_log
stamp "probe_head15"
timeout 60 python3 scripts/device/probe_head15.py 2>&1 | tee -a $L | grep head
stamp "calibrate"
/usr/bin/time -f "calibrate %e s" timeout 120 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model scripts/device/seed2e8.yaml --model scripts/device/medium.yaml --out $OUT/cal-am.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
stamp "medium-off"; train medium 1 off 50 20 medium-off
stamp "medium-on"; train medium 1 on 40 20 medium-on
stamp "seed2-auto"; train seed2-auto auto off 90 8 seed2-auto
stamp "end"
