"""The slow reference for the planner: every placement of a tiny layer, each with its best split.

Enumerates every way to give each GPU min(slots, E) distinct experts such that every expert has
a replica (a placement with a free slot is never better than the same placement with that slot
filled: a replica may receive no tokens), and for each solves the per-source split LP written
independently of the planner's code: path shares from ``PathModel.pair_fractions`` (the one
link map, checked in tests against a per-pair walk of the graph), every link (no dominance pruning), one split per source, dense matrices, ``scipy.optimize.linprog``, and
the layer's time under the problem's schedule (``epplan.schedule``) as exposed * mu + max(hidden
* mu, X) for the max link time mu and the max GPU time X.

For tests only: the count of placements grows as C(E, slots)^G.

Shape legend: G = GPUs, E = experts.
"""

from __future__ import annotations

import itertools

import numpy as np
from scipy.optimize import linprog

from epplan.placement.layer import gpu_slots
from epplan.placement.types import LayerPlacement
from epplan.workload.flops import TRAINING_FLOPS_FACTOR


def brute_force(problem, layer: int = 0, *, max_placements: int = 20_000) -> tuple[float, LayerPlacement]:
    """(least layer time in seconds, a placement attaining it) of one MoE layer."""
    topo = problem.topology
    counts = np.asarray(problem.traffic.counts[layer], dtype=np.float64)     # [G, E]
    num_gpus, num_experts = counts.shape
    slots = np.minimum(gpu_slots(problem), num_experts)
    choices = [list(itertools.combinations(range(num_experts), int(k))) for k in slots]
    total = int(np.prod([len(c) for c in choices], dtype=np.float64))
    if total > max_placements:
        raise ValueError(f"{total} placements: too many for the brute force")
    b = float(problem.bytes_per_assignment)
    cap = np.asarray(topo.link_capacity, dtype=np.float64) * 1e9
    unit = problem.costs.flops_per_assignment * TRAINING_FLOPS_FACTOR / np.asarray(problem.gpu_flops)
    # seconds on every link per assignment s -> t (dispatch + combine, fwd + bwd)
    pair = np.zeros((num_gpus, num_gpus, topo.num_links))
    for s in range(num_gpus):
        for t in range(num_gpus):
            if s != t:
                for l, f in topo.paths.pair_fractions(s, t).items():
                    pair[s, t, l] += f
    pair = (pair + pair.transpose(1, 0, 2)) * 2.0 * b / cap
    best = (np.inf, None)
    for held in itertools.product(*choices):
        replicas = [np.array([g for g in range(num_gpus) if e in held[g]]) for e in range(num_experts)]
        if any(r.size == 0 for r in replicas):
            continue
        value, split = _split_lp(counts, replicas, pair, unit, problem.schedule)
        if value < best[0] - 1e-15:
            best = (value, LayerPlacement(replicas, split))
    return best


def _split_lp(counts: np.ndarray, replicas: list[np.ndarray], pair: np.ndarray, unit: np.ndarray, schedule):
    """min exposed mu + z over per-source splits y[s, e, r] >= 0 with sum_r y = counts[s, e]:
    links <= mu, GPUs <= X, hidden mu <= z, X <= z."""
    num_gpus, num_experts = counts.shape
    num_links = pair.shape[2]
    cols = [(s, e, t) for s in range(num_gpus) for e in range(num_experts) for t in replicas[e]]
    n = len(cols) + 3                                           # ..., mu, X, z
    scale = max(counts.sum() / num_gpus, 1e-30)                 # flows in units of one source
    tscale = scale * float(unit.mean())
    a_eq = np.zeros((num_gpus * num_experts, n))
    b_eq = (counts / scale).ravel()
    a_ub = np.zeros((num_links + num_gpus + 2, n))
    for j, (s, e, t) in enumerate(cols):
        a_eq[s * num_experts + e, j] = 1.0
        a_ub[:num_links, j] = pair[s, t] * scale / tscale
        a_ub[num_links + t, j] = unit[t] * scale / tscale
    a_ub[:num_links, -3] = -1.0
    a_ub[num_links:num_links + num_gpus, -2] = -1.0
    a_ub[-2, [-3, -1]] = schedule.hidden, -1.0
    a_ub[-1, [-2, -1]] = 1.0, -1.0
    c = np.zeros(n)
    c[-3], c[-1] = schedule.exposed, 1.0
    res = linprog(c, A_ub=a_ub, b_ub=np.zeros(a_ub.shape[0]), A_eq=a_eq, b_eq=b_eq,
                  bounds=[(0, None)] * n, method="highs")
    assert res.status == 0, res.message
    y = res.x[:-3] * scale
    split = []
    for e, ranks in enumerate(replicas):
        sh = np.zeros((num_gpus, ranks.size))
        for j, (s, ee, t) in enumerate(cols):
            if ee == e:
                sh[s, int(np.searchsorted(ranks, t))] += y[j]
        tot = sh.sum(axis=1, keepdims=True)
        sh = np.where(tot > 0, sh / np.where(tot > 0, tot, 1.0), 1.0 / ranks.size)
        split.append(sh)
    return float(res.fun * tscale), split
