# One GPU, call AN (issue 15): call AL's plan without its head probe (call AM measured it): the
# calibration of the four models in the same call, then the five configurations on the H100
# manifests (the 4-layer seed dims with the manifest's 4 micro-batches and attention recompute
# passed to the worker, Mixtral's dims, the 2-layer seed dims, the medium model with overlap off
# and on, 60 steps each so the card reaches steady power), the SM clock and power logged.
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15an.sh
# Results in $OUT: smi.csv, cal-an.json, m-*.jsonl, all.log.
source scripts/device/lib15.sh
MANIFESTS=h100
clock_log
stamp "calibrate"
/usr/bin/time -f "calibrate %e s" timeout 230 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model scripts/device/seed2e8.yaml --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-an.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
stamp "seed4"; train seed4 4 off 100 6 seed4 --recompute attention
stamp "mixtral2"; train mixtral2 2 off 70 6 mixtral2
stamp "seed2-auto"; train seed2-auto auto off 80 8 seed2-auto
stamp "medium-off"; train medium 1 off 50 60 medium-off
stamp "medium-on"; train medium 1 on 45 60 medium-on
stamp "end"
