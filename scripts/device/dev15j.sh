# One H200, 2026-12-02, call J (issue 15): the block and the Megatron-Core peer; epplan run
# at seed dims on main's code (the device root) and on this tree (carried as .perf15/: the router
# in fp32, the position embeddings as a slice, one GEMM per expert from 4,608 rows per expert), and
# this tree with the old switch at 8,192 rows (LOOP_MIN_ROWS=8192, train_nockpt.py), same call;
# probe_gap15.py --skip-halves (the experts grouped vs one GEMM per expert, 2,048-10,000 rows per
# expert); probe_adamw.py on two tensors of 1.07 G parameters (the experts' size in training).
# Checkpoints off in every run (--async-checkpoints off, train_nockpt.py). From the device root,
# wheels in .whl/cp312/:
#   bash .perf15/scripts/device/dev15j.sh J      (call J; another label runs the block and the
#                                                three trainings alone)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$PWD NEW=$PWD/.perf15 L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # label tree loop-min-rows(or -) manifest micro-batches steps limit
  date; ( cd $2 && export PYTHONPATH=/tmp/site:$2 && { [ "$3" = - ] || export LOOP_MIN_ROWS=$3; } && timeout $7 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py $NEW/runs/h200-$4.json --out /tmp/t-$1 --steps $6 --device cuda --seed 3 --micro-batches $5 --overlap off --async-checkpoints off >> $L 2>&1 ); echo $1 rc=$?
  cp /tmp/t-$1/metrics.jsonl $OUT/m-$1.jsonl 2>/dev/null; rm -rf /tmp/t-$1
  python3 $NEW/scripts/device/train_components.py $OUT/m-$1.jsonl; }
bench() {  # the block (reference, one GPU) and the peer's MoE layer against ours
  date; ( cd $NEW && PYTHONPATH=/tmp/site:$NEW timeout 75 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1 ); echo bench rc=$?
  grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/$1 2>/dev/null; }
bench bench-$1.json
train seed2-main $ROOT - seed2 2 6 100
train seed2-new $NEW - seed2 2 8 100
train seed2-new8192 $NEW 8192 seed2 2 8 100
grep -m2 "LOOP_MIN_ROWS" $L
if [ "$1" = J ]; then
  date; ( cd $NEW && PYTHONPATH=/tmp/site:$NEW timeout 90 torchrun --nproc-per-node 1 scripts/device/probe_gap15.py --skip-halves --out $OUT >> $L 2>&1 ); echo probe_gap rc=$?
  cat $OUT/probe-gap15.txt
  date; ( cd $NEW && PYTHONPATH=/tmp/site:$NEW timeout 60 python3 scripts/device/probe_adamw.py --params 2147483648 >> $L 2>&1 ); echo probe_adamw rc=$?
  grep -E "^(correctness|adamw|ms per)" $L
fi
date
