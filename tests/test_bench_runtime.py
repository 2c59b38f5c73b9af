"""scripts/bench_runtime.py --smoke: the GPU benchmark's code paths on CPU (gloo, the tiny preset),
so that the script the GPU numbers come from keeps running between device sessions."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_runtime_smoke_two_ranks(tmp_path):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
           str(ROOT / "scripts" / "bench_runtime.py"), "--smoke", "--rounds", "1", "--warmup", "1",
           "--iters", "1", "--variants", "reference,2,2/4,auto", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads((tmp_path / "bench_runtime.json").read_text())
    assert result["num_gpus"] == 2
    variants = result["block"]["variants"]
    assert set(variants) == {"reference", "2", "2/4", "auto"}
    for name, row in variants.items():
        # Chunking reorders the rows on the wire only: the output and input gradient are the same.
        assert row["out_rel_err_vs_reference"] < 1e-6, name
        assert row["grad_x_rel_err_vs_reference"] < 1e-6, name
        # Dispatch and combine, forward and backward, once per chunk (auto: 1 chunk at this size).
        assert row["num_exchanges"] == {"reference": 4, "2": 8, "2/4": 8, "auto": 4}[name], name
        assert row["step_ms"] > 0 and row["comm_only_ms"] > 0
    a2a = result["a2a"]
    assert 0 < a2a["off_gpu_bytes_per_rank"] < a2a["bytes_per_rank"]
    assert {"raw_ctas4_ms", "raw_ctas8_ms"} <= set(a2a)
    for checked in result["check"].values():
        assert all(err < 2e-2 for err in checked.values()), checked
