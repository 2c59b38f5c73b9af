# One H200, 2026-12-02, call L (issue 15): the gather-based dispatch gather and combine
# (epplan/runtime/combine.py, this tree) against the index_add scatter (main at 1a9c474, carried as
# .perf15/), same call: epplan calibrate on this tree (kept as scripts/device/cal-h200-dev15l.json),
# seed dims (2 layers, 16 experts, 8 x 10,000 tokens, 2 micro-batches) on this tree under
# profile_train.py with step 7 kept as a Chrome trace (trace_gaps.py: the GPU's idle gaps) and on
# 1a9c474, the block and the Megatron-Core peer on both. The manifests are make_manifests15.sh's,
# made with this code and carried as runs/ (and .perf15/runs/). From the repository root, wheels in
# .whl/cp312/:
#   bash scripts/device/dev15l.sh L      (call L)
#   bash scripts/device/dev15l.sh M      (call M: the combine's gather-sum compiled, checked against
#                                        its eager form on the GPU; the block and the peer on both
#                                        trees; seed dims on both, interleaved new old new old)
#   bash scripts/device/dev15l.sh N      (call N: calibrate on this tree, kept as
#                                        scripts/device/cal-h200-dev15n.json, and the five one-GPU
#                                        runs, for the predictions)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
ROOT=$PWD OLD=$PWD/.perf15 L=$OUT/all.log M=/tmp/metrics
mkdir -p $M
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # manifest micro-batches overlap limit steps [script]  (in the tree of $TREE)
  date; ( cd ${TREE:-$ROOT} && export PYTHONPATH=/tmp/site:${TREE:-$ROOT} && timeout $4 torchrun --nproc-per-node 1 scripts/device/${6:-train_nockpt.py} runs/h200-$1.json --out /tmp/t-$1-$3 --steps $5 --device cuda --seed 3 --micro-batches $2 --overlap $3 --async-checkpoints off >> $L 2>&1 ); echo $1 $3 ${TREE:-new} rc=$?
  F=$M/m-$1-$3${6:+-prof}${TREE:+-old}-$RUN.jsonl; cp /tmp/t-$1-$3/metrics.jsonl $F 2>/dev/null
  python3 scripts/device/train_components.py $F
  if [ -n "$6" ]; then cp /tmp/t-$1-$3/profile.txt $OUT/ 2>/dev/null
    python3 scripts/device/trace_gaps.py /tmp/t-$1-$3/trace.json.gz --out $OUT 2>&1 | tee -a $L; fi
  rm -rf /tmp/t-$1-$3; }
bench() {  # label tree: the block (reference, one GPU) and the peer's MoE layer against ours
  date; ( cd $2 && export PYTHONPATH=/tmp/site:$2 && timeout 75 torchrun --nproc-per-node 1 scripts/bench_runtime.py --rounds 2 --iters 3 --variants reference --skip nccl,check,interference,a2a,gemm,sdpa --sdpa CUDNN_ATTENTION --peer megatron --out /tmp/b > /tmp/bench.log 2>&1 ); echo bench $1 rc=$?
  grep -E "^(reference|halves|peer) " /tmp/bench.log | cut -c1-330; cat /tmp/bench.log >> $L; cp /tmp/b/bench_runtime.json $OUT/bench-$1.json 2>/dev/null; }
export PYTHONPATH=/tmp/site:$ROOT RUN=1
if [ "$1" = M ]; then
  date; timeout 120 python3 scripts/device/check_combine.py 2>&1 | tee -a $L
  bench new $ROOT; bench old $OLD
  RUN=1 train seed2 2 off 95 8; TREE=$OLD RUN=1 train seed2 2 off 95 8
  RUN=2 train seed2 2 off 95 8; TREE=$OLD RUN=2 train seed2 2 off 95 8
  tar -czf $OUT/metrics.tar.gz -C $M .; date; exit; fi
if [ "$1" = N ]; then
  date; timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-n.json >> $L 2>&1; echo calibrate rc=$?
  train seed2 2 off 95 8; train seed4 4 off 95 6; train mixtral2 2 off 75 6; train medium 1 off 45 20; train medium 1 on 40 20
  tar -czf $OUT/metrics.tar.gz -C $M .; date; exit; fi
date; timeout 150 python3 -m epplan calibrate --iters 3 --rows 512,1024,2048,4096,8192,16384 --model seed --model scripts/device/seed4.yaml --model mixtral-8x7b --model scripts/device/medium.yaml --out $OUT/cal-l.json >> $L 2>&1; echo calibrate rc=$?
PROFILE_STEPS=7,7 PROFILE_TRACE=1 train seed2 2 off 110 9 profile_train.py
TREE=$OLD train seed2 2 off 95 8
bench new $ROOT
bench old $OLD
train seed2 2 off 95 8
tar -czf $OUT/metrics.tar.gz -C $M .
date
