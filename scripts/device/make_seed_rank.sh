# Here: the 1-GPU manifest of one rank of the seed model's 16-GPU plan (dgx-h100-2node), for dev11.sh.
mkdir -p runs
epplan place --topology scripts/device/gpu-one.yaml --model seed --set num_experts=1 --set top_k=1 \
  --set global_batch=8 --placement contiguous --micro-batches 4 --recompute block --optimizer-sharding none \
  --out runs/seed-rank.json
