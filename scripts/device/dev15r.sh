# One H200, 2026-12-03, call R (issue 15): the optimizer's update behind the next forward
# (epplan/train/step_behind.py) and the pinned batch copy. In order of what matters most, every
# result written to $OUT as it comes: check_step_behind.py (bitwise against the inline step), seed
# dims (2 layers, 16 experts, 8 x 10,000 tokens, 2 micro-batches) with the update behind, the block
# and the Megatron-Core peer (bench_runtime.py, as call M), the same seed run with the update inline
# (STEP_BEHIND=0), `epplan calibrate` (as call Q, with the timer's fixes: kept as
# scripts/device/cal-h200-dev15r.json), then call N's four other runs for the predictions. The
# manifests are make_manifests15.sh's, carried as runs/. From the repository root, wheels in
# .whl/cp312/:
#   bash scripts/device/dev15r.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD STEP_BEHIND=1  # the call ran with the update behind as the default
L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # manifest micro-batches overlap limit steps label
  date; timeout $4 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$1-$3 --steps $5 --device cuda --seed 3 --micro-batches $2 --overlap $3 --async-checkpoints off >> $L 2>&1; RC=$?; echo $1 $3 $6 rc=$RC
  F=$OUT/m-$1-$3-$6.jsonl; cp /tmp/t-$1-$3/metrics.jsonl $F 2>/dev/null
  python3 scripts/device/train_components.py $F
  rm -rf /tmp/t-$1-$3; }
date; timeout 80 python3 scripts/device/check_step_behind.py 2>&1 | tee -a $L
train seed2 2 off 95 8 behind
[ "$RC" = 0 ] || { export STEP_BEHIND=0; echo "the update behind failed: the other runs step inline"; }
date; timeout 75 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench.json 2>/dev/null
( export STEP_BEHIND=0; train seed2 2 off 95 8 inline )
MODELS="--model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml"
date; /usr/bin/time -f "calibrate %e s" timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 $MODELS --out $OUT/cal-r.json >> $L 2>&1; echo calibrate rc=$?; tail -1 $L
train mixtral2 2 off 70 6 behind; train medium 1 off 40 20 behind; train medium 1 on 40 20 behind; train seed4 4 off 90 6 behind
date
