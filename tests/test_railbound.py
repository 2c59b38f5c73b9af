"""The rail-cover bound (``epplan.placement.railbound``): on tiny ECMP rail fabrics whose spine
binds it stays below the busiest link of every placement (each with its exact split) and the
trade-off bound it enters below the brute force's optimum; where the near relation is not a
grid (rail-aligned routing) it does not apply."""

from __future__ import annotations

import numpy as np
import pytest

from epplan.placement.bounds import cut_bound, lower_bound, tradeoff_bound
from epplan.placement.bruteforce import brute_force
from epplan.placement.layer import layer_data
from epplan.placement.problem import PlacementProblem
from epplan.placement.railbound import RailCover
from epplan.placement.splits import optimal_splits
from epplan.topology import build_topology, parse_spec
from epplan.workload.traffic import Traffic

from test_planner import _NODE
from test_planner_bounds import _every_placement, problem_on


def rail_sus(nodes: int, per_su: int, gpus: int, over: float, tflops: float, routing: str = "ecmp"):
    """``nodes`` servers of ``gpus`` GPUs in scalable units of ``per_su``, a leaf per rail per
    unit, one spine at ``over``:1."""
    text = _NODE.format(nodes=nodes, gpus=gpus, tflops=tflops, attach=list(range(gpus)))
    text += f"fabric: {{kind: rail_optimized, nodes_per_su: {per_su}, spines: 1, oversubscription: {over}}}\n"
    return build_topology(parse_spec(text + f"routing: {routing}\n"))


def skewed(topo, shares, *, seed: int, alike: bool, slots: int = 1) -> PlacementProblem:
    problem = problem_on(topo, len(shares), seed=seed)
    counts = problem.traffic.counts
    if alike:
        counts = np.repeat(counts[:, :1], counts.shape[1], axis=1)
    counts = counts * np.asarray(shares)
    counts *= problem.traffic.counts.sum() / counts.sum()
    return PlacementProblem(topo, problem.config, Traffic(counts, "test"), experts_per_gpu=slots)


@pytest.mark.parametrize("nodes,per_su,gpus,over,tflops,shares,alike,seed", [
    (4, 2, 2, 2.0, 2000.0, (0.6, 0.3, 0.1), True, 0),
    (4, 2, 2, 4.0, 2000.0, (0.5, 0.3, 0.2), False, 1),
    (2, 2, 3, 2.0, 200.0, (0.6, 0.3, 0.1), True, 2),
    (3, 3, 2, 4.0, 2000.0, (0.4, 0.35, 0.25), False, 3),
    (4, 2, 2, 8.0, 2000.0, (0.4, 0.3, 0.3), True, 4)])
def test_rail_cover_bound_holds_for_every_placement(nodes, per_su, gpus, over, tflops, shares, alike, seed):
    """Below the busiest link of every placement with its exact split (a sample of 60 where
    there are more, and the optimum's), and the bounds it enters below the brute force's
    optimum."""
    problem = skewed(rail_sus(nodes, per_su, gpus, over, tflops), shares, seed=seed, alike=alike)
    data = layer_data(problem, problem.traffic.counts[0])
    rail = RailCover(data)
    assert rail.usable
    bound = rail.link_bound()
    assert bound >= 0
    best, best_layer = brute_force(problem)
    placements = list(_every_placement(problem))
    rng = np.random.default_rng(seed)
    if len(placements) > 60:
        placements = [placements[i] for i in rng.choice(len(placements), 60, replace=False)]
    for replicas in placements + [best_layer.replicas]:
        res = optimal_splits(data, replicas)
        _, link_s, _ = data.time_of(res.layer.flows(data.counts))
        assert bound <= link_s * (1 + 1e-9)
    assert tradeoff_bound(data) <= best * (1 + 1e-9)
    assert lower_bound(data)[0] <= best * (1 + 1e-9)


def test_rail_cover_bound_sees_the_spine_where_the_cuts_do_not(monkeypatch):
    """Two units of two 2-GPU servers, 4:1, every source alike (0.45 / 0.35 / 0.2 of the
    demand), one slot a GPU: each unit can hold every expert, so its cut is empty, but a source
    reaches without the spine only its node and its rail's GPU in the other server of its unit.
    Measured: the cuts 4.8e-8 s, this bound 1.56e-7 s, the optimum's busiest link 1.56e-7 s;
    the trade-off bound 1.08e-7 s without it, 1.63e-7 s with it, the brute force's optimum."""
    import epplan.placement.railbound as railbound

    problem = skewed(rail_sus(4, 2, 2, 4.0, 2000.0), (0.45, 0.35, 0.2), seed=0, alike=True)
    data = layer_data(problem, problem.traffic.counts[0])
    bound = RailCover(data).link_bound()
    best, best_layer = brute_force(problem)
    _, link_s, _ = data.time_of(best_layer.flows(data.counts))
    assert cut_bound(data) * 3 < bound <= link_s * (1 + 1e-9)
    with_rails = tradeoff_bound(data)
    assert with_rails == pytest.approx(best, rel=1e-3) and with_rails <= best * (1 + 1e-9)
    monkeypatch.setattr(railbound, "rail_cover_bound", lambda data: 0.0)
    assert tradeoff_bound(data) < 0.7 * best


def test_rail_cover_bound_needs_the_grid():
    """Under rail-aligned routing (NCCL's PXN) a source reaches every GPU of its unit without
    the spine: no rail groups, the bound does not apply; nor without an oversubscribed spine
    (its links never bind, the link model drops them)."""
    for topo in (rail_sus(4, 2, 2, 2.0, 2000.0, routing="rail_aligned"), rail_sus(4, 2, 2, 1.0, 2000.0)):
        problem = skewed(topo, (0.6, 0.3, 0.1), seed=0, alike=True)
        rail = RailCover(layer_data(problem, problem.traffic.counts[0]))
        assert not rail.usable and rail.link_bound() == 0.0
