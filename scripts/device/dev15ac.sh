# One H200, 2026-12-04, call AC (issue 15): on the final tree, AdamW's bf16 moments in the
# Triton kernel checked against the eager step; the seed dims with fp32 moments (2 micro-batches)
# and bf16 moments (1 micro-batch, as `epplan estimate` picks), beside the block; then one
# calibration and the medium model with overlap off and on, which it predicts with the seed dims.
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15ac.sh
# Results in $OUT: cal-ac.json, m-*.jsonl, bench-ac.json, all.log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
date; timeout 90 python3 scripts/device/check_adamw_bf16.py 2>&1 | tee -a $L | tail -10
train() {  # manifest micro-batches overlap limit steps label
  date; timeout $4 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$6 --steps $5 --device cuda --seed 3 --micro-batches $2 --overlap $3 --async-checkpoints off >> $L 2>&1; echo $6 rc=$?
  cp /tmp/t-$6/metrics.jsonl $OUT/m-$6.jsonl 2>/dev/null
  python3 scripts/device/train_components.py $OUT/m-$6.jsonl; grep -o "\"peak_memory_gb\":[0-9.]*" /tmp/t-$6/metrics.jsonl | tail -1
  rm -rf /tmp/t-$6; }
train seed2 2 off 110 8 seed2-off
date; timeout 60 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-ac.json 2>/dev/null
train seed2-bf16 1 off 110 8 seed2-bf16-mb1
date; /usr/bin/time -f "calibrate %e s" timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model seed --model scripts/device/medium.yaml --out $OUT/cal-ac.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
train medium 1 off 45 20 medium-off
train medium 1 on 45 20 medium-on
date
