"""Baseline placements: Megatron's contiguous layout, DeepSeek's EPLB policy, seeded random."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from epplan.cost import evaluate
from epplan.placement.baselines import BASELINES, contiguous, eplb, eplb_hierarchical, random_placement
from epplan.placement.eplb import rebalance_experts
from epplan.placement.problem import PlacementProblem
from epplan.topology import load_topology
from epplan.workload import make_traffic
from epplan.workload.config import ModelConfig

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
_TOPOS: dict = {}


def problem_of(topology: str, num_experts: int, routing: str = "zipf:1.2", experts_per_gpu: int = 1,
               num_layers: int = 3, num_expert_groups: int = 0) -> PlacementProblem:
    topo = _TOPOS.setdefault(topology, load_topology(TOPOLOGIES / f"{topology}.yaml"))
    config = ModelConfig(name="m", num_layers=num_layers, num_experts=num_experts, top_k=2, d_model=64,
                         d_ff=128, num_heads=4, head_dim=16, num_kv_heads=4, vocab_size=100, seq_len=64,
                         global_batch=topo.num_gpus, num_expert_groups=num_expert_groups,
                         topk_groups=min(num_expert_groups, 1))
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
        for split in layer.split:  # every source splits alike
            np.testing.assert_allclose(split, np.broadcast_to(split[:1], split.shape))
            if not name.startswith("eplb"):  # EPLB: shares of its physical replicas
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


# DeepSeek EPLB README's worked example: 2 layers x 12 experts, 16 replicas, 4 groups, 2 nodes, 8 GPUs.
README_WEIGHT = np.array([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                          [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])
README_PHY2LOG = [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                  [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]


def test_eplb_reproduces_deepseek_readme_example():
    phy2log, log2phy, logcnt = rebalance_experts(README_WEIGHT, 16, 4, 2, 8)
    assert phy2log.tolist() == README_PHY2LOG
    assert logcnt.tolist() == [[1, 2, 1, 1, 2, 2, 1, 1, 1, 1, 2, 1], [1, 2, 1, 1, 1, 2, 2, 1, 2, 1, 1, 1]]
    for li in range(2):  # log2phy inverts phy2log, one column per replica rank, -1 padded
        for e in range(12):
            slots = log2phy[li, e][log2phy[li, e] >= 0]
            assert slots.size == logcnt[li, e] and np.all(phy2log[li, slots] == e)
    # hierarchical: a group's three experts stay on one node (slots 0-7 node 0, 8-15 node 1)
    for li in range(2):
        node_of = {e: {s // 8 for s in range(16) if phy2log[li, s] == e} for e in range(12)}
        for g in range(4):
            assert len(set().union(*(node_of[e] for e in range(3 * g, 3 * g + 3)))) == 1


def test_eplb_global_policy_when_groups_do_not_divide_over_nodes():
    # 3 groups on 2 nodes: the global policy, i.e. one group on one node.
    assert rebalance_experts(README_WEIGHT, 16, 3, 2, 8)[0].tolist() == \
        rebalance_experts(README_WEIGHT, 16, 1, 1, 8)[0].tolist()


def test_eplb_takes_the_model_s_groups():
    # One group (no group-limited routing): global, a hot expert's replicas span both nodes;
    # eplb-hier (every expert a group) keeps each expert's replicas on one node.
    flat = problem_of("dgx-h100-2node", 4, routing="zipf:1.5")
    node = flat.topology.gpu_node
    spans = [len(set(node[r].tolist())) for layer in eplb(flat).layers for r in layer.replicas]
    assert max(spans) == 2
    assert all(len(set(node[r].tolist())) == 1 for layer in eplb_hierarchical(flat).layers for r in layer.replicas)
    # Two groups of 4 on 2 nodes: hierarchical, each group on one node.
    grouped = problem_of("dgx-h100-2node", 8, routing="zipf:1.5", num_expert_groups=2)
    for layer in eplb(grouped).layers:
        for g in range(2):
            assert len({int(n) for e in range(4 * g, 4 * g + 4) for n in node[layer.replicas[e]]}) == 1


def test_eplb_placement_is_its_phy2log():
    """GPU g holds physical slots g * S .. (g + 1) * S - 1; an expert's share of a source's
    tokens on a GPU is the number of its physical replicas there over its count."""
    problem = problem_of("h100-8node-oversub", 4, routing="zipf:1.5", experts_per_gpu=3)
    phy2log, _, logcnt = rebalance_experts(problem.expert_load, 64 * 3, 1, 1, 64)
    for li, layer in enumerate(eplb(problem).layers):
        for e, (ranks, split) in enumerate(zip(layer.replicas, layer.split)):
            slots = np.flatnonzero(phy2log[li] == e)
            np.testing.assert_array_equal(ranks, np.unique(slots // 3))
            np.testing.assert_allclose(split[0], [np.sum(slots // 3 == g) / logcnt[li, e] for g in ranks])


def test_eplb_replicates_hot_experts_and_balances_gpus():
    problem = problem_of("dgx-h100-2node", 4, routing="zipf:1.5")
    for placement in (eplb(problem), eplb_hierarchical(problem)):
        for layer, load in zip(placement.layers, problem.expert_load):
            counts = np.array([r.size for r in layer.replicas])
            assert counts.sum() == 16
            assert counts[np.argmax(load)] == counts.max()  # the hottest expert has the most replicas
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
    for layer in placement.layers:  # EPLB may pack two replicas of one expert on a GPU: one here
        assert experts_per_rank(layer, three.num_gpus).sum() > 2 * three.num_gpus
    assert np.all(gpu_loads(three, placement).max(axis=1) < gpu_loads(one, eplb(one)).max(axis=1))
    assert all(np.all(experts_per_rank(layer, three.num_gpus) == 1) for layer in contiguous(three).layers)


def test_eplb_slots_stop_at_the_experts_a_node_holds():
    # Hierarchical, 4 experts over 2 nodes: a node holds 2, so a GPU can hold at most 2 distinct.
    problem = problem_of("dgx-h100-2node", 4, routing="zipf:1.5", experts_per_gpu=3)
    for layer in eplb_hierarchical(problem).layers:
        assert np.all(experts_per_rank(layer, problem.num_gpus) <= 2)


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
