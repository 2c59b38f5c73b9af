"""Replica-move search: the planner's use of the time the bounds and the MILP leave.

From a layer's best plan, try one move at a time and keep it when the split LP (``splits.py``)
scores the moved placement lower (or equal with an idler network):

    add      GPU g, with a slot free, also holds expert b
    change   GPU g stops holding expert a (which keeps another replica) and holds b instead
    swap     GPUs g and h (on different nodes) exchange one expert each

A move is drawn where the plan's split says it pays: g is, half the time, one of the GPUs that
set the layer's time (where the exchange binds, those whose traffic with other nodes, what
their NICs carry, is within 10 % of the most; else the busiest GPUs), else any GPU; b is drawn
by the demand for it that g's node sends elsewhere, per replica already there (what one more
replica on that node could keep off the network). Before its LP a moved placement is checked
against ``split_bound``: a move whose bound is not below the plan in hand is dropped unsplit
(on instance 7, 18 % of the moves drawn).

Why this method (measured 2026-12-02 on ``scripts/bench_planner.py`` instances 6 and 7, 8 x DGX
H100, 64 GPUs x 32 / 16 experts, where the network binds; this 2-core machine, load 5-7): there
the planner stopped each layer after 0.3-1.6 s, the per-GPU MILP (``ilp.py``) being too large to
try (131,072 / 65,536 flow variables against 60,000). Given 900 s and no size limit on the
worst-gap layer, HiGHS's root bound was the planner's own (gap 36.19 % on 6's layer 18, node LP;
33.01 % on 7, link class), no branch or cut moved it, and its incumbent stayed the planner's
plan. This search alone, from the same plans, for 600 s: 7's layer 0.017344 -> 0.014759 s
(-14.9 %; 565 LPs, 10 moves kept), 6's layer 18 0.020349 -> 0.018742 s (-7.9 %; 1,896 LPs, 15
kept). So the plan, not only the bound, was short, by at least those amounts; what is left
(21 % and 31 % against the same bounds) is not known to be either. Every step is exact (the
LP's own split of a real placement), so the plan only gets better; the bound is untouched.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from epplan.placement.layer import LayerData
from epplan.placement.splits import optimal_splits, split_bound
from epplan.placement.types import LayerPlacement

_TIE = 1e-6        # relative: times this close are equal (the idler network wins)
_LP_MARGIN = 2.0   # a move's LP starts only with this many times the last LP's seconds left


@dataclass
class Searched:
    layer: LayerPlacement
    cost: float        # seconds: the layer's time under the schedule
    link_s: float      # its busiest link
    tried: int         # moves drawn
    solved: int        # moves split by the LP (the others' bound ruled them out)
    kept: int          # moves kept
    seconds: float
    stopped_by_time: bool   # the time ran out (else a run of ``patience`` moves found nothing)


def replica_search(data: LayerData, layer: LayerPlacement, cost: float, link_s: float, *,
                   until: float | None, seed: int = 0, patience: int | None = None,
                   post=None, reserve: Callable[[float], int] | None = None,
                   lp_seconds: float = 0.0) -> Searched:
    """Improve ``layer`` (time ``cost``, busiest link ``link_s``) by moves until ``until``
    (time.monotonic()) or until ``patience`` moves in a row are not kept (default: as many as
    the layer's (GPU, expert) pairs, the size of the change neighbourhood); ``post(layer,
    cost, link_s)`` gets each plan kept. ``reserve(cost)``: split LPs to leave time for before
    ``until`` while the plan costs ``cost``, at the seconds this layer's last LP took (before
    the first: ``lp_seconds``, the caller's last split LP of the layer)."""
    t0 = time.monotonic()
    rng = np.random.default_rng(seed)
    num_gpus, num_experts = data.num_gpus, data.num_experts
    node = np.asarray(data.lm.gpu_node)
    held = _held(layer.replicas, num_gpus, num_experts)
    best = layer
    tried = solved = kept = 0
    patience = num_gpus * num_experts if patience is None else patience
    since = 0           # moves since the last one kept
    timed_out = False
    lp_s = lp_seconds
    if until is not None and time.monotonic() + _LP_MARGIN * lp_s >= until:
        # no time for one LP: return before counting the reserve (split bounds of every
        # relabelled layer's baselines, seconds at 256 GPUs)
        return Searched(best, float(cost), float(link_s), 0, 0, 0, time.monotonic() - t0, True)
    lps_after = 0 if reserve is None else reserve(cost)
    busy = _busy_gpus(data, layer)
    away = _away_demand(data, held, node)
    while since < patience:
        if until is not None and time.monotonic() + (_LP_MARGIN + lps_after) * lp_s >= until:
            timed_out = True
            break
        tried += 1
        since += 1
        moved = _draw(rng, held, busy, away, node, data.slots)
        if moved is None:
            continue
        replicas = [np.flatnonzero(moved[:, e]) for e in range(num_experts)]
        if split_bound(data, replicas) >= cost * (1 - _TIE):
            continue
        left = None if until is None else max(0.05, until - time.monotonic())
        t1 = time.monotonic()
        res = optimal_splits(data, replicas, time_limit=left)
        lp_s = time.monotonic() - t1
        solved += 1
        better = res.bottleneck < cost * (1 - _TIE) or (
            res.bottleneck <= cost * (1 + 1e-12) and res.link_time < link_s * (1 - 1e-9))
        if res.status == "optimal" and better:
            best, cost, link_s, held = res.layer, float(res.bottleneck), float(res.link_time), moved
            kept += 1
            since = 0
            lps_after = 0 if reserve is None else reserve(cost)
            busy = _busy_gpus(data, best)
            away = _away_demand(data, held, node)
            if post is not None:
                post(best, cost, link_s)
    return Searched(best, float(cost), float(link_s), tried, solved, kept, time.monotonic() - t0, timed_out)


def _held(replicas: list[np.ndarray], num_gpus: int, num_experts: int) -> np.ndarray:
    held = np.zeros((num_gpus, num_experts), dtype=bool)
    for e, ranks in enumerate(replicas):
        held[np.asarray(ranks, dtype=np.int64), e] = True
    return held


def _busy_gpus(data: LayerData, layer: LayerPlacement) -> np.ndarray:
    """GPUs that set the plan's time: where the link time is the larger part, those whose
    exchange with other nodes (what their NICs carry) is within 10 % of the most; else the
    busiest GPUs."""
    flows = layer.flows(data.counts)
    node = np.asarray(data.lm.gpu_node)
    _, link_s, gpu_s = data.time_of(flows)
    if data.schedule.hidden * link_s >= gpu_s or data.schedule.hidden == 0 and link_s > 0:
        remote = node[:, None] != node[None, :]
        nic = (flows * remote).sum(axis=0) + (flows * remote).sum(axis=1)
        return np.flatnonzero(nic >= nic.max() * 0.9)
    gpu = flows.sum(axis=0) * data.gpu_unit
    return np.flatnonzero(gpu >= gpu.max() * (1 - 1e-6))


def _away_demand(data: LayerData, held: np.ndarray, node: np.ndarray) -> np.ndarray:
    """float64[N, E]: the demand node n sends for expert e while none of its GPUs holds it
    (and, for experts it holds, the demand per replica on it: a further one would halve it)."""
    num_nodes = int(node.max()) + 1
    demand = np.zeros((num_nodes, data.num_experts))
    np.add.at(demand, node, data.counts)
    on_node = np.zeros((num_nodes, data.num_experts))
    np.add.at(on_node, node, held.astype(np.float64))
    return demand / (1.0 + on_node)


def _draw(rng: np.random.Generator, held: np.ndarray, busy: np.ndarray, away: np.ndarray,
          node: np.ndarray, slots: np.ndarray) -> np.ndarray | None:
    """A moved copy of ``held`` (module docstring), or None where the drawn move is not one."""
    num_gpus, num_experts = held.shape
    g = int(rng.choice(busy)) if busy.size and rng.random() < 0.5 else int(rng.integers(num_gpus))
    mine = np.flatnonzero(held[g])
    if mine.size == 0:
        return None
    moved = held.copy()
    if rng.random() < 0.5:
        # add: an expert g does not hold, into a free slot of g; else change: one of g's
        # experts that keeps a replica elsewhere, for it
        weight = away[node[g]] * ~held[g]
        if weight.sum() <= 0:
            return None
        b = int(rng.choice(num_experts, p=weight / weight.sum()))
        if mine.size < slots[g]:
            moved[g, b] = True
            return moved
        spare = mine[held[:, mine].sum(axis=0) > 1]
        if spare.size == 0:
            return None
        moved[g, int(rng.choice(spare))], moved[g, b] = False, True
        return moved
    # swap with a GPU of another node: g's a for h's b, neither already on the other
    h = int(rng.integers(num_gpus))
    if node[h] == node[g]:
        return None
    a = int(rng.choice(mine))
    theirs = np.flatnonzero(held[h] & ~held[g])
    if theirs.size == 0 or held[h, a]:
        return None
    b = int(rng.choice(theirs))
    moved[g, a], moved[g, b] = False, True
    moved[h, b], moved[h, a] = False, True
    return moved
