"""The replica counts per node with every holder's NIC (``nicmilp.py``): its bound stays below the
exact optimum (brute force) on small rail-optimised and leaf/spine fabrics, blocking and not;
the model's time of a placement is below that placement's exact split, every placement; and it
declines what it does not model."""

from __future__ import annotations

import numpy as np
import pytest

from epplan.placement.bruteforce import brute_force
from epplan.placement.layer import layer_data
from epplan.placement.nicmilp import _leaf_groups, fabric_of, nic_model
from epplan.placement.problem import PlacementProblem
from epplan.placement.splits import optimal_splits
from epplan.workload.traffic import Traffic

from test_planner_bounds import _every_placement, leaf_spine_n, problem_on, rail_toy


def _skewed(problem: PlacementProblem, shares, alike: bool) -> PlacementProblem:
    """The problem with every source's demand scaled by ``shares`` per expert (one hot, the rest
    cold) and, where ``alike``, every source's row the first's."""
    counts = problem.traffic.counts * np.asarray(shares)[: problem.num_experts]
    if alike:
        counts = np.repeat(counts[:, :1], counts.shape[1], axis=1)
    counts *= problem.traffic.counts.sum() / counts.sum()
    return PlacementProblem(problem.topology, problem.config, Traffic(counts, "test"))


def _node_counts(data, replicas) -> np.ndarray:
    node = np.asarray(data.lm.gpu_node)
    held = np.zeros((int(node.max()) + 1, data.num_experts), dtype=np.int64)
    for e, gpus in enumerate(replicas):
        np.add.at(held[:, e], node[gpus], 1)
    return held


FABRICS = [
    (lambda: rail_toy(3, 2, 2.0, 2000.0), 4, True, 0), (lambda: rail_toy(3, 2, 4.0, 200.0), 4, False, 1),
    (lambda: rail_toy(4, 2, 2.0, 2000.0), 3, True, 2), (lambda: rail_toy(2, 3, 1.0, 2000.0), 3, True, 3),
    (lambda: rail_toy(2, 3, 4.0, 2000.0), 4, False, 4), (lambda: leaf_spine_n(4, 1, 2.0, 200.0), 3, True, 5),
    (lambda: leaf_spine_n(2, 2, 10.0, 2000.0), 3, False, 6)]


@pytest.mark.parametrize("topo,experts,alike,seed", FABRICS)
def test_bound_is_below_the_optimum(topo, experts, alike, seed):
    """Rail-optimised fabrics (ECMP, a spine at 1-4:1, 2-3 GPUs a node) and leaf/spine ones,
    skewed demand, every source alike or each its own: the MILP's bound is below the brute
    force's optimum, solved to the end and cut short, with the optimum as ``upper`` (the
    optimum is then the bound) and above it."""
    problem = _skewed(problem_on(topo(), experts, seed=seed), [6.0, 1.0, 0.4, 0.1], alike)
    data = layer_data(problem, problem.traffic.counts[0])
    assert fabric_of(data) is not None
    best, _ = brute_force(problem)
    for upper in (best * 1.5, best):
        res = nic_model(data, upper)
        assert res.status == "optimal"
        assert 0 < res.bound <= best * (1 + 1e-6)
        assert res.counts is not None or res.bound == pytest.approx(upper)
    short = nic_model(data, best * 1.5, time_limit=0.05)
    assert short.bound <= best * (1 + 1e-6)


@pytest.mark.parametrize("topo,experts,alike,seed", [FABRICS[0], FABRICS[3], FABRICS[5]])
def test_model_time_of_a_placement_is_below_its_exact_split(topo, experts, alike, seed):
    """Every placement of tiny layers: the model with that placement's replicas per node held
    (``fixed``) is below the placement's exact split LP (its time for that placement is a bound
    for every placement with those counts)."""
    problem = _skewed(problem_on(topo(), experts, seed=seed), [6.0, 1.0, 0.4, 0.1], alike)
    data = layer_data(problem, problem.traffic.counts[0])
    checked = 0
    for replicas in _every_placement(problem):
        exact = optimal_splits(data, replicas).bottleneck
        model = nic_model(data, exact * 2, fixed=_node_counts(data, replicas), integer=True)
        assert model.bound <= exact * (1 + 1e-6)
        checked += 1
    assert checked >= 6


def test_leaf_rows_only_where_a_leaf_is_thinner_than_its_nics():
    """A non-blocking rail fabric has no leaf rows (a leaf is never busier than its mean NIC);
    a 2:1 one has one group, its scalable unit, at the leaves' fabric capacity."""
    for over, groups in ((1.0, 0), (2.0, 1)):
        problem = problem_on(rail_toy(3, 2, over, 2000.0), 3, seed=0)
        data = layer_data(problem, problem.traffic.counts[0])
        fab = fabric_of(data)
        found = _leaf_groups(fab, np.asarray(data.lm.gpu_node), 3)
        assert len(found) == groups
        if groups:
            nodes, cap = found[0]
            assert list(nodes) == [0, 1, 2]
            assert cap == pytest.approx(min(fab["out"].sum(), fab["into"].sum()))


def test_declines_what_it_does_not_model():
    """Two slots a GPU, rail-aligned routing (PXN: a source sends through another GPU's NIC):
    skipped, bound 0."""
    problem = problem_on(rail_toy(3, 2, 2.0, 2000.0), 3, seed=0)
    two = PlacementProblem(problem.topology, problem.config, problem.traffic, experts_per_gpu=2)
    assert nic_model(layer_data(two, two.traffic.counts[0]), 1.0).status == "skipped"
    import dataclasses

    pxn = dataclasses.replace(problem.topology, routing="rail_aligned", _paths=None)
    rail = PlacementProblem(pxn, problem.config, problem.traffic)
    data = layer_data(rail, rail.traffic.counts[0])
    assert fabric_of(data) is None
    assert nic_model(data, 1.0) == nic_model(data, 1.0).__class__(0.0, None, "skipped", 0.0)
