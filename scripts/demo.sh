#!/usr/bin/env bash
# The end-to-end demo on a built-in default: the founding spec's 16-GPU cluster (two DGX H100),
# no GPU needed. Each step is what a user would type.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${EPPLAN_DEMO_OUT:-out/demo}
mkdir -p "$out"

echo "== 1. the cluster"
epplan topo show topologies/dgx-h100-2node.yaml
