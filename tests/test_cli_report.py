"""``epplan report`` as a user runs it, through typer's CliRunner: every output format, the
comparison, the plot, and each kind of bad input. ``--metrics`` on a real run: test_report_run.py."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from epplan.cli import app
from epplan.cost import evaluate
from epplan.manifest import build_manifest, load_manifest, write_manifest
from epplan.placement.baselines import contiguous, eplb
from epplan.placement.problem import PlacementProblem
from epplan.topology import load_topology
from epplan.workload import load_model_config, make_traffic

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
TWO_NODES = TOPOLOGIES / "dgx-h100-2node.yaml"
runner = CliRunner()


def invoke(*args: str):
    return runner.invoke(app, ["report", *map(str, args)], env={"COLUMNS": "160"})


def _problem(topo_file: Path, config, routing: str = "zipf:1.2") -> PlacementProblem:
    topo = load_topology(topo_file)
    return PlacementProblem(topo, config, make_traffic(routing, config, topo.num_gpus))


def _write(path: Path, placement, problem, routing: str = "zipf:1.2") -> Path:
    write_manifest(path, build_manifest(placement, problem, routing_spec=routing))
    return path


@pytest.fixture(scope="module")
def manifests(tmp_path_factory) -> dict[str, Path]:
    """tiny with 16 experts (fits 16 x 80 GB) on two DGX H100, planned by eplb and contiguous."""
    folder = tmp_path_factory.mktemp("manifests")
    problem = _problem(TWO_NODES, load_model_config("tiny", {"num_experts": 16}))
    return {"eplb": _write(folder / "eplb.json", eplb(problem), problem),
            "contiguous": _write(folder / "contiguous.json", contiguous(problem), problem),
            "problem": problem}


def _one_line_error(result, *fragments: str) -> None:
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    lines = [x for x in result.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------------------ formats

def test_table(manifests):
    result = invoke(manifests["eplb"], "--top", "5")
    assert result.exit_code == 0, result.output
    for text in ("links, hottest first (top 5 of 96", "NIC down", "dispatch", "dense grad", "per link class",
                 "GPUs, busiest expert compute first", "bottleneck link"):
        assert text in result.stdout, text


def test_json_numbers_are_the_cost_functions(manifests):
    result = invoke(manifests["eplb"], "--json", "--top", "8")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    problem = manifests["problem"]
    cost = evaluate(load_manifest(manifests["eplb"]).placement, problem)
    assert data["cost"] == json.loads(json.dumps(cost.to_dict(top_links=8)))
    assert data["plan"]["manifest_hash"] == load_manifest(manifests["eplb"]).hash
    for row in data["links"]:
        k = row["index"]
        assert row["total_bytes"] == float(cost.link_step_bytes[k])
        assert row["time_s"] == float(cost.link_step_bytes[k] / (cost.topology.link_capacity[k] * 1e9))
        assert row["dispatch_bytes"] == 2 * float(cost.dispatch_fwd_bytes.sum(axis=0, dtype=np.float64)[k])
        assert row["dense_sync_bytes"] == float(cost.dense_sync_bytes[k])
    assert data["links"][0]["vs_bottleneck"] == 1.0
    assert data["view"]["bottleneck_time_s"] == data["cost"]["bandwidth"]["busiest_link"]["bytes_per_step"] / 50e9
    gpu = data["gpus"][0]
    assert gpu["memory_bytes"] == float(cost.memory_bytes[gpu["rank"]])
    assert gpu["assignments_per_layer"] == cost.expert_assignments[:, gpu["rank"]].tolist()
    layer = json.loads(invoke(manifests["eplb"], "--json", "--layer", "1", "--all").stdout)
    assert layer["view"]["layer"] == 1 and len(layer["links"]) == 96 and len(layer["gpus"]) == 16
    assert layer["view"]["bottleneck_time_s"] == pytest.approx(cost.a2a_link_s[1], rel=1e-6)


def test_csv_and_markdown(manifests):
    result = invoke(manifests["eplb"], "--csv", "--all")
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 96 and rows[0]["rank"] == "1" and float(rows[0]["vs_bottleneck"]) == 1.0
    times = [float(r["time_s"]) for r in rows]
    assert times == sorted(times, reverse=True)
    md = invoke(manifests["eplb"], "--markdown", "--top", "3")
    assert md.exit_code == 0, md.output
    assert "### links, hottest first (top 3 of 96" in md.stdout
    assert "| # | link | class | GB/s | dispatch | combine | expert grad | dense grad |" in md.stdout


def test_compare_manifests_and_baselines(manifests):
    result = invoke(manifests["eplb"], "--compare", manifests["contiguous"], "--compare", "random", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)["compare"]
    assert [p["label"] for p in data["plans"]] == ["eplb.json", "contiguous.json", "random"]
    cost = evaluate(load_manifest(manifests["contiguous"]).placement, manifests["problem"])
    assert data["plans"][1]["step_time_s"] == cost.step_time_s
    assert data["same_topology"] and len(data["links"][0]["time_s"]) == 3
    table = invoke(manifests["eplb"], "--compare", manifests["contiguous"])
    assert "placements side by side" in table.stdout and "link time under each placement" in table.stdout
    _one_line_error(invoke(manifests["eplb"], "--compare", "nowhere.json"), "--compare nowhere.json: no such manifest")


def test_plot(manifests, tmp_path):
    png = tmp_path / "links.png"
    result = invoke(manifests["eplb"], "--plot", png, "--json")
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)  # the note about the file went to stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    _one_line_error(invoke(manifests["eplb"], "--plot", tmp_path / "links.pdf"), "write a .png file")


# ------------------------------------------------------------------------------ topology lookup

def test_topology_by_recorded_path_or_flag(manifests, tmp_path):
    doc = json.loads(manifests["eplb"].read_text())
    doc["topology"]["source"] = "gone/dgx-h100-2node.yaml"
    moved = tmp_path / "moved.json"
    moved.write_text(json.dumps(doc))
    _one_line_error(invoke(moved), "planned on topology 'dgx-h100-2node' at gone/dgx-h100-2node.yaml",
                    "--topology FILE")
    assert invoke(moved, "--topology", TWO_NODES, "--top", "2").exit_code == 0
    _one_line_error(invoke(moved, "--topology", TOPOLOGIES / "dgx-h100-1node.yaml"),
                    "content hash", "differs from the one moved.json was planned on")


# ------------------------------------------------------------------------------ bad input

def test_manifest_failing_validation(manifests, tmp_path):
    doc = json.loads(manifests["eplb"].read_text())
    doc["placement"]["layers"][0]["experts"][3]["rows"] = [[[0, 0.5]]]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(doc))
    _one_line_error(invoke(bad), "layer 0, expert 3: split row 0 sums to 0.5, not 1")
    truncated = tmp_path / "cut.json"
    truncated.write_text(manifests["eplb"].read_text()[:500])
    _one_line_error(invoke(truncated), "not valid JSON")


def test_conflicting_flags(manifests):
    _one_line_error(invoke(manifests["eplb"], "--json", "--csv"), "choose one output format")
    _one_line_error(invoke(manifests["eplb"], "--top", "3", "--all"), "--top and --all")
    _one_line_error(invoke(manifests["eplb"], "--layer", "9"), "--layer 9: the model has MoE layers 0..1")


def test_compared_plans_with_long_file_names_fit_80_columns_without_cut_cells(manifests, tmp_path):
    # The README's mixtral example compares with 'mixtral-expert-location.manifest.json': a plan's
    # column is headed by its file name, which folds onto two lines rather than being cut to "…".
    long = tmp_path / "a-plan-with-a-rather-long-file-name.manifest.json"
    long.write_bytes(manifests["contiguous"].read_bytes())
    result = runner.invoke(app, ["report", str(manifests["eplb"]), "--compare", str(long), "--top", "5"],
                           env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    assert "…" not in result.stdout, result.stdout
    assert all(len(line) <= 80 for line in result.stdout.splitlines()), result.stdout
    assert "a-plan-with-a-rather-long" in result.stdout
