# One H200, 2026-12-04, call AD (issue 15): the final tree's loop at the seed dims with the run
# settings `epplan place` picks (fp32 moments, 1 micro-batch since the memory model counts the
# step's peak), beside the block; one calibration and the five configurations of call Y it
# predicts, every run's allocator peak against the memory model.
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15ad.sh
# Results in $OUT: cal-ad.json, m-*.jsonl, bench-ad.json, all.log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log
T0=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # manifest micro-batches(auto: the manifest's) overlap limit steps label
  echo "t=$(( $(date +%s) - T0 )) s: $6"; local mb="--micro-batches $2"; [ "$2" = auto ] && mb=""
  timeout $4 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$6 --steps $5 --device cuda --seed 3 $mb --overlap $3 --async-checkpoints off >> $L 2>&1; echo $6 rc=$?
  cp /tmp/t-$6/metrics.jsonl $OUT/m-$6.jsonl 2>/dev/null
  python3 scripts/device/train_components.py $OUT/m-$6.jsonl; grep -o "\"peak_memory_gb\":[0-9.]*" /tmp/t-$6/metrics.jsonl | tail -1
  rm -rf /tmp/t-$6; }
train seed2-auto auto off 110 8 seed2-auto
echo "t=$(( $(date +%s) - T0 )) s: bench"
timeout 60 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-ad.json 2>/dev/null
echo "t=$(( $(date +%s) - T0 )) s: calibrate"
/usr/bin/time -f "calibrate %e s" timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-ad.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
train medium 1 off 40 20 medium-off
train medium 1 on 40 20 medium-on
train mixtral2 2 off 75 6 mixtral2
train seed4 4 off 90 6 seed4
echo "t=$(( $(date +%s) - T0 )) s: end"
