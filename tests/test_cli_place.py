"""``epplan place`` as a user runs it, through typer's CliRunner."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from epplan.cli import app
from epplan.manifest import load_manifest
from epplan.workload import write_routing_stats

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
TWO_NODE = str(TOPOLOGIES / "dgx-h100-2node.yaml")
runner = CliRunner()


def test_place_writes_a_loadable_manifest(tmp_path):
    out = tmp_path / "manifest.json"
    result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--model", "seed", "--routing", "zipf:1.2",
                                 "--set", "num_layers=4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "manifest written" in result.stdout and "lower bound" in result.stdout
    m = load_manifest(out)
    assert m.placement.method == "ilp" and m.world_size == 16 and m.config.num_layers == 4
    assert m.solver["status"] in ("optimal", "gap_met") and m.solver["gap"] <= 0.01


def test_place_records_run_settings_that_fit_or_refuses_with_exit_code_3(tmp_path):
    out = tmp_path / "m.json"
    args = ["place", "--topology", TWO_NODE, "--model", "seed", "--placement", "contiguous", "--out", str(out)]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    m = load_manifest(out)
    assert (m.micro_batches, m.recompute, m.optimizer_sharding) == (4, "block", "none")  # 72.5 of 80 GB
    too_big = tmp_path / "big.json"
    result = runner.invoke(app, [*args[:-1], str(too_big), "--set", "num_layers=32", "--set", "seq_len=40000"])
    assert result.exit_code == 3 and not too_big.exists()
    assert "no run settings fit in GPU memory" in result.output and "Traceback" not in result.output


def test_compare_json(tmp_path):
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["place", "--topology", str(TOPOLOGIES / "h100-8node-oversub.yaml"),
                                 "--set", "num_layers=2", "--routing", "zipf:1.2", "--compare-all", "--json",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    rows = data["compare"]
    assert set(rows) == {"ilp", "eplb", "eplb-hier", "contiguous", "random", "eplb+lp", "eplb-hier+lp",
                         "contiguous+lp"}
    for name in set(rows) - {"ilp"}:
        assert rows["ilp"]["objective_s"] <= rows[name]["objective_s"] * (1 + 1e-6)
        assert rows[name]["gap"] is None
    for name in ("eplb", "eplb-hier", "contiguous"):  # the split LP never makes a placement worse
        assert rows[f"{name}+lp"]["objective_s"] <= rows[name]["objective_s"] * (1 + 1e-9)
    # The clock counts the exposed 1/16 of the exchange (overlap across nodes); its bound is looser
    # than the compute bound that certified the plan when the objective was max(link, GPU).
    assert 0 <= rows["ilp"]["gap"] <= 0.02 and len(rows["ilp"]["link_per_layer_s"]) == 2
    assert data["manifest_hash"] == load_manifest(out).hash


def test_compare_all_says_which_baseline_the_time_limit_left_short(tmp_path, monkeypatch):
    """A +lp row whose split LPs the command's time limit stopped understates the baseline: the
    table marks it, says on how many layers and what to do, and the JSON row counts them."""
    import epplan.cli.place as place_module

    real = place_module.resplit
    monkeypatch.setattr(place_module, "resplit",
                        lambda plan, problem, time_limit=None: real(plan, problem, time_limit=1e-9))
    args = ["place", "--topology", TWO_NODE, "--set", "num_layers=2", "--routing", "zipf:1.2",
            "--compare-all", "--time-limit", "30"]
    result = runner.invoke(app, [*args, "--out", str(tmp_path / "m.json")], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "eplb+lp*" in result.stdout
    text = " ".join(result.stdout.split())
    assert "the time limit cut the split LP short on some of the 2 layers (eplb+lp 2," in text
    assert "understate the baselines" in text
    data = json.loads(runner.invoke(app, [*args, "--json", "--out", str(tmp_path / "j.json")]).stdout)
    assert data["compare"]["eplb+lp"]["resplit_cut_short"] == 2
    assert "resplit_cut_short" not in data["compare"]["eplb"]


def test_baseline_method(tmp_path):
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--set", "num_layers=2", "--placement", "eplb",
                                 "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_manifest(out).placement.method == "eplb"


def test_more_experts_than_gpus_names_the_flag(tmp_path):
    args = ["place", "--topology", TWO_NODE, "--set", "num_experts=40", "--set", "num_layers=1",
            "--out", str(tmp_path / "m.json")]
    result = runner.invoke(app, args)
    assert result.exit_code == 1
    assert "--experts-per-gpu 3" in result.stderr and "Traceback" not in result.output
    assert not (tmp_path / "m.json").exists()
    result = runner.invoke(app, args + ["--experts-per-gpu", "3"])
    assert result.exit_code == 0, result.output


def test_time_limited_solve_reports_bound_and_gap(tmp_path):
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--model", "tiny", "--set", "num_experts=6",
                                 "--routing", "zipf:1.0", "--gap", "0", "--time-limit", "2", "--json",
                                 "--out", str(out)])
    solver = json.loads(result.stdout)["solver"]
    assert result.exit_code == (4 if solver["status"] == "time_limit" else 0), result.output
    # --gap 0: optimal only with the gap closed, gap open only with it open; gap met needs a positive target.
    assert solver["status"] != "optimal" or solver["gap"] <= 1e-6
    assert solver["status"] != "gap_open" or solver["gap"] > 1e-6
    assert solver["status"] in ("optimal", "time_limit", "gap_open")
    assert 0 <= solver["bound_s"] <= solver["objective_s"] and solver["seconds"] < 20
    assert load_manifest(out).solver["gap"] == solver["gap"]


@pytest.mark.parametrize("dispatch", ["flat", "auto"])
def test_time_limit_walls_the_whole_command(tmp_path, monkeypatch, dispatch):
    """Layers still solving at the limit are stopped and the command still scores the plan and
    writes the manifest, within the limit: the solve is given the time left less what scoring
    the plan and writing the manifest takes (8 s of slack here: a loaded 2-core CI machine gives the command a tenth of a core)."""
    import time

    import epplan.placement.solve as solve_module
    from epplan.cli.place import EXIT_TIME_LIMIT

    monkeypatch.setattr(solve_module, "_solve_layer", lambda *args, **kwargs: time.sleep(120))
    out = tmp_path / "m.json"
    t0 = time.monotonic()
    result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--model", "tiny", "--set", "num_experts=16",
                                 "--routing", "zipf:1.0", "--time-limit", "4", "--workers", "2", "--dispatch", dispatch,
                                 "--json", "--out", str(out)])
    assert time.monotonic() - t0 < 4 + 8
    if json.loads(result.stdout)["dispatch"]["chosen"] == "hierarchical":
        # auto's hierarchical plan (improved from the stopped flat one) states its own status
        assert result.exit_code in (0, EXIT_TIME_LIMIT), result.output
        return
    assert result.exit_code == EXIT_TIME_LIMIT, result.output   # the plan written is the best found
    solver = json.loads(result.stdout)["solver"]
    assert solver["status"] == "time_limit" and load_manifest(out).solver["status"] == "time_limit"


def test_auto_dispatch_stops_a_hierarchical_attempt_at_the_limit(tmp_path, monkeypatch):
    """auto's hierarchical attempt runs in a process stopped at the limit: a plan not scored by
    then is left out (flat is chosen, the line says so) and the command keeps the wall."""
    import time

    import epplan.cli.place as place_module

    monkeypatch.setattr(place_module, "plan_hierarchical", lambda *args, **kwargs: time.sleep(120))
    args = ["place", "--topology", TWO_NODE, "--model", "tiny", "--set", "num_experts=16", "--routing", "zipf:1.0",
            "--time-limit", "4", "--out", str(tmp_path / "m.json")]
    t0 = time.monotonic()
    result = runner.invoke(app, args + ["--json"])
    assert time.monotonic() - t0 < 4 + 8
    assert result.exit_code in (0, place_module.EXIT_TIME_LIMIT), result.output
    dispatch = json.loads(result.stdout)["dispatch"]
    assert dispatch["chosen"] == "flat" and list(dispatch["predicted_step_time_s"]) == ["flat"]
    text = runner.invoke(app, args, terminal_width=200)
    assert "hierarchical not scored within --time-limit" in text.output


def test_replan_from_run_routing_stats(tmp_path):
    stats = tmp_path / "routing.json"
    rng = np.random.default_rng(0)
    counts = rng.integers(0, 500, size=(2, 16, 16))
    write_routing_stats(stats, counts, steps=3, model="seed", top_k=2, tokens_per_rank_per_step=80000.0)
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--set", "num_layers=2",
                                 "--routing", str(stats), "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_manifest(out).routing_spec == str(stats)


def test_bad_options_one_line(tmp_path):
    for args in (["--solver", "gurobi"], ["--placement", "greedy"], ["--time-limit", "0"]):
        result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--out", str(tmp_path / "m.json"), *args])
        assert result.exit_code == 1, args
        assert result.stderr.count("\n") == 1 and "error:" in result.stderr


def test_solvers_print_nothing_on_stdout():
    # HiGHS prints a banner on stdout (file descriptor 1) the first time a process starts it;
    # --json output must stay JSON. Checked in a fresh process, at the descriptor level.
    code = ("from epplan.placement.lp import new_highs; new_highs(); import pulp; "
            "p = pulp.LpProblem(); x = p.add_variable('x', 0, 1, cat='Integer'); p += x; "
            "p.solve(pulp.HiGHS(msg=False))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == ""


def test_manifest_records_the_routing_seed_and_the_report_rebuilds_it(tmp_path):
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--model", "tiny", "--set", "num_experts=16",
                                 "--routing", "zipf:1.2", "--seed", "5", "--placement", "eplb", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert load_manifest(out).doc["routing"]["seed"] == 5
    report = runner.invoke(app, ["report", str(out), "--json"])
    assert report.exit_code == 0, report.output
    assert "could not be rebuilt" not in report.output


def test_the_schedule_is_stated_once_as_the_manifest_records_it(tmp_path):
    # At 24 GB the plan needs 8 micro-batches, which cuts each layer into 10 chunks, not the 16
    # that one micro-batch would give: the output says the schedule the plan runs with, once.
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--set", "num_layers=2", "--placement", "eplb",
                                 "--memory-gb", "24", "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    m = load_manifest(out)
    assert m.micro_batches == 8 and m.schedule.overlap and m.schedule.num_chunks == 10
    assert result.stdout.count("overlapped in") == 1, result.stdout
    assert "overlapped in 10 chunks" in result.stdout


def _solve_limits(monkeypatch) -> list[float]:
    """The time limits place's solve calls are given, as they are made (the real solver runs;
    the wrapper only records)."""
    import epplan.cli.place as place_cli

    given = []

    def solve(problem, **kwargs):
        given.append(kwargs["time_limit"])
        return real(problem, **kwargs)

    real = place_cli.solve
    monkeypatch.setattr(place_cli, "solve", solve)
    return given


def test_compare_all_solves_within_the_one_time_limit(tmp_path, monkeypatch):
    # --time-limit is for the whole command: the ILP row of --compare-all gets what is left, not
    # the whole limit again.
    given = _solve_limits(monkeypatch)
    result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--set", "num_layers=2", "--routing", "zipf:1.2",
                                 "--placement", "eplb", "--compare-all", "--time-limit", "30", "--json",
                                 "--out", str(tmp_path / "m.json")])
    assert result.exit_code in (0, 4), result.output
    assert len(given) == 1 and 0 < given[0] < 30
    assert json.loads(result.stdout)["compare"]["ilp"]["gap"] is not None


def test_a_resolve_under_the_plans_own_settings_never_writes_a_worse_plan(tmp_path, monkeypatch):
    # At 32.25 GB the solved plan's cheapest run settings (4 micro-batches) are not EPLB's (8),
    # so place solves once more under them. The second solve is given 1 ms, as the command gave
    # it before its 5 % floor (the README's mixtral example wrote such a plan: "time limit
    # 0.0007 s reached"); the real solver runs, the wrapper records each plan. The plan written
    # is the best of those solved, scored under the settings it is written with, and the summary
    # and --compare-all's ilp row are the kept solve's.
    import dataclasses

    import epplan.cli.place as place_cli
    from epplan.cost import evaluate

    solved = []

    def solve(problem, **kwargs):
        if solved:
            kwargs["time_limit"] = 1e-3
        plan = real(problem, **kwargs)
        solved.append((problem, plan))
        return plan

    real = place_cli.solve
    monkeypatch.setattr(place_cli, "solve", solve)
    out = tmp_path / "m.json"
    result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--set", "num_layers=2", "--routing", "zipf:1.2",
                                 "--experts-per-gpu", "2", "--memory-gb", "32.25", "--dispatch", "flat",
                                 "--gap", "0.3", "--time-limit", "30", "--compare-all", "--json", "--out", str(out)])
    assert result.exit_code in (0, 4), result.output
    assert len(solved) >= 2, "the plan's own settings no longer move: pick another --memory-gb"
    data = json.loads(result.stdout)
    written = load_manifest(out)
    settings = data["run_settings"]
    steps = [evaluate(plan, dataclasses.replace(problem, **settings)).step_time_s for problem, plan in solved]
    assert data["cost"]["step"]["step_time_s"] <= min(steps) * (1 + 1e-9), (data["cost"]["step"], steps)
    kept = min(range(len(steps)), key=steps.__getitem__)
    assert data["solver"]["time_limit_s"] == solved[kept][1].info["time_limit_s"]
    assert data["compare"]["ilp"]["gap"] == solved[kept][1].info["gap"]
    assert written.micro_batches == settings["micro_batches"]


def test_the_clock_counts_what_ran_before_the_command(tmp_path, monkeypatch):
    """Under ``main`` (the epplan script) --time-limit counts from when its process started:
    50 s gone of a 60 s limit leave the solve less than 10 s (it was given 0.7 x (60 s less the
    reserve) when the clock started in the command)."""
    import time

    import epplan.cli as cli

    given = _solve_limits(monkeypatch)
    monkeypatch.setattr(cli, "_started", time.monotonic() - 50.0)
    result = runner.invoke(app, ["place", "--topology", TWO_NODE, "--model", "tiny", "--set", "num_experts=16",
                                 "--routing", "zipf:1.2", "--time-limit", "60", "--dispatch", "flat", "--json",
                                 "--out", str(tmp_path / "m.json")])
    assert result.exit_code in (0, 4), result.output
    assert len(given) == 1 and 0 < given[0] < 10
    timing = json.loads(result.stdout)["time"]
    assert timing["limit_s"] == 60 and timing["seconds"] >= 50
    assert cli._started is None   # one command's: a second command in this process counts from its own start
