# One H200, 2026-12-02, call F (issue 15): the training loop at seed dims before (main's code, the
# device root) and after (this tree, carried as .perf15/: the bf16 residual stream, the one-pass
# AdamW that re-casts the bf16 copies), the after run with torch.profiler over steps 9-10 of 10; the
# one-pass AdamW checked against float64 and timed against torch's fused AdamW + re-cast
# (probe_adamw.py); the block and the Megatron-Core peer, same call. Checkpoints off in every run
# (--async-checkpoints off, train_nockpt.py). Run from the device root, wheels in .whl/cp312/:
#   bash .perf15/scripts/device/dev15f.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$PWD NEW=$PWD/.perf15 L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # label tree script manifest micro-batches steps limit
  date; ( cd $2 && PYTHONPATH=/tmp/site:$2 PROFILE_STEPS=9,10 timeout $7 torchrun --nproc-per-node 1 $3 $NEW/runs/h200-$4.json --out /tmp/t-$1 --steps $6 --device cuda --seed 3 --micro-batches $5 --overlap off --async-checkpoints off >> $L 2>&1 ); echo $1 rc=$?
  cp /tmp/t-$1/metrics.jsonl $OUT/m-$1.jsonl 2>/dev/null; cp /tmp/t-$1/profile.txt $OUT/profile-$1.txt 2>/dev/null; rm -rf /tmp/t-$1
  python3 $NEW/scripts/device/train_components.py $OUT/m-$1.jsonl; }
bench() {  # the block (reference, one GPU) and the peer's MoE layer against ours
  date; ( cd $NEW && PYTHONPATH=/tmp/site:$NEW timeout 75 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1 ); echo bench rc=$?
  grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/$1 2>/dev/null; }
date; ( cd $NEW && PYTHONPATH=/tmp/site:$NEW timeout 60 python3 scripts/device/probe_adamw.py >> $L 2>&1 ); echo probe rc=$?; grep -E "^(correctness|adamw)" $L
train seed2-before $ROOT scripts/device/train_nockpt.py seed2 2 6 100
train seed2-after $NEW scripts/device/profile_train.py seed2 2 10 120
grep -m1 "fp32 output" $L
head -30 $OUT/profile-seed2-after.txt 2>/dev/null | cut -c1-150
bench bench-f.json
date
