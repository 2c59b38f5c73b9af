"""``epplan estimate`` as a user runs it, through typer's CliRunner."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from epplan.cli import app
from epplan.cli.estimate import parse_overrides
from epplan.cost import evaluate
from epplan.cost.calibration import resolve_calibrations
from epplan.placement.baselines import eplb
from epplan.placement.problem import PlacementProblem
from epplan.topology import load_topology
from epplan.workload import load_model_config, make_traffic

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
TWO_NODES = str(TOPOLOGIES / "dgx-h100-2node.yaml")
runner = CliRunner()
# A small model that fits 16 GPUs: tiny with 16 experts.
SMALL = ["--model", "tiny", "--set", "num_experts=16"]


def invoke(*args: str):
    return runner.invoke(app, ["estimate", "--topology", TWO_NODES, *args])


def test_json_matches_the_library():
    result = invoke(*SMALL, "--routing", "zipf:1.2", "--placement", "eplb", "--json")
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    topo = load_topology(TWO_NODES)
    config = load_model_config("tiny", {"num_experts": 16})
    cals, _ = resolve_calibrations(topo)  # by default: the table shipped for the H100s
    problem = PlacementProblem(topo, config, make_traffic("zipf:1.2", config, 16), calibration=cals)
    cost = evaluate(eplb(problem), problem)
    assert cals[0].source == "shipped:h100" and cost.step_parts is not None
    assert data["step"]["step_time_s"] == pytest.approx(cost.step_time_s)
    assert data["step"]["objective_s"] == pytest.approx(cost.objective_s)
    assert data["mfu"]["spec_400_tflops"] == pytest.approx(cost.mfu_spec)
    assert data["memory"]["fits"] is True
    assert data["bandwidth"]["busiest_link"]["class"] in topo.link_class
    assert len(data["layers"]) == config.num_moe_layers
    assert data["placement"] == "eplb" and data["model"] == "tiny"


def test_table_names_the_bottleneck_link_memory_and_targets():
    result = invoke(*SMALL, "--placement", "random", "--per-layer")
    assert result.exit_code == 0, result.output
    for text in ("step time", "all-to-all", "dense gradient sync", "dgx", "memory", "MFU", "target 60%",
                 "bandwidth utilisation", "per MoE layer"):
        assert text in result.output, text


def test_the_seed_fits_its_16_gpus_at_80_and_64_gb_with_the_settings_it_chooses():
    for cap in ([], ["--memory-gb", "64"]):
        result = invoke("--model", "seed", "--json", *cap)
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        settings = data["run_settings"]
        assert data["memory"]["fits"] and settings["fits"]
        assert data["memory"]["worst_gpu_bytes"]["total"] <= (64e9 if cap else 80e9)
        # The same settings given as flags: the same estimate.
        fixed = invoke("--model", "seed", "--json", *cap, "--micro-batches", str(settings["micro_batches"]),
                       "--recompute", settings["recompute"], "--optimizer-sharding", settings["optimizer_sharding"])
        assert json.loads(fixed.stdout)["step"] == data["step"]
    assert settings["optimizer_sharding"] == "dense"  # 64 GB needs the sharded optimizer


def test_memory_over_capacity_is_a_clear_failure_with_its_own_exit_code():
    result = invoke("--model", "seed", "--recompute", "none")  # does not fit on 16 x 80 GB
    assert result.exit_code == 3
    assert isinstance(result.exception, SystemExit)
    assert "no run settings fit in GPU memory" in result.output and "80 GB" in result.output
    assert "more GPUs" in result.output and "Traceback" not in result.output


def test_memory_failure_of_fixed_settings_suggests_micro_batches():
    args = ["--model", "seed", "--set", "num_layers=4", "--recompute", "none", "--optimizer-sharding", "none"]
    result = invoke(*args, "--micro-batches", "1")
    assert result.exit_code == 3
    assert "Try --micro-batches" in result.output
    hint = int(result.output.split("Try --micro-batches ")[1].split()[0])
    assert invoke(*args, "--micro-batches", str(hint)).exit_code == 0


def test_too_many_experts_names_the_flag_and_the_flag_works():
    result = invoke("--model", "tiny", "--set", "num_experts=32")
    assert result.exit_code == 1 and "--experts-per-gpu 2" in result.output
    result = invoke("--model", "tiny", "--set", "num_experts=32", "--experts-per-gpu", "2", "--json")
    assert result.exit_code == 0, result.output


def test_bad_input_is_one_line_not_a_traceback():
    for args in (["--set", "num_experts"], ["--set", "bogus=3"], ["--routing", "zipf:x"],
                 ["--placement", "best"], ["--compute-efficiency", "2"]):
        result = invoke(*SMALL, *args)
        assert result.exit_code == 1, args
        assert "error:" in result.output and "Traceback" not in result.output, args


def test_manifest_placement_and_topology_mismatch(tmp_path):
    plan = tmp_path / "plan.json"
    placed = CliRunner().invoke(app, ["place", "--topology", TWO_NODES, *SMALL, "--placement", "eplb",
                                      "--out", str(plan)])
    assert placed.exit_code == 0, placed.output
    by_manifest = json.loads(invoke(*SMALL, "--placement", str(plan), "--json").stdout)
    # The manifest records the dispatch place chose (auto: by predicted time); estimate follows it.
    by_name = json.loads(invoke(*SMALL, "--placement", "eplb", "--dispatch", by_manifest["dispatch"], "--json").stdout)
    assert by_manifest["step"] == pytest.approx(by_name["step"])
    other = CliRunner().invoke(app, ["estimate", "--topology", str(TOPOLOGIES / "hetero-degraded.yaml"),
                                     *SMALL, "--placement", str(plan)])
    assert other.exit_code == 1 and "planned for topology 'dgx-h100-2node'" in other.output


def test_a_manifest_brings_its_model_and_slots(tmp_path):
    plan = tmp_path / "plan.json"
    placed = CliRunner().invoke(app, ["place", "--topology", TWO_NODES, "--model", "tiny", "--set",
                                      "num_experts=32", "--experts-per-gpu", "2", "--micro-batches", "2",
                                      "--out", str(plan)])
    assert placed.exit_code == 0, placed.output
    alone = invoke("--placement", str(plan), "--json")
    assert alone.exit_code == 0, alone.output
    spelled = invoke("--model", "tiny", "--set", "num_experts=32", "--experts-per-gpu", "2",
                     "--micro-batches", "2", "--placement", str(plan), "--json")
    assert spelled.exit_code == 0, spelled.output
    got, expected = json.loads(alone.stdout), json.loads(spelled.stdout)
    assert got["model"] == "tiny" and got["step"] == pytest.approx(expected["step"])
    assert got["memory"] == expected["memory"]  # micro-batches from the manifest: same activations
    other = runner.invoke(app, ["estimate", "--topology", TWO_NODES, "--model", "seed", "--placement", str(plan)],
                          terminal_width=300)
    assert other.exit_code == 1 and "Traceback" not in other.output
    assert "planned for model 'tiny'" in " ".join(other.output.split())


def test_parse_overrides():
    assert parse_overrides(["num_experts=32", "dtype=fp32", "router_aux_loss_coef=0.1"]) == {
        "num_experts": 32, "dtype": "fp32", "router_aux_loss_coef": 0.1}
