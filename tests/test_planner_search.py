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
from epplan.placement.search import replica_search
from epplan.placement.splits import optimal_splits

from test_planner_bounds import leaf_spine, problem_on, rail_toy


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
