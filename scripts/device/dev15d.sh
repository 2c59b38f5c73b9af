# One H200, call D (issue 15): calibrate (the same call's rates), then the one-GPU manifests of
# make_manifests15.sh through epplan run's worker without checkpoints (train_nockpt.py; pinned
# checkpoint staging off: --async-checkpoints off), medium with overlap off and on; the block and
# the Megatron-Core peer (bench_runtime.py --peer megatron). Call E, right after D on the same
# warm machine, runs only the block and the peer once more and the seed dims 2-layer run beside
# them (the third --peer megatron call). Run from the device root (this tree carried as .perf15/,
# wheels as .whl/):
#   bash .perf15/scripts/device/dev15d.sh D
#   bash .perf15/scripts/device/dev15d.sh E
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
cd .perf15 && export PYTHONPATH=/tmp/site:$PWD && L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # manifest micro-batches overlap
  date; timeout 50 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$1-$3 --steps 6 --device cuda --seed 3 --micro-batches $2 --overlap $3 --async-checkpoints off >> $L 2>&1; echo $1 $3 rc=$?
  cp /tmp/t-$1-$3/metrics.jsonl $OUT/m-$1-$3.jsonl 2>/dev/null; rm -rf /tmp/t-$1-$3
  python3 scripts/device/train_components.py $OUT/m-$1-$3.jsonl; }
bench() {  # the block (reference, one GPU) and the peer's MoE layer against ours
  date; timeout 70 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
  grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/$1 2>/dev/null; }
if [ "$1" = E ]; then bench bench-e.json; train seed2 2 off; date; exit; fi
date; timeout 100 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model seed --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-d.json >> $L 2>&1; echo calibrate rc=$?
grep -E "attention half|moe_local|memory-bound" $L
train seed2 2 off
train seed4 4 off
train mixtral2 2 off
train medium 1 off
train medium 1 on
bench bench-d.json
date
