"""The memory floor (``fit.memory_floor``): no placement's fullest GPU goes below it, it is
reached where the even spread is a plan, and ``place`` refuses before solving when no run
setting fits even there."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from epplan.cli import app
from epplan.cost import evaluate
from epplan.cost.evaluate import memory_for
from epplan.cost.fit import RunSettings, check_memory_floor, micro_batch_choices, memory_floor
from epplan.errors import DoesNotFit
from epplan.placement.baselines import contiguous, eplb, random_placement
from epplan.placement.problem import PlacementProblem
from epplan.topology import load_topology
from epplan.workload import load_model_config, make_traffic
from epplan.workload.memory import OPTIMIZER_SHARDING, RECOMPUTE
from epplan.workload.tensor_parallel import tp_degrees

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
TWO_NODE = str(TOPOLOGIES / "dgx-h100-2node.yaml")
runner = CliRunner()


def _problem(model: str, overrides: dict, routing: str, experts_per_gpu: int) -> PlacementProblem:
    topo = load_topology(TWO_NODE)
    config = load_model_config(model, overrides)
    return PlacementProblem(topo, config, make_traffic(routing, config, topo.num_gpus, seed=3),
                            experts_per_gpu=experts_per_gpu)


def _fullest_fill(placement, problem: PlacementProblem, settings: RunSettings) -> float:
    """The fullest GPU's fill of ``placement`` as ``choose_run_settings`` computes it."""
    s = settings
    served = evaluate(placement, problem).expert_assignments
    total = sum(memory_for(placement, problem, served, s.micro_batches, s.recompute, s.optimizer_sharding,
                           s.tp, s.expert_tp).values())
    return float(np.max(total / (np.asarray(problem.topology.gpu_memory_gb) * 1e9)))


@pytest.mark.parametrize("model, overrides, routing, experts_per_gpu", [
    ("seed", {"num_layers": 4}, "zipf:1.2", 1),
    ("seed", {"num_layers": 4, "num_experts": 24}, "zipf:1.5", 4),     # replicas, 2 experts on some GPUs
    ("tiny", {"num_experts": 8, "dtype": "fp32"}, "zipf:1.0", 3),      # fewer experts than GPUs
    ("mixtral-8x7b", {"num_layers": 2}, "uniform", 2),
])
def test_no_placement_goes_below_the_floor(model, overrides, routing, experts_per_gpu):
    problem = _problem(model, overrides, routing, experts_per_gpu)
    plans = [contiguous(problem), eplb(problem), random_placement(problem, seed=1)]
    ts = tp_degrees(problem.config, problem.gpus_per_node)
    for t, r, s in itertools.product(ts, RECOMPUTE, OPTIMIZER_SHARDING):
        for expert_tp in (False, True) if t > 1 else (False,):
            for m in micro_batch_choices(problem, t)[:: 2]:
                settings = RunSettings(m, r, s, t, expert_tp)
                floor = memory_floor(problem, settings)
                for plan in plans:
                    assert floor <= _fullest_fill(plan, problem, settings) * (1 + 1e-12), (settings, plan.method)


def test_the_floor_is_reached_where_the_even_spread_is_a_plan():
    # Uniform routing, one expert per GPU: every GPU holds and serves the same, so the plan's
    # fullest GPU is the floor (no sharding: the dense state is not split unevenly either).
    problem = _problem("seed", {"num_layers": 4}, "uniform", 1)
    plan = contiguous(problem)
    for r in RECOMPUTE:
        settings = RunSettings(2, r, "none")
        assert memory_floor(problem, settings) == pytest.approx(_fullest_fill(plan, problem, settings), rel=1e-9)


def test_the_floor_check_refuses_only_what_no_setting_fits():
    problem = _problem("seed", {"num_layers": 4}, "zipf:1.2", 1)
    check_memory_floor(problem)  # 4 layers of seed fit an H100
    problem.topology.gpu_memory_gb = np.full(problem.num_gpus, 5.0)
    with pytest.raises(DoesNotFit, match="under any placement"):
        check_memory_floor(problem)


def _solve_calls(monkeypatch) -> list:
    """The problems place's solve is called with (the real solver runs; the wrapper records)."""
    import epplan.cli.place as place_cli

    calls = []

    def solve(problem, **kwargs):
        calls.append(problem)
        return real(problem, **kwargs)

    real = place_cli.solve
    monkeypatch.setattr(place_cli, "solve", solve)
    return calls


# seed on 2 x DGX H100 (16 GPUs, zipf 1.2), at its cheapest settings (8 micro-batches, block
# recompute, dense or all sharding): the floor is 55.5 GB a GPU, the contiguous plan needs 62.2 GB.
ARGS = ["place", "--topology", TWO_NODE, "--model", "seed", "--routing", "zipf:1.2", "--time-limit", "600"]


def test_place_refuses_before_solving_when_no_plan_can_fit(tmp_path, monkeypatch):
    calls = _solve_calls(monkeypatch)
    out = tmp_path / "m.json"
    result = runner.invoke(app, [*ARGS, "--memory-gb", "50", "--recompute", "attention", "--out", str(out)])
    assert result.exit_code == 3, result.output
    assert not calls and not out.exists()
    text = " ".join(result.output.split())
    assert "no run settings fit in GPU memory" in text and "under any placement" in text, text
    assert "the GPUs have 50 GB" in text and "Traceback" not in text
    for fix in ("--recompute block", "--tp auto", "more GPUs", "--memory-gb"):  # the fixed setting first
        assert fix in text, fix


def test_place_still_checks_the_solved_plan_where_the_floor_fits(tmp_path, monkeypatch):
    out = tmp_path / "m.json"
    result = runner.invoke(app, [*ARGS, "--memory-gb", "58", "--placement", "contiguous", "--out", str(out)])
    assert result.exit_code == 3 and not out.exists(), result.output
    text = " ".join(result.output.split())
    assert "no run settings fit in GPU memory" in text and "under any placement" not in text, text
    assert "which has 58 GB" in text
