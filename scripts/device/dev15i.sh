# One H200, 2026-12-02, call I (issue 15): the block and the Megatron-Core peer; epplan run at seed
# dims on main's code (the device root; issue 21's "TP=1 path did not slow down" against call H's
# 0.831 s) and on this tree (carried as .perf15/: the router in fp32 under autocast), the latter
# with torch.profiler over steps 9-10 of 10, by kernel and by input shape; probe_gap15.py (the
# block's halves in the block's and the loop's precision and micro-batching, the weight-gradient
# GEMM's variants); probe_adamw.py with its first compiled call at 1 M and at 537 M parameters.
# Checkpoints off in every run (--async-checkpoints off, train_nockpt.py). From the device root,
# wheels in .whl/cp312/:
#   bash .perf15/scripts/device/dev15i.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$PWD NEW=$PWD/.perf15 L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
git -C $ROOT log --oneline -1 2>/dev/null | tee -a $L
train() {  # label tree script manifest micro-batches steps limit
  date; ( cd $2 && PYTHONPATH=/tmp/site:$2 PROFILE_STEPS=9,10 PROFILE_SHAPES=1 timeout $7 torchrun --nproc-per-node 1 $3 $NEW/runs/h200-$4.json --out /tmp/t-$1 --steps $6 --device cuda --seed 3 --micro-batches $5 --overlap off --async-checkpoints off >> $L 2>&1 ); echo $1 rc=$?
  cp /tmp/t-$1/metrics.jsonl $OUT/m-$1.jsonl 2>/dev/null; cp /tmp/t-$1/profile.txt $OUT/profile.txt 2>/dev/null
  cp /tmp/t-$1/profile-shapes.txt $OUT/profile-shapes.txt 2>/dev/null; rm -rf /tmp/t-$1
  python3 $NEW/scripts/device/train_components.py $OUT/m-$1.jsonl; }
bench() {  # the block (reference, one GPU) and the peer's MoE layer against ours
  date; ( cd $NEW && PYTHONPATH=/tmp/site:$NEW timeout 75 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1 ); echo bench rc=$?
  grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/$1 2>/dev/null; }
bench bench-i.json
train seed2-main $ROOT scripts/device/train_nockpt.py seed2 2 6 100
train seed2-new $NEW scripts/device/profile_train.py seed2 2 10 130
head -32 $OUT/profile.txt 2>/dev/null | cut -c1-160
date; ( cd $NEW && PYTHONPATH=/tmp/site:$NEW timeout 120 torchrun --nproc-per-node 1 scripts/device/probe_gap15.py --out $OUT >> $L 2>&1 ); echo probe_gap rc=$?
cat $OUT/probe-gap15.txt
for first in 0 536870912; do date; ( cd $NEW && PYTHONPATH=/tmp/site:$NEW timeout 50 python3 scripts/device/probe_adamw.py --first-params $first >> $L 2>&1 ); echo probe_adamw first=$first rc=$?; done
grep -E "^(correctness|adamw|ms per|first)" $L
date
