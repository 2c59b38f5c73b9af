# Run here (pulp is not on the device machine): the training manifests dev2/dev4/dev5 read.
set -e
M="--model tiny --set d_model=2048 --set d_ff=8192 --set num_heads=16 --set head_dim=128 --set num_kv_heads=16
   --set num_layers=2 --set num_experts=8 --set seq_len=2048 --set global_batch=64 --set vocab_size=32000
   --experts-per-gpu 2"
mkdir -p runs
epplan place --topology scripts/device/gpu-quad.yaml $M --out runs/quad-medium.json
epplan place --topology scripts/device/gpu-2x2.yaml $M --out runs/2x2-medium.json
epplan place --topology scripts/device/gpu-one.yaml ${M/experts-per-gpu 2/experts-per-gpu 8} --out runs/one-medium.json
