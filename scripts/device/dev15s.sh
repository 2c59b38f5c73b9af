# One H200, 2026-12-03, call S (issue 15): where the medium model's host-bound time goes.
# `epplan calibrate` as call Q (kept as scripts/device/cal-h200-dev15s.json), the medium runs off
# and on (update inline, the default), the medium run profiled over steps 12-13 with its Chrome
# trace (profile_train.py, PROFILE_TRACE=1; trace_gaps.py), probe_fixed.py (the calls after the
# backward, one by one, tiny and full size), then seed dims and Mixtral dims for the predictions.
# The manifests are make_manifests15.sh's, carried as runs/. From the repository root, wheels in
# .whl/cp312/:
#   bash scripts/device/dev15s.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log M=/tmp/metrics
mkdir -p $M /tmp/prof
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
lscpu | grep -E "Model name|^CPU\(s\)|MHz" | tee -a $L
train() {  # manifest micro-batches overlap limit steps
  date; timeout $4 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$1-$3 --steps $5 --device cuda --seed 3 --micro-batches $2 --overlap $3 --async-checkpoints off >> $L 2>&1; echo $1 $3 rc=$?
  F=$M/m-$1-$3.jsonl; cp /tmp/t-$1-$3/metrics.jsonl $F 2>/dev/null
  python3 scripts/device/train_components.py $F
  rm -rf /tmp/t-$1-$3; }
MODELS="--model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml"
date; /usr/bin/time -f "calibrate %e s" timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 $MODELS --out $OUT/cal-s.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
train medium 1 off 45 20; train medium 1 on 40 20
date; PROFILE_TRACE=1 PROFILE_STEPS=12,13 timeout 50 torchrun --nproc-per-node 1 scripts/device/profile_train.py runs/h200-medium.json --out /tmp/prof --steps 14 --device cuda --seed 3 --micro-batches 1 --overlap off --async-checkpoints off > /tmp/prof/log 2>&1; echo profile rc=$?
timeout 30 python3 scripts/device/trace_gaps.py /tmp/prof/trace.json.gz --out /tmp/prof 2>&1 | tee -a $L | head -60
cp /tmp/prof/metrics.jsonl $M/m-medium-profiled.jsonl 2>/dev/null
tar -czf $OUT/prof.tar.gz -C /tmp/prof trace.json.gz kernels.csv.gz profile.txt log
date; timeout 60 python3 scripts/device/probe_fixed.py scripts/device/medium.yaml --full 2>&1 | tee -a $L
train seed2 2 off 95 8; train mixtral2 2 off 75 6
tar -czf $OUT/metrics.tar.gz -C $M .
date
