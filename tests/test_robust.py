"""Plans over several routing windows and plans that move little: against brute force on tiny
layers, the drift source's determinism, and the windows' parsing."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from epplan.cost import evaluate
from epplan.cost.migration import plan_migration, replica_bytes
from epplan.errors import PlacementError, TrafficError
from epplan.placement.bruteforce import brute_force, brute_force_windows
from epplan.placement.robust import (align, combine, relabel_ranks, robust_splits, solve_robust, window_problems,
                                    window_times)
from epplan.placement.solve import solve
from epplan.workload import load_model_config, make_traffic
from epplan.workload.drift import parse_drift
from epplan.workload.traffic import Traffic
from epplan.workload.windows import make_windows, mean_traffic, window_specs
from tests.test_planner import toy_problem


def _windows(base, num: int, seed: int):
    """``num`` skewed, source-dependent windows of ``base``'s shape."""
    rng = np.random.default_rng(seed)
    c = base.config
    out = []
    for w in range(num):
        counts = rng.gamma(0.6, size=base.traffic.counts.shape) + 1e-3
        counts *= c.tokens_per_step / base.num_gpus * c.top_k / counts.sum(axis=2, keepdims=True)
        out.append(Traffic(counts, f"window {w}"))
    return out


# ------------------------------------------------------------------ robust objective vs brute force

@pytest.mark.parametrize("objective,seed", [("mean", 1), ("worst", 0)])
def test_robust_plan_against_brute_force(objective, seed):
    proto = toy_problem(2, 2, 3, d_ff=512, tflops=500.0, seed=seed)
    windows = _windows(proto, 3, seed)
    base = dataclasses.replace(proto, traffic=mean_traffic(windows))
    problems = window_problems(base, windows)
    best, _ = brute_force_windows(problems, objective)
    plan = solve_robust(base, problems, objective=objective, gap=0.0, time_limit=30)
    score = combine(window_times(plan, problems), objective)[0]
    info = plan.info["layers"][0]
    # The plan is scored exactly, no better than the optimum, and the bound is below the optimum.
    assert info["objective_s"] == pytest.approx(score, rel=1e-12)
    assert plan.info["objective"] == objective and plan.info["num_windows"] == 3
    assert score >= best * (1 - 1e-6)
    assert info["bound_s"] <= best * (1 + 1e-6)
    # Every single-window plan is a candidate, so the robust plan is never worse than any of them.
    for p in [base] + problems:
        single = solve(p, gap=0.0, time_limit=30)
        assert score <= combine(window_times(single, problems), objective)[0] * (1 + 1e-9)


@pytest.mark.parametrize("objective", ["mean", "worst"])
def test_robust_split_lp_equals_the_reference(objective):
    # For the brute force's best replicas, the planner's split LP over the windows finds its value.
    proto = toy_problem(2, 2, 3, d_ff=512, tflops=500.0, seed=4)
    windows = _windows(proto, 3, 4)
    base = dataclasses.replace(proto, traffic=mean_traffic(windows))
    problems = window_problems(base, windows)
    best, layer = brute_force_windows(problems, objective)
    got = robust_splits(problems, 0, layer.replicas, objective)
    plan = dataclasses.replace(solve(base, time_limit=30), layers=[got])
    assert combine(window_times(plan, problems), objective)[0] == pytest.approx(best, rel=1e-6)


def test_brute_force_windows_reduces_to_one_window():
    problem = toy_problem(2, 2, 3, d_ff=512, tflops=500.0, seed=3)
    one, _ = brute_force(problem)
    same, _ = brute_force_windows([problem, problem], "worst")
    assert same == pytest.approx(one, rel=1e-9)
    # Worst of two windows is at least their mean, both at least each window's own optimum.
    other = dataclasses.replace(problem, traffic=_windows(problem, 1, 9)[0])
    worst, _ = brute_force_windows([problem, other], "worst")
    mean, _ = brute_force_windows([problem, other], "mean")
    alone = brute_force(other)[0]
    assert worst >= mean * (1 - 1e-9) and mean >= 0.5 * (one + alone) * (1 - 1e-9)


def test_objective_name_is_checked():
    with pytest.raises(PlacementError, match="mean or worst"):
        combine(np.zeros((1, 1)), "median")


# ------------------------------------------------------------------ moving little

def test_move_budget_and_relabelling():
    proto = toy_problem(2, 2, 4, d_ff=512, tflops=500.0, seed=5, layers=2)
    windows = _windows(proto, 2, 5)
    old_problem = dataclasses.replace(proto, traffic=windows[0])
    new_problem = dataclasses.replace(proto, traffic=windows[1])
    old = solve(old_problem, gap=0.0, time_limit=30)
    free = solve_robust(new_problem, [new_problem], old=old, gap=0.0, time_limit=30)
    # Zero budget: nothing moves, and the plan is the old replicas (re-split at most).
    frozen = solve_robust(new_problem, [new_problem], old=old, max_move_bytes=0.0, gap=0.0, time_limit=30)
    assert plan_migration(old, frozen, new_problem).bytes_moved == 0.0
    assert frozen.info["migration"]["moves"] == 0
    for lo, lf in zip(old.layers, frozen.layers):
        assert [r.tolist() for r in lo.replicas] == [r.tolist() for r in lf.replicas]
    # A budget of one replica: at most one moves, and the objective lies between the two.
    one = solve_robust(new_problem, [new_problem], old=old, max_move_bytes=replica_bytes(proto.config),
                       gap=0.0, time_limit=30)
    assert plan_migration(old, one, new_problem).num_moves <= 1
    score = {name: evaluate(p, new_problem).objective_s for name, p in
             (("free", free), ("one", one), ("frozen", frozen))}
    assert score["free"] <= score["one"] * (1 + 1e-9) <= score["frozen"] * (1 + 1e-9)
    # The bound holds under the budget too.
    assert frozen.info["bound_s"] <= score["frozen"] * (1 + 1e-9)


def test_align_keeps_cost_on_symmetric_traffic_and_moves_less():
    # Every source routes alike, so relabelling nodes and GPUs keeps the cost exactly.
    proto = toy_problem(2, 2, 4, d_ff=512, tflops=500.0, seed=2)
    counts = np.broadcast_to(proto.traffic.counts.mean(axis=1, keepdims=True), proto.traffic.counts.shape).copy()
    problem = dataclasses.replace(proto, traffic=Traffic(counts, "alike"))
    plan = solve(problem, gap=0.0, time_limit=30)
    perm = np.array([3, 2, 1, 0])  # swap the nodes and the GPUs inside them
    old = dataclasses.replace(plan, layers=[relabel_ranks(layer, perm) for layer in plan.layers])
    assert evaluate(old, problem).objective_s == pytest.approx(evaluate(plan, problem).objective_s, rel=1e-9)
    aligned = align(old, plan, problem)
    assert plan_migration(old, aligned, problem).num_moves == 0
    assert plan_migration(old, plan, problem).num_moves > 0
    assert evaluate(aligned, problem).objective_s == pytest.approx(evaluate(plan, problem).objective_s, rel=1e-9)


def test_move_options_need_an_old_plan():
    problem = toy_problem(1, 2, 2, seed=0)
    with pytest.raises(PlacementError, match=r"the plan in force \(old\)"):
        solve_robust(problem, [problem], max_move_bytes=1.0)


# ------------------------------------------------------------------ the drift source

def test_drift_is_seeded_zipf_that_rotates():
    config = load_model_config("tiny", {"num_experts": 8, "num_layers": 3})
    at0 = make_traffic("drift:alpha=1.3,rotate=100", config, 4, seed=7)
    zipf = make_traffic("zipf:1.3", config, 4, seed=7)
    np.testing.assert_allclose(at0.counts, zipf.counts, rtol=1e-12)   # step 0 is zipf, same seed
    again = make_traffic("drift:alpha=1.3,rotate=100@250:260", config, 4, seed=7)
    np.testing.assert_array_equal(again.counts, make_traffic("drift:alpha=1.3,rotate=100@250:260",
                                                             config, 4, seed=7).counts)
    assert not np.allclose(again.counts, make_traffic("drift:alpha=1.3,rotate=100@250:260",
                                                      config, 4, seed=8).counts)
    # Whole rotations: after k * rotate steps, popularity rank r sits where rank r + k was...
    d = parse_drift("drift:alpha=1.3,rotate=100")
    s0 = d.shares(3, 8, 0, 0, seed=7)
    s2 = d.shares(3, 8, 200, 200, seed=7)
    order = np.stack([np.random.default_rng(7).permutation(8) for _ in range(1)])[0]
    np.testing.assert_allclose(s2[0, order[(np.arange(8) + 2) % 8]], s0[0, order], rtol=1e-12)
    # ... and half-way it is the blend of the two.
    s1, half = d.shares(3, 8, 100, 100, seed=7), d.shares(3, 8, 150, 150, seed=7)
    np.testing.assert_allclose(half, 0.5 * (s1 + s2), rtol=1e-12)
    # A window is the mean of its steps; every row sums to the volume.
    win = d.shares(3, 8, 140, 160, seed=7)
    np.testing.assert_allclose(win, np.mean([d.shares(3, 8, t, t, seed=7) for t in range(140, 161)], axis=0))
    np.testing.assert_allclose(again.counts.sum(axis=2), config.tokens_per_step / 4 * config.top_k)


def test_drift_exponent_changes_linearly():
    d = parse_drift("drift:alpha=1.0,alpha_end=2.0,steps=100")
    assert d.alpha_at(np.array([0, 50, 100, 500])).tolist() == [1.0, 1.5, 2.0, 2.0]
    config = load_model_config("tiny", {"num_experts": 8})
    early = make_traffic("drift:alpha=1.0,alpha_end=2.0,steps=100@0", config, 2)
    late = make_traffic("drift:alpha=1.0,alpha_end=2.0,steps=100@100", config, 2)
    assert late.counts.max() > early.counts.max()


@pytest.mark.parametrize("spec,match", [
    ("drift:beta=1", "keys alpha"), ("drift:alpha=x", "not a number"), ("drift:alpha=1,alpha=2", "twice"),
    ("drift:alpha_end=2", "go together"), ("drift:rotate=-1", "at least 0"),
    ("drift:alpha=1@5:2", "FIRST <= LAST"), ("drift:alpha=1@x", "FIRST:LAST"),
])
def test_drift_errors(spec, match):
    config = load_model_config("tiny", {})
    with pytest.raises(TrafficError, match=match):
        make_traffic(spec, config, 2)


# ------------------------------------------------------------------ windows

def test_window_specs(tmp_path):
    assert window_specs(["t.npz@1:100:40"]) == ["t.npz@1:40", "t.npz@41:80", "t.npz@81:100"]
    assert window_specs(["drift:alpha=1.2,rotate=5@0:9:5", "uniform"]) == [
        "drift:alpha=1.2,rotate=5@0:4", "drift:alpha=1.2,rotate=5@5:9", "uniform"]
    (tmp_path / "b.json").write_text("{}")
    (tmp_path / "a.json").write_text("{}")
    assert window_specs([str(tmp_path)]) == [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    with pytest.raises(TrafficError, match="WIDTH >= 1"):
        window_specs(["t.npz@1:100:0"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrafficError, match="without routing statistics"):
        window_specs([str(tmp_path / "empty")])


def test_make_windows_and_mean():
    config = load_model_config("tiny", {"num_experts": 4})
    windows = make_windows(["drift:alpha=1.2,rotate=10@0:19:10", "uniform"], config, 2, seed=1)
    assert [w.source.split(" ")[0] for w in windows] == [
        "drift:alpha=1.2,rotate=10@0:9", "drift:alpha=1.2,rotate=10@10:19", "uniform"]
    mean = mean_traffic(windows)
    np.testing.assert_allclose(mean.counts, np.mean([w.counts for w in windows], axis=0))
    assert "mean of 3 windows" in mean.source
