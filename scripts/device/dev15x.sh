# One H200, 2026-12-03, call X (issue 15): AdamW's small tensors in one kernel per group
# (epplan.train.adamw.MANY_BELOW) against one kernel each: check_adamw_many.py (the two paths'
# results and the medium tensors' step), then medium overlap off with ADAMW_MANY_BELOW unset /
# 0 / unset / 0 and the seed dims unset / 0. From the repository root, runs/ from
# make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15x.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
train() {  # label manifest micro-batches limit steps many-below
  date; env ${6:+ADAMW_MANY_BELOW=$6} timeout $4 torchrun --nproc-per-node 1 scripts/device/train_nockpt.py runs/h200-$2.json --out /tmp/t-$1 --steps $5 --device cuda --seed 3 --micro-batches $3 --overlap off --async-checkpoints off >> $L 2>&1; echo $1 rc=$?
  cp /tmp/t-$1/metrics.jsonl $OUT/m-$1.jsonl 2>/dev/null
  python3 scripts/device/train_components.py $OUT/m-$1.jsonl
  rm -rf /tmp/t-$1; }
date; timeout 90 python3 scripts/device/check_adamw_many.py 2>&1 | tee -a $L
train medium-many1 medium 1 40 20; train medium-one1 medium 1 40 20 0
train medium-many2 medium 1 40 20; train medium-one2 medium 1 40 20 0
train seed2-many seed2 2 100 8; train seed2-one seed2 2 100 8 0
date
