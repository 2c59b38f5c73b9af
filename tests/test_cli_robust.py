"""``epplan place`` over several routing windows and from a plan in force, and ``epplan report
--routing``, as a user runs them."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from typer.testing import CliRunner

from epplan.cli import app
from epplan.cost.migration import plan_migration
from epplan.manifest import load_manifest
from epplan.report.manifests import open_plan
from epplan.workload import write_routing_stats

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
TWO_NODE = str(TOPOLOGIES / "dgx-h100-2node.yaml")
runner = CliRunner()
DRIFT = "drift:alpha=1.2,rotate=2"
BASE = ["place", "--topology", TWO_NODE, "--model", "seed", "--set", "num_layers=1", "--time-limit", "20"]


def _place(tmp_path: Path, name: str, *args: str) -> tuple[Path, dict]:
    out = tmp_path / name
    result = runner.invoke(app, [*BASE, *args, "--json", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out, json.loads(result.stdout)


def test_place_over_windows_records_them_and_report_scores_any_window(tmp_path):
    out, data = _place(tmp_path, "robust.json", "--routing", f"{DRIFT}@0:5:2", "--objective", "worst")
    assert data["objective"] == "worst"
    assert [w["spec"] for w in data["windows"]] == [f"{DRIFT}@0:1", f"{DRIFT}@2:3", f"{DRIFT}@4:5"]
    m = load_manifest(out)
    routing = m.doc["routing"]
    assert routing["spec"] is None and routing["objective"] == "worst"
    assert [w["spec"] for w in routing["windows"]] == [w["spec"] for w in data["windows"]]
    assert m.solver["num_windows"] == 3 and m.solver["bound_s"] <= m.solver["objective_s"] * (1 + 1e-9)
    # The report rebuilds the windows' mean as planned (no fallback note) ...
    opened = open_plan(out)
    assert not any("could not be rebuilt" in n for n in opened.notes)
    # ... and scores the plan on any window, the planned ones as the place command did.
    result = runner.invoke(app, ["report", str(out), "--routing", f"{DRIFT}@0:5:2", "--routing", f"{DRIFT}@40",
                                 "--json"])
    assert result.exit_code == 0, result.output
    aged = json.loads(result.stdout)
    assert aged["format"] == "epplan.report-windows" and len(aged["windows"]) == 4
    for row, planned in zip(aged["windows"], data["windows"]):
        assert abs(row["objective_s"] - planned["objective_s"]) <= 1e-9 * planned["objective_s"]
    text = runner.invoke(app, ["report", str(out), "--routing", f"{DRIFT}@40"])
    assert text.exit_code == 0 and "vs planned" in text.stdout


def test_place_over_a_directory_of_routing_statistics(tmp_path):
    # A run's per-window statistics: one file per window, read in name order.
    windows = tmp_path / "windows"
    windows.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        counts = rng.integers(0, 1000, size=(1, 16, 16))
        write_routing_stats(windows / f"w{i}.json", counts, steps=3, model="seed", top_k=2,
                            tokens_per_rank_per_step=80000.0)
    out, data = _place(tmp_path, "dir.json", "--routing", str(windows))
    assert [Path(w["spec"]).name for w in data["windows"]] == ["w0.json", "w1.json"]
    assert load_manifest(out).doc["routing"]["objective"] == "mean"


def test_place_from_a_plan_in_force_limits_and_counts_the_move(tmp_path):
    old, _ = _place(tmp_path, "old.json", "--routing", f"{DRIFT}@0")
    frozen, data = _place(tmp_path, "frozen.json", "--routing", f"{DRIFT}@7", "--from-manifest", str(old),
                          "--max-move-bytes", "0")
    assert data["migration"]["moves"] == 0 and data["migration"]["bytes_moved"] == 0
    free, data_free = _place(tmp_path, "free.json", "--routing", f"{DRIFT}@7", "--from-manifest", str(old))
    # What the manifest's plan moves, recounted from the two manifests, is what place reported.
    a, b = open_plan(old).plan, open_plan(free).plan
    mig = plan_migration(a.placement, b.placement, b.problem)
    assert mig.bytes_moved == data_free["migration"]["bytes_moved"]
    assert data_free["cost"]["step"]["objective_s"] <= data["cost"]["step"]["objective_s"] * (1 + 1e-9)
    text = runner.invoke(app, [*BASE, "--routing", f"{DRIFT}@7", "--from-manifest", str(old),
                               "--amortize-steps", "100", "--out", str(tmp_path / "t.json")])
    assert text.exit_code == 0, text.output
    assert "expert replica(s) move" in text.stdout


def test_place_window_and_move_errors(tmp_path):
    cases = [
        (["--max-move-bytes", "1e9"], "need the plan in force"),
        (["--objective", "median"], "mean or worst"),
        (["--routing", "drift:alpha=1.2@0:9:0"], "WIDTH >= 1"),
        (["--from-manifest", str(tmp_path / "missing.json")], "missing.json"),
    ]
    for args, match in cases:
        result = runner.invoke(app, [*BASE, *args, "--out", str(tmp_path / "x.json")])
        assert result.exit_code == 1, (args, result.output)
        assert match in result.output and "Traceback" not in result.output
        assert not (tmp_path / "x.json").exists()
    old, _ = _place(tmp_path, "old.json", "--routing", f"{DRIFT}@0")
    other = runner.invoke(app, [*BASE, "--set", "d_ff=2048", "--from-manifest", str(old),
                                "--out", str(tmp_path / "x.json")])
    assert other.exit_code == 1 and "same --model and --set" in other.output
