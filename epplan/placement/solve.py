"""``solve(problem) -> Placement``: the planner. Pure: no files, no printing.

Per MoE layer (layers are independent; a layer whose traffic equals an earlier one's up to a
relabelling of the experts is solved once and relabelled, and its own baselines, which need not
be relabellings of the solved layer's, are re-split by the LP as tasks beside the distinct
layers, inside the limit, with a share taken by the distinct layer's own worker where the others
would not finish them, so that no layer is worse than a baseline re-split the limit allowed; in
the end every layer of such a class takes the best plan any of them has, relabelled):

1. lower bound: the analytic bounds of ``bounds.py`` (compute apportionment, cuts around GPUs,
   nodes and the nodes under each fabric switch, and the cuts and the receiving NICs of each
   expert's holders, with the holder's own sending and the nodes' distinct experts, under the
   GPU time a plan may spend; on ECMP rail fabrics the NICs and the spine together,
   ``railbound.py``), combined by the runtime's schedule (``epplan.schedule``), and while the
   gap is open the node-level LP of ``nodelp.py`` (up to MAX_NODE_LP_FLOWS node flows),
   the fabric link classes of ``farbound.py`` and the replica-count MILP
   (``nodelp.count_model``, half the time left, up to MAX_COUNT_INTEGERS);
2. incumbent, the best plan (lowest layer time, as ``evaluate`` computes it) of: every baseline
   (contiguous, EPLB in both modes, random) as it is, and re-split by the split LP
   (``splits.py``) unless ``split_bound`` shows that no split of it beats the plan in hand; the
   constructions of ``heuristic.py`` (compute-first, and network-aware where the layer has a
   network) with their splits from the split LP. The baselines' splits come first (for half
   the layer's time at most), so that a layer stopped early is at least the best of them;
3. if the gap to the bound is still above ``gap``: the MILP of ``ilp.py``, warm-started from the
   incumbent, raises the bound and may find a better placement (re-split by the LP), within the
   time left. The bound is the layer's own: a baseline winning does not move it.

Under ``--expert-tp`` every GPU's time is its TP group's rows / t, as ``evaluate`` charges it
(``LayerData.pool``): the split LP and the MILP optimise that clock; the trade-off bound, the
node LP and the link classes are not taken (they bound a GPU by its own rows).

``time_limit`` (seconds, the whole solve) always ends with the best plan found and its bound:
every LP and the MILP run under the time left, and an LP cut short falls back to a feasible
split that needs no LP. ``placement.info`` records, per layer, status, objective, bound (and
which bound), gap, seconds, the plan's origin (``start``: local, a baseline, or a baseline
re-split, ``eplb+lp``) and the baselines whose split the time limit left unchecked.

Distinct layers run in parallel processes (fork) when ``workers`` allows; each solver runs
single-threaded. A worker stops its layer at the deadline and returns what it has; it also
posts every better plan to the parent as it finds it, so that one still running at the time
limit (``_GRACE_S`` after the workers' deadline: an LP past its limit, a construction that does
not return) is stopped without losing its plan.

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
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Callable, Literal, get_args

import numpy as np

from epplan.errors import param, PlacementError
from epplan.placement.bounds import compute_bound, lower_bound
from epplan.placement.heuristic import local_candidates, local_first, node_swapped
from epplan.placement.layer import LayerData, gpu_slots, layer_data, replica_class_groups
from epplan.placement.linkmodel import link_model
from epplan.placement.nodelp import MAX_COUNT_INTEGERS, MAX_NODE_LP_FLOWS, count_model, node_model
from epplan.placement.problem import PlacementProblem
from epplan.placement.search import LP_MARGIN
from epplan.placement.splits import SETTLED, nearest_split, optimal_splits, split_bound, split_result
from epplan.placement.types import LayerPlacement, Placement, SolverInfo
from epplan.workload.memory import expert_tp_rows

Solver = Literal["highs", "cbc"]  # the MILP's; LPs always use HiGHS
SOLVERS: tuple[Solver, ...] = get_args(Solver)
_EXACT = 1e-6   # relative gap reported as optimal (the LP tie-break may cost 1e-7)
_TIE = 1e-6     # bottlenecks this close are equal; the idler network wins
_GRACE_S = 2.0  # seconds before the time limit at which layers stop, to return what they found
_CHECK_MARGIN_S = 0.5   # seconds before the wall at which the relabelled layers' checks stop
_FLAT_SHARE = 0.7  # of the time limit, for the flat plan that hierarchical dispatch starts from
# GPU times (x the compute bound) whose replica capacity the best construction's node exchange
# is tried at again, and the share of the layer's time those exchanges' split LPs may take
_EXCHANGE_TIMES = (1.0, 1.1, 1.2, 1.3)
_EXCHANGE_SHARE = 0.1
# the node groups' split LP's time (the last LP's; where the constructions come first, the
# longest construction's), scaled by the groups, that the time left must hold for the plan in
# hand's re-split with the replica-class groups
_FINE_LP_TIMES = 1.0
_FINE_LINK_WEIGHT = 0.5   # d(layer time) / d(busiest link's time) from which that re-split runs


@dataclass
class LayerInfo:
    """Solver facts of one layer (seconds are the layer's bottleneck, as ``evaluate`` computes it)."""

    layer: int
    status: str            # optimal | gap_met | time_limit | gap_open (the MILP ended or was too
                           # large to try, and the gap is still above the target)
    objective_s: float
    bound_s: float
    bound_source: str      # compute | cut | cut+compute | tradeoff | node-lp | link-class | node-count | milp
                           # (bounds.py, nodelp.py, farbound.py, ilp.py)
    gap: float
    link_s: float          # max link time of the plan (after the network tie-break)
    seconds: float
    start: str             # where the layer's plan came from: local (the construction, maybe improved
                           # by the MILP or the replica moves), a baseline as it is (eplb, ...) or
                           # re-split (eplb+lp, ...), and +moves where the replica moves improved it
    same_as: int | None = None   # solved as a relabelling of this layer
    unchecked: list[str] = dataclasses.field(default_factory=list)   # baselines whose re-split by the
                           # split LP the time limit left neither solved nor ruled out by its bound


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
    # The wall: the pool is stopped here. Workers stop their search a grace before it (to hand
    # back their plans); past it no LP is solved.
    wall = None if time_limit is None else start + time_limit
    deadline = None if time_limit is None else start + max(0.5 * time_limit, time_limit - _GRACE_S)
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

    tasks = [(li, {name: pl.layers[li] for name, pl in baselines.items()}) for li in todo]
    # The relabelled layers' own baselines (not all label-equivariant: EPLB's plans of zipf
    # layers are not relabellings of each other) are re-split by the LP as tasks of their own,
    # inside the limit, beside the distinct layers (``_checks``); the replica search leaves
    # time for those LPs, and a distinct layer's worker takes a share of them before its bounds
    # where the other workers would not finish them (``_share``).
    checks, covered = _checks(baselines, rep, perms)
    after: dict[int, list] = {li: [] for li in todo}
    shares: dict[int, list] = {li: [] for li in todo}   # (job index, key, layer, replicas) per representative
    for i, (key, (lj, replicas)) in enumerate(checks.items()):
        after[rep[lj]].append((lj, replicas))
        shares[rep[lj]].append((i, key, lj, replicas))
    checked: dict[str, tuple] = {}    # check key -> _check's result
    num_workers = _workers(workers, len(tasks) + len(checks))
    has_fork = "fork" in mp.get_all_start_methods()  # workers inherit the problem by forking
    if not has_fork or (num_workers <= 1 and deadline is None):
        scores = _baseline_scores(problem, baselines, slots)
        for i, (li, base) in enumerate(tasks):
            budget = _budget(deadline, len(tasks) - i)
            layer, info = _solve_layer(problem, li, base, solver, budget, gap, deadline=deadline, after=after[li])
            finish(li, layer, info)
        for key, (lj, replicas) in checks.items():
            checked[key] = _check(problem, lj, replicas, results[rep[lj]][1].objective_s, deadline)
    else:
        # Worker processes, so that the time limit is a wall. Every worker stops its layer's
        # search at the deadline and returns its plan; on the way it posts each better plan it
        # finds (_post), so that a layer still running at the deadline plus the grace (an LP or
        # MILP that overran its limit, a construction that does not return) is stopped and keeps
        # the best plan it had posted (the best baseline as it is when it posted none). The
        # relabelled layers' checks follow the distinct layers in the pool's order; a check
        # reads its representative's best plan so far (``_FLOOR``, shared memory) to skip an LP
        # its split bound rules out.
        ctx = mp.get_context("fork")
        global _SHARED, _QUEUE, _AFTER, _FLOOR, _SHARES, _CLAIMED
        posted: dict[int, tuple] = {}
        queue = ctx.SimpleQueue()
        # the forked workers read them (not pickled: ``after`` holds every relabelled layer's
        # baselines); reset however the pool ends
        _SHARED, _QUEUE, _AFTER, _SHARES = problem, queue, after, shares
        _FLOOR = ctx.Array("d", [np.inf] * num_layers, lock=False)
        _CLAIMED = ctx.Array("b", max(1, len(checks)))   # a check's LP runs in one process only
        try:
            pool = ctx.Pool(max(1, num_workers))
            # The baselines' scores (for the relabelled layers and the stopped ones) are computed
            # while the workers solve, in a thread started after the workers are forked.
            scoring = ThreadPoolExecutor(1)
            scores_future = scoring.submit(_baseline_scores, problem, baselines, slots)
            try:
                jobs = [("layer", li, base, solver, deadline, len(tasks) - i, max(1, num_workers), gap)
                        for i, (li, base) in enumerate(tasks)]
                # checks run up to the wall, less a margin to hand their results back
                until = None if wall is None else max(deadline, wall - _CHECK_MARGIN_S)
                jobs += [("check", key, lj, rep[lj], replicas, until, i)
                         for i, (key, (lj, replicas)) in enumerate(checks.items())]
                results_iter = pool.imap_unordered(_worker, jobs)
                waiting = len(jobs)
                while waiting:
                    wait = None if wall is None else wall - time.monotonic()
                    if wait is not None and wait <= 0:
                        break
                    try:
                        out = results_iter.next(timeout=_POLL_S if wait is None else min(_POLL_S, wait))
                    except mp.TimeoutError:
                        _drain(queue, posted, checked)
                        continue
                    waiting -= 1
                    if out[0] == "check":
                        if out[2] is not None and out[2] != "claimed":   # claimed: a layer's worker has it
                            checked[out[1]] = out[2]
                    elif out[2] is not None:
                        finish(out[1], out[2], out[3])
                _drain(queue, posted, checked)   # a worker may be blocked writing to the queue
            finally:
                pool.terminate()
                pool.join()
                scores = scores_future.result()
                scoring.shutdown()
        finally:
            _SHARED = _QUEUE = _FLOOR = _CLAIMED = None
            _AFTER, _SHARES = {}, {}
            queue.close()
        for li, base in tasks:
            if li not in results:
                layer, info = _stopped_layer(problem, li, baselines, scores, posted.get(li),
                                             time.monotonic() - start)
                finish(li, layer, info)

    # A relabelled layer is as good as its representative; unless that one is proven optimal,
    # its own baselines are checked too: as they are (the scores above) and re-split by the LP
    # (the checks' results; a placement that is a relabelling of one the representative split
    # follows the representative's). No LP runs here.
    relabelled = [lj for lj in range(num_layers)
                  if results[lj][1].same_as is not None and results[lj][1].gap > _EXACT]
    for lj in relabelled:
        layer, info = results[lj]
        li = info.same_as
        rep_open = set(results[li][1].unchecked)
        inc = _Incumbent(lj, None)
        inc.offer(info.objective_s, info.link_s, layer, info.start)
        for name, pl in baselines.items():
            if name not in scores or np.isnan(scores[name][0][lj]):   # does not fit the GPUs
                continue
            inc.offer(scores[name][0][lj], scores[name][1][lj], pl.layers[lj], name)
            how = covered.get((lj, name))
            if how is None:
                continue                     # one split only: the LP cannot change it
            kind, key = how
            if kind == "rep":                # the representative's own re-split of it, relabelled
                if key in rep_open:
                    inc.unchecked.append(name)
                continue
            got = checked.get(key)
            if got is None:                  # the limit came first
                inc.unchecked.append(name)
                continue
            split, cost, link_s, status = got
            if split is not None:            # None: its split bound is above the plan
                lk = checks[key][0]
                inc.offer(cost, link_s, _relabel(split, perms[lk], perms[lj]), f"{name}+lp")
                if status not in SETTLED:
                    inc.unchecked.append(name)
        unchecked = sorted(set(inc.unchecked))
        if inc.layer is not layer or unchecked != info.unchecked:
            g = _gap(inc.cost, min(info.bound_s, inc.cost))
            status = "optimal" if g <= _EXACT else ("gap_met" if g <= gap else info.status)
            moved = inc.layer is not layer
            results[lj] = (inc.layer, LayerInfo(**{**asdict(info), "objective_s": float(inc.cost),
                                                   "link_s": float(inc.link), "gap": float(g), "status": status,
                                                   "start": inc.start, "unchecked": unchecked,
                                                   "same_as": None if moved else info.same_as}))

    _share_class_best(results, rep, perms, gap)
    layers = [results[li][0] for li in range(num_layers)]
    infos = [results[li][1] for li in range(num_layers)]
    placement = Placement(problem.num_gpus, problem.num_experts, layers, method="ilp")
    placement.info = _summary(infos, solver, time_limit, gap, time.monotonic() - start)
    return placement


def plan_hierarchical(flat: Placement, problem: PlacementProblem, *, deadline: float | None = None, gap: float = 0.01) -> Placement:
    """The plan for hierarchical dispatch from ``flat`` (``solve``'s plan for the flat exchange):
    per layer the best under ``evaluate`` of ``flat`` and EPLB after ``improve_hierarchical``, and
    of every baseline as it is (those scored by ``deadline``: ``info["unscored"]`` names the
    others); ``info`` re-states objective, bound (``hierarchical_bound``) and gap under the
    hierarchical cost, and keeps the flat plan's objective."""
    from epplan.cost import evaluate
    from epplan.placement.hierarchical import hierarchical_bound, improve_hierarchical

    t0 = time.monotonic()
    baselines = _baselines(problem)
    starts = {"ilp": flat}
    if "eplb" in baselines:
        starts["eplb"] = baselines["eplb"]
    # Half the time improves the starts, the rest scores the candidates (one hierarchical
    # evaluate takes 40 s at 1,024 GPUs on a loaded machine): the improved flat plan always,
    # the others while time is left.
    improve_end = None if deadline is None else t0 + 0.5 * (deadline - t0)
    candidates: dict[str, Placement] = {}
    for i, (name, plan) in enumerate(starts.items()):
        left = None if improve_end is None else t0 + (improve_end - t0) * (i + 1) / len(starts)
        candidates[f"{name}+coact"] = improve_hierarchical(plan, problem, deadline=left)
    candidates.update(baselines)
    costs = {}
    for name, plan in candidates.items():
        if costs and deadline is not None and time.monotonic() >= deadline:
            break
        costs[name] = evaluate(plan, problem)
    times = {name: cost.moe_time_s for name, cost in costs.items()}
    names = list(costs)
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
    out.info["unscored"] = [name for name in candidates if name not in costs]   # the deadline came first
    return out


def resplit(placement: Placement, problem: PlacementProblem, *, time_limit: float | None = None,
            cache: dict | None = None) -> Placement:
    """``placement`` with every layer's token splits from the split LP (same replicas): set
    beside the placement with its own splits, it separates what a placement buys from what
    splits buy (``--compare`` reports ``eplb+lp`` so). Never worse than the splits it had; under
    ``time_limit`` the layers are re-split in order while time is left (the rest take the nearest
    split where it is better than their own, ``nearest_split``). A
    layer whose traffic and placement are an earlier layer's up to expert labels (EPLB's plans of
    zipf layers) takes that layer's splits, relabelled: the same LP. ``cache`` (a dict the caller
    keeps across calls on one problem): a layer placed as in an earlier call (EPLB's and
    EPLB-hier's plans often are one) takes that call's LP result. ``info["resplit_cut_short"]``:
    the layers whose LP the limit stopped or left unrun (0: every layer at full strength)."""
    deadline = None if time_limit is None else time.monotonic() + time_limit
    counts = problem.traffic.counts
    layers = []
    cut_short: set[int] = set()   # layers whose own LP did not finish (relabelled copies included)
    done: dict[str, int] = {}   # a layer's traffic up to relabelling -> the first layer split with it
    for li, layer in enumerate(placement.layers):
        perm, key = _canonical(counts[li])
        lk = done.get(key)
        if lk is not None and _same_replicas(placement.layers[lk], _canonical(counts[lk])[0], layer, perm):
            # The same placement of the same traffic up to expert labels: the same LP, relabelled.
            layers.append(_relabel(layers[lk], _canonical(counts[lk])[0], perm))
            if lk in cut_short:
                cut_short.add(li)
            continue
        cached = None if cache is None else (li, _placement_key(layer, np.arange(len(layer.replicas))))
        if cached in (cache or {}):
            layers.append(cache[cached])
            done.setdefault(key, li)
            continue
        data = layer_data(problem, counts[li], max_groups=_max_groups(problem))
        own = split_result(data, layer)
        if deadline is not None and time.monotonic() >= deadline:
            # Out of time: the better of its own splits and the nearest split (what an LP out
            # of time falls back to), with no LP.
            near = split_result(data, nearest_split(data, layer.replicas))
            layers.append(near.layer if near.bottleneck < own.bottleneck else layer)
            done.setdefault(key, li)
            cut_short.add(li)
            continue
        # Each LP gets all the time left, not a share of it: where every LP needs more than its
        # share (at 512 GPUs 18-20 s each, against 120 s / 16 layers) shares let none finish.
        res = optimal_splits(data, layer.replicas, time_limit=None if deadline is None else deadline - time.monotonic())
        layers.append(res.layer if res.bottleneck < own.bottleneck else layer)
        done.setdefault(key, li)
        if res.status != "optimal":
            cut_short.add(li)
        elif cached is not None:
            cache[cached] = layers[-1]
    return Placement(placement.num_ranks, placement.num_experts, layers, method=f"{placement.method}+lp",
                     info=SolverInfo(resplit_cut_short=len(cut_short)))


# ---------------------------------------------------------------------------------------------

_SHARED: PlacementProblem | None = None  # the problem solve() hands its forked workers
_QUEUE = None   # where the forked workers post each better plan they find (a SimpleQueue)
_AFTER: dict[int, list] = {}   # per layer, what its relabelled layers re-split after it (``solve``)
_FLOOR = None   # shared float64[L]: each distinct layer's best time posted so far (``_post``)
_SHARES: dict[int, list] = {}   # per layer, its relabelled layers' checks: (job index, key, layer, replicas)
_CLAIMED = None   # shared int8[checks] (with a lock): 1 once a process has started that check (``_claim``)
_POLL_S = 0.1   # seconds between the parent's looks at the queue while it waits for results


def _worker(job: tuple) -> tuple:
    """A pool task: ("layer", ...) solves a distinct layer, ("check", ...) re-splits a relabelled
    layer's baseline (``_check``)."""
    if job[0] == "check":
        _, key, lj, li, replicas, deadline, index = job
        if deadline is not None and time.monotonic() >= deadline:
            return "check", key, None
        if not _claim(index):
            return "check", key, "claimed"
        # The representative posts its baselines as they are within seconds of its start: an
        # LP with no plan to beat would not skip its tie-break, nor a placement its bound rules out.
        while _FLOOR is not None and np.isinf(_FLOOR[li]) and (deadline is None or time.monotonic() < deadline):
            time.sleep(_POLL_S)
        # read again between the LP's rounds: the representative's plan may improve meanwhile
        floor = (lambda: np.inf) if _FLOOR is None else (lambda: float(_FLOOR[li]))
        return "check", key, _check(_SHARED, lj, replicas, floor, deadline)
    _, li, base, solver, deadline, tasks_left, num_workers, gap = job
    if deadline is not None and time.monotonic() >= deadline:
        return "layer", li, None, None   # started past the wall: the parent holds the best baseline
    # The pool starts the jobs in order: this one and the tasks_left - 1 after it share the
    # time left, num_workers at a time.
    budget = _budget(deadline, -(-tasks_left // num_workers))
    layer, info = _solve_layer(_SHARED, li, base, solver, budget, gap, deadline=deadline, post=_post,
                               after=_AFTER.get(li), share=lambda floor, until, lp_s: _share(li, floor, until, lp_s))
    return "layer", li, layer, info


def _claim(index: int) -> bool:
    """Whether this process takes check ``index`` (no other has started it)."""
    if _CLAIMED is None:
        return True
    with _CLAIMED.get_lock():
        if _CLAIMED[index]:
            return False
        _CLAIMED[index] = 1
        return True


def _share(li: int, floor: float, until: float | None, lp_s: float) -> None:
    """Layer ``li``'s worker takes its relabelled layers' checks (from the last, the pool's
    check tasks start at the first) while those not yet started would need, at ``lp_s``
    seconds each, more than the time left to ``until``: the other workers would not finish
    them (instance 9: 15 LPs of 3-15 s each, one worker beside the distinct layer's node LP).
    Each result goes to the parent on the queue."""
    for index, key, lj, replicas in reversed(_SHARES.get(li, [])):
        if until is not None:
            waiting = sum(not _CLAIMED[i] for i, *_ in _SHARES[li]) if _CLAIMED is not None else 0
            if waiting * lp_s <= until - time.monotonic():
                return
        if not _claim(index):
            continue
        t0 = time.monotonic()
        out = _check(_SHARED, lj, replicas, floor, until)
        if out is not None and out[0] is not None:
            lp_s = time.monotonic() - t0
        if _QUEUE is not None and out is not None:
            _QUEUE.put(("check", key, out))


def _post(message: tuple) -> None:
    if _FLOOR is not None:
        _FLOOR[message[0]] = min(_FLOOR[message[0]], message[2])   # the layer's best time so far
    if _QUEUE is not None:
        _QUEUE.put(message)


def _checks(baselines: dict[str, Placement], rep: list[int], perms) -> tuple[dict[str, tuple], dict]:
    """The relabelled layers' baselines to re-split: (checks, covered). checks: key -> (layer,
    replicas), one per placement up to expert labels (EPLB's and EPLB-hier's are often the
    same; two layers' may be); covered: (layer, baseline) -> ("rep", the representative's
    baseline whose placement it is, relabelled) or ("check", key); a baseline with one replica
    per expert (one split only) is in neither."""
    checks: dict[str, tuple] = {}
    covered: dict[tuple[int, str], tuple[str, str]] = {}
    rep_keys: dict[int, dict[str, str]] = {}
    for lj, li in enumerate(rep):
        if li == lj:
            continue
        if li not in rep_keys:
            rep_keys[li] = {_placement_key(pl.layers[li], perms[li]): name for name, pl in baselines.items()}
        for name, pl in baselines.items():
            if all(r.size == 1 for r in pl.layers[lj].replicas):
                continue
            key = _placement_key(pl.layers[lj], perms[lj])
            if key in rep_keys[li]:
                covered[(lj, name)] = ("rep", rep_keys[li][key])
                continue
            covered[(lj, name)] = ("check", key)
            checks.setdefault(key, (lj, pl.layers[lj].replicas))
    return checks, covered


def _placement_key(layer: LayerPlacement, perm: np.ndarray) -> str:
    """The replicas of ``layer`` in canonical expert order (``_canonical``'s perm): equal keys of
    layers with equal traffic keys = the same placement up to expert labels."""
    digest = hashlib.sha256()
    for e in perm:
        digest.update(np.asarray(layer.replicas[e], dtype=np.int64).tobytes() + b"|")
    return digest.hexdigest()


def _check(problem: PlacementProblem, lj: int, replicas: list[np.ndarray], floor: float | Callable[[], float],
           deadline: float | None) -> tuple | None:
    """Layer ``lj``'s baseline placement ``replicas`` re-split by the LP under the time left:
    (split layer, time, busiest link, LP status), or (None, ...) when its split bound is not
    below ``floor`` (the layer's plan in hand, or a function that reads it as it improves), or
    None past ``deadline``."""
    if deadline is not None and time.monotonic() >= deadline:
        return None
    if split_bound(_with_counts(problem, problem.traffic.counts[lj]), replicas) >= (floor() if callable(floor) else floor):
        return None, float("inf"), float("inf"), "ruled_out"
    data = _shared_coef(layer_data(problem, problem.traffic.counts[lj], max_groups=_max_groups(problem)))
    # the tie-break only where the split could be taken: half the LP's time at 512 GPUs
    res = optimal_splits(data, replicas, time_limit=None if deadline is None else deadline - time.monotonic(),
                         worth_below=floor)
    _keep_coef(data)
    return res.layer, float(res.bottleneck), float(res.link_time), res.status


_COEF: list = []   # [(lm, link_unit, group_of, weight, coef)]: the last link coefficients built here


def _shared_coef(data: LayerData) -> LayerData:
    """``data`` with the coefficient matrix (``LayerData.coef``) of an earlier layer of this
    process with the same links, source groups and weights (zipf layers' relabellings: 2.7 s
    to build at 512 GPUs), else ``data`` as it is."""
    for lm, link_unit, group_of, weight, coef in _COEF:
        if (lm is data.lm and np.array_equal(link_unit, data.link_unit) and np.array_equal(group_of, data.group_of)
                and np.array_equal(weight, data.weight)):
            return replace(data, _coef=coef)
    return data


def _keep_coef(data: LayerData) -> None:
    """Keep ``data``'s coefficient matrix, if built, for ``_shared_coef`` (one at a time)."""
    if data._coef is not None and not (_COEF and _COEF[0][4] is data._coef):
        _COEF[:] = [(data.lm, data.link_unit, data.group_of, data.weight, data._coef)]


def _drain(queue, posted: dict[int, tuple], checked: dict[str, tuple]) -> None:
    """Read what the workers posted so far (each layer's latest is its best; a check a layer's
    worker ran, ``_share``)."""
    while not queue.empty():
        message = queue.get()
        if message[0] == "check":
            checked[message[1]] = message[2]
        else:
            posted[message[0]] = message


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


@dataclass
class _Incumbent:
    """A layer's best plan so far (lower time first; among times within ``_TIE`` of the best
    seen, the idler network), and the baselines whose split-LP re-split is not yet solved or
    ruled out (``unchecked``). ``send`` posts it (to the parent process)."""

    layer_index: int
    post: Callable[[tuple], None] | None
    cost: float = float("inf")
    link: float = float("inf")
    layer: LayerPlacement | None = None
    start: str = ""
    floor: float = float("inf")      # the lowest time offered: a tie never drifts above it
    bound: float = 0.0
    source: str = ""
    unchecked: list[str] = dataclasses.field(default_factory=list)
    dirty: bool = False

    def offer(self, cost: float, link: float, layer: LayerPlacement, start: str, *, prefer: bool = False) -> bool:
        """Take the plan if better; ``prefer``: also on a tie with a network no busier (the
        planner's own construction over a baseline it ties)."""
        tie = cost <= self.floor * (1 + _TIE)
        if not (self.layer is None or cost < self.floor * (1 - _TIE) or (tie and link < self.link * (1 - 1e-9))
                or (prefer and tie and link <= self.link * (1 + 1e-9))):
            return False
        self.cost, self.link, self.layer, self.start = float(cost), float(link), layer, start
        self.floor = min(self.floor, float(cost))
        self.dirty = True
        return True

    def send(self) -> None:
        if self.post is not None and self.dirty and self.layer is not None:
            self.post((self.layer_index, self.layer, self.cost, self.link, self.start, self.bound,
                       self.source, sorted(self.unchecked)))
            self.dirty = False


def _solve_layer(problem: PlacementProblem, li: int, baseline_layers: dict[str, LayerPlacement], solver: str,
                 budget: float | None, gap: float, *, deadline: float | None = None,
                 post: Callable[[tuple], None] | None = None, after: list | None = None,
                 share: Callable[[float, float | None, float], None] | None = None) -> tuple[LayerPlacement, LayerInfo]:
    """One layer: every baseline as it is, then re-split by the LP (best first, unless
    ``split_bound`` rules it out; all but the best for half the layer's time at most), the
    construction, the baselines' splits left, then the node LP and the MILP. The baselines come
    first so that a layer stopped early has them, except where the exchange is exposed and a
    node's sources share a split (``network_first`` below: the constructions first). The
    layer's own search stops after ``budget`` seconds or at ``deadline``, the baselines' splits
    at ``deadline``; ``post`` gets each better plan. ``after``: (layer, replicas) of the
    baselines the layers relabelled from this one re-split once it is done where their split
    bound is below its plan (the replica search stops in time for those LPs). ``share(floor,
    until, lp_s)``: once the baselines are split, this layer's worker runs those re-splits that
    the other workers would not finish (``_share``), before its bounds."""
    t0 = time.monotonic()
    stop = None if budget is None else t0 + budget
    if deadline is not None:
        stop = deadline if stop is None else min(stop, deadline)

    def left(until: float | None) -> float | None:
        return None if until is None else max(0.05, until - time.monotonic())

    def over(until: float | None) -> bool:
        return until is not None and time.monotonic() >= until

    data = _shared_coef(layer_data(problem, problem.traffic.counts[li], max_groups=_max_groups(problem)))
    bound, source = lower_bound(data)
    inc = _Incumbent(li, post, bound=bound, source=source)
    fitting = {name: base for name, base in baseline_layers.items() if _fits(base.replicas, data)}
    as_is = {}
    for name, base in fitting.items():   # scored with their own (even) splits, as evaluate does
        own = split_result(data, base)
        as_is[name] = own.bottleneck
        inc.offer(own.bottleneck, own.link_time, own.layer, name)
    order = sorted(fitting, key=as_is.get)
    inc.unchecked = [name for name in order if any(r.size > 1 for r in fitting[name].replicas)]
    inc.send()

    def resplit_baselines(until: float | None, until_first: float | None) -> None:
        for i, name in enumerate(order):   # the best first: the others' bounds are then often above it
            if name not in inc.unchecked:
                continue
            replicas = fitting[name].replicas
            if split_bound(data, replicas) >= inc.floor:
                inc.unchecked.remove(name)          # no split of it beats the plan in hand
                continue
            if any(other not in inc.unchecked and _same_placement(fitting[other].replicas, replicas)
                   for other in order[:i]):
                inc.unchecked.remove(name)          # the same LP as a baseline's already solved
                continue                            # (EPLB's and EPLB-hier's are often one plan)
            end = until_first if i == 0 else until
            if over(end):
                continue
            res = optimal_splits(data, replicas, time_limit=left(end), worth_below=inc.floor)
            split_s.append(res.seconds)
            inc.offer(res.bottleneck, res.link_time, res.layer, f"{name}+lp")
            if res.status in SETTLED:
                inc.unchecked.remove(name)
            inc.send()

    # Where a node's sources share one split and the exchange is exposed (serial, or one
    # chunk: _FINE_LINK_WEIGHT), the constructions come before the baselines' splits, the last
    # (the trade-off bound's counts, where built) first and split at once with two replica
    # classes a node (``replica_class_groups``, top=1: the GPUs holding an expert with at most
    # the mean replicas, and the others), and the node exchanges are not run (on 9 and 10 they
    # changed nothing). The LPs after it stop at its floor (instance 10's layer 0: the best
    # baseline's split 10.5 -> 2.1 s), and its own LP is the one the re-split below would add
    # (there 25.5 s; the node groups' 15.7 s and then the octaves' 30.1 s did not fit the
    # layer's 45 s): 10's worst gap 4.29 -> 2.97 %, 5, 8 and 9 unchanged (measured 2026-12-07,
    # docs/planner.md).
    network_first = data.exact and data.num_groups < data.num_gpus and data.schedule.exposed >= _FINE_LINK_WEIGHT
    split_s: list[float] = []   # seconds of the baselines' split LPs
    # The best baseline's split first, up to the deadline; the others' for half the layer's
    # time at most before the construction (at 1,024 GPUs one split LP takes minutes on a
    # loaded machine), and those left after it, up to the deadline.
    if not network_first:
        resplit_baselines(None if stop is None else min(stop, t0 + 0.5 * (stop - t0)), deadline)
    lp_s = 0.0     # seconds of the layer's last split LP (the replica search paces its LPs by it)
    most_lp_s = 0.0   # the longest construction LP's seconds, scaled to the node groups
    if not over(stop):
        built = []     # (split time, replicas) of each construction

        def split_local(replicas: list[np.ndarray], by: LayerData = data) -> float:
            """Split a construction by the LP (over ``by``'s source groups) and offer it; its
            time (lp_s: the LP's seconds)."""
            nonlocal lp_s, most_lp_s
            t1 = time.monotonic()
            res = optimal_splits(by, replicas, time_limit=left(stop), worth_below=inc.floor,
                                 tie_break=by is data)
            lp_s = time.monotonic() - t1
            most_lp_s = max(most_lp_s, lp_s * data.num_groups / by.num_groups)
            inc.offer(res.bottleneck, res.link_time, res.layer, "local", prefer=True)
            return res.bottleneck

        candidates = local_candidates(data)
        if network_first:   # (above)
            candidates = candidates[::-1]
            two = replica_class_groups(data, candidates[0], top=1)
            if two is not None:
                built.append((split_local(candidates[0], two), candidates[0]))
                candidates = candidates[1:]
        for replicas in candidates:
            if over(stop):
                break
            built.append((split_local(replicas), replicas))
        # Each construction with its nodes' experts exchanged (``heuristic.node_swapped``, for
        # one split LP's seconds at most), the best construction's first, while the time left
        # holds LP_MARGIN of the last split LP (the replica search's pacing): on 6 and 7 the
        # worst gap 9.91 -> 6.17 % and 8.46 -> 5.92 %, on 9 and 10 no change (measured 2026-12-07,
        # docs/planner.md).
        for _, replicas in sorted(built, key=lambda item: item[0]):
            if network_first or over(stop) or (stop is not None and stop - time.monotonic() < LP_MARGIN * lp_s):
                break
            swapped = node_swapped(data, replicas, until=time.monotonic() + max(lp_s, 0.05))
            if swapped is not None:
                split_local(swapped)
        # The best construction exchanged again with the replica capacity of other GPU times
        # (_EXCHANGE_TIMES x the compute bound; the estimate counts one t, the layer's plan
        # trades its GPU time against the NICs), while those split LPs stay within
        # _EXCHANGE_SHARE of the layer's time (so not at 512-1,024 GPUs, where one takes 5-10 s
        # and the exchange did not help): scripts/bench_planner.py's worst gap on 6 6.17 ->
        # 5.5 %, on 7 5.9-6.3 -> 5.6 %, 9 and 10 unchanged (measured 2026-12-07, docs/planner.md).
        c = compute_bound(data) if built and not network_first else 0.0
        if c > 0:
            first = min(built, key=lambda item: item[0])[1]
            spent, allowed = 0.0, np.inf if stop is None else _EXCHANGE_SHARE * (stop - t0)
            for mult in _EXCHANGE_TIMES:
                if over(stop) or spent + lp_s > allowed \
                        or (stop is not None and stop - time.monotonic() < (LP_MARGIN + 1) * lp_s):
                    break
                t1 = time.monotonic()
                swapped = node_swapped(data, first, until=t1 + max(lp_s, 0.05), gpu_time=mult * c)
                if swapped is not None:
                    split_local(swapped)
                spent += time.monotonic() - t1
        inc.send()
    resplit_baselines(deadline, deadline)
    if share is not None and after and split_s and not over(stop):
        # a relabelled layer's check is an LP of the same size as the baselines' splits
        share(inc.floor, stop, float(np.mean(split_s)))
    # Where the layer's time follows its busiest link at least half as fast as the link's own
    # (_FINE_LINK_WEIGHT: serial, or the pipeline's hidden exchange above the GEMMs), the plan in
    # hand re-split once with its node groups split by how replicated their GPUs' experts are
    # (``replica_class_groups``; the first stage alone: on 512 GPUs the tie-break is half an
    # LP), while the time left holds _FINE_LP_TIMES x the node groups' LP scaled by the groups:
    # 9's worst gap 11.69 -> 9.79 %, 8's 11.88 -> 11.12 %; on 5 (16 chunks, the GEMMs above
    # the hidden exchange: weight 1 / 16) the LPs took the search's time, 0.81 -> 1.74 % when
    # they ran there (docs/planner.md).
    fine = None
    if inc.layer is not None and not over(stop) and _gap(inc.cost, bound) > gap:
        _, _, gpu_s = data.time_of(inc.layer.flows(data.counts), link=np.array([inc.link]))
        sched = data.schedule
        weight = sched.exposed + (sched.hidden if sched.binds(inc.link, gpu_s) == "link" else 0.0)
        if weight >= _FINE_LINK_WEIGHT:
            fine = replica_class_groups(data, inc.layer.replicas)
    fine_lp_s = most_lp_s if network_first else lp_s   # (network_first: the last LPs stop at the floor)
    if fine is not None and (stop is None or stop - time.monotonic()
                             > _FINE_LP_TIMES * fine_lp_s * fine.num_groups / data.num_groups):
        res = optimal_splits(fine, inc.layer.replicas, time_limit=left(stop), worth_below=inc.floor, tie_break=False)
        inc.offer(res.bottleneck, res.link_time, res.layer, inc.start)
        inc.send()
    cost, link_s, layer = inc.cost, inc.link, inc.layer
    g = _gap(cost, bound)
    open_as = "time_limit"

    def take_bound(value: float | None, name: str) -> None:
        """Take ``value`` as the layer's bound where it is above the one in hand (capped by the plan)."""
        nonlocal bound, source, g
        if value is not None and value > bound:
            bound, source = min(value, cost), name
            g = _gap(cost, bound)
            inc.bound, inc.source, inc.dirty = bound, source, True
            inc.send()

    # Under --expert-tp (data.pool > 1) the node LP and the link classes are not taken: they
    # bound a GPU's time by its own rows, where a TP group's ranks compute each other's.
    if g > gap and not over(stop) and data.pool == 1 \
            and data.lm.topology.num_nodes ** 2 * data.num_experts <= MAX_NODE_LP_FLOWS:
        # The node-level LP sees the fabric's cuts (leaf/spine/core) and couples them with
        # compute; cheap next to the MILP (0.1 s at 8 nodes x 32 experts), but on half the
        # layer's time left at most, and not above MAX_NODE_LP_FLOWS: at 65,536 flows and more
        # (instances 5 and 8-10) it ran out of that half unsolved (51 s on 5), with no bound.
        node = node_model(data, integer=False,
                          time_limit=left(None if stop is None else time.monotonic() + 0.5 * (stop - time.monotonic())))
        take_bound(node.bound, "node-lp")
    if g > gap and not over(stop) and data.pool == 1:
        # Fabric link classes (leaf-spine under ECMP): what no plan can serve near, searched
        # over the GPU time with the cuts; a share of the layer's time, the MILP may use the rest.
        from epplan.placement.farbound import far_tradeoff_bound

        far = far_tradeoff_bound(data, deadline=None if stop is None else min(stop, t0 + 0.5 * (stop - t0)))
        take_bound(far, "link-class")
    if g > gap and not over(stop) and data.pool == 1 \
            and data.lm.topology.num_nodes * data.num_experts <= MAX_COUNT_INTEGERS:
        # The replica counts per node (every expert's replicas serve all its demand, so cold
        # experts take slots the nodes' hot experts would use locally): a share of the time left.
        counted = count_model(data, cost, floor=bound,
                              time_limit=left(time.monotonic() + 0.5 * (stop - time.monotonic())
                                              if stop is not None else None))
        take_bound(counted.bound, "node-count")
    if g > gap:
        from epplan.placement.ilp import improve

        remaining = left(stop)
        if remaining is None or remaining > 0.5:
            out = improve(data, layer, cost, bound, solver=solver, time_limit=remaining, gap=gap)
            if out.bound > bound:
                bound, source = out.bound, "milp"
            if out.layer is not None and out.cost < min(cost, inc.floor) * (1 - 1e-12):
                cost, link_s, layer = out.cost, out.link_s, out.layer
            g = _gap(cost, bound)
            # The MILP ran to its end (or was too large to try): more time would not help.
            open_as = "time_limit" if out.status == "time_limit" else "gap_open"
    if g > gap and not over(stop):
        # The time the bounds and the MILP leave: replica moves scored by the split LP
        # (search.py; where the MILP is too large, it is the whole search).
        from epplan.placement.search import replica_search

        def keep(moved: LayerPlacement, moved_cost: float, moved_link: float) -> None:
            start = inc.start if inc.start == "local" or inc.start.endswith("+moves") else f"{inc.start}+moves"
            inc.offer(moved_cost, moved_link, moved, start)
            inc.send()

        after_bounds: list[float] = []   # split bounds of ``after``, computed at the first call

        def pending(plan_s: float) -> int:
            if after and not after_bounds:
                counts = problem.traffic.counts
                after_bounds.extend(split_bound(_with_counts(problem, counts[lj]), replicas) for lj, replicas in after)
            return sum(b < plan_s for b in after_bounds)

        found = replica_search(data, layer, cost, link_s, until=stop, seed=li, post=keep, reserve=pending,
                               lp_seconds=lp_s)
        if found.cost < cost * (1 - 1e-12):
            cost, link_s, layer = found.cost, found.link_s, found.layer
            g = _gap(cost, bound)
        if found.stopped_by_time:
            open_as = "time_limit"
    _keep_coef(data)
    status = "optimal" if g <= _EXACT else ("gap_met" if g <= gap else open_as)
    info = LayerInfo(layer=li, status=status, objective_s=float(cost), bound_s=float(bound),
                     bound_source=source, gap=float(g), link_s=float(link_s),
                     seconds=time.monotonic() - t0, start=inc.start, unchecked=sorted(inc.unchecked))
    return layer, info


def _stopped_layer(problem: PlacementProblem, li: int, baselines: dict, scores: dict, posted: tuple | None,
                   seconds: float) -> tuple[LayerPlacement, LayerInfo]:
    """A layer the time limit stopped: the last plan its worker posted, with the bound it had;
    without one, the best baseline as it is (its precomputed score), with the analytic bound."""
    if posted is not None:
        _, layer, cost, link_s, name, bound, source, unchecked = posted
    else:
        data = layer_data(problem, problem.traffic.counts[li], max_groups=_max_groups(problem))
        bound, source = lower_bound(data)
        fitting = [name for name in scores if not np.isnan(scores[name][0][li])]
        unchecked = sorted(fitting)
        if fitting:
            name = min(fitting, key=lambda n: scores[n][0][li])
            layer, cost, link_s = baselines[name].layers[li], scores[name][0][li], scores[name][1][li]
        else:   # no baseline fits the GPUs' memory: the construction, split without an LP
            res = split_result(data, nearest_split(data, local_first(data)))
            name, layer, cost, link_s = "local", res.layer, res.bottleneck, res.link_time
    info = LayerInfo(layer=li, status="time_limit", objective_s=float(cost),
                     bound_s=float(min(bound, cost)), bound_source=source,
                     gap=float(_gap(cost, min(bound, cost))),
                     link_s=float(link_s), seconds=seconds, start=name, unchecked=list(unchecked))
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
        gpu = (expert_tp_rows(loads.served, problem.tp, problem.expert_tp) * gpu_unit).max(axis=1, initial=0.0)
        times = np.asarray(problem.schedule.moe_time(link, gpu), dtype=np.float64).reshape(-1)
        for li, layer in enumerate(pl.layers):
            held = np.bincount(np.concatenate(layer.replicas), minlength=problem.num_gpus)
            if np.any(held > slots):
                times[li] = link[li] = np.nan
        out[name] = (times, link)
    return out


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


_DATA: dict[int, tuple[PlacementProblem, LayerData]] = {}


def _with_counts(problem: PlacementProblem, counts: np.ndarray) -> LayerData:
    """A ``LayerData`` with ``counts`` but the first layer's source groups (built once per
    problem): enough for ``split_bound``, which does not read the groups; not for the split LP."""
    hit = _DATA.get(id(problem))
    if hit is None or hit[0] is not problem:
        _DATA.clear()
        hit = _DATA[id(problem)] = (problem, layer_data(problem, problem.traffic.counts[0], max_groups=_max_groups(problem)))
    return replace(hit[1], counts=np.asarray(counts, dtype=np.float64), _coef=None)


def _same_replicas(layer_a: LayerPlacement, perm_a: np.ndarray, layer_b: LayerPlacement, perm_b: np.ndarray) -> bool:
    """Whether layer B's expert perm_b[i] sits on the same GPUs as layer A's perm_a[i], every i."""
    return all(np.array_equal(layer_a.replicas[i], layer_b.replicas[j]) for i, j in zip(perm_a, perm_b))


def _share_class_best(results: dict[int, tuple[LayerPlacement, LayerInfo]], rep: list[int], perms,
                      gap: float) -> None:
    """Layers alike up to expert labels (``rep``: each layer's representative) all take the best
    plan any of them has, relabelled: it costs each the same. A relabelled layer's own baselines
    (EPLB's label-dependent plans re-split) may beat the representative's plan; before, only that
    layer took it. Measured on instance 10 (16 relabellings of one layer, 1,024 GPUs): EPLB's
    own placements of layers 0, 7, 11 and 13 re-split take 0.004518, 0.004511, 0.004506 and
    0.004509 s."""
    for li in sorted(set(rep)):
        members = [lj for lj in range(len(rep)) if rep[lj] == li]
        best = min(members, key=lambda lj: (results[lj][1].objective_s, results[lj][1].link_s, lj))
        plan, top = results[best]
        for lj in members:
            layer, info = results[lj]
            own = _Incumbent(lj, None)          # the planner's rule: lower time, on a tie the idler network
            own.offer(info.objective_s, info.link_s, layer, info.start)
            if lj == best or not own.offer(top.objective_s, top.link_s, plan, top.start):
                continue
            g = _gap(top.objective_s, min(info.bound_s, top.objective_s))
            status = "optimal" if g <= _EXACT else ("gap_met" if g <= gap else info.status)
            results[lj] = (_relabel(plan, perms[best], perms[lj]),
                           LayerInfo(**{**asdict(info), "objective_s": float(top.objective_s), "link_s": float(top.link_s),
                                        "gap": float(g), "status": status, "start": top.start, "same_as": best}))


def _same_placement(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    """Whether two layers' replicas are the same, expert by expert."""
    return all(np.array_equal(x, y) for x, y in zip(a, b))


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
