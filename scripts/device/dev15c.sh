# One H200, 2026-12-02, call C (issue 15): the training loop before (main's code, the device
# root) and after (this tree, carried as .perf15/) at seed dims, same call; the after run with
# torch.profiler over steps 6-7; calibrate; Mixtral dims and the medium model; the block and the
# Megatron-Core peer (bench_runtime.py --peer megatron). Run from the device root:
#   bash .perf15/scripts/device/dev15c.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$PWD NEW=$PWD/.perf15 L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
summary() { python3 $NEW/scripts/device/train_components.py $1; }
train() {  # label tree script manifest micro-batches (prints the median step and components)
  date; ( cd $2 && PYTHONPATH=/tmp/site:$2 timeout 110 torchrun --nproc-per-node 1 $3 $NEW/runs/h200-$4.json --out /tmp/t-$1 --steps 8 --device cuda --seed 3 --micro-batches $5 --overlap off >> $L 2>&1 ); echo $1 rc=$?
  cp /tmp/t-$1/metrics.jsonl $OUT/m-$1.jsonl 2>/dev/null; cp /tmp/t-$1/profile.txt $OUT/profile-$1.txt 2>/dev/null; rm -rf /tmp/t-$1
  summary $OUT/m-$1.jsonl; }
train seed2-before $ROOT scripts/device/train_nockpt.py seed2 2
train seed2-after $NEW scripts/device/profile_train.py seed2 2
grep -m1 "fp32 output" $L
cd $NEW && export PYTHONPATH=/tmp/site:$NEW
date; timeout 70 python3 -m epplan calibrate --model seed --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-c.json >> $L 2>&1; echo calibrate rc=$?
date; timeout 80 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 3 --iters 4 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L
train mixtral2-after $NEW scripts/device/train_nockpt.py mixtral2 2
train medium-after $NEW scripts/device/train_nockpt.py medium 1
date
