"""The node-level placement model: a certificate that sees every cut of the network, and each
node's replica counts.

Per layer, with the GPUs of a node taken together (A, B = nodes):

    h[B, e] in {0, 1}      node B holds expert e (relaxed to [0, 1] for the LP bound)
    f[A, e, B] >= 0        assignments of A's sources for e served on B
    mu, X, z               busiest link time, busiest GPU time, the schedule's hidden part

    demand    sum_B f[A, e, B] = n[A, e];   f[A, e, B] <= n[A, e] h[B, e]
    slots     sum_e h[B, e] <= min(E, slots of B);   sum_B h[B, e] >= 1
    GPUs      sum_{A, e} f[A, e, B] <= X * sum_{g in B} 1 / c_g;   X >= the compute bound
    cuts      2b (out(S) + in(S)) <= mu * cap(S)  for every cut set S of ``bounds.cut_sets``
              (each node; the nodes under each fabric switch: a rail-optimised scalable unit, a
              pod of a three-tier fabric), out(S) = sum_{A in S, B not in S} f, in(S) likewise,
              cap(S) = the capacity of the links leaving S (and entering it: a row each)
    schedule  hidden * mu <= z,  X <= z;   minimise exposed * mu + z        (``epplan.schedule``)

Why it is a lower bound for the true problem (per GPU, per source, any split): summing a true
solution's flows by node gives a feasible point at the solution's own mu and X. Every byte that
a source in S sends to a replica outside S (dispatch forward, combine backward: 2b) and every
byte a replica in S returns to a source outside (combine forward, dispatch backward: 2b) crosses
a link leaving S, so the busiest of those links carries at least their sum over its capacity;
the busiest GPU of B serves at least B's total at the rate of B's GPUs together. The layer's
time grows with mu and X, so the model's optimum, and any dual bound of it, is <= the true
optimum. It is weaker than the per-GPU models only where one node's NICs are loaded unevenly
or a GPU's own links bind, which the analytic bounds (``bounds.py``) and the per-GPU MILP
(``ilp.py``) see.

Why this model: the per-GPU MILP has G^2 E flow variables (60,000 at 64 GPUs and 16 experts)
and a weak big-M, and stops far from its bound; here there are N^2 E flows and N E binaries
(8 nodes: 1,024 and 128), and the model sees the leaf/spine/core cuts that the analytic bounds
miss. Measured on scripts/bench_planner.py (docs/benchmarks.md). Its solution also gives each
node its experts (h) and, by apportioning the node's slots to the loads it serves, its replica
counts (``NodeResult.replicas``); ``solve`` takes only the LP relaxation's bound and deals no
counts from it onto GPUs.

Shape legend: N = nodes, E = experts, G = GPUs.
"""

from __future__ import annotations

import heapq
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from epplan.placement.bounds import apportion, compute_bound, cut_bound, cut_sets
from epplan.placement.layer import LayerData
from epplan.placement.lp import LP

MAX_FLOWS = 400_000     # node-level flow columns above which the model is not built
# node-level flows (nodes^2 x experts) above which ``solve`` does not start the node LP, which
# gives a bound only once solved. Its LP relaxation alone on a layer (measured 2026-12-08, this
# 2-core machine, two at a time, docs/planner.md): 16,384 flows in 5.1-9.4 s (8 nodes x 256
# experts, 16 x 64, 32 x 16; 16 x 16 in 0.7 s); 65,536 in 245 s (16 x 256) and not in 300 s
# (64 x 16, bench instance 9); 262,144 not in 300-400 s (128 x 16, instance 10; 32 x 256,
# instances 5 and 8), where in the bench it took half the layer's time left for no bound.
MAX_NODE_LP_FLOWS = 16_384
# nodes x experts above which count_model is not tried: at 32 x 256 (bench instance 5) it took
# 51.7 s on a 30 s limit and stayed below the trade-off bound.
MAX_COUNT_INTEGERS = 4096
_COUNT_SPLIT = 1.005  # count_model splits the GPU-time interval with the least bound while wider


@dataclass
class NodeResult:
    bound: float               # seconds, valid for the true problem (0.0 when not solved)
    replicas: np.ndarray | None  # int64[N, E] replicas per node from the model's h, or None
    status: str                # optimal | time_limit | skipped | failed
    seconds: float


def node_model(data: LayerData, *, integer: bool = True, time_limit: float | None = None,
               gap: float = 1e-4) -> NodeResult:
    """Solve the node-level model of one layer (module docstring); ``integer`` False solves
    its LP relaxation."""
    t0 = time.monotonic()
    topo = data.lm.topology
    cuts = cut_sets(topo)
    if not cuts:
        return NodeResult(0.0, None, "skipped", 0.0)
    node_of = data.lm.gpu_node
    num_nodes, num_experts = topo.num_nodes, data.num_experts
    demand = np.zeros((num_nodes, num_experts))
    np.add.at(demand, node_of, data.counts)                          # [N, E]
    fa, fe = np.nonzero(demand > 0)                                  # (A, e) with demand
    num_f = fa.size * num_nodes
    if num_f > MAX_FLOWS:
        return NodeResult(0.0, None, "skipped", time.monotonic() - t0)
    unit = max(demand.sum() / num_nodes, 1e-30)                      # one node's demand
    tau = unit * float(np.mean(data.gpu_unit))
    # Columns: f (A, e, B) | h (B, e) | mu | X | z
    f_a, f_e = np.repeat(fa, num_nodes), np.repeat(fe, num_nodes)
    f_b = np.tile(np.arange(num_nodes), fa.size)
    off_h = num_f
    col_mu, col_x, col_z = off_h + num_nodes * num_experts, off_h + num_nodes * num_experts + 1, \
        off_h + num_nodes * num_experts + 2
    ncol = col_z + 1
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(rr, cc, vv):
        rows.append(np.asarray(rr)); cols.append(np.asarray(cc)); vals.append(np.asarray(vv, dtype=np.float64))

    # demand: sum_B f = n[A, e]
    pair = np.repeat(np.arange(fa.size), num_nodes)
    add(r + pair, np.arange(num_f), np.ones(num_f))
    lo.append(demand[fa, fe] / unit); hi.append(demand[fa, fe] / unit)
    r += fa.size
    # f <= n h
    add(r + np.arange(num_f), np.arange(num_f), np.ones(num_f))
    add(r + np.arange(num_f), off_h + f_b * num_experts + f_e, -demand[f_a, f_e] / unit)
    lo.append(np.full(num_f, -np.inf)); hi.append(np.zeros(num_f))
    r += num_f
    # slots per node, cover per expert
    slots = np.array([min(num_experts, int(data.slots[node_of == b].sum())) for b in range(num_nodes)])
    hb, he = np.divmod(np.arange(num_nodes * num_experts), num_experts)
    add(r + hb, off_h + np.arange(num_nodes * num_experts), np.ones(hb.size))
    lo.append(np.full(num_nodes, -np.inf)); hi.append(slots.astype(np.float64))
    r += num_nodes
    add(r + he, off_h + np.arange(num_nodes * num_experts), np.ones(he.size))
    lo.append(np.ones(num_experts)); hi.append(np.full(num_experts, np.inf))
    r += num_experts
    # GPUs: served on B <= X * sum 1/c_g (in units: X column is seconds / tau)
    rate = np.bincount(node_of, weights=1.0 / data.gpu_unit, minlength=num_nodes)   # assignments/s
    add(r + f_b, np.arange(num_f), unit / (tau * rate[f_b]))                          # seconds / tau
    add(r + np.arange(num_nodes), np.full(num_nodes, col_x), -np.ones(num_nodes))
    lo.append(np.full(num_nodes, -np.inf)); hi.append(np.zeros(num_nodes))
    r += num_nodes
    # cuts: 2b (out + in) / cap <= mu, exit and entry rows
    b2 = 2.0 * data.bytes_per_assignment
    for nodes, exit_cap, entry_cap in cuts:
        is_in = np.zeros(num_nodes, dtype=bool)
        is_in[nodes] = True
        crosses = np.flatnonzero(is_in[f_a] != is_in[f_b])
        for cap in {exit_cap, entry_cap}:
            if cap <= 0 or crosses.size == 0:
                continue
            add(np.full(crosses.size, r), crosses, np.full(crosses.size, b2 * unit / cap / tau))
            add([r], [col_mu], [-1.0])
            lo.append([-np.inf]); hi.append([0.0])
            r += 1
    a, c = _with_schedule(data, rows, cols, vals, lo, hi, r, col_mu, col_x, col_z)
    col_lo = np.zeros(ncol)
    col_hi = np.full(ncol, np.inf)
    col_hi[off_h:col_mu] = 1.0
    col_lo[col_x] = compute_bound(data) / tau
    col_lo[col_mu] = cut_bound(data) / tau
    integrality = None
    if integer:
        integrality = np.zeros(ncol, dtype=bool)
        integrality[off_h:col_mu] = True
    lp = LP(c, a, np.concatenate(lo), np.concatenate(hi), col_lo, col_hi, integrality=integrality)
    if integer:
        lp.h.setOptionValue("mip_rel_gap", gap)
    left = None if time_limit is None else max(0.05, time_limit - (time.monotonic() - t0))
    res = lp.solve(left)
    if integer:
        dual = lp.h.getInfo().mip_dual_bound
        bound = float(dual) * tau if np.isfinite(dual) else 0.0
    else:
        bound = res.objective * tau if res.status == "optimal" else 0.0
    replicas = None
    if res.status in ("optimal", "time_limit") and res.x.size == ncol and np.all(np.isfinite(res.x)):
        held = res.x[off_h:col_mu].reshape(num_nodes, num_experts)
        served = np.zeros((num_nodes, num_experts))
        np.add.at(served, (f_b, f_e), np.maximum(res.x[:num_f], 0.0))
        replicas = _replica_counts(held, served, data, node_of)
    return NodeResult(max(0.0, bound), replicas, res.status, time.monotonic() - t0)


def _with_schedule(data: LayerData, rows: list, cols: list, vals: list, lo: list, hi: list, r: int,
                   col_mu: int, col_x: int, col_z: int) -> tuple[sp.csc_matrix, np.ndarray]:
    """(A, c) of a node model: its rows so far and the schedule's (hidden * mu <= z, X <= z),
    objective exposed * mu + z; appends the schedule's row bounds to lo / hi."""
    ncol = col_z + 1
    rows.append(np.array([r, r, r + 1, r + 1])); cols.append(np.array([col_mu, col_z, col_x, col_z]))
    vals.append(np.array([data.schedule.hidden, -1.0, 1.0, -1.0]))
    lo.append([-np.inf, -np.inf]); hi.append([0.0, 0.0])
    a = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r + 2, ncol))
    c = np.zeros(ncol)
    c[col_mu], c[col_z] = data.schedule.exposed, 1.0
    return a, c


def _replica_counts(held: np.ndarray, served: np.ndarray, data: LayerData, node_of: np.ndarray) -> np.ndarray | None:
    """int64[N, E]: node B's slots apportioned to the experts it holds (h > 0.5) by the load it
    serves for them (at most one replica per GPU); None if that leaves an expert nowhere."""
    num_nodes, num_experts = held.shape
    m = np.zeros((num_nodes, num_experts), dtype=np.int64)
    for b in range(num_nodes):
        experts = np.flatnonzero(held[b] > 0.5)
        size = int(np.sum(node_of == b))
        slots = int(data.slots[node_of == b].sum())
        if experts.size == 0:
            continue
        experts = experts[np.argsort(-served[b, experts], kind="stable")][:slots]
        r = apportion(served[b, experts] + 1e-12, min(slots, experts.size * size), size)
        m[b, experts] = r
    if np.any(m.sum(axis=0) == 0):
        return None
    return m


def count_model(data: LayerData, upper: float, *, time_limit: float | None = None,
                floor: float = 0.0) -> NodeResult:
    """The replica-count model of one layer (below): a lower bound, in seconds, on every plan
    faster than ``upper`` (the plan in hand), so min(upper, bound) is valid for all plans.

    The node model above lets one replica serve a node's whole demand for its expert and the
    trade-off bound (``bounds.tradeoff_bound``) sizes each set's local service alone. Here the
    nodes share the experts' replicas: with r[B, e] the replicas of e on node B (integer,
    at most |B|, sum_e r[B, e] <= B's slots), s[B, e] what B's GPUs serve of e and loc[S, e]
    what the cut set S serves of its own demand for e,

        sum_B s[B, e] = n_e;   s[B, e] <= r[B, e] * X_hi * (B's fastest GPU's rate)
        sum_e s[B, e] <= X * (B's GPUs' rates together);   X_lo <= X <= X_hi
        loc[S, e] <= n[S, e],  loc[S, e] <= sum_{B in S} s[B, e]
        2b (out(S) + in(S)) <= mu * cap(S),  out(S) = n_S - sum_e loc[S, e],
                                             in(S) = sum_{B in S, e} s[B, e] - sum_e loc[S, e]

    for every cut set S of ``bounds.cut_sets`` (exit and entry), over the nodes as a partition
    4b sum_B out(B) <= mu * (all their exit capacity), and the schedule's rows as in the node
    model; minimise exposed * mu + z. A true plan whose busiest GPU X is within X_lo..X_hi maps
    to a feasible point at its own mu and X (r its holdings by node, s and loc its service; no
    replica serves more than its GPU does in X), so the MILP's dual bound is at most that
    plan's time. What it sees: every expert needs replicas that serve all of its demand, so cold
    experts take slots that the nodes' own hot experts would use to serve their demand locally
    (instance 2 of ``scripts/bench_planner.py``: the analytic bounds let every node keep 74 % of
    its demand; the nodes together keep at most 71 %).

    The MILP is solved first on X from the compute bound to ``upper`` (every plan faster than
    ``upper`` has its busiest GPU there); where that bound is above ``floor`` (the bound in
    hand: below it the model changes nothing), the GPU-time interval that gives the least bound
    is halved (geometrically) and each half solved, until it is narrower than _COUNT_SPLIT, a
    MILP stops short or the time is up; the bound is the least over the intervals. Halving
    matters where replicas would run their GPUs above the node's mean: on the whole range each
    replica may serve what a GPU does in ``upper`` while its node's GPUs average X. On
    topologies/hetero-degraded.yaml (seed, d_ff 2048, zipf 1.1, one layer: the plan 0.027187 s):
    the whole range 0.019800 s, halved 0.020302 s (3.1 s, this 2-core machine), the analytic
    bounds 0.019362 s (measured 2026-12-08).
    """
    t0 = time.monotonic()
    cuts = cut_sets(data.lm.topology)
    if not cuts or data.pool > 1:
        return NodeResult(0.0, None, "skipped", 0.0)
    deadline = None if time_limit is None else t0 + time_limit
    c = compute_bound(data)
    top = max(float(upper), c)
    status = "optimal"

    def bound_in(lo: float, hi: float, parent: float) -> float:
        """The MILP's bound on every plan whose busiest GPU takes lo..hi seconds (inf: none)."""
        nonlocal status
        left = None if deadline is None else max(0.05, deadline - time.monotonic())
        lp, tau = _count_lp(data, cuts, lo, hi)
        res = lp.solve(left)
        if res.status == "infeasible":
            return np.inf
        dual = lp.h.getInfo().mip_dual_bound
        if res.status not in ("optimal", "time_limit") or not np.isfinite(dual):
            status = res.status if res.status != "optimal" else "failed"
            return parent
        if res.status == "time_limit":
            status = "time_limit"
        return max(parent, float(dual) * tau)

    heap = [(bound_in(c, top, 0.0), c, top)]
    # Best first, where the whole range's bound is above ``floor`` (the bound in hand): the
    # interval that gives the least bound is split in two (each half's MILP is the parent's
    # with less room, so its bound is at least the parent's) while it is wider than
    # _COUNT_SPLIT, every MILP solved and time left.
    while floor < heap[0][0] < top and heap[0][2] > _COUNT_SPLIT * heap[0][1] and status == "optimal" \
            and (deadline is None or time.monotonic() < deadline):
        b, lo, hi = heapq.heappop(heap)
        mid = float(np.sqrt(lo * hi))
        heapq.heappush(heap, (bound_in(lo, mid, b), lo, mid))
        heapq.heappush(heap, (bound_in(mid, hi, b), mid, hi))
    bound = min(heap[0][0], top)
    return NodeResult(max(0.0, min(bound, float(upper))), None, status, time.monotonic() - t0)


def _count_lp(data: LayerData, cuts: list, x_lo: float, x_hi: float) -> tuple[LP, float]:
    """The replica-count MILP of ``count_model`` with the busiest GPU's time X in x_lo..x_hi
    seconds (each replica serves at most x_hi at its GPU's rate), and its unit of time."""
    topo = data.lm.topology
    node_of = data.lm.gpu_node
    num_nodes, num_experts = topo.num_nodes, data.num_experts
    demand = np.zeros((num_nodes, num_experts))
    np.add.at(demand, node_of, data.counts)                          # [N, E]
    unit = max(demand.sum() / num_nodes, 1e-30)                      # one node's demand
    tau = unit * float(np.mean(data.gpu_unit))
    demand = demand / unit
    load = demand.sum(axis=0)                                        # [E]
    rate = 1.0 / data.gpu_unit
    node_rate = np.bincount(node_of, weights=rate, minlength=num_nodes) * tau / unit   # per unit of X
    fastest = np.array([rate[node_of == b].max() for b in range(num_nodes)]) * x_hi / unit
    size = np.bincount(node_of, minlength=num_nodes)
    slots = np.bincount(node_of, weights=data.slots, minlength=num_nodes)
    ne, ns = num_nodes * num_experts, len(cuts) * num_experts
    # Columns: r (B, e) | s (B, e) | loc (S, e) | mu | X | z
    off_s, off_loc = ne, 2 * ne
    col_mu = off_loc + ns
    col_x, col_z = col_mu + 1, col_mu + 2
    ncol = col_z + 1
    be = np.arange(ne)
    b_of, e_of = np.divmod(be, num_experts)
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(rr, cc, vv):
        rows.append(np.asarray(rr)); cols.append(np.asarray(cc)); vals.append(np.asarray(vv, dtype=np.float64))

    add(r + b_of, be, np.ones(ne))                                   # slots
    lo.append(np.full(num_nodes, -np.inf)); hi.append(slots)
    r += num_nodes
    add(r + b_of, off_s + be, 1.0 / node_rate[b_of])                 # GPUs: served <= X * rate
    add(r + np.arange(num_nodes), np.full(num_nodes, col_x), -np.ones(num_nodes))
    lo.append(np.full(num_nodes, -np.inf)); hi.append(np.zeros(num_nodes))
    r += num_nodes
    add(r + be, off_s + be, np.ones(ne))                             # s <= r * per-replica
    add(r + be, be, -fastest[b_of])
    lo.append(np.full(ne, -np.inf)); hi.append(np.zeros(ne))
    r += ne
    add(r + e_of, off_s + be, np.ones(ne))                           # cover every expert's demand
    lo.append(load); hi.append(load)
    r += num_experts
    b2 = 2.0 * data.bytes_per_assignment * unit / tau
    singles_exit = singles_entry = 0.0
    singles = []
    for i, (nodes, exit_cap, entry_cap) in enumerate(cuts):
        members = (nodes[:, None] * num_experts + np.arange(num_experts)[None, :]).reshape(-1)
        loc = off_loc + i * num_experts + np.arange(num_experts)
        add(r + np.arange(num_experts), loc, np.ones(num_experts))  # loc <= what S serves
        add(r + np.tile(np.arange(num_experts), nodes.size), off_s + members, -np.ones(members.size))
        lo.append(np.full(num_experts, -np.inf)); hi.append(np.zeros(num_experts))
        r += num_experts
        own = float(demand[nodes].sum())
        for cap in {exit_cap, entry_cap}:
            if cap <= 0:
                continue
            k = b2 / cap
            add(np.full(num_experts, r), loc, np.full(num_experts, -2.0 * k))
            add(np.full(members.size, r), off_s + members, np.full(members.size, k))
            add([r], [col_mu], [-1.0])
            lo.append([-np.inf]); hi.append([-k * own])
            r += 1
        if nodes.size == 1:
            singles.append(loc)
            singles_exit += exit_cap
            singles_entry += entry_cap
    if len(singles) == num_nodes:   # the single nodes are a partition
        loc = np.concatenate(singles)
        for cap in {singles_exit, singles_entry}:
            if cap <= 0:
                continue
            k = 2.0 * b2 / cap
            add(np.full(loc.size, r), loc, np.full(loc.size, -k))
            add([r], [col_mu], [-1.0])
            lo.append([-np.inf]); hi.append([-k * float(demand.sum())])
            r += 1
    a, c = _with_schedule(data, rows, cols, vals, lo, hi, r, col_mu, col_x, col_z)
    col_lo = np.zeros(ncol)
    col_hi = np.full(ncol, np.inf)
    col_hi[:ne] = np.minimum(size, slots)[b_of]
    col_hi[off_s:off_loc] = load[e_of]
    col_hi[off_loc:col_mu] = np.concatenate([demand[nodes].sum(axis=0) for nodes, _, _ in cuts])
    col_lo[col_x] = x_lo / tau
    col_hi[col_x] = x_hi / tau
    col_lo[col_mu] = cut_bound(data) / tau
    integrality = np.zeros(ncol, dtype=bool)
    integrality[:ne] = True
    return LP(c, a, np.concatenate(lo), np.concatenate(hi), col_lo, col_hi, integrality=integrality), tau
