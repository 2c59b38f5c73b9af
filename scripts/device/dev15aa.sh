# One H200, 2026-12-04, call AA (issue 15): the loop's idle time and its cross-entropy, main
# (d1f1215, unpacked in base/ by `git archive d1f1215 | tar -x -C base`) against this tree in
# the same call: the Triton cross-entropy checked against the eager one and timed against
# torch.compile's; the seed dims trained by each tree, one after the other; this tree's step
# under the profiler (kernels and idle gaps); the block (the loop against the block).
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15aa.sh
# Results in $OUT: m-seed2-base.jsonl, m-seed2-new.jsonl, profile.txt, gaps.txt, bench-aa.json, all.log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
date; PYTHONPATH=/tmp/site:$PWD timeout 60 python3 scripts/device/check_loss_rows.py 2>&1 | tee -a $L | tail -12
train() {  # tree label
  date; (cd $1 && PYTHONPATH=/tmp/site:$PWD timeout 120 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py $OLDPWD/runs/h200-seed2.json --out /tmp/t-$2 --steps 8 --device cuda --seed 3 --micro-batches 2 --overlap off --async-checkpoints off >> $L 2>&1); echo $2 rc=$?
  cp /tmp/t-$2/metrics.jsonl $OUT/m-seed2-$2.jsonl 2>/dev/null
  PYTHONPATH=/tmp/site:$PWD python3 scripts/device/train_components.py $OUT/m-seed2-$2.jsonl; }
train base base
train . new
export PYTHONPATH=/tmp/site:$PWD
date; PROFILE_STEPS=5,5 PROFILE_TRACE=1 timeout 100 torchrun --nproc-per-node 1 scripts/device/profile_train.py runs/h200-seed2.json --out /tmp/p --steps 5 --device cuda --seed 3 --micro-batches 2 --overlap off --async-checkpoints off >> $L 2>&1; echo profile rc=$?
cp /tmp/p/profile.txt $OUT/ 2>/dev/null
python3 scripts/device/trace_gaps.py /tmp/p/trace.json.gz --out /tmp/p > $OUT/gaps.txt 2>&1; head -14 $OUT/gaps.txt
date; timeout 80 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-aa.json 2>/dev/null
date
