"""The replica-move search (``epplan.placement.search``) against the slow references: the brute
force over every placement of tiny layers where the leaf/spine binds, and its own plans re-scored
as ``evaluate`` scores them."""

from __future__ import annotations

import time

import numpy as np
import pytest

from epplan.placement.baselines import baseline
from epplan.placement.bruteforce import brute_force
from epplan.placement.layer import layer_data
from epplan.placement.problem import PlacementProblem
from epplan.placement.search import replica_search
from epplan.placement.splits import optimal_splits, split_result
from epplan.placement.types import LayerPlacement
from epplan.topology import build_topology, parse_spec
from epplan.workload import load_model_config
from epplan.workload.traffic import Traffic

from test_planner import _NODE
from test_planner_bounds import leaf_spine, leaf_spine_n, problem_on, rail_toy


def _start(data, problem, name: str):
    res = optimal_splits(data, baseline(name, problem).layers[0].replicas)
    return res.layer, res.bottleneck, res.link_time


@pytest.mark.parametrize("topo,experts,seed", [
    (lambda: leaf_spine(), 4, 0), (lambda: leaf_spine(), 4, 1), (lambda: leaf_spine(trunk=5.0), 3, 2),
    (lambda: rail_toy(4, 2, 4.0, 2000.0), 2, 0), (lambda: rail_toy(3, 2, 2.0, 200.0), 3, 3)])
def test_search_plans_are_real_where_the_spine_binds(topo, experts, seed):
    """From the contiguous layout, every plan the moves report costs what its flows cost, none
    is below the brute force's optimum and none above the start (a local search: it may stop
    above the optimum)."""
    problem = problem_on(topo(), experts, seed=seed)
    data = layer_data(problem, problem.traffic.counts[0])
    best, _ = brute_force(problem)
    layer, cost, link_s = _start(data, problem, "contiguous")
    kept = []
    found = replica_search(data, layer, cost, link_s, until=None, seed=seed,
                           post=lambda lay, c, l: kept.append((lay, c)))
    assert not found.stopped_by_time
    for lay, c in kept + [(found.layer, found.cost)]:
        assert data.time_of(lay.flows(data.counts))[0] == pytest.approx(c, rel=1e-9)
        assert c >= best * (1 - 1e-7)
    assert found.cost <= cost


def test_search_stops_at_its_deadline_and_never_worsens():
    problem = problem_on(leaf_spine(gpus=2), 4, seed=5)
    data = layer_data(problem, problem.traffic.counts[0])
    layer, cost, link_s = _start(data, problem, "random")
    t0 = time.monotonic()
    found = replica_search(data, layer, cost, link_s, until=t0 + 0.3, patience=10**9)
    assert found.stopped_by_time and time.monotonic() - t0 < 2.0
    assert found.cost <= cost
    assert data.time_of(found.layer.flows(data.counts))[0] == pytest.approx(found.cost, rel=1e-9)


def test_search_lowers_eplb_where_rails_cross_a_thin_spine():
    """4 servers x 4 GPUs, a leaf per rail, one spine at 4:1 under ECMP, 8 experts: from EPLB's
    placement re-split by the LP, the moves lower the plan, and it is a real one (every expert
    held, no GPU over its slots, the cost its flows cost)."""
    problem = problem_on(rail_toy(4, 4, 4.0, 2000.0), 8, seed=0)
    data = layer_data(problem, problem.traffic.counts[0])
    layer, cost, link_s = _start(data, problem, "eplb")
    found = replica_search(data, layer, cost, link_s, until=None)
    assert found.kept >= 1 and found.cost < cost * (1 - 1e-3)
    held = np.bincount(np.concatenate(found.layer.replicas), minlength=data.num_gpus)
    assert all(r.size for r in found.layer.replicas) and np.all(held <= data.slots)
    assert data.time_of(found.layer.flows(data.counts))[0] == pytest.approx(found.cost, rel=1e-9)


def _rails(nodes: int, gpus: int, tflops: float = 2000.0):
    """``nodes`` servers of ``gpus`` GPUs on a 900 GB/s NVSwitch (the NICs, 50 GB/s, bind),
    a leaf per rail, one spine, non-blocking, ECMP."""
    text = _NODE.format(nodes=nodes, gpus=gpus, tflops=tflops, attach=list(range(gpus)))
    text = text.replace("nvswitch, gbps: 100", "nvswitch, gbps: 900")
    text += f"fabric: {{kind: rail_optimized, nodes_per_su: {nodes}, spines: 1, oversubscription: 1.0}}\n"
    return build_topology(parse_spec(text + "routing: ecmp\n"))


def _is_real(data, layer: LayerPlacement, replicas_per_node: np.ndarray | None = None) -> None:
    """Every expert held, no GPU over its slots or holding an expert twice, every split row 1."""
    assert all(r.size and np.all(np.diff(r) > 0) for r in layer.replicas)
    held = np.bincount(np.concatenate(layer.replicas), minlength=data.num_gpus)
    assert np.all(held <= data.slots)
    for r, x in zip(layer.replicas, layer.split):
        assert x.shape == (data.num_gpus, r.size) and np.allclose(x.sum(axis=1), 1.0)
    if replicas_per_node is not None:
        assert np.array_equal(_per_node(data, layer), replicas_per_node)


def _per_node(data, layer: LayerPlacement) -> np.ndarray:
    node = np.asarray(data.lm.gpu_node)
    return np.stack([np.bincount(node[r], minlength=int(node.max()) + 1) for r in layer.replicas])


def test_same_node_moves_level_the_nics_where_no_cross_node_move_pays():
    """2 servers x 2 GPUs, 2 experts per GPU, one replica each: server 0 holds experts 0-3 and
    its GPUs ask for them most, server 1 holds 4-7 and asks for them most, and for 0 and 1 a
    fifth of that. GPU 0 holds 0 and 1, so its NIC carries all of server 1's demand for server
    0's experts; any expert moved to the other server sends its own server's demand over the
    network, and no slot is free. An exchange of 1 and 2 between GPUs 0 and 1 levels their NICs:
    the search finds it, and the plan is a real one (its cost what its flows cost)."""
    topo = _rails(2, 2)
    config = load_model_config("tiny", {"num_experts": 8, "d_ff": 256, "num_layers": 1})
    counts = np.ones((4, 8))
    counts[:2, :4] = counts[2:, 4:] = 100.0
    counts[2:, :2] = 20.0
    counts *= config.tokens_per_step / 4 * config.top_k / counts.sum(axis=1, keepdims=True)
    problem = PlacementProblem(topo, config, Traffic(counts[None], "test"), experts_per_gpu=2)
    data = layer_data(problem, problem.traffic.counts[0])
    replicas = [np.array([g]) for g in (0, 0, 1, 1, 2, 2, 3, 3)]
    start = split_result(data, LayerPlacement(replicas, [np.ones((4, 1)) for _ in replicas]))
    found = replica_search(data, start.layer, start.bottleneck, start.link_time, until=None)
    # Measured: 7.483e-8 s (GPU 0's NIC 6.255e-8 s) -> 4.576e-8 s (3.438e-8 s)
    assert found.cost < start.bottleneck * 0.7
    _is_real(data, found.layer)
    assert data.time_of(found.layer.flows(data.counts))[0] == pytest.approx(found.cost, rel=1e-9)


@pytest.mark.parametrize("topo,experts,start,seed", [
    (lambda: _rails(3, 2), 5, "contiguous", 0), (lambda: _rails(2, 4), 7, "random", 1),
    (lambda: _rails(4, 2, tflops=200.0), 6, "eplb", 2), (lambda: leaf_spine_n(3, 2, 2.0, 2000.0), 5, "random", 3),
    (lambda: rail_toy(3, 2, 4.0, 2000.0), 4, "contiguous", 4)])
@pytest.mark.parametrize("slack", [0.0, 0.05])
def test_same_node_moves_score_the_placement_they_make(topo, experts, start, seed, slack):
    """``level_nodes`` scores each move by the plan's flows with two columns permuted; the slow
    reference is the moved placement's own flows, timed from scratch. From a baseline re-split
    by the LP (2 experts per GPU): the cost and busiest link it reports are those, the busiest
    link never above the start's, nor the cost (without a slack) or any GPU's time beyond the
    slack (with one), and every node keeps the replicas it had."""
    from epplan.placement.search import level_nodes

    problem = problem_on(topo(), experts, seed=seed)
    problem = PlacementProblem(problem.topology, problem.config, problem.traffic, experts_per_gpu=2)
    data = layer_data(problem, problem.traffic.counts[0])
    res = optimal_splits(data, baseline(start, problem).layers[0].replicas)
    _, _, gpu_s = data.time_of(res.layer.flows(data.counts))
    lev = level_nodes(data, res.layer, res.bottleneck, res.link_time, until=None, gpu_slack=slack)
    assert lev.link_s <= res.link_time * (1 + 1e-12)
    _is_real(data, lev.layer, _per_node(data, res.layer))
    cost, link_s, moved_gpu_s = data.time_of(lev.layer.flows(data.counts))
    assert cost == pytest.approx(lev.cost, rel=1e-9) and link_s == pytest.approx(lev.link_s, rel=1e-9)
    if slack:
        assert moved_gpu_s <= gpu_s * (1 + slack) * (1 + 1e-9)
    else:
        assert lev.cost <= res.bottleneck * (1 + 1e-12)


@pytest.mark.parametrize("experts,seed,start", [(4, 0, "random"), (3, 1, "eplb"), (5, 2, "random")])
def test_moves_are_drawn_from_the_plan_in_hand_after_the_lp_prunes(monkeypatch, experts, seed, start):
    """3 servers x 2 GPUs, 2 experts per GPU: the split LP drops replicas that serve nothing
    (``splits._prune``), so a kept move's plan may hold fewer replicas than the placement the
    move made. Every later move must be drawn from what the kept plan holds (the slow
    reference: ``_held`` of its replicas), not from the placement before the prune; and the
    prune must have fired after a kept move, or the test checks nothing."""
    import epplan.placement.search as search

    problem = problem_on(_rails(3, 2), experts, seed=seed)
    problem = PlacementProblem(problem.topology, problem.config, problem.traffic, experts_per_gpu=2)
    data = layer_data(problem, problem.traffic.counts[0])
    layer, cost, link_s = _start(data, problem, start)
    in_hand = [layer]
    drawn_from, pruned = [], set()   # (the holding drawn from, the plan in hand's); plans the prune cut
    split, draw = search.optimal_splits, search._draw

    def spy_split(data, replicas, **kw):
        res = split(data, replicas, **kw)
        if sum(r.size for r in res.layer.replicas) < sum(len(r) for r in replicas):
            pruned.add(id(res.layer))
        return res

    def spy_draw(rng, held, *args):
        drawn_from.append((held.copy(), search._held(in_hand[-1].replicas, *held.shape)))
        return draw(rng, held, *args)

    monkeypatch.setattr(search, "optimal_splits", spy_split)
    monkeypatch.setattr(search, "_draw", spy_draw)
    found = replica_search(data, layer, cost, link_s, until=None, seed=seed,
                           post=lambda lay, c, l: in_hand.append(lay))
    assert any(id(lay) in pruned for lay in in_hand[1:])
    assert drawn_from and all(np.array_equal(held, want) for held, want in drawn_from)
    _is_real(data, found.layer)
