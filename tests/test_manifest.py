"""The manifest: round trip, hash, atomic write, and every corruption the loader must reject."""

from __future__ import annotations

import copy
import json
import os

import numpy as np
import pytest

from epplan.cost import evaluate
from epplan.errors import ManifestError
from epplan.manifest import (
    SCHEMA_VERSION, build_manifest, load_manifest, manifest_from_doc, manifest_hash, write_manifest,
)
from epplan.placement.baselines import eplb
from epplan.placement.problem import PlacementProblem
from epplan.placement.solve import solve
from epplan.topology import load_topology
from epplan.workload import load_model_config, make_traffic
from epplan.workload.config import ModelConfig


@pytest.fixture(scope="module")
def planned():
    topo = load_topology("topologies/dgx-h100-2node.yaml")
    config = load_model_config("seed", {"num_layers": 3, "num_experts": 8})
    problem = PlacementProblem(topo, config, make_traffic("zipf:1.2", config, topo.num_gpus, seed=1))
    placement = solve(problem, time_limit=30)
    cost = evaluate(placement, problem)
    return problem, placement, cost, build_manifest(placement, problem, cost=cost, routing_spec="zipf:1.2")


def test_round_trip(planned, tmp_path):
    problem, placement, cost, doc = planned
    path = tmp_path / "m.json"
    digest = write_manifest(path, doc)
    m = load_manifest(path)
    assert m.hash == digest == manifest_hash(path) == manifest_hash(doc)
    assert isinstance(m.config, ModelConfig) and m.config == problem.config
    assert m.world_size == 16 and m.rank_nodes[:9] == ["dgx0"] * 8 + ["dgx1"]
    assert m.rank_local_gpus[:9] == list(range(8)) + [0]
    assert m.topology_hash == problem.topology.content_hash
    assert m.routing_spec == "zipf:1.2" and m.experts_per_gpu == 1
    assert m.schedule == problem.schedule and m.schedule.overlap  # two nodes: overlapped
    assert m.problem_options()["overlap"] == "on" and m.problem_options()["num_chunks"] == m.schedule.num_chunks
    m.placement.validate(1)
    for a, b in zip(m.placement.layers, placement.layers):
        for ra, rb, sa, sb in zip(a.replicas, b.replicas, a.split, b.split):
            np.testing.assert_array_equal(ra, rb)
            np.testing.assert_allclose(sa, sb, atol=1e-11)
    # The cost recomputed from the manifest is what the planner reported.
    again = evaluate(m.placement, problem)
    np.testing.assert_allclose(again.moe_time_s, cost.moe_time_s, rtol=1e-9)
    np.testing.assert_allclose([layer["objective_s"] for layer in m.solver["layers"]], again.moe_time_s,
                               rtol=1e-9)
    assert m.predicted["summary"]["step"]["objective_s"] == pytest.approx(cost.objective_s)


def test_even_split_is_stored_once(tmp_path):
    topo = load_topology("topologies/dgx-h100-2node.yaml")
    config = load_model_config("seed", {"num_layers": 2})
    problem = PlacementProblem(topo, config, make_traffic("zipf:1.2", config, 16))
    doc = build_manifest(eplb(problem), problem)
    for expert in doc["placement"]["layers"][0]["experts"]:
        assert isinstance(expert["row_of"], int) and len(expert["rows"]) == 1
    write_manifest(tmp_path / "e.json", doc)
    assert load_manifest(tmp_path / "e.json").placement.method == "eplb"


def test_atomic_write_replaces_and_leaves_nothing(planned, tmp_path):
    _, _, _, doc = planned
    path = tmp_path / "sub" / "m.json"
    write_manifest(path, doc)
    write_manifest(path, doc)
    assert sorted(os.listdir(path.parent)) == ["m.json"]


def _corrupt(doc, edit):
    bad = copy.deepcopy(doc)
    edit(bad)
    return bad


def _expert(doc, layer=0, expert=0):
    return doc["placement"]["layers"][layer]["experts"][expert]


CASES = [
    ("schema version", lambda d: d.update(schema_version=SCHEMA_VERSION + 1), "schema version 2"),
    ("format", lambda d: d.update(format="something-else"), "not an epplan manifest"),
    ("no replica", lambda d: _expert(d).update(replicas=[]), "has no replica"),
    ("rank out of range", lambda d: _expert(d).update(replicas=[16]), "out of range 0..15"),
    ("split sum", lambda d: _expert(d).update(rows=[[[j, 0.3] for j in range(len(_expert(d)["replicas"]))]]
                                              , row_of=0), "sums to"),
    ("two experts on a GPU", lambda d: _expert(d, 0, 1).update(
        replicas=_expert(d, 0, 0)["replicas"], rows=_expert(d, 0, 0)["rows"], row_of=_expert(d, 0, 0)["row_of"]),
     "experts_per_gpu=2"),
    ("row_of length", lambda d: _expert(d).update(row_of=[0, 0]), "row_of has 2 entries"),
    ("layers", lambda d: d["placement"]["layers"].pop(), "MoE layers"),
    ("model", lambda d: d["model"].update(top_k=99), "model:"),
    ("unknown key", lambda d: d.update(extra=1), "unknown key"),
    ("ranks", lambda d: d["ranks"]["node"].pop(), "ranks"),
]


@pytest.mark.parametrize("name,edit,message", CASES, ids=[c[0] for c in CASES])
def test_rejects_broken_manifest(planned, tmp_path, name, edit, message):
    _, _, _, doc = planned
    bad = _corrupt(doc, edit)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(bad))
    with pytest.raises(ManifestError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_manifest(path)


def test_rejects_corrupted_json(planned, tmp_path):
    _, _, _, doc = planned
    path = tmp_path / "cut.json"
    path.write_text(json.dumps(doc)[:500])
    with pytest.raises(ManifestError, match="not valid JSON"):
        load_manifest(path)
    with pytest.raises(ManifestError, match="not found"):
        load_manifest(tmp_path / "missing.json")


def test_several_experts_per_gpu_allowed_by_the_flag(planned):
    _, _, _, doc = planned
    bad = _corrupt(doc, lambda d: _expert(d, 0, 1).update(
        replicas=_expert(d, 0, 0)["replicas"], rows=_expert(d, 0, 0)["rows"], row_of=_expert(d, 0, 0)["row_of"]))
    bad["problem"]["experts_per_gpu"] = 2
    placement = manifest_from_doc(bad).placement
    placement.validate(2)
    layer = placement.layers[0]
    rank = int(layer.replicas[0][0])
    assert [int(r) for r in layer.replicas[1]] == [int(r) for r in layer.replicas[0]]
    assert sum(rank in reps for reps in layer.replicas) >= 2  # that rank now holds two experts of layer 0
    bad["problem"]["experts_per_gpu"] = 1  # and without the flag it is refused, naming the rank
    with pytest.raises(ManifestError, match=f"rank {rank} holds .* experts, more than experts_per_gpu = 1"):
        manifest_from_doc(bad)
