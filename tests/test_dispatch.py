"""Hierarchical dispatch's cost model against per-token simulation, its link loads against a
per-token reference, and the coact routing source."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from epplan.cost import evaluate, link_map
from epplan.cost.dispatch import (hierarchical_link_loads, hierarchical_rows, rail_peers, replica_choice,
                                  simulate_rows, split_counts, token_statistics)
from epplan.errors import TrafficError
from epplan.manifest import build_manifest, manifest_from_doc
from epplan.placement.baselines import contiguous, eplb
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import LayerPlacement, Placement
from epplan.runtime.expert_parallel import split_assignments
from epplan.topology import build_topology, parse_spec
from epplan.workload import make_traffic
from epplan.workload.coact import Coact, coact_statistics, layer_model, layer_rng, sample_tokens
from epplan.workload.config import ModelConfig

# Four servers of two GPUs, one NIC per GPU (rails 0 and 1), one switch.
BOX = ("{gpus: 2, gpu: {model: X, memory_gb: 80, bf16_tflops: 100, hbm_gbps: 1000}, "
       "fabric: {kind: nvswitch, gbps: 100}, nics: {gbps: 10, attach: [0, 1], pcie_gbps: 40}}")
FOUR_BY_TWO = (f"{{name: four-by-two, node_types: {{box: {BOX}}}, "
               "nodes: [{prefix: n, count: 4, type: box}], fabric: {kind: switch}}")
G, NODES = 8, 4


@pytest.fixture(scope="module")
def topo():
    return build_topology(parse_spec(FOUR_BY_TWO))


def tokens_of(params: Coact, num_experts: int, top_k: int, num_tokens: int, seed: int):
    """(topk_idx int64[T, k], source int64[T] sorted): coact tokens spread over the G sources."""
    rng = np.random.default_rng(seed)
    topk = sample_tokens(params, num_experts, top_k, num_tokens, rng)
    return topk, np.sort(rng.integers(G, size=num_tokens))


def single_replica(num_experts: int, seed: int) -> LayerPlacement:
    """Experts on GPUs in a random order, num_experts / G per GPU, no replicas."""
    gpu = np.random.default_rng(seed).permutation(num_experts) % G
    return LayerPlacement([np.array([g]) for g in gpu], [np.ones((G, 1)) for _ in gpu])


def replicated(num_experts: int, seed: int) -> LayerPlacement:
    """Every expert on two GPUs of different nodes, uneven per-source splits (one share 0)."""
    rng = np.random.default_rng(seed)
    gpu = rng.permutation(num_experts) % G
    replicas, splits = [], []
    for e, g in enumerate(gpu):
        ranks = np.array(sorted({int(g), int((g + 3) % G)}))
        share = rng.random((G, ranks.size))
        share[e % G, 0] = 0.0
        replicas.append(ranks)
        splits.append(share / share.sum(axis=1, keepdims=True))
    return LayerPlacement(replicas, splits)


def predict(topk, source, layer, top_k, num_experts):
    counts, pairs = token_statistics(topk, source, G, num_experts)
    return hierarchical_rows(counts.astype(float), pairs.astype(float), layer, np.repeat(np.arange(NODES), 2),
                             top_k=top_k)


def test_top2_without_replicas_is_exact():
    gpu_node = np.repeat(np.arange(NODES), 2)
    for num_experts, seed in ((8, 0), (16, 1), (16, 2)):  # one and two experts per GPU
        topk, source = tokens_of(Coact(4, 0.8), num_experts, 2, 3000, seed)
        layer = single_replica(num_experts, seed)
        node_rows, gpu_rows = predict(topk, source, layer, 2, num_experts)
        want_node, want_gpu = simulate_rows(topk, source, layer, gpu_node, G)
        np.testing.assert_array_equal(node_rows, want_node)
        np.testing.assert_array_equal(gpu_rows, want_gpu)


@pytest.mark.parametrize("top_k", [4, 8])
def test_topk_without_replicas_close_to_simulation(top_k):
    gpu_node = np.repeat(np.arange(NODES), 2)
    num_experts = 32
    topk, source = tokens_of(Coact(8, 0.7, 1.0), num_experts, top_k, 4000, 3)
    layer = single_replica(num_experts, 3)
    node_rows, _ = predict(topk, source, layer, top_k, num_experts)
    want, _ = simulate_rows(topk, source, layer, gpu_node, G)
    counts, _ = token_statistics(topk, source, G, num_experts)
    assert np.all(want <= counts @ np.eye(NODES)[gpu_node[np.array([r[0] for r in layer.replicas])]])
    rel = abs(node_rows.sum() - want.sum()) / want.sum()
    assert rel < 0.03, rel                       # measured 0.3-0.9 %
    assert np.abs(node_rows - want).max() / want.max() < 0.08


def test_replicas_top2_close_to_the_runtime_rule():
    gpu_node = np.repeat(np.arange(NODES), 2)
    num_experts = 8
    topk, source = tokens_of(Coact(4, 0.8), num_experts, 2, 6000, 4)
    layer = replicated(num_experts, 4)
    node_rows, gpu_rows = predict(topk, source, layer, 2, num_experts)
    want_node, want_gpu = simulate_rows(topk, source, layer, gpu_node, G)
    assert abs(node_rows.sum() - want_node.sum()) / want_node.sum() < 0.01
    assert abs(gpu_rows.sum() - want_gpu.sum()) / want_gpu.sum() < 0.01


def test_replica_rule_is_the_runtimes():
    rng = np.random.default_rng(5)
    for _ in range(20):
        shares = rng.random(4) * (rng.random(4) > 0.3)
        shares = shares / shares.sum() if shares.sum() > 0 else np.array([1.0, 0, 0, 0])
        num = int(rng.integers(0, 50))
        want = split_assignments(torch.tensor([num]), torch.tensor(shares[None, :]))[0].numpy()
        np.testing.assert_array_equal(split_counts(num, shares), want)


def test_link_loads_match_a_per_token_route(topo):
    """Measured rows on links equal routing every token's rows one by one (the contract)."""
    num_experts = 16
    topk, source = tokens_of(Coact(4, 0.6), num_experts, 4, 500, 6)
    layer = replicated(num_experts, 6)
    node_rows, gpu_rows = simulate_rows(topk, source, layer, topo.gpu_node, G)
    dest = replica_choice(topk, source, layer)
    peers = rail_peers(topo.gpu_node, topo.gpu_local)
    rows = np.zeros((G, G))
    for s, gpus in zip(source, dest):
        for g in set(gpus.tolist()):
            n = topo.gpu_node[g]
            p = peers[s, n]
            if g != p:
                rows[p, g] += 1                 # inside node n
        for n in {int(topo.gpu_node[g]) for g in gpus}:
            if n != topo.gpu_node[s]:
                rows[s, peers[s, n]] += 1       # across the network, once per node
    row_bytes = 4096.0
    fwd, bwd = hierarchical_link_loads(link_map(topo), node_rows, gpu_rows, row_bytes)
    np.testing.assert_allclose(fwd, row_bytes * topo.link_loads(rows), rtol=0, atol=1e-6)
    np.testing.assert_allclose(bwd, row_bytes * topo.link_loads(rows.T.copy()), rtol=0, atol=1e-6)
    # Every network row stays on its rail: one NIC up, one NIC down.
    assert np.all(np.diag(peers[:, topo.gpu_node]) == np.arange(G))


def small_model(**kw) -> ModelConfig:
    fields = dict(name="small", num_layers=2, num_experts=8, top_k=2, d_model=8, d_ff=16, num_heads=2,
                  head_dim=4, num_kv_heads=2, vocab_size=16, seq_len=4, global_batch=64)
    fields.update(kw)
    return ModelConfig(**fields)


def test_evaluate_hierarchical_fast_equals_reference_and_is_recorded(topo):
    config = small_model()
    traffic = make_traffic("coact:4:0.9", config, G, seed=1)
    problem = PlacementProblem(topo, config, traffic, dispatch="hierarchical", achievable_tflops=100)
    plan = eplb(problem)
    fast, ref = evaluate(plan, problem), evaluate(plan, problem, fast=False)
    np.testing.assert_allclose(fast.dispatch_fwd_bytes, ref.dispatch_fwd_bytes, rtol=1e-6)
    np.testing.assert_allclose(fast.combine_fwd_bytes, ref.combine_fwd_bytes, rtol=1e-6)
    assert fast.to_dict()["dispatch"] == "hierarchical"
    flat = evaluate(plan, PlacementProblem(topo, config, traffic, achievable_tflops=100))
    nic = np.array([c == "nic_up" for c in topo.link_class])
    assert fast.dispatch_fwd_bytes[:, nic].sum() < flat.dispatch_fwd_bytes[:, nic].sum()
    manifest = manifest_from_doc(build_manifest(plan, problem, cost=fast))
    assert manifest.dispatch == "hierarchical" and manifest.problem_options()["dispatch"] == "hierarchical"


def test_dispatch_mode_is_checked(topo):
    config = small_model()
    with pytest.raises(Exception, match="dispatch='pxn'"):
        PlacementProblem(topo, config, make_traffic("uniform", config, G), dispatch="pxn")


# ------------------------------------------------------------------------------ the routing source

def test_coact_is_seeded_and_consistent():
    config = small_model(num_experts=16, top_k=4)
    a = make_traffic("coact:4:0.8:1.0", config, G, seed=7)
    b = make_traffic("coact:4:0.8:1.0", config, G, seed=7)
    c = make_traffic("coact:4:0.8:1.0", config, G, seed=8)
    np.testing.assert_array_equal(a.counts, b.counts)
    np.testing.assert_array_equal(a.pairs, b.pairs)
    assert not np.array_equal(a.pairs, c.pairs)
    tokens = config.tokens_per_step / G
    np.testing.assert_allclose(a.counts.sum(axis=2), tokens * config.top_k)
    np.testing.assert_allclose(a.pairs.sum(axis=(2, 3)), tokens * 6)            # C(4, 2) per token
    assert np.all(np.tril(a.pairs[0, 0]) == 0)
    # Each pair count is at most either expert's tokens.
    per_token = a.counts[0, 0] / config.top_k
    assert np.all(a.pairs[0, 0] <= np.minimum.outer(a.counts[0, 0], a.counts[0, 0]) + 1e-9)
    assert per_token.sum() > 0


def test_coact_share_sets_the_co_activation():
    """SHARE 1 keeps a token's experts in its group; SHARE 0 spreads pairs like independence."""
    share, pairs = coact_statistics(Coact(4, 1.0), 1, 16, 2, seed=0, num_tokens=4000)
    weight, group_of = layer_model(Coact(4, 1.0), 16, layer_rng(0, 0))
    i, j = np.nonzero(pairs[0])
    assert np.all(group_of[i] == group_of[j])
    _, pairs0 = coact_statistics(Coact(4, 0.0), 1, 16, 2, seed=0, num_tokens=4000)
    same = group_of[:, None] == group_of[None, :]
    upper = np.triu(np.ones((16, 16), dtype=bool), 1)
    assert pairs0[0][same & upper].sum() < 0.3       # 18 of 120 pairs are in a group: 15 % expected
    np.testing.assert_allclose(share.sum(), 1.0)


@pytest.mark.parametrize("spec, match", [("coact:1:0.5", "SIZE"), ("coact:4:1.5", "SHARE"),
                                         ("coact:4", "coact:SIZE:SHARE"), ("coact:x:0.5", "integer"),
                                         ("coact:4:0.5:-1", "ALPHA"), ("coact:64:0.5", "exceeds")])
def test_coact_spec_errors(spec, match):
    with pytest.raises(TrafficError, match=match):
        make_traffic(spec, small_model(), G)


def test_routing_statistics_pairs_reach_the_cost_model(tmp_path, topo):
    """A run's v2 statistics (counts + pairs) -> make_traffic -> hierarchical rows equal the
    per-token rows of the same tokens, scaled to the model's volume (top-2: exact)."""
    from epplan.workload.routing_stats import write_routing_stats

    config = small_model(num_layers=1, num_experts=16)
    topk, source = tokens_of(Coact(4, 0.8), 16, 2, 2000, 9)
    counts, pairs = token_statistics(topk, source, G, 16)
    path = write_routing_stats(tmp_path / "routing.json", counts[None], steps=2, model="small", top_k=2,
                               tokens_per_rank_per_step=1.0, pairs=pairs[None])
    traffic = make_traffic(str(path), config, G)
    layer = single_replica(16, 9)
    node_rows, gpu_rows = hierarchical_rows(traffic.counts[0], traffic.pairs[0], layer, topo.gpu_node, top_k=2)
    want_node, want_gpu = simulate_rows(topk, source, layer, topo.gpu_node, G)
    scale = traffic.counts[0].sum(axis=1) / counts.sum(axis=1)           # per source
    np.testing.assert_allclose(node_rows, want_node * scale[:, None], rtol=1e-12)
    np.testing.assert_allclose(gpu_rows, want_gpu * scale[:, None], rtol=1e-12)


# ------------------------------------------------------------------------------ the planner

def _nic_bytes(cost, topo) -> float:
    nic = np.array([c == "nic_up" for c in topo.link_class])
    return float(cost.dispatch_fwd_bytes[:, nic].sum(dtype=np.float64))


@pytest.mark.parametrize("spec, top_k, experts", [("coact:4:0.9", 2, 8), ("coact:4:0.8", 4, 16),
                                                  ("coact:2:0.9", 2, 4), ("uniform", 2, 8)])
def test_planner_never_worse_than_the_co_activation_blind_plan(topo, spec, top_k, experts):
    from epplan.placement.hierarchical import improve_hierarchical
    from epplan.placement.solve import solve

    config = small_model(num_experts=experts, top_k=top_k, d_model=512, d_ff=64)
    traffic = make_traffic(spec, config, G, seed=2)
    options = dict(experts_per_gpu=max(1, experts // G), achievable_tflops=100, overlap="off")  # 4: replicas
    flat = PlacementProblem(topo, config, traffic, **options)
    hier = PlacementProblem(topo, config, traffic, dispatch="hierarchical", **options)
    blind = solve(flat, time_limit=20, workers=1)
    aware = solve(hier, time_limit=20, workers=1)
    blind_cost, aware_cost = evaluate(blind, hier), evaluate(aware, hier)
    assert np.all(aware_cost.moe_time_s <= blind_cost.moe_time_s * (1 + 1e-12))
    for base in (contiguous(hier), eplb(hier)):
        improved = improve_hierarchical(base, hier)
        assert np.all(evaluate(improved, hier).moe_time_s <= evaluate(base, hier).moe_time_s * (1 + 1e-12))
    info = aware.info
    assert info["dispatch"] == "hierarchical" and info["bound_s"] <= info["objective_s"] + 1e-12
    if spec.startswith("coact"):  # the network binds at d_model 512: co-location pays
        assert _nic_bytes(aware_cost, topo) < _nic_bytes(blind_cost, topo)
        assert aware_cost.objective_s < blind_cost.objective_s


def test_hierarchical_bound_below_every_placement(topo):
    """The bound under hierarchical dispatch against every placement of 8 experts on 8 GPUs up to
    the order inside a node and of the nodes (all sources route alike: 105 partitions)."""
    import itertools

    from epplan.placement.hierarchical import hierarchical_bound
    from epplan.placement.layer import layer_data

    config = small_model(num_experts=8, top_k=4, num_layers=1, d_model=512, d_ff=64)
    traffic = make_traffic("coact:2:1.0", config, G, seed=3)
    problem = PlacementProblem(topo, config, traffic, dispatch="hierarchical", achievable_tflops=100, overlap="off")
    bound = hierarchical_bound(layer_data(problem, traffic.counts[0]), config.top_k)
    best = np.inf
    for order in itertools.permutations(range(8)):
        if any(order[2 * n] > order[2 * n + 1] for n in range(NODES)) or list(order[::2]) != sorted(order[::2]):
            continue
        gpu = np.empty(8, dtype=np.int64)
        gpu[list(order)] = np.arange(8)
        layer = LayerPlacement([np.array([g]) for g in gpu], [np.ones((G, 1)) for _ in gpu])
        best = min(best, evaluate(Placement(G, 8, [layer]), problem).objective_s)
    assert 0 < bound <= best


# ------------------------------------------------------------------------------ the CLI

def test_place_dispatch_flag_records_the_choice(tmp_path):
    import json

    from typer.testing import CliRunner

    from epplan.cli import app
    from epplan.cli.place import DISPATCH_MARGIN
    from epplan.manifest import load_manifest

    topology = str(Path(__file__).resolve().parent.parent / "topologies" / "dgx-h100-2node.yaml")
    args = ["place", "--topology", topology, "--model", "tiny", "--routing", "coact:4:1.0", "--set",
            "num_experts=16", "--time-limit", "20", "--gap", "0.6", "--workers", "1", "--json"]
    chosen = {}
    for mode in ("flat", "hierarchical", "auto"):
        out = tmp_path / f"{mode}.json"
        result = CliRunner().invoke(app, [*args, "--dispatch", mode, "--out", str(out)])
        assert result.exit_code == 0, result.output
        data = json.loads(result.stdout)
        chosen[mode] = data["dispatch"]
        assert load_manifest(out).dispatch == data["dispatch"]["chosen"] == data["cost"]["dispatch"]
    assert chosen["flat"]["chosen"] == "flat" and chosen["hierarchical"]["chosen"] == "hierarchical"
    auto = chosen["auto"]["predicted_step_time_s"]
    assert set(auto) == {"flat", "hierarchical"}
    margin_won = auto["hierarchical"] < auto["flat"] * (1 - DISPATCH_MARGIN)
    assert chosen["auto"]["chosen"] == ("hierarchical" if margin_won else "flat")
    bad = CliRunner().invoke(app, [*args, "--dispatch", "pxn", "--out", str(tmp_path / "x.json")])
    assert bad.exit_code == 1 and "--dispatch 'pxn'" in bad.output and "Traceback" not in bad.output


def test_hierarchical_rows_kept_per_traffic_not_shared_across_pairs(topo):
    """evaluate keeps a layer's rows per (counts, pairs) arrays: the same counts with other pair
    counts (a window mean, a what-if) are scored afresh, and a repeat gives the same numbers."""
    import dataclasses

    config = small_model()
    together = make_traffic("coact:4:1.0", config, G, seed=1)
    apart = dataclasses.replace(together, pairs=np.zeros_like(together.pairs))   # same counts array
    plan = eplb(PlacementProblem(topo, config, together, achievable_tflops=100))
    costs = [evaluate(plan, PlacementProblem(topo, config, t, dispatch="hierarchical", achievable_tflops=100))
             for t in (together, apart, together)]
    assert _nic_bytes(costs[0], topo) < _nic_bytes(costs[1], topo)
    np.testing.assert_array_equal(costs[0].dispatch_fwd_bytes, costs[2].dispatch_fwd_bytes)
