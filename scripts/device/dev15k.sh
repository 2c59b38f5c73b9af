# One H200, 2026-12-02, call K (issue 15): call J's one-run comparison of where the experts switch
# from torch._grouped_mm to one GEMM per expert, repeated: the block and the Megatron-Core peer,
# then epplan run at seed dims (2 layers, 16 experts, 8 x 10,000 tokens, 2 micro-batches, overlap
# off, 8 steps) on main's code (41de9d1) with the switch at 4,608 rows (its default) and at 8,192
# (LOOP_MIN_ROWS=8192, the previous default), interleaved A B A B. Checkpoints off
# (train_nockpt.py, --async-checkpoints off). From the device root, this tree carried as .perf15/
# with make_manifests15.sh's runs/, wheels in .whl/cp312/:
#   bash .perf15/scripts/device/dev15k.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
NEW=$PWD/.perf15 L=$OUT/all.log
cd $NEW && export PYTHONPATH=/tmp/site:$NEW
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # label loop-min-rows(or -)
  date; ( { [ "$2" = - ] || export LOOP_MIN_ROWS=$2; } && timeout 100 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-seed2.json --out /tmp/t-$1 --steps 8 --device cuda --seed 3 --micro-batches 2 --overlap off --async-checkpoints off >> $L 2>&1 ); echo $1 rc=$?
  cp /tmp/t-$1/metrics.jsonl $OUT/m-$1.jsonl 2>/dev/null; rm -rf /tmp/t-$1
  python3 scripts/device/train_components.py $OUT/m-$1.jsonl; }
date; timeout 75 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-k.json 2>/dev/null
train a1 -; train b1 8192; train a2 -; train b2 8192
date
