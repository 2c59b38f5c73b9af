"""The split LP's link rows through aggregates (``placement.flowlinks``) against the unaggregated
form: the factored pair form equals ``LinkMap.pair_segments`` pair by pair, the aggregated link
coefficients equal ``LayerData.coef``'s rows flow by flow, and the two LPs reach one optimum, on
small clusters with leaf/spine/rail structure under both routings."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from epplan.cost.linkmap import link_map
from epplan.placement.baselines import baseline, random_placement
from epplan.placement.flowlinks import flow_links
from epplan.placement.layer import layer_data, source_groups
from epplan.placement.problem import PlacementProblem
from epplan.placement.splits import _columns, optimal_splits
from epplan.topology import load_topology
from epplan.workload import Traffic, load_model_config
from tests.test_cost import DEGRADED_RAIL, topo_of

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"

def topologies():
    out = []
    for routing in ("ecmp", "rail_aligned"):
        # two scalable units of two servers, 2:1 leaf/spine, a server with two NICs down
        out.append((f"degraded-rail/{routing}", lambda r=routing: topo_of(DEGRADED_RAIL, r)))
        for name in ("dgx-h100-2node", "h100-8node-oversub", "hetero-degraded", "explicit-2node"):
            out.append((f"{name}/{routing}", lambda n=name, r=routing: load_topology(TOPOLOGIES / f"{n}.yaml", routing=r)))
    return out


TOPOS = topologies()


@pytest.mark.parametrize("name,make", TOPOS, ids=[n for n, _ in TOPOS])
def test_cross_factors_equal_the_pair_form(name, make):
    topo = make()
    lm = link_map(topo)
    cf = lm.cross_factors()
    node = np.asarray(topo.gpu_node)
    g = topo.num_gpus
    s, t = np.divmod(np.arange(g * g), g)
    cross = node[s] != node[t]
    s, t = s[cross], t[cross]
    num_j = cf.num_combos
    combo = cf.combo[t].tocoo()                                        # [P, J]
    pick = sp.csr_matrix((combo.data, (combo.row, s[combo.row] * num_j + combo.col)), shape=(s.size, g * num_j))
    factored = cf.recv[t] + pick @ cf.send
    want = lm.pair_segments(s, t)
    assert want.nnz > 0
    assert abs(factored - want).max() <= 1e-12


def problem_on(topo, experts: int, *, seed: int, per_gpu: int = 1, proportional: bool = False) -> PlacementProblem:
    """A small layer on ``topo``: skewed rows per source, or one pattern for all (zipf-like)."""
    config = load_model_config("tiny", {"num_experts": experts, "d_ff": 64, "num_layers": 1, "top_k": 2})
    rng = np.random.default_rng(seed)
    g = topo.num_gpus
    if proportional:
        counts = np.tile(rng.gamma(0.7, size=experts) + 1e-3, (1, g, 1)) * (1 + rng.random((1, g, 1)))
    else:
        counts = rng.gamma(0.7, size=(1, g, experts)) + 1e-3
    counts *= config.tokens_per_step / g * config.top_k / counts.sum()
    return PlacementProblem(topo, config, Traffic(counts, "test"), experts_per_gpu=per_gpu)


def grouped(data, by_node: bool):
    """``data`` with per-node source groups (the planner's grouping above its single-source size)."""
    if not by_node:
        return data
    group_of, weight, _ = source_groups(data.counts, data.lm.gpu_node, max_groups=0)
    return replace(data, group_of=group_of, weight=weight, _coef=None)


@pytest.mark.parametrize("name,make", TOPOS, ids=[n for n, _ in TOPOS])
@pytest.mark.parametrize("by_node", [False, True])
def test_aggregated_link_rows_equal_the_pair_rows(name, make, by_node):
    """direct + of_flow^T links == coef[(a, t)] for every flow, same-node flows included."""
    topo = make()
    problem = problem_on(topo, 6, seed=len(name), per_gpu=2)
    data = grouped(layer_data(problem, problem.traffic.counts[0]), by_node)
    rng = np.random.default_rng(3)
    a = rng.integers(0, data.num_groups, 400)
    t = rng.integers(0, data.num_gpus, 400)
    fl = flow_links(data, a, t)
    got = (fl.direct + fl.of_flow.T @ fl.links).toarray()
    want = data.coef()[a * data.num_gpus + t].toarray()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12 * np.abs(want).max())
    assert fl.of_flow.min() >= 0   # the aggregates of flows >= 0 are >= 0 (the LP bounds them so)


SMALL = [(n, m) for n, m in TOPOS if not n.startswith("h100-8node")][::2]


@pytest.mark.parametrize("name,make", SMALL, ids=[n for n, _ in SMALL])
@pytest.mark.parametrize("proportional", [False, True])
def test_the_aggregated_split_lp_reaches_the_unaggregated_optimum(name, make, proportional):
    """EPLB's and random placements split by both LPs: one layer time (to 1e-9 by simplex, to
    1e-6 by interior point, its own tolerance) and, with the tie-break, one busiest link; also
    with a column subset (``max_columns``) and, where the sources' rows are proportional (node
    groups are then exact), with node groups."""
    topo = make()
    problem = problem_on(topo, 8, seed=7, per_gpu=2, proportional=proportional)
    data = layer_data(problem, problem.traffic.counts[0])
    cases = [(False, 10**9), (False, 300)] + ([(True, 10**9)] if proportional else [])
    for by_node, max_columns in cases:
        d = grouped(data, by_node)
        for plan in (baseline("eplb", problem), random_placement(problem, seed=11)):
            replicas = plan.layers[0].replicas
            for method, rel in (("simplex", 1e-9), ("ipm", 1e-6)):
                for tie_break in (False, True):
                    fast, slow = (optimal_splits(d, replicas, method=method, max_columns=max_columns,
                                                 tie_break=tie_break, links=links) for links in ("aggregated", "pairs"))
                    assert fast.status == slow.status == "optimal"
                    assert fast.bottleneck == pytest.approx(slow.bottleneck, rel=rel)
                    if tie_break:
                        assert fast.link_time == pytest.approx(slow.link_time, rel=rel)


@pytest.mark.parametrize("name,make", SMALL[:3], ids=[n for n, _ in SMALL[:3]])
def test_lazy_link_rows_reach_the_optimum_of_all_rows(name, make, monkeypatch):
    """Interior point with the link rows added as solutions overload them (here from the
    nearest split's busiest link alone, every model): the optimum of the LP with every row, by
    simplex, to interior point's tolerance, both stages. With ``worth_below`` under that
    optimum the LP stops at a relaxation ("above") whose split is no better than it."""
    from epplan.placement import splits

    topo = make()
    problem = problem_on(topo, 8, seed=5, per_gpu=2)
    data = layer_data(problem, problem.traffic.counts[0])
    for plan in (baseline("eplb", problem), random_placement(problem, seed=3)):
        replicas = plan.layers[0].replicas
        every = optimal_splits(data, replicas, method="simplex", links="pairs")
        monkeypatch.setattr(splits, "_LAZY_ABOVE", 0)
        monkeypatch.setattr(splits, "_LAZY_SHARE", 1.0)
        lazy = optimal_splits(data, replicas, method="ipm")
        assert lazy.status == every.status == "optimal"
        assert lazy.bottleneck == pytest.approx(every.bottleneck, rel=1e-6)
        assert lazy.link_time == pytest.approx(every.link_time, rel=1e-6)
        stopped = optimal_splits(data, replicas, method="ipm", worth_below=0.5 * every.bottleneck)
        assert stopped.status in ("above", "optimal")
        assert stopped.bottleneck >= every.bottleneck * (1 - 1e-6)
        monkeypatch.undo()


def test_columns_subset_is_what_both_forms_see():
    """Sanity: the column subset of a large layer keeps every flow's (group, GPU) in both forms."""
    topo = load_topology(TOPOLOGIES / "h100-8node-oversub.yaml")
    problem = problem_on(topo, 8, seed=1)
    data = layer_data(problem, problem.traffic.counts[0])
    replicas = [np.asarray(r) for r in baseline("eplb", problem).layers[0].replicas]
    ya, _, yt = _columns(data, data.group_counts, replicas, 100)
    pairs = flow_links(data, ya, yt, form="pairs")
    agg = flow_links(data, ya, yt)
    a = (pairs.of_flow.T @ pairs.links).toarray()
    b = (agg.direct + agg.of_flow.T @ agg.links).toarray()
    np.testing.assert_allclose(b, a, rtol=1e-10, atol=1e-12 * np.abs(a).max())


@pytest.mark.parametrize("name,make", SMALL, ids=[n for n, _ in SMALL])
def test_replica_class_groups_split_between_the_per_source_and_the_node_optimum(name, make):
    """Node groups split by the octave of each GPU's coldest expert (``replica_class_groups``)
    restrict the per-source split and relax the node-shared one: their LP optimum lies between
    the two, the split is exact (``evaluate``'s flows give the LP's time), and each subgroup
    lies in one node group, its sources' shares summing to 1."""
    from epplan.placement.layer import replica_class_groups
    from epplan.placement.splits import split_result

    topo = make()
    problem = problem_on(topo, 8, seed=2, per_gpu=1, proportional=True)
    single = layer_data(problem, problem.traffic.counts[0])
    node = grouped(single, True)
    assert replica_class_groups(single, []) is None       # every source its own group already
    split_any = False
    for plan in (baseline("eplb", problem), random_placement(problem, seed=4)):
        replicas = plan.layers[0].replicas
        fine = replica_class_groups(node, replicas)
        if fine is None:                                   # one class on every node: nothing to split
            continue
        split_any = True
        assert node.num_groups < fine.num_groups <= fine.num_gpus
        for a in range(fine.num_groups):
            members = np.flatnonzero(fine.group_of == a)
            assert np.unique(node.group_of[members]).size == 1
            assert fine.weight[members].sum() == pytest.approx(1.0)
        per_source, shared, between = (optimal_splits(d, replicas, method="simplex", max_columns=10**9)
                                       for d in (single, node, fine))
        assert per_source.bottleneck <= between.bottleneck * (1 + 1e-9)
        assert between.bottleneck <= shared.bottleneck * (1 + 1e-9)
        assert split_result(single, between.layer).bottleneck == pytest.approx(between.bottleneck, rel=1e-9)
    assert split_any


def test_replica_class_groups_classes_by_the_coldest_expert_held():
    """Two nodes of eight GPUs, one node group each: expert 0 on one GPU (cold), expert 1 on
    five (the mean is 8 / 3: octave ceil(log2(5 / (8 / 3))) = 1), expert 2 on two (octave 0,
    ceil(-0.42) clipped): each node's group splits into its holders of octave 0, of octave 1
    and the GPUs that hold nothing; with top=0, into its holders and the others."""
    from epplan.placement.layer import replica_class_groups

    topo = load_topology(TOPOLOGIES / "dgx-h100-2node.yaml")
    problem = problem_on(topo, 3, seed=1, per_gpu=1, proportional=True)
    data = grouped(layer_data(problem, problem.traffic.counts[0]), True)
    g = topo.num_gpus
    half = g // 2
    replicas = [np.array([0]), np.array([1, 2, half, half + 1, half + 2]), np.array([3, half + 3])]
    fine = replica_class_groups(data, replicas)
    key = {s: (int(topo.gpu_node[s]), cls) for cls, members in
           ((0, [0, 3, half + 3]), (1, [1, 2, half, half + 1, half + 2]),
            (-1, [s for s in range(g) if s not in (0, 1, 2, 3, half, half + 1, half + 2, half + 3)]))
           for s in members}
    for s in range(g):
        for t in range(g):
            assert (fine.group_of[s] == fine.group_of[t]) == (key[s] == key[t])
    # top=0: the octaves above 0 merged into it, each node's holders one group, the rest another
    merged = replica_class_groups(data, replicas, top=0)
    for s in range(g):
        for t in range(g):
            assert (merged.group_of[s] == merged.group_of[t]) == \
                ((key[s][0], key[s][1] >= 0) == (key[t][0], key[t][1] >= 0))
