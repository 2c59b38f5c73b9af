# Sourced by the issue-15 device scripts from call AE on (calls before it kept their own copy of
# these lines, as they ran): the wheels, the environment every program on the machine gets, and
# train(), one `epplan run` worker with its metrics copied to $OUT and summarised (the manifest
# runs/$MANIFESTS-NAME.json, h200 unless MANIFESTS is set); from call AM on, clock_log (the SM
# clock, power and throttle reasons every 100 ms into $OUT/smi.csv until the script ends) and
# stamp LABEL (the seconds since the start and the UTC time, into the log).
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # manifest micro-batches(auto: the worker's default, 1) overlap limit steps label [worker flags]
  echo "t=$(( $(date +%s) - T0 )) s: $6"; local mb="--micro-batches $2"; [ "$2" = auto ] && mb=""
  timeout $4 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/${MANIFESTS:-h200}-$1.json --out /tmp/t-$6 --steps $5 --device cuda --seed 3 $mb --overlap $3 --async-checkpoints off "${@:7}" >> $L 2>&1; echo $6 rc=$?
  cp /tmp/t-$6/metrics.jsonl $OUT/m-$6.jsonl 2>/dev/null
  python3 scripts/device/train_components.py $OUT/m-$6.jsonl; grep -o "\"peak_memory_gb\":[0-9.]*" /tmp/t-$6/metrics.jsonl | tail -1
  rm -rf /tmp/t-$6; }
clock_log() {
  nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu,clocks_throttle_reasons.active --format=csv -lms 100 > $OUT/smi.csv 2>&1 &
  trap "kill $! 2>/dev/null" EXIT; }
stamp() { echo "t=$(( $(date +%s) - T0 )) s ($(date -u +%T)): $1" | tee -a $L; }
