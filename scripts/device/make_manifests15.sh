# Run here (pulp is not on the device machine): the one-GPU manifests of scripts/device/dev11.sh.
set -e
T=scripts/device/gpu-h200.yaml
mkdir -p runs
epplan place --topology $T --model seed --set num_layers=2 --set global_batch=8 --experts-per-gpu 16 --micro-batches 2 --out runs/h200-seed2.json
epplan place --topology $T --model seed --set num_layers=4 --set num_experts=8 --set global_batch=8 --experts-per-gpu 8 --micro-batches 4 --out runs/h200-seed4.json
epplan place --topology $T --model mixtral-8x7b --set num_layers=2 --set global_batch=16 --experts-per-gpu 8 --micro-batches 2 --out runs/h200-mixtral2.json
epplan place --topology $T --model scripts/device/medium.yaml --experts-per-gpu 8 --out runs/h200-medium.json
# AdamW's moments in bf16 (optimizer_state_dtype): the seed dims in 2 micro-batches, and in the 1
# that `epplan estimate` picks for them (calls AB and AC, 2026-12-04).
epplan place --topology $T --model seed --set num_layers=2 --set global_batch=8 --set optimizer_state_dtype=bf16 --experts-per-gpu 16 --micro-batches 2 --out runs/h200-seed2-bf16.json
# The seed dims with the run settings `epplan place` picks itself (1 micro-batch since the memory
# model counts the step's peak, 2026-12-04, calls AD and AE).
epplan place --topology $T --model seed --set num_layers=2 --set global_batch=8 --experts-per-gpu 16 --out runs/h200-seed2-auto.json
# One H100 (80 GB, scripts/device/gpu-one.yaml), where the manifests above do not fit (call AH,
# 2026-12-05): the seed dims with 8 experts and 4 sequences, in the settings `epplan place` picks
# (2 layers: 1 micro-batch; 4 layers with bf16 moments: 4 micro-batches, attention recomputed),
# Mixtral's dims in 8 sequences, 2 micro-batches, the medium model as above.
H=scripts/device/gpu-one.yaml
epplan place --topology $H --model seed --set num_layers=2 --set num_experts=8 --set global_batch=4 --experts-per-gpu 8 --out runs/h100-seed2-auto.json
epplan place --topology $H --model seed --set num_layers=4 --set num_experts=8 --set global_batch=4 --set optimizer_state_dtype=bf16 --experts-per-gpu 8 --out runs/h100-seed4.json
epplan place --topology $H --model mixtral-8x7b --set num_layers=2 --set global_batch=8 --experts-per-gpu 8 --micro-batches 2 --out runs/h100-mixtral2.json
epplan place --topology $H --model scripts/device/medium.yaml --experts-per-gpu 8 --out runs/h100-medium.json
