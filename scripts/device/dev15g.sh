# One H200, 2026-12-02, call G (issue 15): epplan calibrate (this call's rates, kept as
# scripts/device/cal-h200-dev15g.json), the one-GPU manifests of make_manifests15.sh through
# epplan run's worker without checkpoints (train_nockpt.py, --async-checkpoints off), the block
# and the Megatron-Core peer, and probe_adamw.py timed again (each variant twice, interleaved).
# Run from the device root (this tree carried as .perf15/, wheels as .whl/cp312/):
#   bash .perf15/scripts/device/dev15g.sh G      (call G)
#   bash .perf15/scripts/device/dev15g.sh H      (call H: calibrate for the medium model and its two
#                                                runs over 20 steps (6 were still warming up in G),
#                                                the block and the peer, seed dims, the probe)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
cd .perf15 && export PYTHONPATH=/tmp/site:$PWD && L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # manifest micro-batches overlap limit [steps]
  date; timeout $4 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$1.json --out /tmp/t-$1-$3 --steps ${5:-6} --device cuda --seed 3 --micro-batches $2 --overlap $3 --async-checkpoints off >> $L 2>&1; echo $1 $3 rc=$?
  cp /tmp/t-$1-$3/metrics.jsonl $OUT/m-$1-$3.jsonl 2>/dev/null; rm -rf /tmp/t-$1-$3
  python3 scripts/device/train_components.py $OUT/m-$1-$3.jsonl; }
bench() {  # the block (reference, one GPU) and the peer's MoE layer against ours
  date; timeout 75 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1; echo bench rc=$?
  grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/$1 2>/dev/null; }
probe() { date; timeout 50 python3 scripts/device/probe_adamw.py >> $L 2>&1; echo probe rc=$?; grep -E "^(correctness|adamw|ms per)" $L; }
if [ "$1" = H ]; then
  date; timeout 80 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model scripts/device/medium.yaml --out $OUT/cal-h.json >> $L 2>&1; echo calibrate rc=$?
  train medium 1 off 50 20; train medium 1 on 50 20; bench bench-h.json; train seed2 2 off 95; probe; date; exit; fi
date; timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-g.json >> $L 2>&1; echo calibrate rc=$?
grep -E "attention half|moe_local|memory-bound|LM head|fixed cost" $L
train seed2 2 off 95
bench bench-g.json
train seed4 4 off 95
train mixtral2 2 off 75
train medium 1 off 45
train medium 1 on 40
date
