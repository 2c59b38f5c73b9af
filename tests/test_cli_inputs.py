"""The hostile and careless inputs of the 'nothing silently wrong' issue, through the CLI as a user
types them: each is one ``error:`` line naming what is wrong, exit code 1, no traceback, and no
file is half-written. (scripts/fuzz_inputs.py throws several hundred generated ones.)"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from epplan.cli import app

runner = CliRunner()
TOPOLOGY = {
    "name": "pair",
    "node_types": {"box": {
        "gpus": 2,
        "gpu": {"model": "H100", "memory_gb": 80, "bf16_tflops": 989, "hbm_gbps": 3350},
        "fabric": {"kind": "nvswitch", "gbps": 450},
        "nics": {"gbps": 50, "attach": [0, 1], "pcie_gbps": 64},
    }},
    "nodes": [{"prefix": "n", "count": 2, "type": "box"}],
    "fabric": {"kind": "rail_optimized", "nodes_per_su": 2, "spines": 1, "oversubscription": 1.0},
}


def _topology(tmp_path: Path, text: str | None = None, **edits) -> str:
    doc = json.loads(json.dumps(TOPOLOGY))
    for path, value in edits.items():
        node = doc
        keys = path.split("__")
        for k in keys[:-1]:
            node = node[int(k)] if k.isdigit() else node[k]
        node[keys[-1]] = value
    file = tmp_path / "t.yaml"
    file.write_text(text if text is not None else yaml.safe_dump(doc))
    return str(file)


def _error(*argv: str) -> str:
    result = runner.invoke(app, list(argv), terminal_width=400)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.output
    return lines[0]


@pytest.mark.parametrize("edits, command, message", [
    ({"node_types__box__fabric__gbps": float("inf")}, "show", "gbps"),
    ({"node_types__box__fabric__gbps": float("inf")}, "place", "gbps"),
    ({"fabric__oversubscription": float("inf")}, "estimate", "oversubscription"),
    ({"nodes__0__count": 10**9}, "show", "epplan plans up to 4,096 nodes"),
    ({"nodes__0__count": 100_000}, "estimate", "epplan plans up to 4,096 nodes"),
    ({"node_types__box__gpus": True}, "show", "gpus: holds a boolean"),
    ({"node_types__box__gpu__memory_gb": 1e308}, "show", "memory_gb"),
])
def test_topology_values(tmp_path, edits, command, message):
    file = _topology(tmp_path, **edits)
    argv = {"show": ["topo", "show", file],
            "estimate": ["estimate", "--topology", file, "--model", "tiny"],
            "place": ["place", "--topology", file, "--model", "tiny", "--out", str(tmp_path / "m.json")]}[command]
    assert message in _error(*argv)
    assert not (tmp_path / "m.json").exists()


def test_topology_files_that_are_not_files(tmp_path):
    assert "not a regular file" in _error("topo", "show", "/dev/zero")
    os.mkfifo(tmp_path / "fifo.yaml")
    assert "not a regular file" in _error("topo", "show", str(tmp_path / "fifo.yaml"))
    text = yaml.safe_dump(TOPOLOGY).replace("name: pair\n", "name: pair\nname: other\n")
    assert "duplicate key 'name'" in _error("topo", "show", _topology(tmp_path, text))


def _model(tmp_path: Path, text: str | bytes) -> str:
    file = tmp_path / "model.yaml"
    file.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(file)


@pytest.mark.parametrize("model, message", [
    ("base: [tiny]\n", "base: unknown preset ['tiny']"),
    (b"base: tiny\nname: \xff\n", "not UTF-8"),
    ("base: tiny\nnum_layers: " + "[" * 3000 + "]" * 3000 + "\n", "nested"),
    ("base: tiny\nnum_experts: 4\nnum_experts: 8\n", "duplicate key 'num_experts'"),
    ("base: tiny\nrouter_aux_loss_coef: .nan\n", "router_aux_loss_coef"),
])
def test_model_files(tmp_path, model, message):
    assert message in _error("estimate", "--topology", _topology(tmp_path), "--model", _model(tmp_path, model))


def test_model_directory_and_huge_sizes(tmp_path):
    (tmp_path / "dir.yaml").mkdir()
    topo = _topology(tmp_path)
    assert "is a directory" in _error("estimate", "--topology", topo, "--model", str(tmp_path / "dir.yaml"))
    assert "num_experts=1,000,000 is more than" in _error(
        "place", "--topology", topo, "--model", "tiny", "--set", "num_experts=1000000", "--time-limit", "5",
        "--out", str(tmp_path / "m.json"))
    assert "num_layers=1,000,000 is more than" in _error(
        "estimate", "--topology", topo, "--model", "tiny", "--set", "num_layers=1000000")
    assert "router_aux_loss_coef" in _error("estimate", "--topology", topo, "--model", "tiny",
                                            "--set", "router_aux_loss_coef=.nan")
    assert "global_batch=1,000,000,000 is more than" in _error(  # it ran for minutes in the memory fit
        "estimate", "--topology", topo, "--model", "tiny", "--set", "global_batch=1000000000")


def test_routing_inputs(tmp_path):
    topo = _topology(tmp_path)
    est = ["estimate", "--topology", topo, "--model", "tiny", "--routing"]
    with open(tmp_path / "trace.npz", "wb") as fh:
        np.save(fh, np.ones((2, 4, 4)))
    assert "single .npy array" in _error(*est, str(tmp_path / "trace.npz"))
    (tmp_path / "zip.npz").write_bytes(b"PK\x03\x04garbage")
    assert "not a readable .npz file" in _error(*est, str(tmp_path / "zip.npz"))
    stats = {"format": "epplan.routing-stats", "version": True, "model": "tiny", "num_moe_layers": 2,
             "num_ranks": 4, "num_experts": 4, "top_k": 2, "steps": 1, "tokens_per_rank_per_step": 64.0,
             "manifest_hash": None, "counts": np.ones((2, 4, 4), int).tolist()}
    (tmp_path / "s.json").write_text(json.dumps(stats))
    assert "version True" in _error(*est, str(tmp_path / "s.json"))
    stats["version"] = 1
    stats["counts"][0][0][0] = -3
    (tmp_path / "s.json").write_text(json.dumps(stats))
    assert "counts[0][0][0] = -3 is negative" in _error(*est, str(tmp_path / "s.json"))
    (tmp_path / "s.json").write_bytes(b'{"format": "\xff"}')
    assert "not UTF-8" in _error(*est, str(tmp_path / "s.json"))


@pytest.mark.parametrize("args, message", [
    (["--spines", "0"], "--spines must be at least 1, got 0"),
    (["--oversubscription", "inf"], "--oversubscription is a downlink:uplink ratio"),
    (["--nodes", "1000000000"], "epplan plans up to"),
])
def test_topo_gen_flags(tmp_path, args, message):
    out = tmp_path / "g.yaml"
    out.write_text("kept\n")
    assert message in _error("topo", "gen", "--nodes", "2", *args, "--out", str(out))
    assert out.read_text() == "kept\n"


@pytest.fixture(scope="module")
def planned(tmp_path_factory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("planned")
    topo = _topology(root)
    result = runner.invoke(app, ["place", "--topology", topo, "--model", "tiny", "--placement", "contiguous",
                                 "--out", str(root / "m.json")])
    assert result.exit_code == 0, result.output
    return topo, str(root / "m.json")


def test_manifest_values(planned, tmp_path):
    topo, manifest = planned
    doc = json.loads(Path(manifest).read_text())
    text = json.dumps(doc).replace('"compute_efficiency": 0.6', '"compute_efficiency": NaN')
    (tmp_path / "nan.json").write_text(text)
    assert "NaN is not a number JSON allows" in _error("estimate", "--topology", topo, "--placement",
                                                         str(tmp_path / "nan.json"))
    doc["placement"]["layers"][0]["experts"][0]["replicas"] = [1e20]
    (tmp_path / "far.json").write_text(json.dumps(doc))
    assert "replica" in _error("estimate", "--topology", topo, "--placement", str(tmp_path / "far.json"))


@pytest.mark.parametrize("args, message", [
    (["--seed", "-1"], "--seed must be at least 0"), (["--lr", "-1"], "--lr must be more than 0"),
    (["--lr", "nan"], "--lr nan: give a finite number"), (["--capacity-factor", "0"], "--capacity-factor must be"),
    (["--max-restarts", "-1"], "--max-restarts -1 is out of range"),
    (["--grad-clip", "-1"], "--grad-clip must be at least 0, got -1.0; 0 turns clipping off"),
    (["--warmup-steps", "-5"], "--warmup-steps must be at least 0, got -5"),
    (["--num-chunks", "100000"], "--num-chunks 100000 is too large: at most 256"),
    (["--allow-change", "lr", "--resume"], "--allow-change lr: not a resume check"),
])
def test_run_numbers_are_checked_where_parsed(planned, tmp_path, args, message):
    _, manifest = planned
    assert message in _error("run", manifest, "--out", str(tmp_path / "r"), "--nnodes", "2",
                             "--print-launch", "torchrun", *args)


def test_run_out_naming_a_file(planned, tmp_path):
    _, manifest = planned
    (tmp_path / "file").write_text("x")
    assert "--out" in _error("run", manifest, "--out", str(tmp_path / "file"), "--nnodes", "2",
                             "--node-rank", "0", "--rdzv-endpoint", "h:1")


def test_metrics_values(planned, tmp_path):
    topo, manifest = planned
    from epplan.manifest import load_manifest

    m = load_manifest(manifest)
    L, G, E = m.config.num_moe_layers, m.world_size, m.config.num_experts
    start = {"format": "epplan.metrics", "version": 1, "kind": "start", "step": 0, "manifest_hash": m.hash}
    a2a = [[[100] * G for _ in range(G)] for _ in range(L)]
    step = {"kind": "step", "step": 1, "step_time_s": "fast", "tokens_per_expert": [[8] * E] * L,
            "dispatch_bytes": a2a, "combine_bytes": a2a}
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(start) + "\n" + json.dumps(step) + "\n")
    report = ["report", manifest, "--topology", topo, "--metrics", str(run)]
    assert "step_time_s is 'fast'" in _error(*report)
    step["step_time_s"] = 0.5
    step["dispatch_bytes"] = [[[-100] * G for _ in range(G)] for _ in range(L)]
    (run / "metrics.jsonl").write_text(json.dumps(start) + "\n" + json.dumps(step) + "\n")
    assert "dispatch_bytes holds -100" in _error(*report)
