# One H200, 2026-12-02, call L (issue 15): main's code (8876352 and the profiler's trace export)
# measured whole: epplan calibrate (kept as scripts/device/cal-h200-dev15l.json), the one-GPU
# manifests of make_manifests15.sh (made here with this code, carried as runs/) through epplan
# run's worker without checkpoints, seed dims under profile_train.py with step 7 kept as a Chrome
# trace (trace_gaps.py: the GPU's idle gaps), the block and the Megatron-Core peer. From the
# repository root, wheels in .whl/cp312/:
#   bash scripts/device/dev15l.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD L=$OUT/all.log M=/tmp/metrics
mkdir -p $M
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # manifest micro-batches overlap limit steps [script]
  date; timeout $4 torchrun --nproc-per-node 1 scripts/device/${6:-train_nockpt.py} runs/h200-$1.json --out /tmp/t-$1-$3 --steps $5 --device cuda --seed 3 --micro-batches $2 --overlap $3 --async-checkpoints off >> $L 2>&1; echo $1 $3 rc=$?
  cp /tmp/t-$1-$3/metrics.jsonl $M/m-$1-$3${6:+-prof}.jsonl 2>/dev/null
  python3 scripts/device/train_components.py $M/m-$1-$3${6:+-prof}.jsonl
  if [ -n "$6" ]; then cp /tmp/t-$1-$3/profile.txt $OUT/ 2>/dev/null
    python3 scripts/device/trace_gaps.py /tmp/t-$1-$3/trace.json.gz --out $OUT 2>&1 | tee -a $L; fi
  rm -rf /tmp/t-$1-$3; }
date; timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-l.json >> $L 2>&1; echo calibrate rc=$?
PROFILE_STEPS=7,7 PROFILE_TRACE=1 train seed2 2 off 110 9 profile_train.py
date; timeout 75 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-l.json 2>/dev/null
train seed2 2 off 95 8
train seed4 4 off 95 6
train mixtral2 2 off 75 6
train medium 1 off 45 20
train medium 1 on 40 20
tar -czf $OUT/metrics.tar.gz -C $M .
date
