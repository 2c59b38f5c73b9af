"""The slow reference for the planner: every placement of a tiny layer, each with its best split.

Enumerates every way to give each GPU min(slots, E) distinct experts such that every expert has
a replica (a placement with a free slot is never better than the same placement with that slot
filled: a replica may receive no tokens), and for each solves the per-source split LP written
independently of the planner's code: path shares from ``PathModel.pair_fractions`` (the one
link map, checked in tests against a per-pair walk of the graph), every link (no dominance pruning), one split per source, dense matrices, ``scipy.optimize.linprog``, and
the layer's time under the problem's schedule (``epplan.schedule``) as exposed * mu + max(hidden
* mu, X) for the max link time mu and the max GPU time X. Under ``--expert-tp`` a GPU's time is
its TP group's rows / t (every rank of the group computes a 1 / t slice of each of them).

For tests only: the count of placements grows as C(E, slots)^G.

Shape legend: G = GPUs, E = experts.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import linprog

from epplan.placement.layer import gpu_slots
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import LayerPlacement


def brute_force(problem: PlacementProblem, layer: int = 0, *, max_placements: int = 20_000) -> tuple[float, LayerPlacement]:
    """(least layer time in seconds, a placement attaining it) of one MoE layer."""
    return brute_force_windows([problem], "mean", layer, max_placements=max_placements)


def brute_force_windows(problems: list[PlacementProblem], objective: str, layer: int = 0, *,
                        max_placements: int = 20_000) -> tuple[float, LayerPlacement]:
    """(least objective, a placement attaining it) of one MoE layer over several routing windows
    (``epplan.placement.robust``): problems alike but for their traffic; one split for all
    windows; ``mean`` or ``worst`` (max) of the windows' layer times."""
    problem = problems[0]
    topo = problem.topology
    windows = [np.asarray(p.traffic.counts[layer], dtype=np.float64) for p in problems]   # [G, E] each
    counts = windows[0]
    num_gpus, num_experts = counts.shape
    slots = np.minimum(gpu_slots(problem), num_experts)
    choices = [list(itertools.combinations(range(num_experts), int(k))) for k in slots]
    total = int(np.prod([len(c) for c in choices], dtype=np.float64))
    if total > max_placements:
        raise ValueError(f"{total} placements: too many for the brute force")
    b = float(problem.bytes_per_assignment)
    cap = np.asarray(topo.link_capacity, dtype=np.float64) * 1e9
    unit = problem.expert_flops_per_assignment / np.asarray(problem.gpu_flops)
    pool = problem.tp if problem.expert_tp else 1
    # seconds on every link per assignment s -> t (dispatch + combine, fwd + bwd)
    pair = np.zeros((num_gpus, num_gpus, topo.num_links))
    for s in range(num_gpus):
        for t in range(num_gpus):
            if s != t:
                for l, f in topo.paths.pair_fractions(s, t).items():
                    pair[s, t, l] += f
    pair = (pair + pair.transpose(1, 0, 2)) * 2.0 * problem.exchange_scale * b / cap
    best = (np.inf, None)
    for held in itertools.product(*choices):
        replicas = [np.array([g for g in range(num_gpus) if e in held[g]]) for e in range(num_experts)]
        if any(r.size == 0 for r in replicas):
            continue
        value, split = _split_lp(windows, replicas, pair, unit, problem.schedule, objective, pool)
        if value < best[0] - 1e-15:
            best = (value, LayerPlacement(replicas, split))
    return best


def _split_lp(windows: list[np.ndarray], replicas: list[np.ndarray], pair: np.ndarray, unit: np.ndarray,
              schedule, objective: str, pool: int = 1):
    """Over per-source split shares f[s, e, r] >= 0 with sum_r f = 1, window w's flows
    counts_w[s, e] f[s, e, r]: links <= mu_w, GPUs <= X_w (GPU g: the rows served in its group of
    ``pool`` consecutive ranks / pool), hidden mu_w <= z_w, X_w <= z_w; minimise
    the mean of exposed mu_w + z_w (``mean``) or v >= every window's (``worst``)."""
    num_gpus, num_experts = windows[0].shape
    num_w = len(windows)
    num_links = pair.shape[2]
    cols = [(s, e, t) for s in range(num_gpus) for e in range(num_experts) for t in replicas[e]]
    nf = len(cols)
    n = nf + 3 * num_w + 1                                     # f..., (mu, X, z) per window, v
    scale = max(float(np.mean([c.sum() for c in windows])) / num_gpus, 1e-30)
    tscale = scale * float(unit.mean())
    a_eq = np.zeros((num_gpus * num_experts, n))
    b_eq = np.ones(num_gpus * num_experts)
    rows_w = num_links + num_gpus + 2 + (1 if objective == "worst" else 0)
    a_ub = np.zeros((num_w * rows_w, n))
    for j, (s, e, t) in enumerate(cols):
        a_eq[s * num_experts + e, j] = 1.0
    for w, counts in enumerate(windows):
        r0, mu, x, z = w * rows_w, nf + 3 * w, nf + 3 * w + 1, nf + 3 * w + 2
        for j, (s, e, t) in enumerate(cols):
            a_ub[r0:r0 + num_links, j] = pair[s, t] * counts[s, e] / tscale
            for g in range(t - t % pool, t - t % pool + pool):
                a_ub[r0 + num_links + g, j] = unit[g] * counts[s, e] / pool / tscale
        a_ub[r0:r0 + num_links, mu] = -1.0
        a_ub[r0 + num_links:r0 + num_links + num_gpus, x] = -1.0
        a_ub[r0 + num_links + num_gpus, [mu, z]] = schedule.hidden, -1.0
        a_ub[r0 + num_links + num_gpus + 1, [x, z]] = 1.0, -1.0
        if objective == "worst":
            a_ub[r0 + rows_w - 1, [mu, z, n - 1]] = schedule.exposed, 1.0, -1.0
    c = np.zeros(n)
    if objective == "worst":
        c[-1] = 1.0
    else:
        for w in range(num_w):
            c[nf + 3 * w], c[nf + 3 * w + 2] = schedule.exposed / num_w, 1.0 / num_w
    # Rows without demand (a source that never routes to e) still need their shares to sum to 1.
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(a_ub.shape[0]), A_eq=a_eq, b_eq=b_eq,
                  bounds=[(0, None)] * n, method="highs")
    assert res.status == 0, res.message
    f = res.x[:nf]
    split = []
    for e, ranks in enumerate(replicas):
        sh = np.zeros((num_gpus, ranks.size))
        for j, (s, ee, t) in enumerate(cols):
            if ee == e:
                sh[s, int(np.searchsorted(ranks, t))] += f[j]
        tot = sh.sum(axis=1, keepdims=True)
        sh = np.where(tot > 0, sh / np.where(tot > 0, tot, 1.0), 1.0 / ranks.size)
        split.append(sh)
    return float(res.fun * tscale), split
