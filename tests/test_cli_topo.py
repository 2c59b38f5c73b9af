"""``epplan topo`` as a user runs it, through typer's CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

from epplan.cli import app

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
runner = CliRunner()


def test_help_explains_every_command():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0 and "topo" in result.output
    for sub in ("show", "validate", "gen"):
        result = runner.invoke(app, ["topo", sub, "--help"])
        assert result.exit_code == 0, result.output
        assert "Usage" in result.output


def test_show_json():
    result = runner.invoke(app, ["topo", "show", str(TOPOLOGIES / "h100-8node-oversub.yaml"), "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert info["gpus"] == 64 and info["nodes"] == 8
    # Two units of 4 servers; the top tier carries half of what the 4 servers' NICs can inject.
    assert info["bisection_ratio"] == 0.5
    assert info["bisection_gbps"] == 4 * 8 * 50 / 2
    assert info["injection_gbps_per_gpu"]["inter_node"] == {"min": 50.0, "max": 50.0}
    classes = {c["class"]: c for c in info["link_classes"]}
    assert classes["nvlink"]["links"] == 2 * 64 and classes["nic_up"]["max_gbps"] == 50.0


def test_show_table():
    result = runner.invoke(app, ["topo", "show", str(TOPOLOGIES / "pcie-8gpu.yaml")])
    assert result.exit_code == 0, result.output
    assert "bisection" in result.output and "socket" in result.output


def test_show_missing_file_is_one_line_error(tmp_path):
    result = runner.invoke(app, ["topo", "show", str(tmp_path / "x.yaml")])
    assert result.exit_code == 1
    assert "topology file not found" in result.output
    assert "Traceback" not in result.output


def test_validate_lists_problems_and_fails(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: b\nnodes:\n  - {name: a, type: dgx-h100}\n  - {name: a, type: dgx-h100}\nfabric: {kind: switch}\n")
    result = runner.invoke(app, ["topo", "validate", str(bad), str(TOPOLOGIES / "dgx-h100-2node.yaml")])
    assert result.exit_code == 1
    assert "duplicate node name 'a'" in result.output
    assert "dgx-h100-2node.yaml: 2 nodes, 16 GPUs" in result.output


def test_validate_every_shipped_file():
    result = runner.invoke(app, ["topo", "validate", *map(str, sorted(TOPOLOGIES.glob("*.yaml")))])
    assert result.exit_code == 0, result.output


def test_gen_writes_a_loadable_file(tmp_path):
    out = tmp_path / "gen.yaml"
    result = runner.invoke(app, ["topo", "gen", "--nodes", "6", "--fabric", "three_tier", "--nodes-per-su", "2",
                                 "--core-oversubscription", "2", "--out", str(out)])
    assert result.exit_code == 0, result.output
    shown = runner.invoke(app, ["topo", "show", str(out), "--json"])
    info = json.loads(shown.output)
    assert info["gpus"] == 48 and info["fabric"] == "three_tier"


def test_gen_bad_flag_is_clear():
    result = runner.invoke(app, ["topo", "gen", "--nodes", "2", "--node-type", "dgx-b300"])
    assert result.exit_code == 1
    assert "unknown node type 'dgx-b300'" in result.output


def test_console_script_exits_1_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "epplan", "topo", "show", str(tmp_path / "none.yaml")],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert "error:" in proc.stderr and "Traceback" not in proc.stderr


def test_gen_out_is_atomic_a_failed_write_keeps_the_old_file(tmp_path, monkeypatch):
    import errno
    import os

    out = tmp_path / "cluster.yaml"
    out.write_text("old: contents\n")

    def full_disk(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    result = runner.invoke(app, ["topo", "gen", "--nodes", "2", "--out", str(out)])
    assert result.exit_code == 1 and "No space left on device" in result.output, result.output
    assert out.read_text() == "old: contents\n"
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.yaml"]  # no temporary left behind
