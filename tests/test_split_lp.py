"""The split LP's solver choice and deadline, and the plan's floor: never worse than a baseline.

The interior-point path (taken for large or dense models, ``splits._IPM_ABOVE``; no crossover by
default) is checked against dual simplex and against itself with crossover, the slow references
at 512 GPUs; ``solve`` with a limit too short to finish
is checked against every baseline it scored.
"""

from __future__ import annotations

import dataclasses

from pathlib import Path

import numpy as np
import pytest

from epplan.cost import evaluate
from epplan.placement.baselines import BASELINES, baseline, random_placement
from epplan.placement.layer import layer_data
from epplan.placement.solve import _max_groups, solve
from epplan.placement.splits import nearest_split, optimal_splits
from epplan.placement.types import Placement
from tests.test_planner import toy_problem

_TIE = 1e-6  # the planner's tie tolerance (solve._TIE)


@pytest.mark.parametrize("nodes,gpus,experts,per_gpu,seed", [
    (2, 4, 4, 1, 0), (2, 4, 6, 2, 1), (3, 4, 8, 2, 2), (4, 2, 5, 2, 3), (2, 8, 12, 3, 4)])
def test_interior_point_reaches_the_simplex_optimum(nodes, gpus, experts, per_gpu, seed):
    """Same first-stage optimum on random placements of random layers: to 1e-9 (relative) with
    crossover, to 1e-6 without (interior point's own tolerance; the split is scored as it is)."""
    problem = toy_problem(nodes, gpus, experts, experts_per_gpu=per_gpu, d_ff=64, seed=seed)
    data = layer_data(problem, problem.traffic.counts[0])
    rng = np.random.default_rng(seed)
    for trial in range(3):
        plan = random_placement(problem, seed=int(rng.integers(1 << 30))) if trial else baseline("eplb", problem)
        replicas = plan.layers[0].replicas
        ipm = optimal_splits(data, replicas, tie_break=False, method="ipm")
        vertex = optimal_splits(data, replicas, tie_break=False, method="ipm", crossover=True)
        simplex = optimal_splits(data, replicas, tie_break=False, method="simplex")
        assert ipm.status == vertex.status == simplex.status == "optimal"
        assert vertex.bottleneck == pytest.approx(simplex.bottleneck, rel=1e-9)
        assert ipm.bottleneck == pytest.approx(simplex.bottleneck, rel=1e-6)
        # With the tie-break: the layer's time within the second stage's slack, the links alike.
        both = optimal_splits(data, replicas, method="ipm"), optimal_splits(data, replicas, method="simplex")
        assert both[0].bottleneck == pytest.approx(both[1].bottleneck, rel=1e-6)
        assert both[0].link_time == pytest.approx(both[1].link_time, rel=1e-6)


@pytest.mark.slow
def test_interior_point_without_crossover_at_512_gpus():
    """Instance 9's first layer (seed with d_ff=2048 on the 64-node 3-tier cluster, zipf 1.2):
    EPLB's placement split by interior point without crossover costs what it costs with
    crossover (a vertex), to 1e-6, with the tie-break too (6.3 s against 9.5 s at load 1)."""
    from epplan.placement.problem import PlacementProblem
    from epplan.topology import load_topology
    from epplan.workload import load_model_config, make_traffic

    topo = load_topology(Path(__file__).resolve().parent.parent / "topologies" / "h100-64node-3tier.yaml")
    config = load_model_config("seed", {"d_ff": 2048})
    problem = PlacementProblem(topo, config, make_traffic("zipf:1.2", config, topo.num_gpus), experts_per_gpu=1)
    data = layer_data(problem, problem.traffic.counts[0], max_groups=_max_groups(problem))
    replicas = baseline("eplb", problem).layers[0].replicas
    fast = optimal_splits(data, replicas, method="ipm")
    vertex = optimal_splits(data, replicas, method="ipm", crossover=True)
    assert fast.status == vertex.status == "optimal"
    assert fast.bottleneck == pytest.approx(vertex.bottleneck, rel=1e-6)
    assert fast.link_time == pytest.approx(vertex.link_time, rel=1e-6)


def test_the_split_lps_limit_counts_its_build():
    """A limit the model's build (here the layer's link map, built on first use) has used up
    runs no LP: the nearest split comes back, marked time_limit. Before, HiGHS was handed at
    least 0.01 s after the build, whatever the build had taken."""
    problem = toy_problem(2, 4, 4, seed=5)
    data = layer_data(problem, problem.traffic.counts[0])
    replicas = baseline("eplb", problem).layers[0].replicas
    res = optimal_splits(data, replicas, time_limit=1e-6)
    assert res.status == "time_limit"
    near = nearest_split(data, replicas)
    for got, want in zip(res.layer.split, near.split):
        np.testing.assert_array_equal(got, want)
    assert optimal_splits(data, replicas, time_limit=30).status == "optimal"


@pytest.mark.parametrize("time_limit", [0.01, 0.3, 2.0])
def test_no_layer_is_worse_than_a_baseline_it_scored(time_limit):
    """Whatever the limit cut, every layer's plan is at most every baseline's time as it is, and
    at most its re-split by the split LP where the layer does not list that baseline as
    unchecked (its re-split solved, or ruled out by its bound)."""
    for seed in range(3):
        problem = toy_problem(2, 4, 6, experts_per_gpu=2, d_ff=64, seed=seed, layers=3)
        placement = solve(problem, time_limit=time_limit, gap=0.0)
        placement.validate(problem.experts_per_gpu)
        ours = evaluate(placement, problem).moe_time_s
        for name in BASELINES:
            plan = baseline(name, problem)
            theirs = evaluate(plan, problem).moe_time_s
            assert np.all(ours <= theirs * (1 + _TIE)), (seed, name, ours, theirs)
            for li, info in enumerate(placement.info["layers"]):
                if name in info["unchecked"]:
                    continue
                data = layer_data(problem, problem.traffic.counts[li])
                split = optimal_splits(data, plan.layers[li].replicas)
                assert ours[li] <= split.bottleneck * (1 + _TIE), (seed, name, li, ours[li], split.bottleneck)


def test_resplit_gives_each_lp_the_time_left(monkeypatch):
    """Under a limit the layers are re-split in order, each LP with all the time left: with a
    share each (limit / layers) none finished where every LP needed more than its share (EPLB's
    16 layers at 512 GPUs, 18-20 s each against 7.5 s)."""
    import epplan.placement.solve as solve_module
    from epplan.placement.solve import resplit

    given = []

    def recording(data, replicas, **kwargs):   # the real LP; only its limit is recorded
        given.append(kwargs.get("time_limit"))
        return optimal_splits(data, replicas, **kwargs)

    monkeypatch.setattr(solve_module, "optimal_splits", recording)
    problem = toy_problem(2, 4, 6, experts_per_gpu=2, d_ff=64, seed=0, layers=4)
    plan = random_placement(problem, seed=1)
    out = resplit(plan, problem, time_limit=60.0)
    assert len(given) >= 2 and given[0] > 0.9 * 60.0
    ours, theirs = evaluate(out, problem).moe_time_s, evaluate(plan, problem).moe_time_s
    assert np.all(ours <= theirs * (1 + 1e-9))


def test_resplit_counts_the_layers_its_time_limit_cut_short(monkeypatch):
    """``info["resplit_cut_short"]``: every layer when no time is left, none without a limit, and
    a layer whose LP stopped short (status not optimal) counts as well as one never run."""
    import epplan.placement.solve as solve_module
    from epplan.placement.solve import resplit

    problem = toy_problem(2, 4, 6, experts_per_gpu=2, d_ff=64, seed=0, layers=4)
    plan = random_placement(problem, seed=1)
    assert resplit(plan, problem, time_limit=1e-9).info["resplit_cut_short"] == 4
    assert resplit(plan, problem).info["resplit_cut_short"] == 0
    calls = []

    def second_stops(data, replicas, **kwargs):   # the real LP, reported stopped on its second call
        res = optimal_splits(data, replicas, **kwargs)
        calls.append(res)
        return dataclasses.replace(res, status="time_limit") if len(calls) == 2 else res

    monkeypatch.setattr(solve_module, "optimal_splits", second_stops)
    assert resplit(plan, problem, time_limit=60.0).info["resplit_cut_short"] == 1


def test_resplit_out_of_time_keeps_the_better_of_its_own_and_the_nearest_split():
    """Layers left no time take the nearest split where it beats their own (an LP out of time
    falls back to the same), not their own splits whatever they cost."""
    from epplan.placement.solve import resplit
    from epplan.placement.splits import split_result

    problem = toy_problem(2, 4, 6, experts_per_gpu=2, d_ff=64, seed=0, layers=4)
    plan = random_placement(problem, seed=1)
    out = evaluate(resplit(plan, problem, time_limit=1e-9), problem).moe_time_s
    for li, layer in enumerate(plan.layers):
        data = layer_data(problem, problem.traffic.counts[li])
        best = min(split_result(data, layer).bottleneck,
                   split_result(data, nearest_split(data, layer.replicas)).bottleneck)
        assert out[li] == pytest.approx(best, rel=1e-9)


def _zipf_layers(num_layers: int):
    """Zipf layers (relabellings of one another) on 7 x 8 GPUs, 16 experts: the MILP is tried."""
    from epplan.placement.problem import PlacementProblem
    from epplan.workload import load_model_config, make_traffic
    from tests.test_planner import toy_topology

    topo = toy_topology(7, 8, 2000.0)
    config = load_model_config("tiny", {"num_experts": 16, "d_ff": 2048, "num_layers": num_layers, "top_k": 2})
    return PlacementProblem(topo, config, make_traffic("zipf:1.2", config, topo.num_gpus), experts_per_gpu=1)


def test_relabelled_layers_check_their_own_baselines_inside_the_limit():
    """Zipf layers are relabellings of one another; their EPLB plans are not. The re-split of
    every relabelled layer's own baselines runs as a task beside the distinct layer, inside the
    limit, so that none is left unchecked while the MILP (56 GPUs: small enough to try) takes
    the distinct layer's whole time, and every layer is at most each baseline's re-split. Before,
    they ran after the workers, past the deadline: all 60 were left unchecked (load 3.5), where
    15 LPs of 0.15 s each fit the 12 s many times over."""
    problem = _zipf_layers(16)
    placement = solve(problem, time_limit=12.0, gap=0.0, workers=2)
    infos = placement.info["layers"]
    assert sum(info["same_as"] is None for info in infos) == 1
    assert [info["unchecked"] for info in infos] == [[]] * 16
    ours = evaluate(placement, problem).moe_time_s
    for name in BASELINES:
        plan = baseline(name, problem)
        for li in range(problem.num_layers):
            data = layer_data(problem, problem.traffic.counts[li])
            split = optimal_splits(data, plan.layers[li].replicas)
            assert ours[li] <= split.bottleneck * (1 + _TIE), (name, li, ours[li], split.bottleneck)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_split_that_cannot_be_taken_skips_the_tie_break(monkeypatch, seed):
    """``worth_below``: a first stage above the plan in hand ends the LP (its time is the
    optimum all the same); at a tie, or below, the tie-break runs and the result is the full
    LP's. Counted by the HiGHS solves (a recording wrapper round the real ``LP.solve``): before,
    every split LP ran both stages, half the time of the relabelled layers' checks at 512 GPUs."""
    from epplan.placement import lp as lp_module

    problem = toy_problem(3, 4, 8, experts_per_gpu=2, d_ff=64, seed=seed)
    data = layer_data(problem, problem.traffic.counts[0])
    replicas = random_placement(problem, seed=seed).layers[0].replicas
    full = optimal_splits(data, replicas)
    solves = []
    real = lp_module.LP.solve

    def counted(self, *args, **kwargs):
        solves.append(1)
        return real(self, *args, **kwargs)

    monkeypatch.setattr(lp_module.LP, "solve", counted)
    above = optimal_splits(data, replicas, worth_below=full.bottleneck * 0.99)
    assert (above.status, len(solves)) == ("optimal", 1)
    assert above.bottleneck == pytest.approx(full.bottleneck, rel=1e-9)
    assert above.link_time >= full.link_time * (1 - 1e-9)
    solves.clear()
    for worth in (full.bottleneck, full.bottleneck * 1.5):
        tie = optimal_splits(data, replicas, worth_below=worth)
        assert tie.bottleneck == pytest.approx(full.bottleneck, rel=1e-9)
        assert tie.link_time == pytest.approx(full.link_time, rel=1e-9)
    assert len(solves) == 4


def test_the_distinct_layers_worker_shares_the_checks_the_other_would_not_finish():
    """The relabelled layers' checks (here 159 layers' baselines, 0.05-0.1 s each) are more than
    the one worker beside the distinct layer (whose MILP takes its whole time, as the node LP
    takes instance 9's) finishes in the limit: that layer's worker takes a share of them once its
    baselines are split, and a check that cannot beat the plan in hand skips its tie-break.
    Before, measured at load 2.8: 189 baselines were left unchecked at 12 s (none at 14 s, the
    solve ending at 12.75 s); now none at 8 s. On 2026-12-06, on a machine where the whole suite
    took 18.5 min (10 the day before), 4 were left at 12 s on a8c957d and 38 or more with the
    bound-count construction's extra split LP per distinct layer (``heuristic._counts_bound``);
    none at 24 s, the limit here."""
    problem = _zipf_layers(160)
    placement = solve(problem, time_limit=24.0, gap=0.0, workers=2)
    infos = placement.info["layers"]
    assert sum(info["same_as"] is None for info in infos) == 1
    assert [info["layer"] for info in infos if info["unchecked"]] == []
    ours = evaluate(placement, problem).moe_time_s
    plan = baseline("eplb", problem)
    for li in range(problem.num_layers):
        split = optimal_splits(layer_data(problem, problem.traffic.counts[li]), plan.layers[li].replicas)
        assert ours[li] <= split.bottleneck * (1 + _TIE), (li, ours[li], split.bottleneck)


def test_resplit_cache_reuses_an_earlier_calls_lp_for_the_same_layer_placement(monkeypatch):
    """The benchmark re-splits EPLB's and EPLB-hier's plans to completion with one cache: a layer
    placed as in the earlier call takes its split with no LP; a layer placed otherwise gets its
    own LP (the same times as without the cache)."""
    import epplan.placement.solve as solve_module
    from epplan.placement.solve import resplit

    calls = []

    def counting(data, replicas, **kwargs):   # the real LP; the calls are counted
        calls.append(1)
        return optimal_splits(data, replicas, **kwargs)

    monkeypatch.setattr(solve_module, "optimal_splits", counting)
    problem = toy_problem(2, 4, 6, experts_per_gpu=2, d_ff=64, seed=0, layers=3)
    plan = random_placement(problem, seed=1)
    other = random_placement(problem, seed=2)
    mixed = Placement(plan.num_ranks, plan.num_experts, [plan.layers[0], other.layers[1], plan.layers[2]])
    cache: dict = {}
    first = resplit(plan, problem, cache=cache)
    solved = len(calls)
    again = resplit(mixed, problem, cache=cache)
    assert len(calls) == solved + 1   # only layer 1, placed otherwise
    assert again.layers[0] is first.layers[0] and again.layers[2] is first.layers[2]
    uncached = resplit(mixed, problem)
    np.testing.assert_allclose(evaluate(again, problem).moe_time_s, evaluate(uncached, problem).moe_time_s, rtol=1e-9)


def test_layers_alike_up_to_labels_take_the_best_plan_any_of_them_has():
    """A relabelled layer whose own baseline re-split beats its representative's plan (EPLB's
    plans are label-dependent: on instance 10 such checks gave 0.15-0.27 % shorter layers): every
    layer alike up to labels takes that plan, relabelled, at the same time as the layer that
    found it (``split_result``, the planner's scoring). Before, only the layer that found it did."""
    from epplan.placement.solve import LayerInfo, _canonical, _share_class_best
    from epplan.placement.splits import split_result

    problem = _zipf_layers(3)
    counts = problem.traffic.counts
    perms = [_canonical(counts[li])[0] for li in range(3)]
    good = solve(problem, time_limit=5.0, workers=1).layers[2]
    weak = baseline("contiguous", problem)
    results = {}
    scored = [split_result(layer_data(problem, counts[li]), good if li == 2 else weak.layers[li]) for li in range(3)]
    bound = 0.5 * scored[2].bottleneck   # the class's bound (one traffic up to labels)
    for li, res in enumerate(scored):
        results[li] = (res.layer, LayerInfo(layer=li, status="time_limit", objective_s=res.bottleneck,
                                            bound_s=bound, bound_source="tradeoff", gap=1 - bound / res.bottleneck,
                                            link_s=res.link_time, seconds=0.0, start="local" if li == 2 else "contiguous",
                                            same_as=0 if li == 1 else None))
    best = results[2][1].objective_s
    assert results[0][1].objective_s > best * 1.01 and results[1][1].objective_s > best * 1.01
    _share_class_best(results, [0, 0, 0], perms, 0.01)
    for li in range(3):
        layer, info = results[li]
        scored = split_result(layer_data(problem, counts[li]), layer)
        assert scored.bottleneck == pytest.approx(best, rel=1e-9)
        assert (info.objective_s, info.start) == (best, "local")
        assert info.same_as == (None if li == 2 else 2)
        assert (info.bound_s, info.status) == (bound, "time_limit") and info.gap == pytest.approx(0.5)
