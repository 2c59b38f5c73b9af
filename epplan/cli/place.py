"""``epplan place``: plan the experts of every MoE layer and write the manifest."""

from __future__ import annotations

import dataclasses
import multiprocessing as mp
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from epplan.cli import app, command_started
from epplan.cli.common import (AchievableTflopsOption, BINDS_WORDS, CalibrationOption, check_range, console, count,
                               dispatch_notes, EfficiencyOption, err_console, ExpertsPerGpuOption, JsonOption, MemoryGbOption,
                               Method, MicroBatchesOption, ModelOption, narrow_table, NumChunksOption, Objective,
                               OldTflopsOption, OptimizerShardingOption, out_option, OverlapOption, plain,
                               ExpertTpOption, TpOption, parse_tp,
                               PlanDispatch, prefer, print_json, rates_for, RecomputeOption, renamed,
                               RoutingWindowsOption, SeedOption, SetOption, Solver, STATUS_WORDS, time_unit,
                               TopologyOption, user_errors, WORDS_HELP)
from epplan.cli.estimate import cap_memory, parse_overrides, print_run_settings
from epplan.cost.fit import check_memory_floor, Fit, RunSettings, choose_run_settings
from epplan.cost import Cost, evaluate
from epplan.errors import PlacementError
from epplan.manifest import build_manifest, write_manifest
from epplan.opened import open_manifest
from epplan.placement.baselines import baseline
from epplan.placement.problem import DISPATCH_MODES, PlacementProblem
from epplan.placement.robust import solve_robust, window_problems, window_times
from epplan.placement.solve import LayerInfo, plan_hierarchical, resplit, solve
from epplan.placement.types import Placement, SolverInfo
from epplan.topology import load_topology
from epplan.workload import load_model_config, make_traffic
from epplan.workload.hf_config import model_notes
from epplan.workload.windows import mean_traffic, window_specs

METHODS = tuple(m.value for m in Method)
# --compare also scores these baselines with the split LP's splits (same replicas).
RESPLIT = ("eplb", "eplb-hier", "contiguous")
EXIT_TIME_LIMIT = 4  # the time limit ended the solve before every layer met the gap target


@app.command("place", epilog=WORDS_HELP)
@user_errors
def place(
    topology: TopologyOption,
    model: ModelOption = None,
    set_: SetOption = None,
    routing: RoutingWindowsOption = None,
    objective: Annotated[Objective, typer.Option(
        callback=plain, help="Over several routing windows: mean (the mean step) or worst (every layer's "
        "worst window) of the per-window layer times.")] = Objective.mean,
    from_manifest: Annotated[Optional[Path], typer.Option(
        metavar="FILE", help="The plan in force: count the expert replicas that move from it (weights and "
        "AdamW state) and prefer plans that move less (--max-move-bytes, --amortize-steps).",
        show_default=False)] = None,
    max_move_bytes: Annotated[Optional[float], typer.Option(
        help="With --from-manifest: move at most this many bytes, all layers together (0: keep "
             "every replica where it is, re-split only).", show_default=False)] = None,
    amortize_steps: Annotated[Optional[int], typer.Option(
        help="With --from-manifest: charge the move's predicted seconds spread over this many "
             "steps (the steps the plan will run) in the objective.", show_default=False)] = None,
    experts_per_gpu: ExpertsPerGpuOption = None,
    placement: Annotated[Method, typer.Option(
        "--placement", callback=plain,
        help="ilp (the planner) or a baseline: eplb (DeepSeek EPLB as the serving frameworks call it), "
             "eplb-hier (EPLB, every expert its own group), contiguous (Megatron), random.")] = Method.ilp,
    method: Annotated[Optional[Method], typer.Option(hidden=True, callback=renamed("--method", "--placement"))] = None,
    solver: Annotated[Solver, typer.Option(callback=plain, help="MILP solver.")] = Solver.highs,
    time_limit: Annotated[float, typer.Option(
        help="Seconds for the whole solve; the best plan found is kept, with its bound and gap.")] = 120.0,
    gap: Annotated[float, typer.Option(help="Stop a layer once its proven gap is at most this.")] = 0.01,
    compare_all: Annotated[bool, typer.Option(
        "--compare-all", metavar="", help="Also score every method side by side: the ILP, the baselines, "
        "and eplb, eplb-hier and contiguous re-split by the split LP (+lp).")] = False,
    compare: Annotated[bool, typer.Option("--compare", hidden=True, callback=renamed("--compare", "--compare-all"))] = False,
    out: Annotated[Path, out_option("Where to write the manifest [default: manifest.json].")] = Path("manifest.json"),
    calibration: CalibrationOption = None,
    compute_efficiency: EfficiencyOption = None,
    achievable_tflops: AchievableTflopsOption = None,
    tflops: OldTflopsOption = None,
    micro_batches: MicroBatchesOption = None,
    recompute: RecomputeOption = None,
    optimizer_sharding: OptimizerShardingOption = None,
    tp: TpOption = None,
    expert_tp: ExpertTpOption = None,
    memory_gb: MemoryGbOption = None,
    overlap: OverlapOption = None,
    num_chunks: NumChunksOption = None,
    dispatch: Annotated[PlanDispatch, typer.Option(
        callback=plain,
        help="The exchange the plan is made for: flat (one row per token and expert), hierarchical "
             "(one row per token and destination node over the network, forwarded inside the node "
             "over NVLink; co-activated experts placed together), or auto: hierarchical where its "
             "predicted step time is over 1 % shorter, else flat (recorded in the manifest; 'run' follows it).")] = PlanDispatch.auto,
    seed: SeedOption = 0,
    workers: Annotated[Optional[int], typer.Option(
        help="Processes solving distinct layers in parallel (default: CPU count, at most 4).")] = None,
    json: JsonOption = False,
) -> None:
    """Plan where every MoE layer's experts go and write the manifest that 'epplan run' follows.

    Place every MoE layer's experts and replicas to minimise each layer's all-to-all and expert
    time as 'epplan run' will spend it (serial, or overlapped in chunks), and write the manifest
    that 'epplan run' follows, with the cheapest run settings (micro-batches, recompute,
    optimizer sharding; the TP degree with --tp auto) that fit every GPU's memory. Exits 3,
    writing nothing, if none fits."""
    started = command_started()  # --time-limit counts from here: the imports and reading the inputs are part of it
    method = method or placement  # --method: the old spelling
    compare = compare_all or compare
    tflops = prefer(achievable_tflops, tflops, "--achievable-tflops", "--tflops")
    model = model or "seed"
    experts_per_gpu = 1 if experts_per_gpu is None else experts_per_gpu
    if not 0 < time_limit <= 7 * 86400:  # also NaN and infinity
        raise PlacementError(f"--time-limit must be > 0 seconds and at most a week, got {time_limit:g}")
    check_range("--experts-per-gpu", experts_per_gpu, 1, 4096)
    check_range("--compute-efficiency", compute_efficiency, 0, 1, low_open=True)
    check_range("--achievable-tflops", tflops, 0, 1e6, low_open=True)
    check_range("--micro-batches", micro_batches, 1, 1 << 20)
    check_range("--seed", seed, 0, 2**32 - 1)
    check_range("--memory-gb", memory_gb, 0, 1e5, low_open=True)
    check_range("--workers", workers, 1, 256)
    if not 0 <= gap < 1:
        raise PlacementError(f"--gap must be in [0, 1), got {gap:g}")
    check_range("--max-move-bytes", max_move_bytes, 0, 1e18)
    check_range("--amortize-steps", amortize_steps, 1, 10**9)
    if from_manifest is None and (max_move_bytes is not None or amortize_steps is not None):
        raise PlacementError("--max-move-bytes and --amortize-steps need the plan in force: "
                             "add --from-manifest OLD.json")
    if from_manifest is not None and method != "ilp":
        raise PlacementError(f"--from-manifest needs --method ilp (the baseline {method!r} does not "
                             "look at the plan in force)")
    topo = cap_memory(load_topology(topology), memory_gb)
    config = load_model_config(model, parse_overrides(set_ or []))
    specs = window_specs(routing or ["uniform"])
    windows = [make_traffic(spec, config, topo.num_gpus, seed=seed) for spec in specs]
    traffic = mean_traffic(windows)
    several = len(windows) > 1
    robust = None
    if several or from_manifest is not None:
        if dispatch == "hierarchical":
            raise PlacementError("--dispatch hierarchical plans for one routing window without a plan in "
                                 "force; plan over several windows or --from-manifest with --dispatch flat")
        dispatch = "flat"  # the robust planner plans the flat exchange (auto would compare on the mean only)
        robust = RobustOptions(windows, objective, None if from_manifest is None else
                               _plan_in_force(from_manifest, topo, config),
                               max_move_bytes, 0.0 if amortize_steps is None else 1.0 / amortize_steps)
    rates, rate_notes = rates_for(topo, calibration, compute_efficiency, tflops)
    problem = PlacementProblem(topo, config, traffic, experts_per_gpu=experts_per_gpu,
                               overlap=overlap or "auto", num_chunks=num_chunks, **rates,
                               dispatch="flat" if dispatch == "auto" else dispatch)
    if not json:
        console.print(
            f"[bold]{escape(config.name)}[/] on [bold]{escape(topo.name)}[/] ({count(topo.num_gpus, 'GPU')}, {count(topo.num_nodes, 'node')}), "
            f"{count(config.num_moe_layers, 'MoE layer')} x {count(config.num_experts, 'expert')}, routing {escape(traffic.source)}, "
            f"at most {count(experts_per_gpu, 'expert')} per GPU",  # the schedule: after the run settings
            highlight=False)
        for note in model_notes(model) + traffic.notes + rate_notes + dispatch_notes(traffic, dispatch):
            console.print(f"  [dim]note: {escape(note)}[/]", highlight=False)

    plans: dict[str, tuple[Placement, float]] = {}
    names = [method] + ([m for m in METHODS if m != method] + [f"{b}+lp" for b in RESPLIT] if compare else [])
    t0 = time.monotonic()
    # The run settings are part of the layer's clock (block recompute exchanges six times a layer,
    # micro-batches set the chunk pipeline), so the plan is solved under the settings it runs
    # with: chosen on a balanced stand-in (EPLB's plan), then checked on the solved plan and,
    # where its own cheapest settings differ, solved once more under those.
    fixed = {"micro_batches": micro_batches, "recompute": recompute, "optimizer_sharding": optimizer_sharding,
             "tp": 1 if tp is None else parse_tp(tp), "expert_tp": bool(expert_tp)}
    deadline = started + time_limit
    phases: dict[str, float] = {}   # seconds per phase, as the output's "time" reports them
    lap = _Laps(started, phases)
    check_memory_floor(problem, **fixed)  # exits 3 within seconds where no plan can fit, before solving one
    lap("inputs")
    t_fit = time.monotonic()
    if None in fixed.values():  # the stand-in's choice within a fifth of the limit (Fit.unscored)
        settings = choose_run_settings(_baseline("eplb", problem, seed, time_limit), problem, **fixed,
                                       deadline=started + 0.2 * time_limit).settings
    else:  # all three given: nothing to choose
        settings = RunSettings(**fixed)
    # --time-limit is a wall for the whole command: the solve gets the time left less what the
    # work after it takes (the run settings of the solved plan, scored as the EPLB plan's were
    # just now, its cost and the manifest), measured here: twice that scoring and the manifest's
    # time. The solved plan's settings are chosen by the wall less the manifest's, the stand-in's first.
    manifest_s = manifest_seconds(problem)
    reserve = 2.0 * (time.monotonic() - t_fit) + manifest_s
    lap("stand_in_settings")
    tried: list[tuple[Placement, PlacementProblem, dict[str, float], Fit, float]] = []
    for attempt in range(2):
        problem = dataclasses.replace(problem, **dataclasses.asdict(settings))
        left = max(deadline - time.monotonic() - reserve, 0.05 * time_limit)
        t_solve = time.monotonic()
        chosen, problem, predicted, fit = _plan_for_dispatch(method, dispatch, problem, solver, left, gap,
                                                             workers, seed, quiet=json, robust=robust, fixed=fixed)
        lap("plan")
        fit = fit or choose_run_settings(chosen, problem, **fixed, deadline=deadline - manifest_s, first=settings)
        lap("run_settings")
        moved = fit.settings != settings
        if moved and attempt == 1:  # they moved again: keep those it was solved under if they fit
            same = choose_run_settings(chosen, problem, **dataclasses.asdict(settings))
            fit = same if same.fits else fit
        tried.append((chosen, problem, predicted, fit, time.monotonic() - t_solve))
        # The plan's own settings moved: solve once more under them, only while a quarter of
        # the limit is left. With less, the second solve's MILP starts from the baselines again
        # with a fraction of the first one's time and returns a plan no better than the first
        # (a re-solve given 1 ms wrote the baselines' plan); the first plan, under its own
        # settings, is kept then.
        if not moved or attempt == 1 or deadline - time.monotonic() < reserve + 0.25 * time_limit:
            break
        settings = fit.settings
    # The plan written is the best of those solved, each under its own cheapest settings that
    # fit (the settings it would be written with): a second solve can only add a candidate.
    chosen, problem, predicted, fit, solve_s = min(tried, key=lambda t: (not t[3].fits, t[3].cost.step_time_s))
    fit.check()
    lap("run_settings")
    plans[method] = (chosen, solve_s)
    for name in names[1:]:
        t0 = time.monotonic()
        if name == "ilp":  # the time the command's --time-limit leaves, as for the plan's own re-solve
            left = max(time_limit - (time.monotonic() - started), 1e-3)
            plan = _solve(problem, solver, left, gap, workers, quiet=json)
        else:  # +lp: the split LPs within the time left
            plan = _baseline(name, problem, seed, max(deadline - time.monotonic(), 1e-3))
        plans[name] = (plan, time.monotonic() - t0)
    if compare:
        lap("compare")
    if not json:
        console.print(_dispatch_line(problem.dispatch, dispatch, predicted), highlight=False)
    problem = dataclasses.replace(problem, **dataclasses.asdict(fit.settings))
    costs = {name: fit.cost if name == method else evaluate(plan, problem) for name, (plan, _) in plans.items()}
    doc = build_manifest(chosen, problem, cost=costs[method], routing_spec=None if several else specs[0],
                         routing_seed=seed, windows=list(zip(specs, windows)) if several else None,
                         objective=objective if several else None)
    digest = write_manifest(out, doc)
    lap("manifest")
    timing = {"limit_s": time_limit, "seconds": time.monotonic() - started, "run_settings_unscored": fit.unscored,
              "phases_s": {name: round(t, 3) for name, t in phases.items()}}

    if json:
        data: dict[str, Any] = {
            "manifest": str(out), "manifest_hash": digest, "method": method,
            "solver": _solver_summary(chosen), "notes": list(traffic.notes),
            "cost": costs[method].to_dict(),
            "run_settings": dataclasses.asdict(fit.settings),
            "dispatch": {"chosen": problem.dispatch, "asked": dispatch, "predicted_step_time_s": predicted},
            "time": timing,
        }
        if several:
            data["objective"] = objective
            data["windows"] = _window_rows(chosen, problem, specs, windows)
        if from_manifest is not None:
            data["migration"] = chosen.info.get("migration")
        if compare:
            data["compare"] = {name: _row(name, plans[name], costs[name]) for name in names}
        print_json(data, "place")
    else:
        _print_plan(chosen, costs[method], problem)
        if several:
            _print_windows(chosen, problem, specs, windows, objective)
        if from_manifest is not None:
            _print_migration(chosen.info["migration"], from_manifest)
        print_run_settings(fit, written=True)
        if compare:
            _print_compare(names, plans, costs, problem)
        console.print(f"manifest written: [bold]{escape(str(out))}[/] (sha256 {digest[:12]})", highlight=False)
        for note in _time_notes(timing):
            console.print(f"  [yellow]note: {escape(note)}[/]", highlight=False)
    if (chosen.info or {}).get("status") == "time_limit":  # the plan is written: the best one found
        raise typer.Exit(EXIT_TIME_LIMIT)


def manifest_seconds(problem: PlacementProblem) -> float:
    """Seconds kept after the run settings for the manifest (build, validate, write), by its
    size: 2 s at 16 layers x 1,024 expert replicas (measured 1.27 s on the 2-core machine at
    load 13-19), at least half a second."""
    entries = problem.num_layers * max(problem.num_experts, problem.num_gpus * problem.experts_per_gpu)
    return max(0.5, 2.0 * entries / (16 * 1024))


class _Laps:
    """``lap(name)`` adds the seconds since the last lap (or ``start``) to ``phases[name]``."""

    def __init__(self, start: float, phases: dict[str, float]) -> None:
        self.last, self.phases = start, phases

    def __call__(self, name: str) -> None:
        now = time.monotonic()
        self.phases[name] = self.phases.get(name, 0.0) + now - self.last
        self.last = now


def _time_notes(timing: dict[str, Any]) -> list[str]:
    """What --time-limit cut short or could not hold, said (never silently extended)."""
    notes = []
    if timing["run_settings_unscored"]:
        notes.append(f"{count(timing['run_settings_unscored'], 'run setting')} left unscored at --time-limit: "
                     "these are the best of those scored on this plan (the stand-in plan's choice first)")
    over = timing["seconds"] - timing["limit_s"]
    if over > 0:
        phases = ", ".join(f"{name.replace('_', ' ')} {t:.1f} s" for name, t in timing["phases_s"].items())
        notes.append(f"--time-limit {timing['limit_s']:g} s: the command took {timing['seconds']:.1f} s "
                     f"({phases}): what is not the plan's search took more than the limit left")
    return notes


# ------------------------------------------------------------------------------ solving

def _solve(problem: PlacementProblem, solver: str, time_limit: float, gap: float, workers: int | None,
           quiet: bool) -> Placement:
    total = problem.num_layers
    if quiet:
        return solve(problem, solver=solver, time_limit=time_limit, gap=gap, workers=workers)
    with Progress(TextColumn("[bold]solving[/]"), BarColumn(bar_width=12), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=err_console, transient=False) as progress:
        task = progress.add_task("", total=total)

        def report(info: LayerInfo, done: int, _total: int) -> None:
            how = f"= {info.same_as}" if info.same_as is not None else f"{info.seconds:.0f} s"
            progress.update(task, completed=done, description=(
                f"layer {info.layer}: gap {info.gap:.2%}, {STATUS_WORDS.get(info.status, info.status)} ({how})"))

        return solve(problem, solver=solver, time_limit=time_limit, gap=gap, progress=report, workers=workers)


@dataclasses.dataclass
class RobustOptions:
    """A plan over several routing windows and/or from a plan in force (``solve_robust``)."""

    windows: list            # Traffic per window
    objective: str
    old: Placement | None
    max_move_bytes: float | None
    move_weight: float


def _plan_for_dispatch(method: str, dispatch: str, problem: PlacementProblem, solver: str, time_limit: float,
                       gap: float, workers: int | None, seed: int, quiet: bool,
                       robust: RobustOptions | None = None, fixed: dict | None = None,
                       ) -> tuple[Placement, PlacementProblem, dict[str, float], Fit | None]:
    """(plan, the problem with the dispatch it is for, predicted step time per dispatch scored,
    the plan's run settings where they were chosen here, else None).

    auto plans for the flat exchange (70 % of the time limit for the ILP), then for hierarchical
    dispatch from that plan (``plan_hierarchical``), and keeps the one ``choose_dispatch``
    picks (hierarchical only where it is over 1 % faster). A baseline is scored under both.
    auto's hierarchical attempt (planned, scored and its run settings chosen under ``fixed``)
    runs in a forked process stopped at the time limit: scoring hierarchical rows takes 40 s a
    plan at 1,024 GPUs on a loaded machine; unscored, it is left out of ``predicted``. ``robust``:
    the ILP plans over its windows and from its plan in force (``solve_robust``), flat dispatch."""
    modes = DISPATCH_MODES if dispatch == "auto" else (dispatch,)
    start = time.monotonic()
    flat_limit = time_limit * 0.7 if dispatch == "auto" else time_limit
    plans: dict[str, tuple[Placement, PlacementProblem]] = {}
    predicted: dict[str, float] = {}
    fits: dict[str, Fit] = {}
    for mode in modes:
        mode_problem = dataclasses.replace(problem, dispatch=mode)
        if mode == "hierarchical" and len(modes) > 1:
            flat = plans["flat"][0] if method == "ilp" else None
            tried = _by_deadline(start + time_limit, _hierarchical_attempt, method, flat, mode_problem, seed,
                                 time_limit, start + 0.85 * time_limit, gap, fixed or {})
            if tried is not None:
                plan, predicted[mode], fits[mode] = tried
                plans[mode] = (plan, mode_problem)
            continue
        if method != "ilp":
            plan = _baseline(method, mode_problem, seed, time_limit)
        elif robust is not None:
            several = len(robust.windows) > 1
            plan = solve_robust(mode_problem, window_problems(mode_problem, robust.windows) if several
                                else [mode_problem], objective=robust.objective, old=robust.old,
                                max_move_bytes=robust.max_move_bytes, move_weight=robust.move_weight,
                                solver=solver, time_limit=flat_limit, gap=gap, workers=workers)
        else:
            plan = _solve(mode_problem, solver, flat_limit, gap, workers, quiet=quiet)
        plans[mode] = (plan, mode_problem)
        predicted[mode] = evaluate(plan, mode_problem).step_time_s
    mode = next(iter(predicted)) if len(predicted) == 1 else choose_dispatch(predicted)
    return plans[mode][0], plans[mode][1], predicted, fits.get(mode)


def _hierarchical_attempt(method: str, flat: Placement | None, problem: PlacementProblem, seed: int,
                          time_limit: float, deadline: float, gap: float, fixed: dict) -> tuple[Placement, float, Fit]:
    """auto's plan for hierarchical dispatch: (plan, predicted step time, its run settings)."""
    if flat is None:
        plan = _baseline(method, problem, seed, time_limit)
    else:
        plan = plan_hierarchical(flat, problem, deadline=deadline, gap=gap)
        plan.info["time_limit_s"] = time_limit
    standin = RunSettings(problem.micro_batches, problem.recompute, problem.optimizer_sharding, problem.tp,
                          problem.expert_tp)
    return plan, evaluate(plan, problem).step_time_s, choose_run_settings(plan, problem, **fixed, deadline=deadline,
                                                                          first=standin)


_CALL: tuple | None = None   # what _by_deadline's forked process runs


def _by_deadline(deadline: float, fn, *args):
    """``fn(*args)`` in a forked process, or None if it has not returned by ``deadline`` (the
    process is then stopped); in this process where fork is not available."""
    global _CALL
    if "fork" not in mp.get_all_start_methods():
        return fn(*args)
    _CALL = (fn, args)
    try:
        with mp.get_context("fork").Pool(1) as pool:   # leaving the block terminates it
            job = pool.apply_async(_call)
            try:
                return job.get(timeout=max(0.0, deadline - time.monotonic()))
            except mp.TimeoutError:
                return None
    finally:
        _CALL = None


def _call():
    fn, args = _CALL
    return fn(*args)


DISPATCH_MARGIN = 0.01


def choose_dispatch(predicted: dict[str, float]) -> str:
    """auto's choice: hierarchical only where its predicted step time is more than
    ``DISPATCH_MARGIN`` (1 %) below flat's. Closer than that is a tie, and a tie goes to flat:
    the simpler exchange, planned with the stronger certificate (the flat bounds do not hold for
    hierarchical dispatch), while hierarchical rows are predicted to within a few per cent of a
    per-token simulation once experts have replicas (docs/planner.md)."""
    if predicted["hierarchical"] < predicted["flat"] * (1.0 - DISPATCH_MARGIN):
        return "hierarchical"
    return "flat"


def _dispatch_line(chosen: str, asked: str, predicted: dict[str, float]) -> str:
    times = ", ".join(f"{mode} {_t(t)}" for mode, t in predicted.items())
    if asked == "auto" and "hierarchical" not in predicted:
        times += "; hierarchical not scored within --time-limit"
    how = (f"hierarchical only if its predicted step is over {DISPATCH_MARGIN:.0%} shorter"
           if asked == "auto" else "--dispatch")
    return f"dispatch: [bold]{chosen}[/] ({how}; predicted step time: {times})"


def _plan_in_force(path: Path, topo, config) -> Placement:
    """The placement of the manifest at ``path``, checked to be of this cluster and model."""
    old = open_manifest(path, topo, what="--topology").manifest
    if old.config != config:
        raise PlacementError(f"--from-manifest {path}: planned for model {old.config.name!r} with other "
                             f"dimensions than {config.name!r} here; give the same --model and --set")
    return old.placement


def _baseline(name: str, problem: PlacementProblem, seed: int, time_limit: float) -> Placement:
    base = name.removesuffix("+lp")
    plan = baseline(base, problem, seed)
    cut_short = {}
    if name.endswith("+lp"):
        plan = resplit(plan, problem, time_limit=time_limit)
        cut_short = {"resplit_cut_short": plan.info["resplit_cut_short"]}
    plan.info = SolverInfo(solver=None, status="baseline", seconds=0.0, **cut_short)
    return plan


# ------------------------------------------------------------------------------ output

def _t(seconds: float) -> str:
    """A duration with a unit that suits it: 1.234 s, 12.34 ms, 5.67 us."""
    seconds = float(seconds)
    if seconds >= 1:
        return f"{seconds:.3f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.3f} ms"
    return f"{seconds * 1e6:.3f} us"


def _solver_summary(plan: Placement) -> dict[str, Any]:
    info = plan.info or {}
    keys = ("solver", "status", "objective_s", "bound_s", "gap", "total_gap", "gap_target", "time_limit_s", "seconds")
    return {k: info.get(k) for k in keys if k in info}


def _imbalance(cost: Cost) -> float:
    """Busiest GPU's expert assignments over the mean, worst layer."""
    served = cost.expert_assignments
    mean = served.mean(axis=1)
    ratio = np.where(mean > 0, served.max(axis=1) / np.where(mean > 0, mean, 1), 1.0)
    return float(ratio.max())


def _row(name: str, plan_time: tuple[Placement, float], cost: Cost) -> dict[str, Any]:
    plan, seconds = plan_time
    links = Counter(int(k) for k in cost.a2a_link)
    worst = int(np.argmax(cost.a2a_link_s))
    info = plan.info or {}
    return {
        "method": name,
        "objective_s": cost.objective_s,
        "link_total_s": float(cost.a2a_link_s.sum()),
        "link_per_layer_s": [float(v) for v in cost.a2a_link_s],
        "moe_time_per_layer_s": [float(v) for v in cost.moe_time_s],
        "bottleneck_link": cost.topology.link_name(int(cost.a2a_link[worst])),
        "most_frequent_link": cost.topology.link_name(links.most_common(1)[0][0]),
        "gpu_imbalance": _imbalance(cost),
        "solve_s": seconds,
        "gap": info.get("gap"),
        "bound_s": info.get("bound_s"),
        **({"resplit_cut_short": info["resplit_cut_short"]} if "resplit_cut_short" in info else {}),
    }


def _window_rows(plan: Placement, problem: PlacementProblem, specs: list[str], windows: list) -> list[dict]:
    """Per window: its spec and source, and the plan's MoE time on it (``Cost.objective_s``)."""
    times = window_times(plan, window_problems(problem, windows)).sum(axis=1)
    return [{"spec": spec, "source": w.source, "objective_s": float(t)} for spec, w, t in zip(specs, windows, times)]


def _print_windows(plan: Placement, problem: PlacementProblem, specs: list[str], windows: list,
                   objective: str) -> None:
    rows = _window_rows(plan, problem, specs, windows)
    t = Table(title=f"the plan on each routing window, with the run settings below (objective: {objective})", title_justify="left")
    for col in ("window", "routing", "a2a+experts"):
        t.add_column(col, justify="right" if col == "a2a+experts" else "left", overflow="fold")
    for i, row in enumerate(rows):
        t.add_row(str(i), escape(row["source"]), _t(row["objective_s"]))
    values = [r["objective_s"] for r in rows]
    t.add_row("mean", "", _t(sum(values) / len(values)))
    t.add_row("worst", "", _t(max(values)))
    console.print(t)


def _print_migration(info: dict, path: Path) -> None:
    limit = info.get("max_move_bytes")
    console.print(
        f"from {escape(str(path))}: {info['moves']} expert replica(s) move, {info['bytes_moved'] / 1e9:.3f} GB "
        f"(weights and AdamW state), predicted {_t(info['seconds'])} on this cluster"
        + ("" if limit is None else f" (at most {limit / 1e9:.3f} GB allowed)"), highlight=False)


def _print_plan(plan: Placement, cost: Cost, problem: PlacementProblem) -> None:
    info = plan.info or {}
    topo = problem.topology
    # A plan over several windows: the table shows it on their mean, the bound is the objective's.
    robust = info.get("num_windows", 1) > 1
    label = f"{info.get('objective')} of {info.get('num_windows')} windows" if robust else ""
    layers = info.get("layers")
    expert_max = cost.expert_compute_s.max(axis=1)
    unit, k = time_unit([*cost.moe_time_s, *cost.a2a_link_s, *expert_max])
    t = narrow_table(f"placement: {escape(plan.method)}" + (f" (on the windows' mean routing; bound: {label})"
                                                            if robust else ""))
    t.add_column("layer", justify="right", no_wrap=True)
    t.add_column(f"MoE {unit}", justify="right", no_wrap=True)
    t.add_column("set by", no_wrap=True)
    if robust:  # the objective's column instead of the mean routing's link and GEMM (80 columns)
        t.add_column(f"{info['objective']} {unit}", justify="right", no_wrap=True)
    else:
        t.add_column(f"link {unit}", justify="right", no_wrap=True)
        t.add_column(f"GEMM {unit}", justify="right", no_wrap=True)
    if layers:
        t.add_column(f"bound {unit}", justify="right", no_wrap=True)
        t.add_column("gap", justify="right", no_wrap=True)
        t.add_column("status")
    for li in range(cost.num_layers):
        row = [str(li), f"{cost.moe_time_s[li] * k:.4g}", BINDS_WORDS[cost.binds[li]]]
        row += ([f"{layers[li]['objective_s'] * k:.4g}"] if robust else
                [f"{cost.a2a_link_s[li] * k:.4g}", f"{expert_max[li] * k:.4g}"])
        if layers:
            L = layers[li]
            row += [f"{L['bound_s'] * k:.4g}", f"{L['gap']:.2%}", STATUS_WORDS.get(L["status"], L["status"])]
        t.add_row(*row)
    console.print(t)
    busiest = [topo.link_name(int(cost.a2a_link[li])) for li in range(cost.num_layers)]
    same = [(li, f"solved as layer {L['same_as']} (the same demand, experts relabelled)")
            for li, L in enumerate(layers or []) if L.get("same_as") is not None]
    relabelled = f"; {_grouped([li for li, _ in same], [w for _, w in same], 'layer', collapse=False)}" if same else ""
    console.print(f"  busiest link: {escape(_grouped(list(range(cost.num_layers)), busiest, 'layer'))}{relabelled}; "
                  "MoE: a2a and expert GEMMs as scheduled, link: the busiest link's time, GEMM: the busiest GPU's",
                  highlight=False, style="dim")
    line = (f"a2a and expert GEMMs, {cost.schedule.describe()}: [bold]{_t(cost.objective_s)}[/] per step "
            "summed over the MoE layers")
    if robust:
        line += (f" on the windows' mean routing; objective ({label}, per layer, summed) "
                 f"[bold]{_t(info['objective_s'])}[/]")
    if layers:
        line += (f", lower bound {_t(info['bound_s'])} (gap {info.get('total_gap', 0):.2%}, worst "
                 f"layer {info['gap']:.2%}), {info.get('solver')} {STATUS_WORDS.get(info['status'], info['status'])}, solved in {info['seconds']:.1f} s")
        if info["status"] == "time_limit":
            line += (f"; [yellow]time limit {info.get('time_limit_s')} s reached: this is the best plan found, "
                     f"its gap above the target {info.get('gap_target', 0):.0%}[/]")
        elif info["status"] == "gap_open" and robust:
            line += (f"; [yellow]the gap stays above the target {info.get('gap_target', 0):.0%}: the bound "
                     "(each window's bound, combined as the objective, or the mean routing's) is valid, "
                     "the plan may be better than it shows[/]")
        elif info["status"] == "gap_open":
            line += (f"; [yellow]the gap stays above the target {info.get('gap_target', 0):.0%}: the MILP "
                     "ended or was too large for these layers; the bound is valid, the plan may be better "
                     "than it shows[/]")
    console.print(line, highlight=False)


def _print_compare(names: list[str], plans: dict, costs: dict[str, Cost], problem: PlacementProblem) -> None:
    rows = {name: _row(name, plans[name], costs[name]) for name in names}
    first = names[0]
    unit, k = time_unit(r["objective_s"] for r in rows.values())
    t = narrow_table("methods side by side (scored by the same cost function)")
    t.add_column("method", no_wrap=True)
    for col in (f"MoE {unit}", f"{first} saves", f"link {unit}", "GPU load", "solve s", "gap"):
        t.add_column(col, justify="right", no_wrap=True)
    ref = rows[first]["objective_s"]
    short = [n for n in names if rows[n].get("resplit_cut_short")]
    for name in names:
        r = rows[name]
        total = r["objective_s"]
        saves = "" if name == first or total <= 0 else f"{(total - ref) / total:.1%}"
        t.add_row(name + ("*" if name in short else ""), f"{total * k:.4g}", saves, f"{r['link_total_s'] * k:.4g}",
                  f"{r['gpu_imbalance']:.2f}x", f"{r['solve_s']:.1f}", "-" if r["gap"] is None else f"{r['gap']:.2%}")
    console.print(t)
    worst = _grouped(names, [r["bottleneck_link"] for r in rows.values()])
    console.print(f"  busiest link in the worst layer: {escape(worst)}; MoE: a2a and expert GEMMs per step; "
                  "link: the busiest link's time, summed over layers; GPU load: the busiest GPU's expert "
                  "work over the mean (worst layer)", highlight=False, style="dim")
    if short:
        counts = ", ".join(f"{n} {rows[n]['resplit_cut_short']}" for n in short)
        console.print(f"  * the time limit cut the split LP short on some of the {problem.num_layers} layers "
                      f"({counts}), which keep a split found without it: these rows understate the baselines; "
                      "a longer --time-limit scores them at full strength", highlight=False)
    baselines = [n for n in names if n != "ilp" and n != "random" and not n.startswith("random")]
    if "ilp" in rows and baselines:
        strongest = min(baselines, key=lambda n: rows[n]["objective_s"])
        best, ilp = rows[strongest]["objective_s"], rows["ilp"]["objective_s"]
        saving = 0.0 if best <= 0 else (best - ilp) / best
        verdict = "a tie" if abs(saving) < 1e-3 else f"the ILP saves {saving:.1%}"
        if short and saving > 0:
            verdict += f" (against {', '.join(short)} not at full strength)"
        console.print(f"strongest baseline: [bold]{strongest}[/] ({_t(best)}); {verdict}", highlight=False)
    _print_per_layer(names, rows, problem.num_layers)


def _grouped(items: list, values: list[str], noun: str = "", collapse: bool = True) -> str:
    """'layers 0-2 a -> b; layer 3 c -> d' (``noun``: items are integers, runs shown as ranges) or
    'ilp, eplb: a -> b': the items that share a value, in order of first appearance; just the
    value when every item has it (``collapse``)."""
    groups: dict[str, list] = {}
    for item, value in zip(items, values):
        groups.setdefault(value, []).append(item)
    if len(groups) == 1 and noun and collapse:
        return next(iter(groups))
    parts = []
    for value, members in groups.items():
        if noun:
            spans, start = [], members[0]
            for a, b in zip(members, members[1:] + [None]):
                if b != a + 1:
                    spans.append(f"{start}" if start == a else f"{start}-{a}")
                    start = b
            parts.append(f"{noun}{'s' if len(members) > 1 else ''} {','.join(spans)} {value}")
        else:
            parts.append(f"{', '.join(members)}: {value}")
    return "; ".join(parts)


def _print_per_layer(names: list[str], rows: dict[str, dict], num_layers: int) -> None:
    """The busiest link's time per layer, a row per method; layers in as many tables as the
    console's width needs."""
    unit, k = time_unit(v for r in rows.values() for v in r["link_per_layer_s"])
    cells = {n: [f"{v * k:.4g}" for v in rows[n]["link_per_layer_s"]] for n in names}
    totals = {n: f"{rows[n]['link_total_s'] * k:.4g}" for n in names}
    # A column takes its widest cell and 3 more (a space either side and the gap between columns).
    width = max(len(n) for n in names + ["method"]) + 3
    col = max(len(c) for c in [*(c for cs in cells.values() for c in cs), *totals.values(), "total"]) + 3
    per_table = max(1, (console.width - width - col) // col)
    for start in range(0, num_layers, per_table):
        stop = min(num_layers, start + per_table)
        part = f" (layers {start}-{stop - 1})" if per_table < num_layers else ""
        per = narrow_table(f"busiest link's time per layer, {unit}{part}")
        per.add_column("method", no_wrap=True)
        for li in range(start, stop):
            per.add_column(str(li), justify="right", no_wrap=True)
        if stop == num_layers:
            per.add_column("total", justify="right", no_wrap=True)
        for n in names:
            total = [totals[n]] if stop == num_layers else []
            per.add_row(n, *cells[n][start:stop], *total)
        console.print(per)
