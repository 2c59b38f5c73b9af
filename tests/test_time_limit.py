"""``place --time-limit`` is a wall for the whole command: every phase gets a deadline and keeps
its best result at it; the fast paths that make the phases fit are checked against their slow
references."""

from __future__ import annotations

import dataclasses
import random
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
from typer.testing import CliRunner

import epplan.cli as cli
from epplan.cli import app
from epplan.cli.common import rates_for
from epplan.cost.evaluate import evaluate
from epplan.cost.fit import RunSettings, choose_run_settings
from epplan.placement.baselines import baseline
from epplan.placement.problem import PlacementProblem
from epplan.topology import load_topology
from epplan.topology.paths import _adjacency, ecmp_fractions
from epplan.workload import load_model_config, make_traffic
from epplan.workload.memory import zero_partition

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
TWO_NODE = str(TOPOLOGIES / "dgx-h100-2node.yaml")
runner = CliRunner()


def _problem(topology: str, model: str = "tiny", **overrides) -> PlacementProblem:
    topo = load_topology(topology)
    config = load_model_config(model, overrides)
    rates, _ = rates_for(topo, None, None, None)
    return PlacementProblem(topo, config, make_traffic("zipf:1.2", config, topo.num_gpus, seed=0), **rates)


# ------------------------------------------------------------------ the command's phases

def test_every_run_settings_choice_gets_a_deadline_before_the_wall(tmp_path, monkeypatch):
    """The stand-in's and the solved plan's run settings are chosen by deadlines that leave the
    manifest its time before the wall."""
    import epplan.cli.place as place_cli

    deadlines = []

    def choose(plan, problem, **kwargs):
        deadlines.append((time.monotonic(), kwargs.get("deadline")))
        return real(plan, problem, **kwargs)

    real = place_cli.choose_run_settings
    monkeypatch.setattr(place_cli, "choose_run_settings", choose)
    t0 = time.monotonic()
    monkeypatch.setattr(cli, "_started", t0)   # the command's clock, as main sets it
    result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--model", "tiny", "--set", "num_experts=16",
                                 "--routing", "zipf:1.2", "--time-limit", "20", "--dispatch", "flat", "--json",
                                 "--out", str(tmp_path / "m.json")])
    assert result.exit_code in (0, 4), result.output
    assert len(deadlines) >= 2
    (_, standin), (_, solved) = deadlines[:2]
    assert standin == t0 + 0.2 * 20
    assert solved == t0 + 20 - place_cli.manifest_seconds(_problem(TWO_NODE, num_experts=16))


# ------------------------------------------------------------------ run settings by a deadline

def test_run_settings_past_the_deadline_keep_the_first_that_fits():
    problem = _problem(TWO_NODE, num_experts=16)
    plan = baseline("eplb", problem)
    full = choose_run_settings(plan, problem)
    assert full.fits and full.unscored == 0
    # No deadline: the order of the trials changes nothing.
    other = RunSettings(full.settings.micro_batches, "block", "all")
    assert choose_run_settings(plan, problem, first=other).settings == full.settings
    # Past the deadline: the first that fits is kept, the rest counted as unscored.
    cut = choose_run_settings(plan, problem, deadline=time.monotonic() - 1.0, first=other)
    assert cut.fits and cut.settings.recompute == "block" and cut.settings.optimizer_sharding == "all"
    assert cut.unscored == 3 * 3 - 1   # recompute x optimizer sharding at TP 1, less the one scored
    scored = evaluate(plan, dataclasses.replace(problem, **dataclasses.asdict(cut.settings)))
    assert cut.cost.step_time_s == scored.step_time_s
    again = choose_run_settings(plan, problem, deadline=time.monotonic() - 1.0, first=full.settings)
    assert again.settings == full.settings and again.cost.step_time_s == full.cost.step_time_s


# ------------------------------------------------------------------ the solve past its wall

def test_a_solve_past_its_wall_computes_no_more_split_bounds(monkeypatch):
    """Identical layers are relabelled from the first; past the wall their baselines' split
    bounds are not computed (0.05-0.2 s each at 1,024 GPUs: 3 s past the wall there) but left
    unchecked. The wrapper only counts the calls in this process."""
    import epplan.placement.solve as solve_module

    problem = _problem(TWO_NODE, num_experts=6)   # 16 GPUs, 6 experts: EPLB replicates
    calls = []

    def split_bound(*args, **kwargs):
        calls.append(time.monotonic())
        return real(*args, **kwargs)

    real = solve_module.split_bound
    monkeypatch.setattr(solve_module, "split_bound", split_bound)
    plan = solve_module.solve(problem, time_limit=0.01, workers=2)
    layers = plan.info["layers"]
    assert any(L["same_as"] is not None for L in layers)
    assert calls == []
    relabelled = [L for L in layers if L["same_as"] is not None]
    assert all(L["unchecked"] for L in relabelled)


# ------------------------------------------------------------------ fast paths and their references

def _zero_partition_scan(group_sizes, num_ranks):
    """torch ZeroRedundancyOptimizer's rule as written there: each tensor, largest first, to
    ``sizes.index(min(sizes))``."""
    sizes = [0] * num_ranks
    out = []
    for group in group_sizes:
        per_rank = [[] for _ in range(num_ranks)]
        for i in sorted(range(len(group)), key=lambda j: group[j], reverse=True):
            rank = sizes.index(min(sizes))
            per_rank[rank].append(i)
            sizes[rank] += group[i]
        out.append(per_rank)
    return out


def test_zero_partition_is_torch_s_scan():
    rng = random.Random(0)
    for _ in range(200):
        ranks = rng.randint(1, 40)
        groups = [[rng.choice([1, 4, 4, 16, 1024, rng.randint(1, 5000)]) for _ in range(rng.randint(0, 60))]
                  for _ in range(rng.randint(1, 3))]
        assert zero_partition(groups, ranks) == _zero_partition_scan(groups, ranks)


def test_gpu_rates_one_lookup_per_table_equal_every_gpu_s_own():
    problem = _problem(str(TOPOLOGIES / "hetero-degraded.yaml"), model="seed")
    assert problem.calibration is not None and len({id(c) for c in problem.calibration}) >= 1
    c = problem.config
    path = "chunked" if problem.schedule.overlap else "unchunked"
    each = np.array([cal.expert_flops(c.d_model, c.d_ff, c.activation, problem.expected_rows_per_expert, path)
                     for cal in problem.calibration])
    assert np.array_equal(problem.gpu_flops, each)


def test_fabric_routes_one_search_per_destination_equal_the_per_pair_walk():
    topo = load_topology(str(TOPOLOGIES / "h100-64node-3tier.yaml"))
    pm = topo.paths
    graph = topo.graph
    switches = {d for d in graph.nodes if graph.nodes[d].get("node") is None}   # the fabric's devices
    adj = _adjacency(graph, switches)
    edge = [None] * pm.num_edge_switches
    for c, w in enumerate(pm.nic_switch):
        up = int(pm.nic_up[c])
        edge[w] = next(v for u, v, i in graph.edges(data="idx") if i == up)
    num_w = len(edge)
    rows, cols, vals = [], [], []
    idx = {(u, v): i for u, v, i in graph.edges(data="idx")}
    for a in range(num_w):
        for b in range(num_w):
            if a != b:
                for (u, v), f in ecmp_fractions(adj, edge[a], edge[b]).items():
                    rows.append(a * num_w + b); cols.append(idx[u, v]); vals.append(f)
    ref = sp.csr_matrix((vals, (rows, cols)), shape=pm.fabric_routes.shape)
    assert abs(ref - pm.fabric_routes).max() < 1e-12


def test_the_commands_clock_starts_with_its_process():
    """Under ``main`` the clock starts when the process did (the interpreter's start-up counts),
    not when the CLI is imported: here a second after the script's first line."""
    import subprocess
    import sys

    script = ("import time; first = time.monotonic(); time.sleep(1.0); import epplan.cli as cli; "
              "print(first - cli._IMPORTED)")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    before_first_line = float(out.stdout)
    assert 0.0 <= before_first_line < 10.0   # the start-up, before the script's first line
