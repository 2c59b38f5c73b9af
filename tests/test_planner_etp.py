"""The planner's clock under --expert-tp is evaluate's: a TP group's ranks compute its rows together.

Every layer time the planner reports (``LayerData.time_of``, the split LP, the MILP) and every
bound it certifies are on the clock ``evaluate`` scores (each rank 1 / t of its TP group's rows),
checked against the brute force of that clock on tiny layers.
"""

from __future__ import annotations

import dataclasses

import hypothesis
import numpy as np
import pytest
from hypothesis import strategies as st

from epplan.cost.evaluate import evaluate
from epplan.placement.bounds import lower_bound
from epplan.placement.bruteforce import brute_force
from epplan.placement.layer import layer_data
from epplan.placement.splits import optimal_splits, split_bound
from epplan.placement.types import LayerPlacement, Placement

from test_planner import assert_solve_finds_the_brute_force_optimum, toy_problem


def etp_problem(nodes: int, gpus: int, experts: int, *, tp: int = 2, experts_per_gpu: int = 1,
                d_ff: int = 1024, tflops: float = 400.0, seed: int = 0, layers: int = 1):
    base = toy_problem(nodes, gpus, experts, experts_per_gpu=experts_per_gpu, d_ff=d_ff, tflops=tflops,
                       seed=seed, layers=layers)
    return dataclasses.replace(base, tp=tp, expert_tp=True)


def random_layer(rng: np.random.Generator, num_gpus: int, num_experts: int, slots: int) -> LayerPlacement:
    """Every GPU ``slots`` distinct experts (every expert somewhere), random splits."""
    while True:
        held = [rng.choice(num_experts, size=slots, replace=False) for _ in range(num_gpus)]
        replicas = [np.array([g for g in range(num_gpus) if e in held[g]], dtype=np.int64)
                    for e in range(num_experts)]
        if all(r.size for r in replicas):
            break
    split = [rng.dirichlet(np.ones(r.size), size=num_gpus) for r in replicas]
    return LayerPlacement(replicas, split)


@pytest.mark.parametrize("nodes,gpus,tp", [(2, 2, 2), (1, 4, 2), (1, 4, 4), (2, 4, 2)])
def test_planner_layer_time_is_evaluate_s_under_expert_tp(nodes, gpus, tp):
    problem = etp_problem(nodes, gpus, 4, tp=tp, experts_per_gpu=2, layers=3, seed=nodes + gpus + tp)
    rng = np.random.default_rng(tp)
    for _ in range(5):
        layers = [random_layer(rng, problem.num_gpus, 4, 2) for _ in range(3)]
        cost = evaluate(Placement(problem.num_gpus, 4, layers), problem)
        for li, layer in enumerate(layers):
            data = layer_data(problem, problem.traffic.counts[li])
            time, link, gpu = data.time_of(layer.flows(data.counts))
            assert link == pytest.approx(cost.a2a_link_s[li], rel=1e-9)
            assert gpu == pytest.approx(cost.expert_compute_s[li].max(), rel=1e-9)
            assert time == pytest.approx(cost.moe_time_s[li], rel=1e-9)


TINY_ETP = [  # nodes, gpus per node, experts, experts per GPU, d_ff, tflops
    (2, 2, 3, 1, 1024, 400.0),    # both matter
    (2, 2, 4, 1, 4096, 50.0),     # compute-bound
    (2, 2, 3, 2, 1024, 400.0),
    (1, 4, 3, 1, 4096, 100.0),
]


@pytest.mark.parametrize("nodes,gpus,experts,k,d_ff,tflops", TINY_ETP)
def test_milp_under_expert_tp_equals_the_brute_force_of_evaluate_s_clock(nodes, gpus, experts, k, d_ff, tflops):
    problem = etp_problem(nodes, gpus, experts, experts_per_gpu=k, d_ff=d_ff, tflops=tflops,
                          seed=nodes * 100 + gpus * 10 + experts)
    best = assert_solve_finds_the_brute_force_optimum(problem)
    per_gpu, _ = brute_force(dataclasses.replace(problem, expert_tp=False, tp=1))
    assert best < per_gpu * (1 - 1e-3)     # pooling the group's rows is another clock


@hypothesis.settings(max_examples=8, deadline=None)
@hypothesis.given(seed=st.integers(0, 10_000), experts=st.integers(2, 4), tflops=st.sampled_from([50.0, 400.0, 2000.0]))
def test_bounds_under_expert_tp_are_below_the_brute_force(seed, experts, tflops):
    problem = etp_problem(2, 2, experts, d_ff=1024, tflops=tflops, seed=seed)
    best, _ = brute_force(problem)
    data = layer_data(problem, problem.traffic.counts[0])
    bound, _ = lower_bound(data)
    assert bound <= best * (1 + 1e-9)
    # split_bound is below the split LP's optimum for every placement the brute force sees.
    rng = np.random.default_rng(seed)
    for _ in range(3):
        replicas = random_layer(rng, problem.num_gpus, experts, 1).replicas
        assert split_bound(data, replicas) <= optimal_splits(data, replicas).bottleneck * (1 + 1e-7)


def test_baseline_scores_are_evaluate_s_under_expert_tp():
    """The precomputed baseline times (what a layer stopped by the time limit keeps) are the
    group-pooled clock, as ``evaluate`` scores them."""
    from epplan.placement.layer import gpu_slots
    from epplan.placement.solve import _baseline_scores, _baselines

    problem = etp_problem(2, 4, 4, experts_per_gpu=2, layers=2, seed=3)
    baselines = _baselines(problem)
    scores = _baseline_scores(problem, baselines, gpu_slots(problem))
    for name, plan in baselines.items():
        cost = evaluate(plan, problem)
        np.testing.assert_allclose(scores[name][0], cost.moe_time_s, rtol=1e-9)


@pytest.mark.parametrize("objective", ["mean", "worst"])
def test_robust_split_lp_under_expert_tp_equals_the_reference(objective):
    from epplan.placement.bruteforce import brute_force_windows
    from epplan.placement.robust import combine, robust_splits, window_problems, window_times
    from epplan.workload.traffic import Traffic
    from epplan.workload.windows import mean_traffic

    proto = etp_problem(2, 2, 3, d_ff=1024, tflops=400.0, seed=4)
    rng = np.random.default_rng(4)
    windows = []
    for w in range(3):
        counts = rng.gamma(0.6, size=proto.traffic.counts.shape) + 1e-3
        counts *= proto.config.tokens_per_step / proto.num_gpus * proto.config.top_k / counts.sum(axis=2, keepdims=True)
        windows.append(Traffic(counts, f"window {w}"))
    base = dataclasses.replace(proto, traffic=mean_traffic(windows))
    problems = window_problems(base, windows)
    best, layer = brute_force_windows(problems, objective)
    got = robust_splits(problems, 0, layer.replicas, objective)
    plan = Placement(base.num_gpus, 3, [got])
    assert combine(window_times(plan, problems), objective)[0] == pytest.approx(best, rel=1e-6)


def test_hierarchical_search_scores_on_evaluate_s_clock_under_expert_tp():
    """The co-activation search's layer time (its blocks as its ``run`` builds them) is
    evaluate's under --expert-tp."""
    from epplan.cost.evaluate import served_assignments
    from epplan.placement.baselines import baseline
    from epplan.placement.hierarchical import _LayerSearch

    problem = dataclasses.replace(etp_problem(2, 2, 4, experts_per_gpu=2, layers=1, seed=5), dispatch="hierarchical")
    plan = baseline("contiguous", problem, 0)
    search = _LayerSearch(problem, 0, plan.layers[0])
    search.blocks = []
    layer = plan.layers[0]
    slot_gpu = np.concatenate([np.asarray(r, dtype=np.int64) for r in layer.replicas])
    for e, r in enumerate(layer.replicas):
        for col in range(r.size):
            hi = np.cumsum(layer.split[e], axis=1)[:, col]
            search.blocks.append((e, hi - layer.split[e][:, col], hi))
    node_rows, gpu_rows = search._rows(slot_gpu, None, None)
    time, _ = search._score(node_rows, gpu_rows, served_assignments(layer, search.counts))
    assert time == pytest.approx(evaluate(plan, problem).moe_time_s[0], rel=1e-9)
