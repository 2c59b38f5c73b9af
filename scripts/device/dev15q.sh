# One H200, 2026-12-03, call Q (issue 15): `epplan calibrate` holding the card at its sustained
# clock (--sustain 1, the default: each part timed after 1 s of back-to-back GEMMs), kept as
# scripts/device/cal-h200-dev15q.json, then call N's five one-GPU runs (make_manifests15.sh's
# manifests, carried as runs/) for the predictions, then the same calibration with --sustain 0
# (as calibrate timed before), kept as cal-h200-dev15q0.json. From the repository root, wheels in
# .whl/cp312/:
#   bash scripts/device/dev15q.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log M=/tmp/metrics
mkdir -p $M
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -lms 200 > $OUT/smi.csv &
SMI=$!
train() {  # manifest micro-batches overlap limit steps
  date; timeout $4 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$1-$3 --steps $5 --device cuda --seed 3 --micro-batches $2 --overlap $3 --async-checkpoints off >> $L 2>&1; echo $1 $3 rc=$?
  F=$M/m-$1-$3.jsonl; cp /tmp/t-$1-$3/metrics.jsonl $F 2>/dev/null
  python3 scripts/device/train_components.py $F
  rm -rf /tmp/t-$1-$3; }
MODELS="--model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml"
date; /usr/bin/time -f "calibrate %e s" timeout 200 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 $MODELS --out $OUT/cal-q.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
train seed2 2 off 95 8; train seed4 4 off 95 6; train mixtral2 2 off 75 6; train medium 1 off 45 20; train medium 1 on 40 20
date; /usr/bin/time -f "calibrate %e s" timeout 120 python3 -m epplan calibrate --sustain 0 --iters 3 --rows 512,1024,2048,4096,8192,16384 $MODELS --out $OUT/cal-q0.json >> $L 2>&1; echo calibrate sustain 0 rc=$?; tail -1 $L
kill $SMI
tar -czf $OUT/metrics.tar.gz -C $M .
date
