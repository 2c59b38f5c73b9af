"""Optimal token splits for a fixed placement: one linear program per layer.

Given which GPUs hold which experts, the best split of every source's tokens over an expert's
replicas is an LP (``DESIGN.md``'s model with the placement fixed):

    variables  y[a, e, t] >= 0   assignments source group a sends to the replica of e on t
               v >= 0            aggregates of the flows the links see (``flowlinks``)
               mu, X, Z          the max link time, the max GPU time, the layer's hidden part
    demand     sum_t y[a, e, t] = n[a, e]
    aggregates v = of_flow y
    links      (direct y + links v)[k] <= mu     (k: kept links; = sum coef[(a, t), k] y[a, e, t])
    GPUs       gpu_unit[t] * sum_{a, e} y[a, e, t] <= X
    schedule   hidden * mu <= Z,  X <= Z
    minimise   exposed * mu + Z (the layer's time under the runtime's schedule, ``epplan.schedule``);
               then, with it fixed at its optimum, mu

The second stage breaks ties toward the least-loaded network: when expert compute hides the
exchange, any split that keeps the links below it is optimal, and the planner prefers the one
with the idlest links (``--compare`` reports both). Flows are scaled to O(1) units for HiGHS.

Where the seconds went at 1,024 GPUs (instance 10's layer 6, EPLB's placement, 24,559 flows,
4,096 kept links; this 2-core machine at load 1-3): written with one row of link coefficients
per (group, GPU) pair the model had 0.9M nonzeros and took 5.4 s (first stage) + 7.2 s (tie-break)
of HiGHS's interior point, all of it in HiGHS (the build 0.1 s). The aggregates cut it to 0.26M
nonzeros but not the solve (5.5 s: IPX's basis stays dense, every node's links couple with every
other's); what does is leaving out the link rows that do not bind: without the 2,048 NVLink rows,
which never bind there, 2.6 s for the same optimum. So the link rows are lazy (``_LAZY_ABOVE``):
the LP starts with the links the nearest split loads most and adds those a solution overloads.
And a first stage whose relaxation is already above the plan the caller has (``worth_below``)
stops there: its placement cannot win (the relabelled layers' checks at 1,024 GPUs mostly).

Shape legend: G = GPUs, E = experts, A = source groups, R_e = replicas of expert e.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, replace
from typing import Callable

import numpy as np
import scipy.sparse as sp

from epplan.placement.flowlinks import flow_links
from epplan.placement.layer import LayerData
from epplan.placement.lp import LP, LPResult
from epplan.placement.types import LayerPlacement
from epplan.workload.memory import tp_group_sum

_STAGE2_SLACK = 1e-7   # Z may grow by this fraction in the tie-break stage
# Interior point above either size, dual simplex below. Measured at load 4-6 on a 2-core machine,
# both stages, with one row of link coefficients per (group, GPU) pair: 512 GPUs, 64 node groups,
# 19,485 columns but 2.15M nonzeros (every (node, GPU) pair crosses ~200 fabric links): 18.8 s
# with crossover against 300.8 s for dual simplex. Without crossover (the default,
# ``crossover``): the same 512-GPU layer 6.3 s against 9.5 s with it at load 1, the same layer
# time to 1e-12 (instance 9's layers 0 and 3, scripts/bench_planner.py). With the aggregates
# (``flowlinks``; 2026-12-03, load 1.6-2.1, first layer, EPLB's placement): 128 GPUs (instance
# 2) 20,739 columns, 0.10M nonzeros: simplex 0.35 s, interior point 1.2 s; 512 GPUs (9) 13,679
# columns, 0.44M nonzeros: simplex 57.7 s; 1,024 GPUs (10) 32,503 columns, 0.26M nonzeros:
# simplex 208 s, interior point 5 s (all link rows) to 1.2-1.6 s a round (lazy).
_IPM_ABOVE = 30_000          # columns
_IPM_ABOVE_NONZEROS = 200_000
_WORTH_TIE = 1e-5     # relative: a first stage this close above ``worth_below`` may still tie it
_TIE_BREAK_SHARE = 2.0  # under a limit the tie-break gets at most this many times the first stage's time (>= 1 s)
# Lazy link rows above this many links (interior point only; the small models take simplex):
# first the links the nearest split loads to at least _LAZY_SHARE of its busiest; where a
# solution loads a left-out link above its mu by more than _LAZY_TOL (relative to the objective),
# every left-out link above (1 - _LAZY_MARGIN) mu is added and the LP solved again. Exact: the
# last LP is a relaxation of the full one whose optimum meets every left-out row, so it is an
# optimum of the full one. Measured on instance 10's layer 6 (EPLB's placement, 4,096 link rows,
# load 2-3): 386 rows to start, 580 at the end, 3 solves of 1.2-1.6 s against 5.4 s for all rows;
# the tie-break on those rows 1.9 s against 7.2 s.
_LAZY_ABOVE = 256
_LAZY_SHARE = 0.5
_LAZY_MARGIN = 0.1
_LAZY_TOL = 1e-9
MAX_COLUMNS = 30_000   # flow columns above which groups use a subset of remote replicas
_REMOTE_PRESENT = 4    # remote replicas a group may use for an expert its node holds
_REMOTE_ABSENT = 16    # ... for an expert its node does not hold


# Statuses of a split LP that settle whether its placement beats the plan in hand (``worth_below``):
# solved, or stopped where a relaxation's optimum was above that plan.
SETTLED = frozenset({"optimal", "above"})


@dataclass
class SplitResult:
    layer: LayerPlacement
    bottleneck: float     # seconds: the layer's time under the schedule, every link counted
    link_time: float      # seconds: max link time of the returned splits
    status: str
    seconds: float


def optimal_splits(data: LayerData, replicas: list[np.ndarray], *, tie_break: bool = True,
                   time_limit: float | None = None, max_columns: int = MAX_COLUMNS,
                   method: str = "auto", crossover: bool = False,
                   worth_below: float | Callable[[], float] = np.inf,
                   links: str = "aggregated") -> SplitResult:
    """Best splits for ``replicas`` (replicas[e]: sorted ranks holding expert e).

    ``worth_below`` (seconds): the time the caller's plan in hand takes (or a function that
    returns it, read again as the LP goes on, where that plan may improve meanwhile). Where the first
    stage's optimum is above it by more than ``_WORTH_TIE``, the split would not be taken, so
    the tie-break (the idlest network among equal times) is not run: the result's time is
    still the optimum, its busiest link not the least (on 512 GPUs the tie-break is about half
    the LP's time). Where the link rows are lazy (``_LAZY_ABOVE``) and a relaxation's optimum is
    already above it, the LP stops there: status "above", the relaxation's split scored as it
    is (above ``worth_below``; it is not the optimum).

    Exact over all splits while groups x replicas <= ``max_columns``; above, each group may use
    every replica on its own node and a few others (``_columns``), and the result is the best
    split of that kind (its cost is still exact).

    ``method``: HiGHS's "ipm" or "simplex", or "auto" (by the model's size: interior point
    above ``_IPM_ABOVE`` columns or ``_IPM_ABOVE_NONZEROS`` nonzeros). Interior point stops
    at its own optimality tolerance unless ``crossover``: no vertex is needed, since the flows
    become per-source fractions (``_to_layer``) and the plan is scored as it is
    (``split_result``); where it does not reach that tolerance, it runs again with crossover.
    ``time_limit`` counts from the call: the link map's first build (2.7 s at 512 GPUs) and the
    model's are part of it, HiGHS gets what is left. Out of time, the result is ``nearest_split``
    (the caller keeps whichever split it had in hand if that is better); ``seconds`` is the
    call's wall time.
    """
    t0 = time.monotonic()
    num_gpus, num_experts = data.num_gpus, data.num_experts
    gc = data.group_counts                                    # [A, E]
    replicas = [np.asarray(r, dtype=np.int64) for r in replicas]
    unit = max(gc.sum() / num_gpus, 1e-30)                    # flow unit: one source's demand
    tau = unit * float(np.mean(data.gpu_unit))                # time unit: serving it
    ya, ye, yt = _columns(data, gc, replicas, max_columns)
    ny = ya.size
    # Link loads through aggregates of the flows (``flowlinks``), defined by equality rows.
    fl = flow_links(data, ya, yt, form=links)
    nagg = fl.num_aggregates
    col_z, col_mu, col_x = ny + nagg, ny + nagg + 1, ny + nagg + 2
    ncol = ny + nagg + 3
    # Rows: demand (a, e) | aggregates | links | GPUs | hidden mu <= Z, X <= Z | objective.
    dem_key = ya * num_experts + ye
    dem_keys, y2d = np.unique(dem_key, return_inverse=True)
    ndem = dem_keys.size
    demand = gc.ravel()[dem_keys] / unit
    coef = (sp.vstack([fl.direct, fl.links]) * (unit / tau)).tocsc()           # (ny + nagg, K)
    is_link = np.diff(coef.indptr) > 0
    coef = coef[:, is_link]
    nlink = coef.shape[1]
    # GPU rows: y on its GPU's own row, or under --expert-tp 1 / t of it on every row of the
    # GPU's TP group (``workload.memory.expert_tp_rows``, the clock ``evaluate`` charges).
    pool = data.pool
    gpu_row = data.pooled_rows(yt)                                                       # [ny, pool]
    gpu = (data.gpu_unit[gpu_row] / pool * (unit / tau)).ravel()
    gpu_col = np.repeat(np.arange(ny), pool)
    exposed, hidden = data.schedule.exposed, data.schedule.hidden
    blocks = []
    r0 = 0
    blocks.append((y2d.ravel() + r0, np.arange(ny), np.ones(ny)))                # demand
    r0 += ndem
    agg = fl.of_flow.tocoo()
    blocks.append((agg.row + r0, agg.col, agg.data))                              # aggregates: +y
    blocks.append((np.arange(nagg) + r0, ny + np.arange(nagg), -np.ones(nagg)))   # aggregates: -v
    r0 += nagg
    blocks.append((gpu_row.ravel() + r0, gpu_col, gpu))                            # GPUs: y
    blocks.append((np.arange(num_gpus) + r0, np.full(num_gpus, col_x), -np.ones(num_gpus)))
    r0 += num_gpus
    blocks.append((np.array([r0, r0, r0 + 1, r0 + 1]), np.array([col_mu, col_z, col_x, col_z]),
                   np.array([hidden, -1.0, 1.0, -1.0])))
    r0 += 2
    row_obj = r0
    blocks.append((np.array([r0, r0]), np.array([col_mu, col_z]), np.array([exposed, 1.0])))
    r0 += 1
    rows = np.concatenate([b[0] for b in blocks])
    cols = np.concatenate([b[1] for b in blocks])
    vals = np.concatenate([b[2] for b in blocks])
    base = sp.csr_matrix((vals, (rows, cols)), shape=(r0, ncol))
    # Link rows: sum coef x - mu <= 0, one per link that any column loads.
    cc = coef.tocoo()
    link_rows = sp.csr_matrix((np.concatenate([cc.data, -np.ones(nlink)]),
                               (np.concatenate([cc.col, np.arange(nlink)]),
                                np.concatenate([cc.row, np.full(nlink, col_mu)]))), shape=(nlink, ncol))
    inf = np.inf
    row_lo = np.concatenate([demand, np.zeros(nagg), np.full(num_gpus + 3, -inf)])
    row_hi = np.concatenate([demand, np.zeros(nagg), np.zeros(num_gpus + 2), [inf]])
    cost = np.zeros(ncol)
    cost[col_mu], cost[col_z] = exposed, 1.0
    nnz = base.nnz + link_rows.nnz
    ipm = method == "ipm" or (method == "auto" and (ncol > _IPM_ABOVE or nnz > _IPM_ABOVE_NONZEROS))
    # The link rows in the LP (``_LAZY_ABOVE``): all, or those the nearest split loads most
    # first and the others where a solution overloads them.
    active = _lazy_links(data, replicas, is_link) if ipm and nlink > _LAZY_ABOVE else np.ones(nlink, dtype=bool)
    a = sp.vstack([base, link_rows[active]]).tocsc()
    num_active = int(active.sum())
    # (the aggregates of flows >= 0 are >= 0: every column has lower bound 0)
    lp = LP(cost, a, np.concatenate([row_lo, np.full(num_active, -inf)]),
            np.concatenate([row_hi, np.zeros(num_active)]), np.zeros(ncol), np.full(ncol, inf))
    if ipm:
        lp.h.setOptionValue("solver", "ipm")   # several times faster than simplex at this size
        lp.h.setOptionValue("run_crossover", "on" if crossover else "off")
    elif method == "simplex":
        lp.h.setOptionValue("solver", "simplex")

    def left() -> float | None:
        return None if time_limit is None else time_limit - (time.monotonic() - t0)

    def solve(limit: float | None, above: Callable[[], float] = lambda: inf) -> tuple[LPResult, bool]:
        """(result, stopped): the LP with every link row it needs, solved, checked against the
        rows left out, and solved again with those a solution overloads until none is; stopped
        early (True) where a relaxation's optimum, a lower bound, is above ``above``."""
        t_solve = time.monotonic()
        while True:
            out = lp.solve(limit if limit is None else max(limit - (time.monotonic() - t_solve), 0.0))
            if out.status != "optimal" or active.all():
                return out, False
            load = link_rows @ out.x                       # each link's time less mu
            if not np.any((load > _LAZY_TOL * max(out.objective, 1.0)) & ~active):
                return out, False
            if out.objective > above():
                return out, True
            # Interior point returns the centre of the optimal face, which the rows left out
            # cut (there are many optimal splits): take those near mu too, not only those above.
            over = (load > -_LAZY_MARGIN * out.x[col_mu]) & ~active
            lp.add_rows(link_rows[over], np.full(int(over.sum()), -inf), np.zeros(int(over.sum())))
            active[over] = True
            if limit is not None and time.monotonic() - t_solve >= limit:
                return replace(out, status="time_limit"), False

    # A first stage whose relaxation is above the plan in hand (``worth_below``) is not solved on.
    def above() -> float:
        return (worth_below() if callable(worth_below) else worth_below) * (1 + _WORTH_TIE) / tau

    res, stopped = solve(left(), above) if left() is None or left() > 0 else (None, False)
    if ipm and not crossover and res is not None and res.status == "error" and (left() is None or left() > 0):
        lp.h.setOptionValue("run_crossover", "on")   # imprecise without a vertex: take one
        res, stopped = solve(left(), above)
    if res is None or res.status != "optimal":
        # Out of time (or numerical trouble): a feasible split that uses no LP.
        return split_result(data, nearest_split(data, replicas), status="time_limit" if res is None else res.status,
                            seconds=time.monotonic() - t0)
    x, best = res.x, exposed * res.x[col_mu] + res.x[col_z]
    if stopped:
        y = np.maximum(x[:ny], 0.0) * unit
        return split_result(data, _prune(data, _to_layer(data, replicas, ya, ye, yt, y)), status="above",
                            seconds=time.monotonic() - t0)
    # Under a time limit the tie-break, a preference, may not take the time of the plans after
    # this one (on 512 GPUs dual simplex spent 10x the first stage's time on it).
    stage1 = time.monotonic() - t0
    worth = best <= above()
    if tie_break and worth and nlink and (left() is None or left() > 0.1):
        lp.set_row_bounds([row_obj], [-inf], [best * (1 + _STAGE2_SLACK) + 1e-12])
        c2 = np.zeros(ncol)
        c2[col_mu] = 1.0
        lp.set_cost(c2)
        res2, _ = solve(None if left() is None else min(left(), max(1.0, _TIE_BREAK_SHARE * stage1)))
        if res2.status == "optimal":
            x = res2.x
    y = np.maximum(x[:ny], 0.0) * unit
    layer = _prune(data, _to_layer(data, replicas, ya, ye, yt, y))
    return split_result(data, layer, status="optimal", seconds=time.monotonic() - t0)


def _lazy_links(data: LayerData, replicas: list[np.ndarray], is_link: np.ndarray) -> np.ndarray:
    """bool[nlink] the link rows an LP starts with (``_LAZY_SHARE``): the links (of those
    ``is_link`` keeps) on which the nearest split puts at least that share of its busiest one's
    time."""
    flows = nearest_split(data, replicas).flows(data.counts)
    times = data.link_times(flows)[data.lm.kept][is_link]
    return times >= _LAZY_SHARE * float(times.max(initial=0.0))


def split_bound(data: LayerData, replicas: list[np.ndarray]) -> float:
    """Seconds: no split of ``replicas`` serves this layer faster (the split LP's optimum is at
    least this), so a placement whose bound is above a plan in hand need not be split.

    GPU part: the experts of a set S are served on the GPUs holding them, so the busiest of
    those serves at least load(S) / sum over them of 1 / gpu_unit; S runs over every single
    expert and the prefixes of the experts by load / capacity of their replicas. Link part: a
    source's assignments to experts its GPU (its node, the nodes under a fabric switch) does not
    hold leave that set and come back, 2b bytes each way: over the set's exit links, over its
    entry links (``bounds.cut_bound``'s cuts with the placement's own unavoidable traffic).
    Combined by the schedule, which grows with both. Under ``--expert-tp`` (``data.pool`` > 1)
    the GPU part counts a TP group's ranks as holding every expert the group holds.
    """

    num_gpus, num_experts = data.num_gpus, data.num_experts
    held = np.zeros((num_gpus, num_experts), dtype=bool)               # [G, E]
    for e, ranks in enumerate(replicas):
        held[np.asarray(ranks, dtype=np.int64), e] = True
    speed = 1.0 / data.gpu_unit                                        # [G] assignments/s
    load = data.counts.sum(axis=0)                                     # [E]
    # Under --expert-tp every rank of a group that holds e computes e's rows (1 / t each): a
    # group serves at most its ranks' summed speed, as one GPU holding all its experts would.
    computes = tp_group_sum(held.T, data.pool).T > 0 if data.pool > 1 else held
    cap = computes.T.astype(np.float64) @ speed                        # [E]
    gpu = float((load / cap).max(initial=0.0))
    covered = np.zeros(num_gpus, dtype=bool)
    total = 0.0
    for e in np.argsort(-(load / cap), kind="stable"):
        covered |= computes[:, e]
        total += float(load[e])
        gpu = max(gpu, total / float(speed[covered].sum()))
    b2 = 2.0 * data.bytes_per_assignment
    cuts = _cuts(data.lm.topology)
    # Per GPU: a source's assignments to experts its own GPU lacks (its own links).
    away = (data.counts * ~held).sum(axis=1)                           # [G]
    link = _cut_time(b2 * away[:cuts.gpu_caps.shape[0]], cuts.gpu_caps)
    # Per node and per set of nodes under a fabric switch: the experts none of its GPUs holds.
    if cuts.members.shape[0]:
        node_held = (cuts.onehot @ held) > 0                           # [N, E]
        node_demand = cuts.onehot @ data.counts                        # [N, E]
        set_held = (cuts.members @ node_held) > 0                      # [C, E]
        unavoidable = ((cuts.members @ node_demand) * ~set_held).sum(axis=1)   # [C]
        link = max(link, _cut_time(b2 * unavoidable, cuts.set_caps))
    return float(data.schedule.moe_time(link, gpu))


@dataclass
class _Cuts:
    """A topology's cut sets for ``split_bound``: GPUs, nodes and the nodes under each switch."""

    gpu_caps: np.ndarray   # float64[G, 2] bytes/s of each GPU's own exit and entry links
    onehot: np.ndarray     # float64[N, G] node of each GPU
    members: np.ndarray    # float64[C, N] nodes of each cut set (``bounds.cut_sets``)
    set_caps: np.ndarray   # float64[C, 2] exit and entry bytes/s of each set


_CUTS: dict[int, tuple[object, _Cuts]] = {}


def _cuts(topo) -> _Cuts:
    """``_Cuts`` of ``topo``, built once per topology (its links are walked in Python)."""
    from epplan.placement.bounds import _gpu_caps, cut_sets

    hit = _CUTS.get(id(topo.paths))
    if hit is not None and hit[0] is topo.paths:
        return hit[1]
    num_gpus = topo.num_gpus
    node = np.asarray(topo.gpu_node)
    num_nodes = int(node.max()) + 1
    onehot = np.zeros((num_nodes, num_gpus))
    onehot[node, np.arange(num_gpus)] = 1.0
    sets = cut_sets(topo)
    members = np.zeros((len(sets), num_nodes))
    for i, (nodes, _, _) in enumerate(sets):
        members[i, nodes] = 1.0
    gpu_caps = np.array(_gpu_caps(topo), dtype=np.float64).reshape(-1, 2) if num_gpus > 1 else np.zeros((0, 2))
    cuts = _Cuts(gpu_caps=gpu_caps, onehot=onehot, members=members,
                 set_caps=np.array([[e, n] for _, e, n in sets], dtype=np.float64).reshape(-1, 2))
    _CUTS.clear()
    _CUTS[id(topo.paths)] = (topo.paths, cuts)
    return cuts


def _cut_time(nbytes: np.ndarray, caps: np.ndarray) -> float:
    """Seconds: the largest of nbytes[i] over caps[i, 0] (exit) and caps[i, 1] (entry), 0 where a cap is 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        times = np.where(caps > 0, nbytes[:, None] / np.where(caps > 0, caps, 1.0), 0.0)
    return float(times.max(initial=0.0))


def split_result(data: LayerData, layer: LayerPlacement, *, status: str = "given",
                 seconds: float = 0.0) -> SplitResult:
    """Score ``layer`` as it is (every link, as ``evaluate`` does): the reported numbers are
    what the final splits cost, not the LP's Z (the tie-break may leave Z up to
    _STAGE2_SLACK above the realised maximum)."""
    bottleneck, link_time, _ = data.time_of(layer.flows(data.counts))
    return SplitResult(layer=layer, bottleneck=bottleneck, link_time=link_time, status=status,
                       seconds=seconds)


def nearest_split(data: LayerData, replicas: list[np.ndarray]) -> LayerPlacement:
    """A split without an LP: each source sends to its own GPU if it holds the expert, else
    evenly to the replicas on its node, else evenly to all replicas."""
    node = data.lm.gpu_node
    gpus = np.arange(data.num_gpus)
    split = []
    for ranks in replicas:
        ranks = np.asarray(ranks, dtype=np.int64)
        own = ranks[None, :] == gpus[:, None]                               # [G, R_e]
        local = node[ranks][None, :] == node[:, None]
        pick = np.where(own.any(axis=1, keepdims=True), own,
                        np.where(local.any(axis=1, keepdims=True), local, True)).astype(np.float64)
        split.append(pick / pick.sum(axis=1, keepdims=True))
    return LayerPlacement([np.asarray(r, dtype=np.int64) for r in replicas], split)


def _prune(data: LayerData, layer: LayerPlacement) -> LayerPlacement:
    """Drop replicas that serve nothing (they would only cost memory and gradient sync), as long
    as every GPU keeps one expert and every expert one replica. Costs are unchanged."""
    served = [data.counts[:, e] @ split for e, split in enumerate(layer.split)]      # [R_e] each
    total = max(float(data.counts.sum()), 1e-30)
    held = np.bincount(np.concatenate(layer.replicas), minlength=data.num_gpus)
    replicas, splits = [], []
    for e, (ranks, split) in enumerate(zip(layer.replicas, layer.split)):
        keep = np.ones(ranks.size, dtype=bool)
        for j in np.argsort(served[e]):
            if served[e][j] > 1e-12 * total or keep.sum() == 1:
                break
            if held[ranks[j]] > 1:
                keep[j] = False
                held[ranks[j]] -= 1
        if keep.all():
            replicas.append(ranks)
            splits.append(split)
            continue
        sub = split[:, keep]
        rows = sub.sum(axis=1, keepdims=True)
        # A source that only sent (nothing) to dropped replicas: spread evenly over the rest.
        sub = np.where(rows > 0, sub / np.where(rows > 0, rows, 1.0), 1.0 / keep.sum())
        replicas.append(ranks[keep])
        splits.append(sub)
    return LayerPlacement(replicas, splits)


def _columns(data: LayerData, gc: np.ndarray, replicas: list[np.ndarray], max_columns: int):
    """(ya, ye, yt): the split LP's flow columns, group a -> replica on yt of expert ye.

    All (group, replica) pairs with demand when that is at most ``max_columns``. Otherwise a
    group keeps every replica on its own node, plus ``_REMOTE_PRESENT`` remote replicas of an
    expert its node holds (for balancing across nodes) or ``_REMOTE_ABSENT`` of one it does not,
    spaced evenly over the replica list from an offset that differs per group, so that the
    groups' remote traffic spreads over all replicas.
    """
    num_groups = gc.shape[0]
    full = sum(int(np.count_nonzero(gc[:, e])) * r.size for e, r in enumerate(replicas))
    ya, ye, yt = [], [], []
    if full <= max_columns:
        for e, ranks in enumerate(replicas):
            groups = np.flatnonzero(gc[:, e] > 0)
            ya.append(np.repeat(groups, ranks.size))
            ye.append(np.full(groups.size * ranks.size, e))
            yt.append(np.tile(ranks, groups.size))
        return np.concatenate(ya), np.concatenate(ye), np.concatenate(yt)
    node = data.lm.gpu_node
    group_node = np.zeros(num_groups, dtype=np.int64)
    group_node[data.group_of] = node
    for e, ranks in enumerate(replicas):
        rank_node = node[ranks]
        for a in np.flatnonzero(gc[:, e] > 0):
            local = ranks[rank_node == group_node[a]]
            remote = ranks[rank_node != group_node[a]]
            q = _REMOTE_PRESENT if local.size else _REMOTE_ABSENT
            if remote.size > q:
                pick = (a * 7919 + np.arange(q) * remote.size // q) % remote.size
                remote = remote[np.unique(pick)]
            chosen = np.concatenate([local, remote])
            ya.append(np.full(chosen.size, a))
            ye.append(np.full(chosen.size, e))
            yt.append(chosen)
    return np.concatenate(ya), np.concatenate(ye), np.concatenate(yt)


def _to_layer(data: LayerData, replicas: list[np.ndarray], ya, ye, yt, y) -> LayerPlacement:
    """Per-source splits from group flows: every source of group a uses a's fractions."""
    gc = data.group_counts
    node = data.lm.gpu_node
    split = []
    order = np.lexsort((yt, ya, ye))
    ya, ye, yt, y = ya[order], ye[order], yt[order], y[order]
    bounds = np.searchsorted(ye, np.arange(len(replicas) + 1))
    for e, ranks in enumerate(replicas):
        lo, hi = bounds[e], bounds[e + 1]
        share = np.zeros((gc.shape[0], ranks.size))
        idx = np.searchsorted(ranks, yt[lo:hi])
        np.add.at(share, (ya[lo:hi], idx), y[lo:hi])
        total = share.sum(axis=1, keepdims=True)
        has = total[:, 0] > 0
        share[has] /= total[has]
        rows = share[data.group_of]                                    # [G, R_e]
        # Sources without demand for e: any split costs nothing; prefer a replica on their node.
        idle = ~has[data.group_of]
        if idle.any():
            local = node[ranks][None, :] == node[:, None]               # [G, R_e]
            fallback = np.where(local.any(axis=1, keepdims=True), local, True).astype(np.float64)
            fallback /= fallback.sum(axis=1, keepdims=True)
            rows[idle] = fallback[idle]
        rows = np.where(rows < 1e-12, 0.0, rows)
        rows /= rows.sum(axis=1, keepdims=True)
        split.append(rows)
    return LayerPlacement([r.copy() for r in replicas], split)
