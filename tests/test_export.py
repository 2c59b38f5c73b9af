"""``epplan export``: EPLB / vLLM / SGLang / Megatron-Core layouts of a plan, and their scores."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from epplan.cli import app
from epplan.errors import PlacementError
from epplan.export import dispatch_placement, eplb_maps, megatron_expert_order, physical_layout
from epplan.manifest import load_manifest
from epplan.placement.types import LayerPlacement, Placement

PAIR = str(Path(__file__).resolve().parent.parent / "topologies" / "h100-pair.yaml")
runner = CliRunner()


def _plan(tmp_path, *args) -> Path:
    out = tmp_path / "plan.json"
    result = runner.invoke(app, ["place", "--topology", PAIR, "--model", "tiny", "--routing", "zipf:1.2",
                                 *args, "--out", str(out), "--json"])
    assert result.exit_code == 0, result.output
    return out


def test_eplb_maps_match_vllms_documented_example():
    # EplbState's docstring: 2 layers, 6 physical experts, 4 logical experts on 3 EP ranks.
    phy2log = np.array([[0, 1, 2, 3, 0, 1], [0, 2, 0, 1, 0, 3]])
    log2phy, logcnt = eplb_maps(phy2log, 4)
    assert log2phy.tolist() == [[[0, 4, -1], [1, 5, -1], [2, -1, -1], [3, -1, -1]],
                                [[0, 2, 4], [3, -1, -1], [1, -1, -1], [5, -1, -1]]]
    assert logcnt.tolist() == [[2, 2, 1, 1], [3, 1, 1, 1]]


def _random_placement(rng, num_ranks=4, num_experts=6, slots=3) -> Placement:
    layers = []
    for _ in range(2):
        held = [rng.choice(num_experts, size=rng.integers(1, slots + 1), replace=False) for _ in range(num_ranks)]
        for e in range(num_experts):  # every expert somewhere
            if not any(e in h for h in held):
                g = min(range(num_ranks), key=lambda r: len(held[r]))
                held[g] = np.append(held[g], e)
        replicas = [np.array(sorted(g for g in range(num_ranks) if e in held[g])) for e in range(num_experts)]
        split = [rng.dirichlet(np.ones(r.size), size=num_ranks) for r in replicas]
        layers.append(LayerPlacement(replicas, split))
    return Placement(num_ranks=num_ranks, num_experts=num_experts, layers=layers)


@pytest.mark.parametrize("seed", range(5))
def test_layout_keeps_every_replica_and_fills_every_slot(seed):
    rng = np.random.default_rng(seed)
    placement = _random_placement(rng)
    load = rng.random((2, 6))
    layout = physical_layout(placement, load)
    S = layout.slots
    assert layout.phy2log.shape == (2, 4 * S)
    for li, layer in enumerate(placement.layers):
        for g in range(4):
            on_gpu = layout.phy2log[li, g * S:(g + 1) * S]
            assert len(set(on_gpu.tolist())) == S  # no expert twice on a GPU
            assert set(layer.experts_on_rank(4)[g]) <= set(on_gpu.tolist())
    assert len(layout.padded) == sum(S - len(h) for layer in placement.layers for h in layer.experts_on_rank(4))
    exported = dispatch_placement(layout.phy2log, 4, 6, "local_first")
    exported.validate(experts_per_gpu=S)
    for layer in exported.layers:  # local_first: a rank holding a replica keeps its tokens
        for e, (ranks, split) in enumerate(zip(layer.replicas, layer.split)):
            for r, g in enumerate(ranks):
                assert split[g, r] == 1.0
            assert np.ptp((split > 0).sum(axis=0)) <= 1  # replicas serve ranks evenly


def test_a_full_even_plan_exports_unchanged(tmp_path):
    plan = _plan(tmp_path, "--experts-per-gpu", "2", "--placement", "contiguous")
    m = load_manifest(plan)
    layout = physical_layout(m.placement)
    assert layout.padded == []
    back = dispatch_placement(layout.phy2log, 2, 4, "even")
    for a, b in zip(m.placement.layers, back.layers):
        assert [r.tolist() for r in a.replicas] == [r.tolist() for r in b.replicas]
    assert megatron_expert_order(m.placement).tolist() == [[0, 1, 2, 3], [0, 1, 2, 3]]


def test_cli_vllm_and_sglang_files_and_scores(tmp_path):
    # The flat exchange's ILP fills every slot (3 x 2 GPUs); auto may keep EPLB's layers.
    plan = _plan(tmp_path, "--experts-per-gpu", "3", "--dispatch", "flat")
    result = runner.invoke(app, ["export", str(plan), "--format", "vllm", "--json"])
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    state = torch.load(info["out"], weights_only=True)
    assert set(state) == {"physical_to_logical_map", "logical_to_physical_map", "logical_replica_count"}
    assert state["physical_to_logical_map"].shape == (2, info["num_physical_experts"])
    assert info["exported_objective_s"] >= info["original_objective_s"] * 0.99  # ILP gap target 1 %
    assert any("per-source splits are lost" in n for n in info["notes"])
    report = runner.invoke(app, ["report", str(plan), "--compare", info["scored_manifest"], "--json"])
    assert report.exit_code == 0, report.output
    # The exported plan runs with the plan's run settings.
    problem = {k: v for k, v in load_manifest(plan).doc["problem"].items() if k != "experts_per_gpu"}
    assert {k: v for k, v in json.loads(Path(info["scored_manifest"]).read_text())["problem"].items()
            if k != "experts_per_gpu"} == problem

    out = tmp_path / "loc.json"
    result = runner.invoke(app, ["export", str(plan), "--format", "sglang", "--out", str(out)])
    assert result.exit_code == 0, result.output
    p2l = json.loads(out.read_text())["physical_to_logical_map"]
    assert len(p2l) == 2 and len(p2l[0]) == 6  # tiny: 2 decoder layers, both MoE; 3 slots x 2 GPUs
    assert "--ep-num-redundant-experts 2 --init-expert-location" in " ".join(result.stdout.split())


def test_megatron_refuses_replicas_with_the_fix(tmp_path):
    plan = _plan(tmp_path, "--experts-per-gpu", "3", "--dispatch", "flat")  # replicas in every spare slot
    result = runner.invoke(app, ["export", str(plan), "--format", "megatron"])
    assert result.exit_code == 1
    assert "Megatron-Core places each expert once" in result.output and "Traceback" not in result.output
    plan = _plan(tmp_path, "--experts-per-gpu", "2")
    out = tmp_path / "order.json"
    result = runner.invoke(app, ["export", str(plan), "--format", "megatron", "--out", str(out)])
    assert result.exit_code == 0, result.output
    order = json.loads(out.read_text())["expert_order"]
    assert all(sorted(row) == [0, 1, 2, 3] for row in order)


def test_plain_json_keeps_the_splits(tmp_path):
    plan = _plan(tmp_path, "--experts-per-gpu", "3")
    out = tmp_path / "p.json"
    assert runner.invoke(app, ["export", str(plan), "--format", "json", "--out", str(out)]).exit_code == 0
    doc = json.loads(out.read_text())
    m = load_manifest(plan)
    for layer, want in zip(doc["layers"], m.placement.layers):
        for e, expert in enumerate(layer["experts"]):
            np.testing.assert_allclose(expert["split"], want.split[e], atol=1e-12)


def test_unknown_format():
    with pytest.raises(PlacementError):
        dispatch_placement(np.zeros((1, 2), dtype=np.int64), 2, 1, "random")
