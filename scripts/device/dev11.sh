# One rank of the seed model's 16-GPU plan on one H200 (seed_rank.py): the plan's settings with a
# checkpoint after step 2, then 8 micro-batches without and with block recompute. Run from the
# repository root with the wheels in .whl/ and the manifest in runs/seed-rank.json
# (make_seed_rank.sh writes it).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p $OUT/r
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; df -h /tmp /dev/shm; free -g; date -u; } 2>&1 | tee $OUT/r/info.log
M=runs/seed-rank.json
D=$(df --output=avail,target /tmp /dev/shm | tail -n +2 | sort -n | tail -1 | awk '{print $2}')  # the roomier
echo "checkpoint under $D" | tee -a $OUT/r/info.log
python3 scripts/device/seed_rank.py $M --out $D/plan --steps 3 --checkpoint-after 2 --json $OUT/r/plan.json 2>&1 | grep -v Warn | tee $OUT/r/plan.log
rm -rf $D/plan
for r in block none; do
  python3 scripts/device/seed_rank.py $M --out /tmp/$r --steps 3 --micro-batches 8 --recompute $r --json $OUT/r/$r-8.json 2>&1 | grep -v Warn | tee $OUT/r/$r-8.log
done
