#!/usr/bin/env bash
# The end-to-end demo on built-in defaults, no GPU needed. Each step is what a user would type.
#   1-3: the founding spec's seed model on its 16-GPU cluster (two DGX H100): plan and report.
#   4-6: the re-plan loop on a CPU: plan the tiny model for 2 GPUs, train it for real through
#        torchrun (gloo), and compare the run's measured all-to-all bytes with the prediction.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${EPPLAN_DEMO_OUT:-out/demo}
rm -rf "$out" && mkdir -p "$out"

echo "== 1. the cluster"
epplan topo show topologies/dgx-h100-2node.yaml

echo "== 2. plan the seed model (16 layers x 16 experts, top-2) for it, against the baselines"
epplan place --topology topologies/dgx-h100-2node.yaml --model seed --routing zipf:1.2 \
  --compare-all --out "$out/seed.json"

echo "== 3. where the bytes go: the hottest links of the plan, and the plan vs EPLB"
epplan report "$out/seed.json" --top 8 --compare eplb

echo "== 4. plan the tiny model on 2 GPUs"
epplan place --topology topologies/h100-pair.yaml --model tiny --experts-per-gpu 2 --out "$out/tiny.json"

echo "== 5. train it on the CPU through torchrun: 2 processes, gloo"
epplan run "$out/tiny.json" --out "$out/run" --steps 30 --device cpu

echo "== 6. predicted vs measured bytes of that run"
epplan report "$out/tiny.json" --metrics "$out/run" --top 6
