"""``solve(problem) -> Placement``: the planner. Pure: no files, no printing.

Per MoE layer (layers are independent; a layer whose traffic equals an earlier one's up to a
relabelling of the experts is solved once and relabelled):

1. lower bound: the analytic bounds of ``bounds.py`` (compute apportionment, cuts around GPUs,
   nodes and the nodes under each fabric switch, and the cuts under the GPU time a plan may
   spend), combined by the runtime's schedule (``epplan.schedule``), and while the gap is open
   the node-level LP of ``nodelp.py`` and the fabric link classes of ``farbound.py``;
2. incumbent: the constructions of ``heuristic.py`` (compute-first, and network-aware where the
   layer has a network) with their splits from the split LP (``splits.py``); then every
   baseline (contiguous, EPLB in both modes, random), scored with its own split exactly as
   ``evaluate`` scores it, and re-split by the LP when that could win or while the gap is open:
   the plan is never worse than a baseline;
3. if the gap to the bound is still above ``gap``: the MILP of ``ilp.py``, warm-started from the
   incumbent, raises the bound and may find a better placement (re-split by the LP), within the
   time left.

``time_limit`` (seconds, the whole solve) always ends with the best plan found and its bound:
every LP and the MILP run under the time left, and an LP cut short falls back to a feasible
split that needs no LP. ``placement.info`` records, per layer, status, objective, bound (and
which bound), gap, seconds and the incumbent that the layer's plan came from.

Distinct layers run in parallel processes (fork) when ``workers`` allows; each solver runs
single-threaded.

Under hierarchical dispatch (``problem.dispatch``) the steps above plan for the flat exchange
(most of the time limit), then ``plan_hierarchical`` moves co-activated experts onto common
nodes (``hierarchical.py``), from that plan and from EPLB's, and keeps per layer the best of
those and of every baseline under the hierarchical cost. The flat link bounds (cut, node LP,
MILP) do not hold there; the bound reported is ``hierarchical_bound`` (compute, and the cut
bound over top_k).
"""

from __future__ import annotations

import dataclasses
import hashlib
import multiprocessing as mp
import os
import time
from dataclasses import asdict, dataclass, replace
from typing import Callable, Literal, get_args

import numpy as np

from epplan.errors import param, PlacementError
from epplan.placement.bounds import lower_bound
from epplan.placement.heuristic import local_candidates, local_first
from epplan.placement.layer import LayerData, gpu_slots, layer_data
from epplan.placement.linkmodel import link_model
from epplan.placement.nodelp import node_model
from epplan.placement.problem import PlacementProblem
from epplan.placement.splits import nearest_split, optimal_splits, split_result
from epplan.placement.types import LayerPlacement, Placement, SolverInfo

Solver = Literal["highs", "cbc"]  # the MILP's; LPs always use HiGHS
SOLVERS: tuple[Solver, ...] = get_args(Solver)
_EXACT = 1e-6   # relative gap reported as optimal (the LP tie-break may cost 1e-7)
_TIE = 1e-6     # bottlenecks this close are equal; the idler network wins
_GRACE_S = 2.0  # seconds past the time limit a layer may take to return what it found
_FLAT_SHARE = 0.7  # of the time limit, for the flat plan that hierarchical dispatch starts from


@dataclass
class LayerInfo:
    """Solver facts of one layer (seconds are the layer's bottleneck, as ``evaluate`` computes it)."""

    layer: int
    status: str            # optimal | gap_met | time_limit | gap_open (the MILP ended or was too
                           # large to try, and the gap is still above the target)
    objective_s: float
    bound_s: float
    bound_source: str      # compute | cut | cut+compute | tradeoff | node-lp | link-class | milp
                           # (bounds.py, nodelp.py, farbound.py, ilp.py)
    gap: float
    link_s: float          # max link time of the plan (after the network tie-break)
    seconds: float
    start: str             # the incumbent the layer started from: local | contiguous | eplb | random
    same_as: int | None = None   # solved as a relabelling of this layer


ProgressFn = Callable[[LayerInfo, int, int], None]


def solve(problem: PlacementProblem, *, solver: Solver = "highs", time_limit: float | None = 120.0, gap: float = 0.01,
          progress: ProgressFn | None = None, workers: int | None = None) -> Placement:
    """Plan every MoE layer of ``problem`` (see the module docstring).

    solver:     "highs" or "cbc", for the MILP (LPs always use HiGHS).
    time_limit: wall seconds for the whole solve (None: no limit).
    gap:        stop a layer once (cost - bound) / cost <= gap.
    progress:   called as progress(info, done, total) after each layer.
    workers:    processes for distinct layers (default: CPU count, at most 4).
    """
    if solver not in SOLVERS:
        raise PlacementError(f"{param('solver', repr(solver))} unknown; use one of {', '.join(SOLVERS)}")
    if time_limit is not None and time_limit <= 0:
        raise PlacementError(f"{param('time_limit')} must be > 0 seconds, got {time_limit}")
    if not 0 <= gap < 1:
        raise PlacementError(f"gap must be in [0, 1), got {gap}")
    if problem.dispatch == "hierarchical":
        start = time.monotonic()
        flat = solve(dataclasses.replace(problem, dispatch="flat"), solver=solver, gap=gap, progress=progress,
                     workers=workers, time_limit=None if time_limit is None else _FLAT_SHARE * time_limit)
        deadline = None if time_limit is None else start + time_limit
        plan = plan_hierarchical(flat, problem, deadline=deadline, gap=gap)
        plan.info["time_limit_s"] = time_limit
        return plan
    start = time.monotonic()
    deadline = None if time_limit is None else start + time_limit
    slots = gpu_slots(problem)
    if slots.sum() < problem.num_experts:
        raise PlacementError(
            f"the GPUs' memory holds {int(slots.sum())} expert slots per layer in all, fewer than "
            f"the {problem.num_experts} experts: use GPUs with more memory or fewer layers/experts")
    if np.any(slots < 1):
        g = int(np.flatnonzero(slots < 1)[0])
        raise PlacementError(
            f"GPU {problem.topology.gpu_names[g]} cannot hold one expert of every MoE layer "
            f"({problem.topology.gpu_memory_gb[g]:g} GB)")
    link_model(problem.topology)          # built once here, inherited by worker processes
    counts = problem.traffic.counts
    num_layers = counts.shape[0]

    # Distinct layers up to expert relabelling: perm[l] orders layer l's experts canonically.
    perms, keys = zip(*(_canonical(counts[li]) for li in range(num_layers)))
    first: dict[str, int] = {}
    rep = [first.setdefault(k, li) for li, k in enumerate(keys)]
    todo = sorted(set(rep))
    baselines = _baselines(problem)

    results: dict[int, tuple[LayerPlacement, LayerInfo]] = {}
    total = num_layers
    done = 0

    def finish(li: int, layer: LayerPlacement, info: LayerInfo) -> None:
        nonlocal done
        results[li] = (layer, info)
        done += 1
        if progress is not None:
            progress(info, done, total)
        for lj in range(num_layers):
            if rep[lj] == li and lj != li:
                relabelled = _relabel(layer, perms[li], perms[lj])
                info_j = LayerInfo(**{**asdict(info), "layer": lj, "same_as": li, "seconds": 0.0})
                results[lj] = (relabelled, info_j)
                done += 1
                if progress is not None:
                    progress(info_j, done, total)

    scores = _baseline_scores(problem, baselines, slots)
    tasks = [(li, {name: pl.layers[li] for name, pl in baselines.items()}) for li in todo]
    num_workers = _workers(workers, len(todo))
    has_fork = "fork" in mp.get_all_start_methods()  # workers inherit the problem by forking
    if not has_fork or (num_workers <= 1 and deadline is None):
        for i, (li, base) in enumerate(tasks):
            budget = _budget(deadline, len(tasks) - i)
            layer, info = _solve_layer(problem, li, base, solver, budget, gap)
            finish(li, layer, info)
    else:
        # Worker processes, so that the time limit is a wall: layers still solving at the
        # deadline (plus a grace for the pool to hand back what it has) are stopped and get the
        # best baseline with the analytic bound.
        ctx = mp.get_context("fork")
        global _SHARED
        _SHARED = problem  # the forked workers read it; reset however the pool ends
        try:
            pool = ctx.Pool(max(1, num_workers))
            try:
                jobs = [(li, base, solver, deadline, len(tasks), max(1, num_workers), gap) for li, base in tasks]
                results_iter = pool.imap_unordered(_worker, jobs)
                for _ in jobs:
                    wait = None if deadline is None else max(0.0, deadline + _GRACE_S - time.monotonic())
                    try:
                        li, layer, info = results_iter.next(timeout=wait)
                    except mp.TimeoutError:
                        break
                    finish(li, layer, info)
            finally:
                pool.terminate()
                pool.join()
        finally:
            _SHARED = None
        for li, base in tasks:
            if li not in results:
                layer, info = _fallback_layer(problem, li, baselines, scores, time.monotonic() - start)
                finish(li, layer, info)

    # A relabelled layer is as good as its representative; unless that one is proven optimal,
    # check the layer's own baselines (not label-equivariant): as they are, and EPLB's two modes
    # re-split by the LP (the strongest baselines), keeping whichever is best.
    relabelled = [lj for lj in range(num_layers)
                  if results[lj][1].same_as is not None and results[lj][1].gap > _EXACT]
    # Past the deadline only the precomputed scores are compared (no LP, no new layer data).
    for i, lj in enumerate(relabelled):
        layer, info = results[lj]
        best = (info.objective_s, info.link_s, layer, info.start)
        data = None
        for name, pl in baselines.items():
            if name not in scores or np.isnan(scores[name][0][lj]):   # does not fit the GPUs
                continue
            own_s, own_link = scores[name][0][lj], scores[name][1][lj]
            if _better(own_s, own_link, best):
                best = (own_s, own_link, pl.layers[lj], name)
            if name.startswith("eplb") and (deadline is None or time.monotonic() < deadline):
                data = data or layer_data(problem, counts[lj], max_groups=_max_groups(problem))
                res = optimal_splits(data, pl.layers[lj].replicas,
                                     time_limit=_budget(deadline, 2 * (len(relabelled) - i)))
                if _better(res.bottleneck, res.link_time, best):
                    best = (res.bottleneck, res.link_time, res.layer, name)
        if best[2] is not layer:
            cost, link_s, new, start_name = best
            g = _gap(cost, min(info.bound_s, cost))
            status = "optimal" if g <= _EXACT else ("gap_met" if g <= gap else info.status)
            results[lj] = (new, LayerInfo(**{**asdict(info), "objective_s": float(cost), "link_s": float(link_s),
                                             "gap": float(g), "status": status, "start": start_name,
                                             "same_as": None}))

    layers = [results[li][0] for li in range(num_layers)]
    infos = [results[li][1] for li in range(num_layers)]
    placement = Placement(problem.num_gpus, problem.num_experts, layers, method="ilp")
    placement.info = _summary(infos, solver, time_limit, gap, time.monotonic() - start)
    return placement


def plan_hierarchical(flat: Placement, problem: PlacementProblem, *, deadline: float | None = None, gap: float = 0.01) -> Placement:
    """The plan for hierarchical dispatch from ``flat`` (``solve``'s plan for the flat exchange):
    per layer the best under ``evaluate`` of ``flat`` and EPLB after ``improve_hierarchical``, and
    of every baseline as it is; ``info`` re-states objective, bound (``hierarchical_bound``) and
    gap under the hierarchical cost, and keeps the flat plan's objective."""
    from epplan.cost import evaluate
    from epplan.placement.hierarchical import hierarchical_bound, improve_hierarchical

    t0 = time.monotonic()
    baselines = _baselines(problem)
    starts = {"ilp": flat}
    if "eplb" in baselines:
        starts["eplb"] = baselines["eplb"]
    candidates: dict[str, Placement] = {}
    for i, (name, plan) in enumerate(starts.items()):
        left = None if deadline is None else t0 + (deadline - t0) * (i + 1) / len(starts)
        candidates[f"{name}+coact"] = improve_hierarchical(plan, problem, deadline=left)
    candidates.update(baselines)
    costs = {name: evaluate(plan, problem) for name, plan in candidates.items()}
    times = {name: cost.moe_time_s for name, cost in costs.items()}
    names = list(candidates)
    best = [min(names, key=lambda n: (times[n][li], names.index(n))) for li in range(problem.num_layers)]
    layers = [candidates[name].layers[li] for li, name in enumerate(best)]
    out = Placement(problem.num_gpus, problem.num_experts, layers, method="ilp")
    flat_info = SolverInfo(**flat.info)
    infos = []
    for li, name in enumerate(best):
        data = layer_data(problem, problem.traffic.counts[li], max_groups=_max_groups(problem))
        cost = float(times[name][li])
        bound = min(hierarchical_bound(data, problem.config.top_k), cost)
        g = _gap(cost, bound)
        before = (flat_info.get("layers") or [{}] * problem.num_layers)[li]
        status = "optimal" if g <= _EXACT else ("gap_met" if g <= gap else "gap_open")
        infos.append(LayerInfo(layer=li, status=status, objective_s=cost, bound_s=bound,
                               bound_source="hierarchical", gap=g, link_s=float(costs[name].a2a_link_s[li]),
                               seconds=float(before.get("seconds", 0.0)), start=name))
    out.info = _summary(infos, flat_info.get("solver", "highs"), flat_info.get("time_limit_s"), gap,
                        float(flat_info.get("seconds", 0.0)) + time.monotonic() - t0)
    out.info["dispatch"] = "hierarchical"
    out.info["flat_plan"] = {k: flat_info.get(k) for k in ("status", "objective_s", "bound_s", "gap")}
    out.info["coact_swaps"] = {name: plan.info.get("hierarchical", {}).get("swaps")
                               for name, plan in candidates.items() if name.endswith("+coact")}
    return out


def resplit(placement: Placement, problem: PlacementProblem, *, time_limit: float | None = None) -> Placement:
    """``placement`` with every layer's token splits from the split LP (same replicas): set
    beside the placement with its own splits, it separates what a placement buys from what
    splits buy (``--compare`` reports ``eplb+lp`` so). Never worse than the splits it had."""
    deadline = None if time_limit is None else time.monotonic() + time_limit
    counts = problem.traffic.counts
    layers = []
    for li, layer in enumerate(placement.layers):
        data = layer_data(problem, counts[li], max_groups=_max_groups(problem))
        own = split_result(data, layer)
        res = optimal_splits(data, layer.replicas, time_limit=_budget(deadline, len(placement.layers) - li))
        layers.append(res.layer if res.bottleneck < own.bottleneck else layer)
    return Placement(placement.num_ranks, placement.num_experts, layers, method=f"{placement.method}+lp")


# ---------------------------------------------------------------------------------------------

_SHARED: PlacementProblem | None = None  # the problem solve() hands its forked workers


def _worker(job: tuple) -> tuple[int, LayerPlacement, LayerInfo]:
    li, base, solver, deadline, num_tasks, num_workers, gap = job
    budget = _budget(deadline, max(1, num_tasks // num_workers))
    layer, info = _solve_layer(_SHARED, li, base, solver, budget, gap)
    return li, layer, info


def _workers(workers: int | None, num_tasks: int) -> int:
    if workers is None:
        workers = min(4, os.cpu_count() or 1)
    return max(1, min(workers, num_tasks))


def _budget(deadline: float | None, tasks_left: int) -> float | None:
    """Seconds for the next layer: the time left shared by the layers left (at least 0.5 s, so
    a solve past its deadline still returns a scored plan per layer, quickly)."""
    if deadline is None:
        return None
    return max(0.5, (deadline - time.monotonic()) / max(1, tasks_left))


def _solve_layer(problem: PlacementProblem, li: int, baseline_layers: dict[str, LayerPlacement], solver: str,
                 budget: float | None, gap: float) -> tuple[LayerPlacement, LayerInfo]:
    t0 = time.monotonic()

    def left() -> float | None:
        return None if budget is None else max(0.05, budget - (time.monotonic() - t0))

    data = layer_data(problem, problem.traffic.counts[li], max_groups=_max_groups(problem))
    bound, source = lower_bound(data)
    # The construction, split by the LP.
    best = None
    for replicas in local_candidates(data):
        res = optimal_splits(data, replicas, time_limit=left())
        if _better(res.bottleneck, res.link_time, best):
            best = (res.bottleneck, res.link_time, res.layer, "local")
    # Baselines: scored with their own (even) splits, as evaluate scores them; re-split by the
    # LP when that could beat the incumbent, or to find a better start while the gap is open.
    for name, base in baseline_layers.items():
        replicas = base.replicas
        if not _fits(replicas, data):
            continue
        own = split_result(data, base)
        if _better(own.bottleneck, own.link_time, best):
            best = (own.bottleneck, own.link_time, own.layer, name)
        open_gap = _gap(best[0], bound) > gap
        out_of_time = budget is not None and time.monotonic() - t0 > budget
        if (open_gap or own.bottleneck < best[0] * (1 + _TIE)) and not out_of_time:
            res = optimal_splits(data, replicas, time_limit=left())
            if _better(res.bottleneck, res.link_time, best):
                best = (res.bottleneck, res.link_time, res.layer, name)
    cost, link_s, layer, start_name = best
    g = _gap(cost, bound)
    open_as = "time_limit"
    if g > gap and (budget is None or time.monotonic() - t0 < budget):
        # The node-level LP sees the fabric's cuts (leaf/spine/core) and couples them with
        # compute; cheap next to the MILP (0.1 s at 8 nodes x 32 experts).
        node = node_model(data, integer=False, time_limit=left())
        if node.bound > bound:
            bound, source = min(node.bound, cost), "node-lp"
            g = _gap(cost, bound)
    if g > gap and (budget is None or time.monotonic() - t0 < budget):
        # Fabric link classes (leaf-spine under ECMP): what no plan can serve near, searched
        # over the GPU time with the cuts; a share of the layer's time, the MILP may use the rest.
        from epplan.placement.farbound import far_tradeoff_bound

        far = far_tradeoff_bound(data, deadline=None if budget is None else t0 + 0.5 * budget)
        if far is not None and far > bound:
            bound, source = min(far, cost), "link-class"
            g = _gap(cost, bound)
    if g > gap:
        from epplan.placement.ilp import improve

        remaining = left()
        if remaining is None or remaining > 0.5:
            out = improve(data, layer, cost, bound, solver=solver, time_limit=remaining, gap=gap)
            if out.bound > bound:
                bound, source = out.bound, "milp"
            if out.layer is not None and out.cost < cost * (1 - 1e-12):
                cost, link_s, layer = out.cost, out.link_s, out.layer
            g = _gap(cost, bound)
            # The MILP ran to its end (or was too large to try): more time would not help.
            open_as = "time_limit" if out.status == "time_limit" else "gap_open"
    status = "optimal" if g <= _EXACT else ("gap_met" if g <= gap else open_as)
    info = LayerInfo(layer=li, status=status, objective_s=float(cost), bound_s=float(bound),
                     bound_source=source, gap=float(g), link_s=float(link_s),
                     seconds=time.monotonic() - t0, start=start_name)
    return layer, info


def _fallback_layer(problem: PlacementProblem, li: int, baselines: dict, scores: dict,
                    seconds: float) -> tuple[LayerPlacement, LayerInfo]:
    """A layer the time limit stopped: the best baseline as it is (its precomputed score), with
    the analytic bound."""
    data = layer_data(problem, problem.traffic.counts[li], max_groups=_max_groups(problem))
    bound, source = lower_bound(data)
    fitting = [name for name in scores if not np.isnan(scores[name][0][li])]
    if fitting:
        name = min(fitting, key=lambda n: scores[n][0][li])
        layer, cost, link_s = baselines[name].layers[li], scores[name][0][li], scores[name][1][li]
    else:   # no baseline fits the GPUs' memory: the construction, split without an LP
        res = split_result(data, nearest_split(data, local_first(data)))
        name, layer, cost, link_s = "local", res.layer, res.bottleneck, res.link_time
    info = LayerInfo(layer=li, status="time_limit", objective_s=float(cost),
                     bound_s=float(min(bound, cost)), bound_source=source,
                     gap=float(_gap(cost, min(bound, cost))),
                     link_s=float(link_s), seconds=seconds, start=name)
    return layer, info


def _baseline_scores(problem: PlacementProblem, baselines: dict, slots: np.ndarray) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (float64[L] layer time, float64[L] max link time) of each baseline with its own
    splits, as ``split_result`` scores a layer (NaN where it does not fit the GPUs' memory);
    through ``evaluate``'s exchange loads (low-rank, identical layers once)."""
    from epplan.cost.evaluate import exchange_loads

    topo = problem.topology
    flat = problem if problem.dispatch == "flat" else replace(problem, dispatch="flat")
    unit = 2.0 * problem.exchange_scale * float(problem.bytes_per_assignment) \
        / (np.asarray(topo.link_capacity, dtype=np.float64) * 1e9)
    gpu_unit = problem.expert_flops_per_assignment / np.asarray(problem.gpu_flops, dtype=np.float64)
    out = {}
    for name, pl in baselines.items():
        loads = exchange_loads(pl, flat, check=False)
        link = ((loads.fwd + loads.bwd) * unit).max(axis=1, initial=0.0)           # [L]
        gpu = (loads.served * gpu_unit).max(axis=1, initial=0.0)                  # [L]
        times = np.asarray(problem.schedule.moe_time(link, gpu), dtype=np.float64).reshape(-1)
        for li, layer in enumerate(pl.layers):
            held = np.bincount(np.concatenate(layer.replicas), minlength=problem.num_gpus)
            if np.any(held > slots):
                times[li] = link[li] = np.nan
        out[name] = (times, link)
    return out


def _better(cost: float, link: float, best) -> bool:
    """Lower bottleneck first; among equal ones (within the split LP's tie-break slack, as in
    compute-bound layers) the idler network."""
    if best is None or cost < best[0] * (1 - _TIE):
        return True
    return cost <= best[0] * (1 + _TIE) and link < best[1] * (1 - 1e-9)


def _gap(cost: float, bound: float) -> float:
    return 0.0 if cost <= 0 else max(0.0, (cost - bound) / cost)


def _max_groups(problem: PlacementProblem) -> int:
    # Keep the split LP near 1e5-1e6 columns: groups x replicas.
    return max(problem.topology.num_nodes, 300_000 // max(1, problem.num_gpus))


def _fits(replicas: list[np.ndarray], data: LayerData) -> bool:
    held = np.bincount(np.concatenate(replicas), minlength=data.num_gpus)
    return bool(np.all(held <= data.slots))


def _baselines(problem: PlacementProblem) -> dict[str, Placement]:
    """Every baseline on ``problem``: the starts the planner must match or beat."""
    from epplan.placement.baselines import BASELINES, baseline

    return {name: baseline(name, problem) for name in BASELINES}


def _canonical(counts: np.ndarray) -> tuple[np.ndarray, str]:
    """(perm, key): experts ordered by their count columns; equal keys = same layer up to labels."""
    cols = np.round(counts.T, 6)                                  # [E, G]
    perm = np.lexsort(cols.T[::-1])
    key = hashlib.sha256(np.ascontiguousarray(cols[perm]).tobytes()).hexdigest()
    return perm, key


def _relabel(layer: LayerPlacement, perm_from: np.ndarray, perm_to: np.ndarray) -> LayerPlacement:
    """Layer B's expert perm_to[i] takes what layer A's expert perm_from[i] got."""
    num = len(layer.replicas)
    replicas: list[np.ndarray] = [None] * num  # type: ignore[list-item]
    split: list[np.ndarray] = [None] * num  # type: ignore[list-item]
    for i in range(num):
        replicas[perm_to[i]] = layer.replicas[perm_from[i]].copy()
        split[perm_to[i]] = layer.split[perm_from[i]].copy()
    return LayerPlacement(replicas, split)


def _summary(infos: list[LayerInfo], solver: str, time_limit: float | None, gap: float,
             seconds: float) -> SolverInfo:
    worst = max(infos, key=lambda i: i.gap)
    statuses = {i.status for i in infos}
    status = ("optimal" if statuses == {"optimal"} else "time_limit" if "time_limit" in statuses
              else "gap_open" if "gap_open" in statuses else "gap_met")
    objective = float(sum(i.objective_s for i in infos))
    bound = float(sum(i.bound_s for i in infos))
    return {
        "solver": solver,
        "status": status,
        "objective_s": objective,
        "bound_s": bound,
        "gap": float(worst.gap),
        "total_gap": 0.0 if objective <= 0 else (objective - bound) / objective,
        "gap_target": gap,
        "time_limit_s": time_limit,
        "seconds": seconds,
        "layers": [asdict(i) for i in infos],
    }
