"""Baseline placements: Megatron's contiguous layout, DeepSeek's EPLB policy, seeded random."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from epplan.cost import evaluate
from epplan.placement.baselines import (
    BASELINES, _pack_to_gpus, _replicate_heaviest, _round_robin, contiguous, eplb, random_placement,
)
from epplan.placement.problem import PlacementProblem
from epplan.topology import load_topology
from epplan.workload import make_traffic
from epplan.workload.config import ModelConfig

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
_TOPOS: dict = {}


def problem_of(topology: str, num_experts: int, routing: str = "zipf:1.2", experts_per_gpu: int = 1,
               num_layers: int = 3) -> PlacementProblem:
    topo = _TOPOS.setdefault(topology, load_topology(TOPOLOGIES / f"{topology}.yaml"))
    config = ModelConfig(name="m", num_layers=num_layers, num_experts=num_experts, top_k=2, d_model=64,
                         d_ff=128, num_heads=4, head_dim=16, num_kv_heads=4, vocab_size=100, seq_len=64,
                         global_batch=topo.num_gpus)
    traffic = make_traffic(routing, config, topo.num_gpus, seed=1)
    return PlacementProblem(topo, config, traffic, experts_per_gpu=experts_per_gpu)


def experts_per_rank(layer, num_gpus: int) -> np.ndarray:
    return np.array([len(e) for e in layer.experts_on_rank(num_gpus)])


def gpu_loads(problem: PlacementProblem, placement) -> np.ndarray:
    """float64[L, G] assignments each GPU serves."""
    return np.stack([layer.flows(c).sum(axis=0) for layer, c in zip(placement.layers, problem.traffic.counts)])


@pytest.mark.parametrize("name", sorted(BASELINES))
@pytest.mark.parametrize("topology,num_experts,epg", [
    ("dgx-h100-2node", 16, 1),   # E = G
    ("dgx-h100-2node", 4, 1),    # G > E: replicas fill the free GPUs
    ("dgx-h100-2node", 6, 1),    # G not a multiple of E
    ("dgx-h100-2node", 32, 2),   # E > G
    ("dgx-h100-2node", 20, 3),   # E > G, uneven
    ("h100-8node-oversub", 4, 1),  # more nodes than experts: EPLB's global policy
    ("hetero-degraded", 8, 1),
])
def test_every_baseline_is_feasible(name, topology, num_experts, epg):
    problem = problem_of(topology, num_experts, experts_per_gpu=epg)
    placement = BASELINES[name](problem)
    placement.validate(epg)
    assert placement.num_layers == problem.num_layers and placement.num_ranks == problem.num_gpus
    for layer in placement.layers:
        held = experts_per_rank(layer, problem.num_gpus)
        assert held.max() <= epg
        if problem.num_gpus >= num_experts:
            assert np.all(held == 1)  # every GPU holds exactly one expert
        for split in layer.split:  # even split over replicas
            np.testing.assert_allclose(split, 1.0 / split.shape[1])
    assert evaluate(placement, problem).step_time_s > 0


def test_contiguous_is_megatron_s_layout():
    p = contiguous(problem_of("dgx-h100-2node", 16))
    assert [r.tolist() for r in p.layers[0].replicas] == [[e] for e in range(16)]
    p = contiguous(problem_of("dgx-h100-2node", 6))
    assert p.layers[0].replicas[0].tolist() == [0, 6, 12] and p.layers[0].replicas[5].tolist() == [5, 11]
    p = contiguous(problem_of("dgx-h100-2node", 32, experts_per_gpu=2))
    assert p.layers[0].experts_on_rank(16)[3] == [6, 7]
    p = contiguous(problem_of("dgx-h100-2node", 20, experts_per_gpu=2))
    assert p.layers[0].experts_on_rank(16)[:5] == [[0, 1], [2, 3], [4, 5], [6, 7], [8]]


def test_replicate_heaviest():
    # loads 8, 4, 1 and 3 extra slots: 8 -> 2 copies (4 each), then 4 vs 4 (tie: lowest index), ...
    assert _replicate_heaviest(np.array([8.0, 4.0, 1.0]), 6, 8).tolist() == [3, 2, 1]
    # capped at the number of GPUs in the pool
    assert _replicate_heaviest(np.array([100.0, 1.0]), 4, 2).tolist() == [2, 2]


def test_pack_to_gpus_keeps_replicas_apart_and_fills_every_slot():
    rng = np.random.default_rng(0)
    for _ in range(200):
        num_ranks, slots = int(rng.integers(1, 7)), int(rng.integers(1, 4))
        num_experts = int(rng.integers(1, num_ranks * slots + 1))
        load = rng.random(num_experts) * 10 ** rng.random(num_experts)
        if num_experts < slots:  # too few experts to fill a rank without repeating one
            continue
        count = _replicate_heaviest(load, num_ranks * slots, num_ranks)
        replicas: list[list[int]] = [[] for _ in range(num_experts)]
        _pack_to_gpus(load, count, np.arange(num_ranks) + 10, slots, np.arange(num_experts), replicas)
        assert [len(r) for r in replicas] == count.tolist()
        assert all(len(set(r)) == len(r) for r in replicas)
        per_rank = np.bincount(np.concatenate(replicas) - 10, minlength=num_ranks)
        assert np.all(per_rank == slots)


def test_round_robin_fallback_keeps_replicas_apart():
    chosen = _round_robin(np.array([3, 1, 2]), 3)  # 6 replicas on 3 ranks, 2 slots each
    by_expert = {e: sorted(p for x, p in chosen if x == e) for e in range(3)}
    assert by_expert == {0: [0, 1, 2], 1: [0], 2: [1, 2]}


def test_eplb_replicates_hot_experts_and_balances_gpus():
    problem = problem_of("dgx-h100-2node", 4, routing="zipf:1.5")
    placement = eplb(problem)
    for layer, load in zip(placement.layers, problem.expert_load):
        counts = np.array([r.size for r in layer.replicas])
        assert counts.sum() == 16
        assert counts[np.argmax(load)] == counts.max()  # the hottest expert has the most replicas
        # hierarchical: 4 experts over 2 nodes, each expert's replicas stay inside its node
        for r in layer.replicas:
            assert len(set(problem.topology.gpu_node[r].tolist())) == 1
    busiest = gpu_loads(problem, placement).max(axis=1)
    assert np.all(busiest < gpu_loads(problem, contiguous(problem)).max(axis=1))


@pytest.mark.parametrize("topology,num_experts", [("dgx-h100-2node", 16),  # hierarchical
                                                   ("h100-8node-oversub", 4)])  # global
def test_eplb_uses_every_slot_the_user_allows(topology, num_experts):
    """EPLB's redundant experts: with --experts-per-gpu 3 it fills 3 slots per GPU (what the planner
    may use too), which relieves the hot experts' GPUs; contiguous keeps one expert per GPU."""
    one = problem_of(topology, num_experts, routing="zipf:1.5")
    three = problem_of(topology, num_experts, routing="zipf:1.5", experts_per_gpu=3)
    placement = eplb(three)
    placement.validate(3)
    for layer in placement.layers:
        assert np.all(experts_per_rank(layer, three.num_gpus) == 3)
    assert np.all(gpu_loads(three, placement).max(axis=1) < gpu_loads(one, eplb(one)).max(axis=1))
    assert all(np.all(experts_per_rank(layer, three.num_gpus) == 1) for layer in contiguous(three).layers)


def test_eplb_slots_stop_at_the_experts_a_node_holds():
    # Hierarchical, 4 experts over 2 nodes: a node holds 2, so a GPU can hold at most 2 distinct.
    problem = problem_of("dgx-h100-2node", 4, routing="zipf:1.5", experts_per_gpu=3)
    for layer in eplb(problem).layers:
        assert np.all(experts_per_rank(layer, problem.num_gpus) == 2)


def test_eplb_global_policy_when_nodes_outnumber_experts():
    problem = problem_of("h100-8node-oversub", 4, routing="zipf:1.5")  # 64 GPUs, 8 nodes, 4 experts
    placement = eplb(problem)
    loads = gpu_loads(problem, placement)
    mean = loads.mean(axis=1)
    assert np.all(loads.max(axis=1) <= 1.5 * mean)
    assert np.all(loads.max(axis=1) < gpu_loads(problem, contiguous(problem)).max(axis=1))


def test_random_is_seeded():
    problem = problem_of("dgx-h100-2node", 6)
    a, b, c = random_placement(problem, 3), random_placement(problem, 3), random_placement(problem, 4)
    same = all(np.array_equal(x, y) for la, lb in zip(a.layers, b.layers) for x, y in zip(la.replicas, lb.replicas))
    diff = all(np.array_equal(x, y) for la, lc in zip(a.layers, c.layers) for x, y in zip(la.replicas, lc.replicas))
    assert same and not diff
    r = random_placement(problem, 3, even_split=False)
    r.validate(1)
    assert any(not np.allclose(s, 1.0 / s.shape[1]) for s in r.layers[0].split if s.shape[1] > 1)
