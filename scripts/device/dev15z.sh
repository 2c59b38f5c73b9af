# One H200, 2026-12-04, call Z (issue 15): where the seed-dims loop's time goes outside its
# blocks, on main after call Y: one step of `epplan run`'s worker under torch.profiler (the
# kernels by device time, the Chrome trace reduced to every kernel and the GPU's idle gaps).
# From the repository root, runs/ from make_manifests15.sh, wheels in .whl/cp312/:
#   bash scripts/device/dev15z.sh
# Results in $OUT: profile.txt, profile-shapes.txt, kernels.csv.gz, gaps.txt, all.log.
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/cp312/*.whl || exit 1
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD
L=$OUT/all.log
nvidia-smi --query-gpu=name,memory.total,power.limit --format=csv,noheader | tee -a $L
date; PROFILE_STEPS=6,6 PROFILE_TRACE=1 PROFILE_SHAPES=1 timeout 150 torchrun --nproc-per-node 1 scripts/device/profile_train.py runs/h200-seed2.json --out /tmp/p --steps 7 --device cuda --seed 3 --micro-batches 2 --overlap off --async-checkpoints off >> $L 2>&1; echo profile rc=$?
cp /tmp/p/profile.txt /tmp/p/profile-shapes.txt $OUT/ 2>/dev/null
python3 scripts/device/train_components.py /tmp/p/metrics.jsonl
python3 scripts/device/trace_gaps.py /tmp/p/trace.json.gz --out $OUT > $OUT/gaps.txt 2>&1; head -30 $OUT/gaps.txt
date
