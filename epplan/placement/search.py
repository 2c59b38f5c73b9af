"""Replica-move search: the planner's use of the time the bounds and the MILP leave.

From a layer's best plan, try one move at a time and keep it when the split LP (``splits.py``)
scores the moved placement lower (or equal with an idler network):

    add      GPU g, with a slot free, also holds expert b
    change   GPU g stops holding expert a (which keeps another replica) and holds b instead
    swap     GPUs g and h (on different nodes) exchange one expert each

and, before the first move and after each one kept, a pass of same-node moves
(``level_nodes``) that no LP scores.

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

from epplan.placement.heuristic import nic_unit
from epplan.placement.layer import LayerData
from epplan.placement.splits import optimal_splits, split_bound
from epplan.placement.types import LayerPlacement

_TIE = 1e-6        # relative: times this close are equal (the idler network wins)
LP_MARGIN = 2.0    # a move's LP starts only with this many times the last LP's seconds left
_LEVEL_SLACK = 0.01   # same-node moves may leave a GPU this much busier than the plan's busiest
_LEVEL_LPS = 4.0      # ... for this many times the last LP's seconds, before their LP


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
    if until is not None and time.monotonic() + LP_MARGIN * lp_s >= until:
        # no time for one LP: return before counting the reserve (split bounds of every
        # relabelled layer's baselines, seconds at 256 GPUs)
        return Searched(best, float(cost), float(link_s), 0, 0, 0, time.monotonic() - t0, True)
    lps_after = 0 if reserve is None else reserve(cost)

    def level() -> None:
        """Rounds of ``level_nodes`` (GPUs up to ``_LEVEL_SLACK`` busier than the plan's
        busiest), each placement re-split by the LP, while a round lowers the plan and there is
        time for its LP; each better plan kept."""
        nonlocal best, cost, link_s, held, lps_after, kept, solved, lp_s
        while True:
            end = None if until is None else until - (LP_MARGIN + lps_after) * lp_s
            if end is not None and time.monotonic() >= end:
                return
            if end is not None and lp_s > 0:
                end = min(end, time.monotonic() + _LEVEL_LPS * lp_s)
            lev = level_nodes(data, best, cost, link_s, until=end, gpu_slack=_LEVEL_SLACK)
            if not lev.kept or until is not None and time.monotonic() + (LP_MARGIN + lps_after) * lp_s >= until:
                return
            left = None if until is None else max(0.05, until - time.monotonic())
            t1 = time.monotonic()
            res = optimal_splits(data, lev.layer.replicas, time_limit=left, worth_below=cost)
            lp_s = time.monotonic() - t1
            solved += 1
            options = [(lev.cost, lev.link_s, lev.layer)]
            if res.status == "optimal":
                options.append((float(res.bottleneck), float(res.link_time), res.layer))
            new_cost, new_link, new_layer = min(options, key=lambda o: (o[0], o[1]))
            if not _better(new_cost, new_link, cost, link_s):
                return
            best, cost, link_s = new_layer, new_cost, new_link
            held = _held(best.replicas, num_gpus, num_experts)
            kept += 1
            lps_after = 0 if reserve is None else reserve(cost)
            if post is not None:
                post(best, cost, link_s)

    level()
    busy = _busy_gpus(data, best)
    away = _away_demand(data, held, node)
    while since < patience:
        if until is not None and time.monotonic() + (LP_MARGIN + lps_after) * lp_s >= until:
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
        res = optimal_splits(data, replicas, time_limit=left, worth_below=cost)
        lp_s = time.monotonic() - t1
        solved += 1
        if res.status == "optimal" and _better(res.bottleneck, res.link_time, cost, link_s):
            # the LP's plan, not ``moved``: its prune (``splits._prune``) may have dropped
            # replicas that serve nothing, and later moves are drawn from what the plan holds
            best, cost, link_s = res.layer, float(res.bottleneck), float(res.link_time)
            held = _held(best.replicas, num_gpus, num_experts)
            kept += 1
            since = 0
            lps_after = 0 if reserve is None else reserve(cost)
            if post is not None:
                post(best, cost, link_s)
            level()
            busy = _busy_gpus(data, best)
            away = _away_demand(data, held, node)
    return Searched(best, float(cost), float(link_s), tried, solved, kept, time.monotonic() - t0, timed_out)


def _better(new_cost: float, new_link: float, cost: float, link_s: float) -> bool:
    """Whether a plan of time ``new_cost`` and busiest link ``new_link`` replaces the one in
    hand: shorter, or equal with an idler network."""
    return new_cost < cost * (1 - _TIE) or (new_cost <= cost * (1 + 1e-12) and new_link < link_s * (1 - 1e-9))


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


def level_nodes(data: LayerData, layer: LayerPlacement, cost: float, link_s: float, *,
                until: float | None, max_checks: int = 4, gpu_slack: float = 0.0) -> Searched:
    """Same-node moves scored without an LP: GPUs g and h of one node exchange one expert each
    (g's a for h's b), or g's a moves to h where h has a free slot; every replica carries its
    split along, so the moved placement's flows are the plan's with columns g and h permuted,
    a real split scored exactly by ``LayerData.time_of`` (the split LP can only improve on it).

    Why: the split LP balances a node's off-node traffic only over the replicas the node
    holds; which GPU of the node holds them decides which NIC carries it. On
    ``scripts/bench_planner.py`` instance 5 (256 GPUs, 9 experts each) the plan's busiest NIC
    carried 0.7258 s against its node's NIC mean 0.6104 s; the cross-node moves of
    ``replica_search`` do not reach that, and each of their LPs takes seconds there, where
    one ``time_of`` takes milliseconds.

    Moves are drawn for the GPU with the busiest NIC (its off-node exchange, both ways; the
    next while it is within 10 % of the most where none of its moves was kept): its exchanges
    and moves with each GPU of its node that leave no GPU busier than the busiest, ranked by
    the two NICs' larger time after it (both linear in the replicas' own flows), the
    ``max_checks`` best scored exactly. Kept when the layer's time and its busiest
    link do not grow and one of them, or else the sum of squared link times (the NICs of a node
    more level), falls. Stops when no drawn GPU has a move kept, or at ``until``.

    ``gpu_slack`` > 0: a move may also leave the two GPUs up to that fraction busier than the
    start's busiest GPU, and is kept by the link times alone, so the returned plan may cost
    more than the start (``cost`` says what it costs); for the split LP to re-balance. Where
    the LP has balanced compute to the last digit (every GPU of instance 5's plan within 2e-8
    of the busiest), no exchange leaves it level: with no slack the pass kept none that
    lowered the plan."""
    t0 = time.monotonic()
    cost0, link0 = cost, link_s
    num_gpus = data.num_gpus
    node = np.asarray(data.lm.gpu_node)
    is_remote = node[:, None] != node[None, :]                         # [G, G]
    unit_n = nic_unit(data)                                            # [G] s per assignment
    replicas = [np.asarray(r, dtype=np.int64).copy() for r in layer.replicas]
    split = [np.asarray(x, dtype=np.float64).copy() for x in layer.split]
    held = _held(replicas, num_gpus, data.num_experts)
    flows = layer.flows(data.counts)                                   # [G, G]
    link = data.link_times(flows)
    cost, link_s, _ = data.time_of(flows, link)
    pot = float(np.square(link).sum())
    tried = kept = 0
    timed_out = False

    def column(e: int, t: int) -> np.ndarray:
        """float64[G] what each source sends to expert e's replica on t."""
        return data.counts[:, e] * split[e][:, int(np.searchsorted(replicas[e], t))]

    def move_to(e: int, src: int, dst: int) -> None:
        j = int(np.searchsorted(replicas[e], src))
        ranks = replicas[e].copy()
        ranks[j] = dst
        order = np.argsort(ranks, kind="stable")
        replicas[e], split[e] = ranks[order], split[e][:, order]
        held[src, e], held[dst, e] = False, True

    top_gpu = float((flows.sum(axis=0) * data.gpu_unit).max(initial=0.0))   # the start's busiest GPU
    stuck: set[int] = set()
    while True:
        if until is not None and time.monotonic() >= until:
            timed_out = True
            break
        off_node = flows * is_remote
        nic = (off_node.sum(axis=0) + off_node.sum(axis=1)) * unit_n   # [G] s
        served = flows.sum(axis=0)                                                           # [G]
        drawn = [int(g) for g in np.argsort(-nic) if nic[g] >= 0.9 * nic.max() > 0 and int(g) not in stuck]
        if not drawn:
            break
        g = drawn[0]
        cands = []   # (the two NICs' larger time after it, h, a, b or -1 for a move)
        for h in np.flatnonzero(node == node[g]):
            h = int(h)
            if h == g:
                continue
            mine, theirs = np.flatnonzero(held[g] & ~held[h]), np.flatnonzero(held[h] & ~held[g])
            if mine.size == 0:
                continue
            col_a = np.stack([column(int(a), g) for a in mine])                  # [M, G]
            rem_a, srv_a = col_a[:, is_remote[:, g]].sum(axis=1), col_a.sum(axis=1)
            col_b = np.stack([column(int(b), h) for b in theirs]) if theirs.size else np.zeros((0, num_gpus))
            rem_b, srv_b = col_b[:, is_remote[:, h]].sum(axis=1), col_b.sum(axis=1)
            # exchanges [M, T], then moves [M] where h has a free slot (and g keeps an expert)
            options = [(rem_a[:, None] - rem_b[None, :], srv_a[:, None] - srv_b[None, :], theirs)]
            if held[h].sum() < data.slots[h] and held[g].sum() > 1:
                options.append((rem_a[:, None], srv_a[:, None], np.array([-1])))
            for d_rem, d_srv, other in options:                                  # what goes g -> h
                est = np.maximum(nic[g] - d_rem * unit_n[g], nic[h] + d_rem * unit_n[h])
                fits = np.maximum((served[g] - d_srv) * data.gpu_unit[g],
                                  (served[h] + d_srv) * data.gpu_unit[h]) <= top_gpu * (1 + gpu_slack + 1e-12)
                for i, j in zip(*np.nonzero((est < nic[g] * (1 - 1e-9)) & fits)):
                    cands.append((float(est[i, j]), h, int(mine[i]), int(other[j])))
        cands.sort()
        accepted = False
        for _, h, a, b in cands[:max_checks]:
            tried += 1
            moved = flows.copy()
            c_a = column(a, g)
            moved[:, g] -= c_a
            moved[:, h] += c_a
            if b >= 0:
                c_b = column(b, h)
                moved[:, h] -= c_b
                moved[:, g] += c_b
            moved_link = data.link_times(moved)
            t_new, l_new, _ = data.time_of(moved, moved_link)
            p_new = float(np.square(moved_link).sum())
            if (t_new > cost * (1 + 1e-12) and not gpu_slack) or l_new > link_s * (1 + 1e-12):
                continue
            if not ((t_new < cost * (1 - 1e-9) and not gpu_slack) or l_new < link_s * (1 - 1e-9) or p_new < pot * (1 - 1e-9)):
                continue
            move_to(a, g, h)
            if b >= 0:
                move_to(b, h, g)
            flows, link, cost, link_s, pot = moved, moved_link, t_new, l_new, p_new
            kept += 1
            accepted = True
            stuck.clear()
            break
        if not accepted:
            stuck.add(g)
    if not kept:
        return Searched(layer, float(cost0), float(link0), tried, 0, 0, time.monotonic() - t0, timed_out)
    return Searched(LayerPlacement(replicas, split), float(cost), float(link_s), tried, 0, kept,
                    time.monotonic() - t0, timed_out)
