# DCP checkpoints on one H200 (issue 14): a DCP checkpoint written asynchronously on the GPU
# resumes exactly (resume_check.py, the tiny model); one rank of the seed model's 16-GPU plan
# (seed_rank.py) with a dcp.async_save checkpoint after step 1 (the staging buffers are allocated at its end), then 8 micro-batches with and
# without block recompute. Run from the repository root with the wheels in .whl/ and the
# manifests in runs/ (make_seed_rank.sh writes runs/seed-rank.json; runs/tiny-one.json is
# `epplan place --topology scripts/device/gpu-one.yaml --model tiny --experts-per-gpu 4`).
# `bash dev14.sh --checkpoint-only` stops before the recompute pair.
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
mkdir -p $OUT/r
L=$OUT/r/all.log
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; df -h /tmp /dev/shm; free -g; date -u
  python3 -c "import torch; print('torch', torch.__version__)"; } 2>&1 | tee $L
python3 scripts/device/resume_check.py runs/tiny-one.json --out /tmp/rc --json $OUT/r/resume.json 2>&1 | grep -v Warn | tee -a $L
D=$(df --output=avail,target /tmp /dev/shm | tail -n +2 | sort -n | tail -1 | awk '{print $2}')  # the roomier
echo "seed-rank checkpoint under $D" | tee -a $L
python3 scripts/device/seed_rank.py runs/seed-rank.json --out $D/plan --steps 2 --checkpoint-after 1 --json $OUT/r/plan.json 2>&1 | grep -v Warn | tee -a $L
ls -la $D/plan/checkpoints/* 2>&1 | tee -a $L
rm -rf $D/plan
[ "$1" = "--checkpoint-only" ] && { date -u | tee -a $L; exit 0; }  # call 2: the recompute pair ran in call 1
for r in block none; do
  python3 scripts/device/seed_rank.py runs/seed-rank.json --out /tmp/$r --steps 3 --micro-batches 8 --recompute $r --json $OUT/r/$r-8.json 2>&1 | grep -v Warn | tee -a $L
done
date -u | tee -a $L
