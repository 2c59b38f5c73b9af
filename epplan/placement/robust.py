"""Plans that hold over several routing windows, and plans that move little from an old one.
Pure, like ``solve``: no files, no printing.

Shape legend: W = routing windows, L = MoE layers, C = candidate plans, G = ranks, E = experts.

Objective. Routing drifts, so a plan is scored on W windows (each its own ``PlacementProblem``,
the same cluster, model and run settings, another traffic): t[w, l] is layer l's MoE time on
window w (``Cost.moe_time_s``, the planner's objective, with the plan's one split for every
window, as the runtime follows it). ``mean`` minimises sum_l mean_w t[w, l] (the mean step);
``worst`` minimises sum_l max_w t[w, l] (every layer's worst window; an upper bound of the worst
window's step, and the objective that separates over layers).

Method (candidates, then an exact choice per layer):

1. candidates: ``solve`` on the windows' mean traffic (``base``), and when there are several, on
   each window alone and on their envelope (every count at its largest over the windows); with an OLD plan also OLD itself (nothing moves) and every candidate
   relabelled toward OLD (``align``: nodes of one type matched, then GPUs inside them, by the
   most experts kept in place; a relabelling the cost function re-scores, exact or not);
2. every candidate scored on every window by ``evaluate`` (exact);
3. per layer the candidate with the least objective, plus ``move_weight`` x the predicted seconds
   of moving that layer from OLD (``epplan.cost.migration``; layers' seconds added, an upper
   bound of moving them together), under ``max_move_bytes`` for all layers together (a
   multiple-choice knapsack, exact by dynamic programming over the number of replicas moved:
   every move carries the same bytes); ties go to the plan that moves less;
4. the chosen layers that came from OLD or a relabelling re-split by the split LP on ``base``
   (same replicas, so the same moves), kept where that lowers the objective.

Bounds stay valid for the objective. For any plan, t[w, l] >= b[w, l], window w's lower bound
from its own solve, so mean_w t >= mean_w b and max_w t >= max_w b; and the layer time of a fixed
plan is convex in the traffic (link loads and GPU loads are linear in it, the schedule's A / C +
max(A (C - 1) / C, X) and A + X are convex and increasing), so mean_w t[w, l] >= the layer's time
on the mean traffic >= ``base``'s bound. Each layer's bound is the larger of the two; a move budget
only shrinks the set of plans, so it stays a bound.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Literal, get_args

import numpy as np
import scipy.sparse as sp
from scipy.optimize import linear_sum_assignment

from epplan.cost import evaluate
from epplan.cost.migration import plan_migration, replica_bytes
from epplan.errors import param, PlacementError
from epplan.placement.problem import PlacementProblem
from epplan.placement.solve import solve
from epplan.placement.types import LayerPlacement, Placement, SolverInfo

Objective = Literal["mean", "worst"]
OBJECTIVES: tuple[Objective, ...] = get_args(Objective)
_TIE = 1e-9  # relative: objectives this close are equal, the plan that moves less wins


def window_problems(base: PlacementProblem, windows: list) -> list[PlacementProblem]:
    """``base`` with each window's ``Traffic`` in place of its own."""
    return [dataclasses.replace(base, traffic=w) for w in windows]


def envelope_problem(base: PlacementProblem, windows: list[PlacementProblem]) -> PlacementProblem:
    """``base`` on the envelope of the windows: every (layer, source, expert) at its largest
    count over them, a candidate that provisions every window's hot experts at once."""
    from epplan.workload.traffic import Traffic

    counts = np.max([w.traffic.counts for w in windows], axis=0)
    return dataclasses.replace(base, traffic=Traffic(counts, f"envelope of {len(windows)} windows"))


def window_times(placement: Placement, problems: list[PlacementProblem]) -> np.ndarray:
    """float64[W, L]: each layer's MoE time (``Cost.moe_time_s``) on each window."""
    return np.stack([evaluate(placement, p).moe_time_s for p in problems])


def combine(times: np.ndarray, objective: str) -> np.ndarray:
    """float64[L]: the objective per layer from times[W, L]."""
    if objective not in OBJECTIVES:
        raise PlacementError(f"{param('objective', repr(objective))}: use {' or '.join(OBJECTIVES)}")
    return times.mean(axis=0) if objective == "mean" else times.max(axis=0)


def solve_robust(base: PlacementProblem, windows: list[PlacementProblem], *, objective: str = "mean",
                 old: Placement | None = None, max_move_bytes: float | None = None,
                 move_weight: float = 0.0, solver: str = "highs", time_limit: float | None = 120.0,
                 gap: float = 0.01, workers: int | None = None,
                 solve_fn: Callable[..., Placement] = solve) -> Placement:
    """The plan of least ``objective`` over ``windows`` (module docstring).

    base:           the problem on the windows' mean traffic (what the manifest records).
    windows:        one problem per window (``window_problems``); [base] for a single window.
    old:            the plan in force, if any: moves from it are counted, limited and charged.
    max_move_bytes: at most this many bytes moved, all layers together (needs ``old``).
    move_weight:    objective seconds charged per predicted second of moving (e.g. 1 / the
                    steps the plan will run, to spread the move over them; needs ``old``).
    time_limit:     wall seconds for all the solves together, shared evenly.
    """
    combine(np.zeros((1, 1)), objective)  # checks the name
    if old is None and (max_move_bytes is not None or move_weight):
        raise PlacementError(f"{param('max_move_bytes')} and a move cost need the plan in force ({param('old')})")
    if max_move_bytes is not None and not max_move_bytes >= 0:
        raise PlacementError(f"{param('max_move_bytes')} must be >= 0, got {max_move_bytes}")
    if not move_weight >= 0:
        raise PlacementError(f"the move weight must be >= 0, got {move_weight}")
    start = time.monotonic()
    several = len(windows) > 1
    targets = [base] + (windows + [envelope_problem(base, windows)] if several else [])
    share = None if time_limit is None else time_limit / len(targets)
    solved = [solve_fn(p, solver=solver, time_limit=share, gap=gap, workers=workers) for p in targets]
    num_layers = base.num_layers
    # names[c][l]: where candidate c's layer l came from (Placement.info's "start").
    names = [[n] * num_layers for n in
             ["mean" if several else "plan"]
             + ([f"window {w}" for w in range(len(windows))] + ["envelope"] if several else [])]
    candidates = list(solved)
    if old is not None:
        aligned = [align(old, c, base) for c in solved]
        candidates += [old] + aligned
        names += [["in force"] * num_layers] + [[f"{n}, relabelled" for n in row] for row in names[:len(solved)]]
    times = np.stack([window_times(c, windows) for c in candidates])        # [C, W, L]
    score = np.stack([combine(t, objective) for t in times])                 # [C, L]
    moves = np.zeros_like(score, dtype=np.int64)
    move_s = np.zeros_like(score)
    if old is not None:
        per = replica_bytes(base.config)
        for c, cand in enumerate(candidates):
            mig = plan_migration(old, cand, base)
            moves[c] = np.rint(mig.bytes_per_layer(num_layers) / per).astype(np.int64)
            move_s[c] = mig.seconds_per_layer(base)
    value = score + move_weight * move_s
    if several or old is not None:
        # Splits made for one window (or for OLD's routing) rarely suit all: the best few
        # candidates of each layer re-split by the LP over every window join the candidates.
        deadline = None if time_limit is None else start + time_limit
        extra = _resplit_best(candidates, value, windows, objective, deadline)
        for order, placement in extra:
            candidates.append(placement)
            names.append([f"{names[c][li]}, re-split" for li, c in enumerate(order)])
            score = np.vstack([score, combine(window_times(placement, windows), objective)[None]])
            moves = np.vstack([moves, moves[order, np.arange(num_layers)][None]])
            move_s = np.vstack([move_s, move_s[order, np.arange(num_layers)][None]])
            value = score + move_weight * move_s
    budget = None
    if max_move_bytes is not None:
        budget = int(np.floor(max_move_bytes / replica_bytes(base.config) + 1e-9))
    choice = _choose(value, moves, budget)
    layers = [candidates[c].layers[li] for li, c in enumerate(choice)]
    plan = Placement(base.num_gpus, base.num_experts, layers, method="ilp")
    final = window_times(plan, windows)
    plan.info = _summary(solved, several, final, objective, choice, names, gap, time_limit,
                         time.monotonic() - start, solver)
    if old is not None:
        mig = plan_migration(old, plan, base)
        plan.info["migration"] = {"moves": mig.num_moves, "bytes_moved": mig.bytes_moved,
                                  "seconds": mig.seconds, "max_move_bytes": max_move_bytes,
                                  "move_weight": move_weight}
    return plan


def _resplit_best(candidates: list[Placement], value: np.ndarray, windows: list[PlacementProblem],
                  objective: str, deadline: float | None, best: int = 2) -> list[tuple[np.ndarray, Placement]]:
    """For j < ``best``: the placement whose layer l is the j-th best candidate of layer l (by
    value[C, L]) re-split by ``robust_splits``, with int64[L] the candidate each layer came from."""
    base = windows[0]
    num_c, num_layers = value.shape
    ranked = np.argsort(value, axis=0, kind="stable")                       # [C, L]
    out = []
    for j in range(min(best, num_c)):
        order = ranked[j]
        layers = []
        for li in range(num_layers):
            left = None if deadline is None else max(
                0.5, (deadline - time.monotonic()) / ((min(best, num_c) - j) * num_layers - li))
            own = candidates[int(order[li])].layers[li]
            got = robust_splits(windows, li, own.replicas, objective, time_limit=left)
            layers.append(own if got is None else got)
        out.append((order, Placement(base.num_gpus, base.num_experts, layers)))
    return out


def robust_splits(problems: list[PlacementProblem], layer: int, replicas: list[np.ndarray], objective: str, *,
                  time_limit: float | None = None) -> LayerPlacement | None:
    """The split of ``replicas`` (one layer) of least ``objective`` over the windows, or None
    when the LP did not finish (or the layer is too large for per-source splits).

    One LP, the split LP of ``splits.py`` with its shares shared by W windows: variables
    f[s, e, t] >= 0 (source s's share of expert e served on t, sum_t f = 1), per window
    Y_w[s, t] = sum_e n_w[s, e] f[s, e, t], links sum coef Y_w <= mu_w, GPUs gpu_unit Y_w <= X_w
    (under ``--expert-tp`` a GPU's row holds 1 / t of its TP group's Y_w, as ``evaluate`` charges),
    hidden mu_w <= z_w, X_w <= z_w; minimise mean_w (exposed mu_w + z_w), or v >= each of them.
    Per-source (exact) only: above ``layer.SINGLE_SOURCE_COLUMNS`` it returns None.
    """
    from epplan.placement.layer import layer_data
    from epplan.placement.lp import LP
    from epplan.placement.splits import nearest_split

    windows = [np.asarray(p.traffic.counts[layer], dtype=np.float64) for p in problems]    # [G, E] each
    data = layer_data(problems[0], windows[0])
    if not np.array_equal(data.group_of, np.arange(data.num_gpus)):
        return None
    g, num_w = data.num_gpus, len(windows)
    demand = np.max(windows, axis=0)                                                      # [G, E]
    cols = [(s, e, t) for e, ranks in enumerate(replicas) for s in np.flatnonzero(demand[:, e] > 0)
            for t in ranks]
    if not cols:
        return None
    fs, fe, ft = (np.array(c, dtype=np.int64) for c in zip(*cols))
    nf = fs.size
    pair = fs * g + ft
    pairs, f2p = np.unique(pair, return_inverse=True)
    npair = pairs.size
    coef = data.coef()[pairs].tocsc()                      # (npair, K) seconds per assignment
    coef = coef[:, np.diff(coef.indptr) > 0]
    nlink = coef.shape[1]
    unit = max(float(np.mean([c.sum() for c in windows])) / g, 1e-30)
    tau = unit * float(np.mean(data.gpu_unit))
    dem_key = fs * data.num_experts + fe
    dem_keys, f2d = np.unique(dem_key, return_inverse=True)
    ndem = dem_keys.size
    exposed, hidden = data.schedule.exposed, data.schedule.hidden
    # Columns: f | per window (Y_w [npair], mu_w, X_w, z_w) | v.
    wcols = npair + 3
    ncol = nf + num_w * wcols + 1
    col_v = ncol - 1
    blocks = [(f2d, np.arange(nf), np.ones(nf))]            # demand rows: sum_t f = 1
    r0 = ndem
    cc = coef.tocoo()
    # GPU rows: Y on t's row, or under --expert-tp 1 / t of it on each row of t's TP group
    pool = data.pool
    gpu_row = data.pooled_rows(pairs % g)                                            # [npair, pool]
    gpu = (data.gpu_unit[gpu_row] / pool * unit / tau).ravel()
    for w, counts in enumerate(windows):
        c0 = nf + w * wcols
        mu, x, z = c0 + npair, c0 + npair + 1, c0 + npair + 2
        blocks.append((f2p + r0, np.arange(nf), counts[fs, fe] / unit))                 # aux: +n f
        blocks.append((np.arange(npair) + r0, c0 + np.arange(npair), -np.ones(npair)))  # aux: -Y
        r0 += npair
        blocks.append((cc.col + r0, c0 + cc.row, cc.data * unit / tau))                  # links
        blocks.append((np.arange(nlink) + r0, np.full(nlink, mu), -np.ones(nlink)))
        r0 += nlink
        blocks.append((gpu_row.ravel() + r0, np.repeat(c0 + np.arange(npair), pool), gpu))   # GPUs
        blocks.append((np.arange(g) + r0, np.full(g, x), -np.ones(g)))
        r0 += g
        blocks.append((np.array([r0, r0, r0 + 1, r0 + 1]), np.array([mu, z, x, z]),
                       np.array([hidden, -1.0, 1.0, -1.0])))
        r0 += 2
        if objective == "worst":
            blocks.append((np.array([r0, r0, r0]), np.array([mu, z, col_v]), np.array([exposed, 1.0, -1.0])))
            r0 += 1
    rows = np.concatenate([b[0] for b in blocks])
    cols_ = np.concatenate([b[1] for b in blocks])
    vals = np.concatenate([b[2] for b in blocks])
    a = sp.csc_matrix((vals, (rows, cols_)), shape=(r0, ncol))
    row_lo = np.full(r0, -np.inf)
    row_hi = np.zeros(r0)
    row_lo[:ndem], row_hi[:ndem] = 1.0, 1.0
    for w in range(num_w):  # aux rows are equalities
        start = ndem + w * (npair + nlink + g + 2 + (objective == "worst"))
        row_lo[start:start + npair] = 0.0
    cost = np.zeros(ncol)
    if objective == "worst":
        cost[col_v] = 1.0
    else:
        for w in range(num_w):
            c0 = nf + w * wcols
            cost[c0 + npair], cost[c0 + npair + 2] = exposed / num_w, 1.0 / num_w
    lp = LP(cost, a, row_lo, row_hi, np.zeros(ncol), np.full(ncol, np.inf))
    res = lp.solve(time_limit)
    if res.status != "optimal":
        return None
    f = np.maximum(res.x[:nf], 0.0)
    fallback = nearest_split(data, replicas)
    split = []
    for e, ranks in enumerate(replicas):
        sh = fallback.split[e].copy()
        sel = fe == e
        if sel.any():
            got = np.zeros((g, ranks.size))
            np.add.at(got, (fs[sel], np.searchsorted(ranks, ft[sel])), f[sel])
            has = got.sum(axis=1) > 0
            sh[has] = got[has] / got[has].sum(axis=1, keepdims=True)
        split.append(sh)
    return LayerPlacement([np.asarray(r, dtype=np.int64).copy() for r in replicas], split)


def _choose(value: np.ndarray, moves: np.ndarray, budget: int | None) -> list[int]:
    """Per layer the candidate of least value[c, l] with sum_l moves[c_l, l] <= budget (None: no
    limit); ties (within _TIE) to fewer moves. Exact: a DP over the replicas moved."""
    num_c, num_layers = value.shape
    scale = max(float(np.abs(value).max(initial=0.0)), 1e-30)
    # Lexicographic: value first, then moves (a tie-break far below any real difference).
    key = value + _TIE * scale * moves / max(1, int(moves.max(initial=0)) + 1)
    if budget is None or moves.max(axis=0).sum() <= budget:
        return [int(np.argmin(key[:, li])) for li in range(num_layers)]
    if moves.min(axis=0).sum() > budget:  # cannot happen with OLD among the candidates (0 moves)
        raise PlacementError(f"{param('max_move_bytes')} allows {budget} replicas moved, every plan moves more")
    inf = np.inf
    best = np.full(budget + 1, inf)
    best[0] = 0.0
    back = np.zeros((num_layers, budget + 1), dtype=np.int64)
    for li in range(num_layers):
        nxt = np.full(budget + 1, inf)
        for c in range(num_c):
            m = int(moves[c, li])
            if m > budget:
                continue
            cand = np.full(budget + 1, inf)
            cand[m:] = best[:budget + 1 - m] + key[c, li]
            better = cand < nxt
            nxt[better] = cand[better]
            back[li, better] = c
        best = nxt
    used = int(np.argmin(best))
    choice = [0] * num_layers
    for li in range(num_layers - 1, -1, -1):
        c = int(back[li, used])
        choice[li] = c
        used -= int(moves[c, li])
    return choice


def align(old: Placement, new: Placement, problem: PlacementProblem) -> Placement:
    """``new`` with its ranks relabelled so that as many replicas as possible stay where ``old``
    has them: per layer, nodes of one type and size matched (most experts in common), then the
    GPUs of each matched pair (most experts in common), both by ``linear_sum_assignment``. The
    sources move with their GPUs (split rows follow the relabelling)."""
    layers = [_align_layer(lo, ln, problem) for lo, ln in zip(old.layers, new.layers)]
    return Placement(new.num_ranks, new.num_experts, layers, method=new.method)


def _align_layer(old: LayerPlacement, new: LayerPlacement, problem: PlacementProblem) -> LayerPlacement:
    topo = problem.topology
    g, e = problem.num_gpus, problem.num_experts
    gpu_node = np.asarray(topo.gpu_node)
    held_old, held_new = np.zeros((g, e)), np.zeros((g, e))
    for x, layer in ((held_old, old), (held_new, new)):
        for ex, ranks in enumerate(layer.replicas):
            x[np.asarray(ranks), ex] = 1.0
    num_nodes = topo.num_nodes
    by_node_old = np.zeros((num_nodes, e))
    by_node_new = np.zeros((num_nodes, e))
    np.add.at(by_node_old, gpu_node, held_old)
    np.add.at(by_node_new, gpu_node, held_new)
    overlap = np.minimum(by_node_new[:, None, :], by_node_old[None, :, :]).sum(axis=2)   # [N, N]
    ranks_of = [np.flatnonzero(gpu_node == n) for n in range(num_nodes)]
    kind = [(topo.node_types[n], ranks_of[n].size) for n in range(num_nodes)]
    alike = np.array([[kind[a] == kind[b] for b in range(num_nodes)] for a in range(num_nodes)])
    big = float(g * e + 1)
    rows, cols = linear_sum_assignment(np.where(alike, -overlap, big))
    perm = np.arange(g)                     # new rank -> relabelled rank
    for a, b in zip(rows, cols):
        if not alike[a, b]:                 # no same-kind match left: keep the node as it is
            continue
        ra, rb = ranks_of[a], ranks_of[b]
        common = held_new[ra] @ held_old[rb].T                                             # [n, n]
        i, j = linear_sum_assignment(-common)
        perm[ra[i]] = rb[j]
    if np.unique(perm).size != g:           # a partial match collided: keep new as it is
        return new
    return relabel_ranks(new, perm)


def relabel_ranks(layer: LayerPlacement, perm: np.ndarray) -> LayerPlacement:
    """``layer`` with rank g renamed perm[g] (perm: int64[G], a permutation): replicas move to
    the new names, and so do the sources' split rows."""
    replicas, split = [], []
    for ranks, sp in zip(layer.replicas, layer.split):
        mapped = perm[np.asarray(ranks)]
        order = np.argsort(mapped)
        s = np.empty_like(sp)
        s[perm] = sp
        replicas.append(mapped[order])
        split.append(s[:, order])
    return LayerPlacement(replicas, split)


def _summary(solved: list[Placement], several: bool, final: np.ndarray, objective: str, choice: list[int],
             names: list[str], gap: float, time_limit, seconds: float, solver: str) -> SolverInfo:
    """``Placement.info`` of a robust plan, in ``solve``'s layout (per-layer rows and totals)."""
    score = combine(final, objective)
    base_layers = solved[0].info["layers"]
    bounds = np.array([row["bound_s"] for row in base_layers], dtype=np.float64)
    if several:
        per_window = np.array([[row["bound_s"] for row in s.info["layers"]] for s in solved[1:-1]])
        bounds = np.maximum(bounds, combine(per_window, objective))
    statuses = [row["status"] for s in solved for row in s.info["layers"]]
    layers = []
    for li, value in enumerate(score):
        b = min(float(bounds[li]), float(value))
        layer_gap = 0.0 if value <= 0 else (float(value) - b) / float(value)
        status = ("optimal" if layer_gap <= 1e-6 else "gap_met" if layer_gap <= gap else "gap_open")
        layers.append({"layer": li, "status": status, "objective_s": float(value), "bound_s": b,
                       "bound_source": base_layers[li]["bound_source"], "gap": layer_gap,
                       "link_s": base_layers[li]["link_s"], "seconds": None, "start": names[choice[li]][li],
                       "same_as": None})
    total, bound = float(score.sum()), float(sum(r["bound_s"] for r in layers))
    worst = max(r["gap"] for r in layers)
    status = ("time_limit" if "time_limit" in statuses else "optimal" if worst <= 1e-6
              else "gap_met" if worst <= gap else "gap_open")
    return {"solver": solver, "status": status, "objective": objective, "num_windows": int(final.shape[0]),
            "objective_s": total, "bound_s": bound, "gap": worst,
            "total_gap": 0.0 if total <= 0 else (total - bound) / total, "gap_target": gap,
            "time_limit_s": time_limit, "seconds": seconds, "layers": layers,
            "window_objective_s": [float(v) for v in final.sum(axis=1)]}
