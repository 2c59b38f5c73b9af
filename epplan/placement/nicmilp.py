"""The replica counts per node with every holder's NIC: a MILP that decides the trade between
the busiest GPU and the holders' NICs where every GPU has its own NIC and holds one expert.

The trade-off bound (``bounds.tradeoff_bound``) lets a plan whose busiest GPU is within t give
each cold expert as many replicas as t allows, and its holders' NIC term then falls; it does not
see that integer replicas on nodes also send the hot experts' demand off a node that holds too
few of them for its own sources, into other holders' NICs. Here, per layer (B = node, e =
expert; every GPU one slot, ``ecmp`` routing, a NIC per GPU through which it sends and receives:
``PathModel.send_near``/``recv_near``),

    r[B, e] in {0..|B|}    GPUs of B holding e;  sum_e r[B, e] = |B|,  sum_B r[B, e] >= 1
    h[B, e] in {0, 1}      B holds e:  h <= r <= |B| h
    L[B, e], R[B, e]       what B's holders of e serve of e for B's own sources, for the others
    K[B, e], J[B, e, f]    what the sources on B's holders of e keep on B, in all and of f
    mu, X, z               busiest link, busiest GPU (seconds, scaled), the schedule's hidden part

    local     L <= n[B, e] h;   K = sum_f J[B, e, f] <= r kappa_B;   sum_e J[B, e, f] = L[B, f];
              J[B, e, f] <= r[B, e] d_B(f)  (a source keeps of f at most its demand for f)
    GPUs      L + R <= X r / c_B                         (r x X: binary expansion, exact)
    remote    T_e = sum_B (n[B, e] - L) = sum_B R;   (n[B, e] - L) + R <= T_e   (every B)
    NICs      2b (R + r * n_min(B) - K) <= mu r cap_B  (r x mu: binary expansion, exact)
    leaves    where some leaf's fabric links carry less than its NICs: per group of leaves over
              the same nodes (a scalable unit), 2b x (the far traffic of its nodes: remote flows
              less those under one leaf, at most r x (the leaf-mates' demand for e) each way)
              <= mu x (the group's fabric capacity)
    schedule  hidden * mu <= z,  X <= z;   minimise exposed * mu + z     (``epplan.schedule``)

with kappa_B the most one source of B keeps on B (its min(E, |B|) largest demands), d_B(f) the
largest demand for f of a source on B, n_min(B) the
least demand of a source on B, c_B the fastest GPU time per assignment on B and cap_B the
largest NIC capacity on B.

Why it is valid (a lower bound on every plan): a plan may fill every slot (a replica more never
hurts: its flows may stay 0), so every GPU holds one expert and its source belongs to the
holders of that expert. Sum a plan's per-GPU rows over B's holders of e: their GPU time is at
most r X / c_B, their NICs carry their remote receipts R and their sources' remote sending
(at least r n_min - K: what they keep is what B serves for them) within r mu cap_B / 2b, as every
cross-node byte of a GPU passes its own NIC under ``ecmp`` (dispatch and combine, 2b per
assignment). The remote flows of e form a transportation between nodes with every pair of
distinct nodes allowed, for which the rows per node are exact (Hall). Far traffic crosses each
of its two leaves' fabric links, so a group's leaves carry at least its nodes' far traffic. The
products r x X and r x mu are exact through r's binary digits (w_k <= X, w_k <= X_max b_k).
So a plan gives a feasible point at its own busiest link and GPU, and the MILP's dual bound is
at most its time; ``upper`` (the plan in hand) caps X and mu.

Why this model (measured 2026-12-04 on instance 6's layer 8 and instance 7's layer 0 of
``scripts/bench_planner.py``, docs/planner.md has the table). A per-GPU MILP with the same NIC and
leaf rows (x[g, e] binary, flows by the class of the pair: same node, same leaf, elsewhere;
7,187 columns at 64 GPUs x 16 experts) has an LP bound of 0.0105 s on 7 and 0.0138 s on 6
(the trade-off bound: 0.0139 s and 0.0174 s; its LP alone 14.5 s on 7), and in 60 s its MILP
found no plan: a node's GPUs are interchangeable, which counts per node remove. Here (12,579
columns, 1,536 integers on 6; 4,499 columns on 7) the model's time of a placement held fixed
is within 0.1-0.3 % of the placement's exact split on 6 and on 7's plan (6's plan: 0.021413 s
against 0.021459 s; 7's: 0.015157 s against 0.015172 s; without J, every source keeping up to
its D_B largest demands, 2.4-10.9 % below; on 7 the counts of its own optimum at X = 1.15 c,
dealt onto the rails naively, 3.5 % below), but its LP relaxation is 0.0123 s on 6 and 0.0103 s on 7: its MILP, warm-
started from the plan, in 240 s (6) and 120 s (7) kept the trade-off bound as its dual bound
and found 0.0 % and 0.4 % (model time) below the plan. So it neither raises the layer's bound
nor finds plans in a layer's budget, and ``solve`` does not call it: it is the instrument that
measured the trade (docs/planner.md), for the next model to beat.

Shape legend: N = nodes, E = experts, G = GPUs, W = leaf switches.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from epplan.placement.bounds import compute_bound, cut_bound
from epplan.placement.layer import LayerData
from epplan.placement.lp import LP

MAX_INTEGERS = 1024     # nodes x experts above which the model is not built


@dataclass
class NicResult:
    bound: float                     # seconds, valid for every plan (capped by ``upper``; 0: none)
    counts: np.ndarray | None        # int64[N, E] the MILP's replicas per node, or None
    status: str                      # optimal | time_limit | infeasible | skipped | failed
    seconds: float


def fabric_of(data: LayerData) -> dict | None:
    """What the model sees of the network: per GPU its NIC's capacity (bytes/s, the smaller of
    up and down) and its leaf (the switch its NIC plugs into), per leaf the capacity of its
    links to the fabric, out and in; None where the model does not apply (one
    node, routing other than ``ecmp``, a GPU without exactly one NIC of its own on its node)."""
    topo = data.lm.topology
    pm = topo.paths
    if topo.num_nodes < 2 or pm.routing != "ecmp" or pm.num_nics == 0:
        return None
    send, recv = pm.send_near.tocsr(), pm.recv_near.tocsr()
    if np.any(np.diff(send.indptr) != 1) or np.any(np.diff(recv.indptr) != 1):
        return None
    nic = send.indices
    if not np.array_equal(nic, recv.indices) or np.unique(nic).size != nic.size:
        return None
    if not np.array_equal(pm.nic_node[nic], np.asarray(topo.gpu_node)):
        return None
    cap = data.lm.cap
    leaf = pm.nic_switch[nic]                                                      # [G]
    switch_of = {topo.links[pm.nic_up[c]][1]: int(pm.nic_switch[c]) for c in nic}
    is_fabric = {d: n is None for d, n in topo.graph.nodes(data="node")}
    out_cap = np.zeros(pm.num_edge_switches)
    in_cap = np.zeros(pm.num_edge_switches)
    for k, (u, v) in enumerate(topo.links):
        if u in switch_of and is_fabric.get(v, False):
            out_cap[switch_of[u]] += cap[k]
        if v in switch_of and is_fabric.get(u, False):
            in_cap[switch_of[v]] += cap[k]
    return dict(nic=np.minimum(cap[pm.nic_up[nic]], cap[pm.nic_down[nic]]), leaf=leaf, out=out_cap, into=in_cap)


def nic_model(data: LayerData, upper: float, *, lower: float = 0.0, time_limit: float | None = None,
              gap: float = 1e-4, integer: bool = True, fixed: np.ndarray | None = None,
              gpu_time: float | None = None, link_time: float | None = None,
              start: np.ndarray | None = None, free: np.ndarray | None = None) -> NicResult:
    """Solve the model of the module docstring for one layer. ``upper``: the plan in hand's time
    (no plan faster is cut off; the bound is capped by it); ``lower``: a valid bound in hand (a
    row on the objective); ``integer`` False: the LP relaxation; ``fixed``: int64[N, E] replicas
    per node to hold (the model's time of that placement), where ``free`` (bool[N]) is False
    (all nodes without it); ``start``: int64[N, E] replicas to warm-start from."""
    t0 = time.monotonic()
    fab = None if data.pool > 1 or np.any(data.slots != 1) else fabric_of(data)
    node = np.asarray(data.lm.gpu_node)
    num_nodes, num_experts = int(node.max()) + 1, data.num_experts
    if fab is None or num_nodes * num_experts > MAX_INTEGERS:
        return NicResult(0.0, None, "skipped", 0.0)
    size = np.bincount(node, minlength=num_nodes)
    if size.sum() < num_experts:
        return NicResult(0.0, None, "skipped", 0.0)
    counts = data.counts
    unit = max(float(counts.sum()) / num_nodes, 1e-30)          # one node's demand
    tau = unit * float(np.mean(data.gpu_unit))                 # seconds per unit of mu, X, z
    n = np.zeros((num_nodes, num_experts))
    np.add.at(n, node, counts / unit)                           # [N, E]
    load = n.sum(axis=0)
    src_total = counts.sum(axis=1) / unit                       # [G]
    n_min = np.array([src_total[node == b].min() for b in range(num_nodes)])
    kappa = np.array([np.sort(counts[node == b] / unit, axis=1)[:, ::-1][:, :min(num_experts, size[b])].sum(axis=1).max()
                      for b in range(num_nodes)])
    d_max = np.stack([counts[node == b].max(axis=0) for b in range(num_nodes)]) / unit   # [N, E]
    c_b = np.array([data.gpu_unit[node == b].min() for b in range(num_nodes)])
    cap_b = np.array([fab["nic"][node == b].max() for b in range(num_nodes)])
    b2 = 2.0 * data.bytes_per_assignment
    # X and mu at most the plan in hand's time (the layer's time is at least each), or fixed
    x_hi = (upper if gpu_time is None else gpu_time) / tau
    mu_hi = (upper if link_time is None else link_time) / tau
    digits = int(np.ceil(np.log2(size.max() + 1)))
    ne = num_nodes * num_experts
    # Columns (each [N, E], index B * E + e unless noted): r | h | L | R | K | bits b[k] | wx[k] |
    # wm[k] (k < digits) | T [E] | mu | X | z
    names = ["r", "h", "L", "R", "K"] + [f"b{k}" for k in range(digits)] + [f"wx{k}" for k in range(digits)] \
        + [f"wm{k}" for k in range(digits)]
    off = {k: i * ne for i, k in enumerate(names)}
    off_t = len(names) * ne
    col_mu, col_x, col_z = off_t + num_experts, off_t + num_experts + 1, off_t + num_experts + 2
    ncol = col_z + 1
    b_of, e_of = np.divmod(np.arange(ne), num_experts)
    idx = np.arange(ne)
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(rr, cc, vv):
        rr, cc = np.asarray(rr, dtype=np.int64), np.asarray(cc, dtype=np.int64)
        rows.append(rr); cols.append(cc)
        vals.append(np.broadcast_to(np.asarray(vv, dtype=np.float64), cc.shape).copy())

    def rowset(low, high, num):
        nonlocal r
        lo.append(np.broadcast_to(np.asarray(low, dtype=np.float64), (num,)).copy())
        hi.append(np.broadcast_to(np.asarray(high, dtype=np.float64), (num,)).copy())
        first = r
        r += num
        return first

    # every slot filled, every expert somewhere
    add(r + b_of, off["r"] + idx, 1.0); rowset(size, size, num_nodes)
    add(r + e_of, off["r"] + idx, 1.0); rowset(1.0, np.inf, num_experts)
    # h <= r <= |B| h;  r = sum_k 2^k b_k
    add(r + idx, off["h"] + idx, 1.0); add(r + idx, off["r"] + idx, -1.0); rowset(-np.inf, 0.0, ne)
    add(r + idx, off["r"] + idx, 1.0); add(r + idx, off["h"] + idx, -size[b_of]); rowset(-np.inf, 0.0, ne)
    add(r + idx, off["r"] + idx, 1.0)
    for k in range(digits):
        add(r + idx, off[f"b{k}"] + idx, -float(2 ** k))
    rowset(0.0, 0.0, ne)
    # w^x_k <= X, w^x_k <= X_hi b_k; the same for mu
    for w, col, top in (("wx", col_x, x_hi), ("wm", col_mu, mu_hi)):
        for k in range(digits):
            add(r + idx, off[f"{w}{k}"] + idx, 1.0); add(r + idx, np.full(ne, col), -1.0); rowset(-np.inf, 0.0, ne)
            add(r + idx, off[f"{w}{k}"] + idx, 1.0); add(r + idx, off[f"b{k}"] + idx, -top); rowset(-np.inf, 0.0, ne)
    # local: L <= n h;  sum_e K = sum_e L per node;  K <= r kappa
    add(r + idx, off["L"] + idx, 1.0); add(r + idx, off["h"] + idx, -n.reshape(-1)); rowset(-np.inf, 0.0, ne)
    add(r + b_of, off["K"] + idx, 1.0); add(r + b_of, off["L"] + idx, -1.0); rowset(0.0, 0.0, num_nodes)
    add(r + idx, off["K"] + idx, 1.0); add(r + idx, off["r"] + idx, -kappa[b_of]); rowset(-np.inf, 0.0, ne)
    # what they keep is of the experts B serves them: K[B, e] = sum_f J[B, e, f], J[B, e, f] <=
    # r[B, e] x (the largest demand for f of a source on B), sum_e J[B, e, f] = L[B, f]
    off_j = ncol
    nee = num_nodes * num_experts * num_experts
    jb, je, jf = np.unravel_index(np.arange(nee), (num_nodes, num_experts, num_experts))
    add(r + jb * num_experts + je, off_j + np.arange(nee), 1.0); add(r + idx, off["K"] + idx, -1.0); rowset(0.0, 0.0, ne)
    add(r + np.arange(nee), off_j + np.arange(nee), 1.0)
    add(r + np.arange(nee), off["r"] + jb * num_experts + je, -d_max[jb, jf]); rowset(-np.inf, 0.0, nee)
    add(r + jb * num_experts + jf, off_j + np.arange(nee), 1.0); add(r + idx, off["L"] + idx, -1.0); rowset(0.0, 0.0, ne)
    ncol += nee
    # GPUs: c_B (L + R) <= X r  (in units: (L + R) unit c_B / tau <= sum_k 2^k wx_k)
    scale_x = unit * c_b[b_of] / tau
    add(r + idx, off["L"] + idx, scale_x); add(r + idx, off["R"] + idx, scale_x)
    for k in range(digits):
        add(r + idx, off[f"wx{k}"] + idx, -float(2 ** k))
    rowset(-np.inf, 0.0, ne)
    # remote: T_e = sum_B (n - L) = sum_B R;  (n - L) + R <= T_e
    add(r + e_of, off["L"] + idx, -1.0); add(r + np.arange(num_experts), off_t + np.arange(num_experts), -1.0)
    rowset(-load, -load, num_experts)
    add(r + e_of, off["R"] + idx, 1.0); add(r + np.arange(num_experts), off_t + np.arange(num_experts), -1.0)
    rowset(0.0, 0.0, num_experts)
    add(r + idx, off["L"] + idx, -1.0); add(r + idx, off["R"] + idx, 1.0); add(r + idx, off_t + e_of, -1.0)
    rowset(-np.inf, -n.reshape(-1), ne)
    # NICs: 2b (R + r n_min - K) unit / (cap_B tau) <= sum_k 2^k wm_k
    scale_m = b2 * unit / (cap_b[b_of] * tau)
    add(r + idx, off["R"] + idx, scale_m); add(r + idx, off["K"] + idx, -scale_m)
    add(r + idx, off["r"] + idx, scale_m * n_min[b_of])
    for k in range(digits):
        add(r + idx, off[f"wm{k}"] + idx, -float(2 ** k))
    rowset(-np.inf, 0.0, ne)
    extra_cols = 0
    leaf_rows = _leaf_groups(fab, node, num_nodes)
    if leaf_rows:
        # near flows: into B's holders of e from other nodes under their leaves, at most r x
        # the leaf-mates' largest demand for e each; out of B's sources likewise; the rest is far
        mates = _leaf_mates(fab, node, num_nodes)                                   # bool[N, N]
        per = _per_leaf_node(fab, node)
        off_ni, off_no = ncol, ncol + ne
        extra_cols = 2 * ne
        near_in_cap = per * (mates.astype(float) @ d_max)                           # [N, E] per holder
        add(r + idx, off_ni + idx, 1.0); add(r + idx, off["r"] + idx, -near_in_cap.reshape(-1)); rowset(-np.inf, 0.0, ne)
        add(r + idx, off_ni + idx, 1.0); add(r + idx, off["R"] + idx, -1.0); rowset(-np.inf, 0.0, ne)
        # out of B's sources to A's holders (A a leaf-mate): at most r[A, e] per d_max[B, e]
        for b in range(num_nodes):
            row = r + b * num_experts + np.arange(num_experts)
            add(row, off_no + b * num_experts + np.arange(num_experts), 1.0)
            for a in np.flatnonzero(mates[b]):
                add(row, off["r"] + a * num_experts + np.arange(num_experts), -per * d_max[b])
        rowset(-np.inf, 0.0, ne)
        add(r + idx, off_no + idx, 1.0); add(r + idx, off["L"] + idx, 1.0); rowset(-np.inf, n.reshape(-1), ne)
        add(r + e_of, off_ni + idx, 1.0); add(r + e_of, off_no + idx, -1.0); rowset(0.0, 0.0, num_experts)
        # per group of leaves: 2b (far in + far out of its nodes) <= mu x its fabric capacity
        for nodes, cap in leaf_rows:
            sel = np.isin(b_of, nodes)
            k_m = b2 * unit / (cap * tau)
            add(np.full(int(sel.sum()), r), off["R"] + idx[sel], k_m)
            add(np.full(int(sel.sum()), r), off_ni + idx[sel], -k_m)
            add(np.full(int(sel.sum()), r), off["L"] + idx[sel], -k_m)
            add(np.full(int(sel.sum()), r), off_no + idx[sel], -k_m)
            add([r], [col_mu], [-1.0])
            rowset(-np.inf, -k_m * float(n[nodes].sum()), 1)
    ncol += extra_cols
    sched = data.schedule
    add([r, r, r + 1, r + 1, r + 2, r + 2], [col_mu, col_z, col_x, col_z, col_mu, col_z],
        [sched.hidden, -1.0, 1.0, -1.0, sched.exposed, 1.0])
    rowset([-np.inf, -np.inf, lower / tau], [0.0, 0.0, upper / tau * (1 + 1e-9)], 3)
    a = sp.csc_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, ncol))
    c = np.zeros(ncol)
    c[col_mu], c[col_z] = sched.exposed, 1.0
    col_lo, col_hi = np.zeros(ncol), np.full(ncol, np.inf)
    col_hi[off["r"]:off["r"] + ne] = size[b_of]
    if fixed is not None:
        keep = np.ones(ne, dtype=bool) if free is None else ~np.asarray(free)[b_of]
        held = np.asarray(fixed, dtype=np.float64).reshape(-1)
        col_lo[off["r"] + idx[keep]] = col_hi[off["r"] + idx[keep]] = held[keep]
    col_hi[off["h"]:off["h"] + ne] = 1.0
    for k in range(digits):
        col_hi[off[f"b{k}"]:off[f"b{k}"] + ne] = 1.0
    col_lo[col_x], col_hi[col_x] = compute_bound(data) / tau, x_hi
    col_lo[col_mu], col_hi[col_mu] = cut_bound(data) / tau, mu_hi
    if gpu_time is not None:
        col_lo[col_x] = x_hi
    if link_time is not None:
        col_lo[col_mu] = mu_hi
    integrality = np.zeros(ncol, dtype=bool)
    if integer:
        integrality[off["r"]:off["r"] + 2 * ne] = True
        for k in range(digits):
            integrality[off[f"b{k}"]:off[f"b{k}"] + ne] = True
    lp = LP(c, a, np.concatenate(lo), np.concatenate(hi), col_lo, col_hi,
            integrality=integrality if integer else None)
    left = None if time_limit is None else max(0.05, time_limit - (time.monotonic() - t0))
    if integer:
        lp.h.setOptionValue("mip_rel_gap", gap)
        if start is not None:
            # the plan in hand's replicas per node (HiGHS completes the rest by a sub-MIP)
            start = np.asarray(start, dtype=np.int64).reshape(-1)
            known = [off["r"] + idx, off["h"] + idx] + [off[f"b{k}"] + idx for k in range(digits)]
            value = [start, (start > 0)] + [(start >> k) & 1 for k in range(digits)]
            lp.h.setSolution(len(known) * ne, np.concatenate(known).astype(np.int32),
                             np.concatenate(value).astype(np.float64))
    res = lp.solve(left)
    if res.status == "infeasible":      # no plan is faster than ``upper``
        return NicResult(float(upper), None, "infeasible", time.monotonic() - t0)
    if not integer:
        bound = res.objective * tau if res.status == "optimal" else 0.0
        return NicResult(max(0.0, min(bound, upper)), None, res.status, time.monotonic() - t0)
    info = lp.h.getInfo()
    dual = info.mip_dual_bound
    bound = float(dual) * tau if res.status in ("optimal", "time_limit") and np.isfinite(dual) else 0.0
    held = None
    if res.x.size == ncol and info.primal_solution_status == 2:
        held = np.round(res.x[off["r"]:off["r"] + ne]).astype(np.int64).reshape(num_nodes, num_experts)
    return NicResult(max(0.0, min(bound, upper)), held, res.status, time.monotonic() - t0)


def _leaf_groups(fab: dict, node: np.ndarray, num_nodes: int) -> list[tuple[np.ndarray, float]]:
    """[(nodes, fabric capacity)] per group of leaves over the same nodes whose leaves hold every
    GPU of those nodes (a scalable unit of a rail-optimised fabric), the capacity the smaller of
    their links out and in, summed; [] where every leaf's fabric links carry at least its NICs
    (a leaf is then never busier than its mean NIC, which the NIC rows see)."""
    leaf = fab["leaf"]
    num_leaves = int(leaf.max()) + 1
    nic_cap = np.bincount(leaf, weights=fab["nic"], minlength=num_leaves)
    if np.all(np.minimum(fab["out"], fab["into"]) >= nic_cap * (1 - 1e-9)):
        return []
    groups: dict[tuple, list[int]] = {}
    for w in range(num_leaves):
        groups.setdefault(tuple(np.unique(node[leaf == w]).tolist()), []).append(w)
    out = []
    for nodes, leaves in groups.items():
        if np.all(np.isin(leaf[np.isin(node, nodes)], leaves)):
            cap = min(float(fab["out"][leaves].sum()), float(fab["into"][leaves].sum()))
            if cap > 0:
                out.append((np.array(nodes, dtype=np.int64), cap))
    return out


def _leaf_mates(fab: dict, node: np.ndarray, num_nodes: int) -> np.ndarray:
    """bool[N, N]: distinct nodes with GPUs under one leaf."""
    leaf = fab["leaf"]
    mates = np.zeros((num_nodes, num_nodes), dtype=bool)
    for w in np.unique(leaf):
        nodes = np.unique(node[leaf == w])
        mates[np.ix_(nodes, nodes)] = True
    np.fill_diagonal(mates, False)
    return mates


def _per_leaf_node(fab: dict, node: np.ndarray) -> int:
    """The most GPUs of one node under one leaf."""
    leaf = fab["leaf"]
    pairs = leaf.astype(np.int64) * (int(node.max()) + 1) + node
    return int(np.bincount(pairs).max())
