# One H200, 2026-12-03, call V (issue 15): how much of the AdamW update hides under the GEMMs on
# another stream (probe_overlap.py), and the seed dims' training step with the update inline,
# behind, and behind with the worker on a high-priority stream, interleaved. From the repository
# root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15v.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log M=/tmp/metrics
mkdir -p $M
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # label behind high-priority steps
  date; STEP_BEHIND=$2 HIGH_PRIORITY=$3 timeout 100 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-seed2.json --out /tmp/t-$1 --steps $4 --device cuda --seed 3 --micro-batches 2 --overlap off --async-checkpoints off >> $L 2>&1; echo $1 behind=$2 hp=$3 rc=$?
  F=$M/m-$1.jsonl; cp /tmp/t-$1/metrics.jsonl $F 2>/dev/null
  python3 scripts/device/train_components.py $F
  rm -rf /tmp/t-$1; }
date; timeout 150 python3 scripts/device/probe_overlap.py 2>&1 | tee -a $L
train inline1 0 0 8; train behind1 1 0 8; train behindhp1 1 1 8
train inline2 0 0 8; train behindhp2 1 1 8; train behind2 1 0 8
tar -czf $OUT/metrics.tar.gz -C $M .
date
