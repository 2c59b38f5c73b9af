"""The placement MILP: where each expert's replicas go, with a certified lower bound.

Per layer, solved through PuLP (HiGHS by default, CBC selectable):

    x[e, g] in {0, 1}      GPU g holds a replica of expert e
    Y[a, e, g] >= 0        assignments source group a sends to e's replica on g (g not a's own
                           source: a GPU's traffic to itself is sigma)
    sigma[g, e] >= 0       assignments source g serves itself (free of links)
    mu, X, z               the max link time, the max GPU time, the schedule's hidden part
                           (seconds, scaled): the layer's time is exposed * mu + z

    demand    sum_g Y[a, e, g] + sum_{g in a} sigma[g, e] = n[a, e]
    replicas  sum_a Y[a, e, g] + sigma[g, e] <= M_eg x[e, g],  sigma[g, e] <= n[g, e] x[e, g]
              M_eg = min(n_e, z_ub / c_g): no GPU serves more than the incumbent's time allows
    slots     1 <= sum_e x[e, g] <= slots_g;   sum_g x[e, g] >= 1
    GPUs      c_g (sum_{a, e} Y[a, e, g] + sum_e sigma[g, e]) <= X; under ``--expert-tp``
              (``LayerData.pool`` = t) c_g / t times the sum over g's TP group (each rank
              computes 1 / t of its group's rows), and M_eg = min(n_e, t z_ub / max c_h over
              g's group)
    links     sum_{a, g} W_l(a, g) Y[a, g] <= mu                  for each kept link l
    groups    sum_{a, g} W_L(a, g) Y[a, g] <= |L| mu              for groups L of like links
    schedule  hidden * mu <= z,  X <= z      (``epplan.schedule``: serial, or C chunks)
    LB <= exposed * mu + z <= UB;  minimise exposed * mu + z

with W_l(a, g) = min over sources s of a (s != g) of the seconds one assignment s -> g puts on
link l (both directions of the a2a), and W_L the min over s of the sum over the group's links.

Why the bound is valid for the true per-GPU problem (any per-source split): map a true solution
to Y = sum over a's sources, sigma = the self-served part. Every true link load is
sum_s sum_g time(s, g, l) y[s, ., g] >= sum_{a, g} W_l(a, g) Y[a, g] since each term is
>= its group's minimum, and a group of |L| links each within mu sums to <= |L| mu. So every true
solution is feasible here at its own time (which increases with mu and X), and the MILP's dual bound is <= the true optimum.
With one source per group (small problems) the min is over one source: the model is exact.
With proportional-row groups the group rows are what make it tight: a node's NIC up-links
together carry every remote assignment of its sources exactly once, whatever the source, so
their sum is exact; the per-link min then only loosens the sending side, which the split LP's
proportional split balances evenly anyway.

The MILP's own placement (x) is re-split by the exact split LP; the incumbent warm-starts it.
"""

from __future__ import annotations

import os
import re
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from epplan.placement.layer import LayerData, pair_incidence_sym
from epplan.placement.splits import optimal_splits
from epplan.placement.types import LayerPlacement

MAX_FLOW_VARS = 60_000   # group x expert x GPU flows above which the MILP is not attempted


@dataclass
class Improved:
    layer: LayerPlacement | None   # a better placement, or None
    cost: float                    # its bottleneck, seconds
    link_s: float
    bound: float                   # a valid lower bound, seconds
    status: str                    # optimal | time_limit | skipped (too large) | failed
    seconds: float


@dataclass
class _Model:
    c: np.ndarray
    a: sp.csr_matrix
    row_lo: np.ndarray
    row_hi: np.ndarray
    col_lo: np.ndarray
    col_hi: np.ndarray
    is_int: np.ndarray
    tau: float                      # seconds per unit of z
    num_x: int                      # x occupies columns [0, num_x), index e * G + g
    col_z: int
    col_mu: int
    col_x: int
    index: tuple = ()               # column layout, for the warm start


def improve(data: LayerData, layer: LayerPlacement, cost: float, bound: float, *, solver: str = "highs",
            time_limit: float | None = None, gap: float = 0.01, exact: bool | None = None) -> Improved:
    """Run the MILP from the incumbent ``layer`` (bottleneck ``cost``); return what it found.

    exact: one source per group (None: when small enough).
    """
    t0 = time.monotonic()
    num_gpus, num_experts = data.num_gpus, data.num_experts
    if exact is None:
        exact = num_gpus * num_experts * num_gpus <= MAX_FLOW_VARS // 2
    group_of = np.arange(num_gpus) if exact else data.group_of
    num_groups = int(group_of.max()) + 1
    if num_groups * num_experts * num_gpus > MAX_FLOW_VARS:
        return Improved(None, cost, 0.0, bound, "skipped", time.monotonic() - t0)
    model = _build(data, group_of, ub=cost, lb=bound)
    start = _warm_start(model, data, group_of, layer, cost)
    deadline = None if time_limit is None else t0 + time_limit
    x, milp_bound, status = _run(model, solver, start, deadline, gap)
    bound_s = max(bound, milp_bound * model.tau) if milp_bound is not None else bound
    best_layer, best_cost, best_link = None, cost, 0.0
    if x is not None:
        xe = np.round(x[:model.num_x]).reshape(num_experts, num_gpus) > 0.5
        replicas = [np.flatnonzero(xe[e]) for e in range(num_experts)]
        if all(r.size for r in replicas) and np.all(xe.sum(axis=0) <= data.slots):
            res = optimal_splits(data, replicas)
            new_cost = res.bottleneck
            if new_cost < cost * (1 - 1e-9):
                best_layer, best_cost, best_link = res.layer, new_cost, res.link_time
    # The incumbent's cost is an upper bound on the optimum, so the bound never exceeds it.
    bound_s = min(bound_s, best_cost)
    return Improved(best_layer, best_cost, best_link, bound_s, status, time.monotonic() - t0)


# ---------------------------------------------------------------------------------------------

def _build(data: LayerData, group_of: np.ndarray, *, ub: float, lb: float) -> _Model:
    g_n, e_n = data.num_gpus, data.num_experts
    a_n = int(group_of.max()) + 1
    counts = data.counts
    gc = np.zeros((a_n, e_n))
    np.add.at(gc, group_of, counts)
    unit = max(gc.sum() / g_n, 1e-30)
    tau = unit * float(np.mean(data.gpu_unit))
    scale = unit / tau
    # Columns: x [E*G] | Y [(a, e, g) with demand, g != sole member] | sigma [(g, e)] | Yt [A*G] | z
    members = [np.flatnonzero(group_of == a) for a in range(a_n)]
    ya, ye, yg = [], [], []
    for a in range(a_n):
        es = np.flatnonzero(gc[a] > 0)
        gs = np.arange(g_n)
        if members[a].size == 1:
            gs = gs[gs != members[a][0]]
        ya.append(np.full(es.size * gs.size, a))
        ye.append(np.repeat(es, gs.size))
        yg.append(np.tile(gs, es.size))
    ya, ye, yg = (np.concatenate(v) for v in (ya, ye, yg))
    se, sg = np.nonzero(counts.T > 0)                       # sigma[(g, e)] where g demands e
    nx, ny, ns, nt = e_n * g_n, ya.size, se.size, a_n * g_n
    off_y, off_s, off_t = nx, nx + ny, nx + ny + ns
    col_z, col_mu, col_x = off_t + nt, off_t + nt + 1, off_t + nt + 2
    ncol = col_x + 1
    exposed, hidden = data.schedule.exposed, data.schedule.hidden
    rows, cols, vals, lo, hi = [], [], [], [], []
    r = 0

    def add(rr, cc, vv):
        rows.append(np.asarray(rr)); cols.append(np.asarray(cc)); vals.append(np.asarray(vv, dtype=np.float64))

    # demand (a, e)
    keys = ya * e_n + ye
    s_keys = group_of[sg] * e_n + se
    all_keys = np.unique(np.concatenate([keys, s_keys]))
    add(r + np.searchsorted(all_keys, keys), off_y + np.arange(ny), np.ones(ny))
    add(r + np.searchsorted(all_keys, s_keys), off_s + np.arange(ns), np.ones(ns))
    rhs = gc.ravel()[all_keys] / unit
    lo.append(rhs); hi.append(rhs)
    r += all_keys.size
    # replicas: sum_a Y[a, e, g] + sigma[g, e] - M x[e, g] <= 0
    # [G] most a GPU serves, in units; under --expert-tp every rank of its TP group computes
    # 1 / t of it (``workload.memory.expert_tp_rows``): t times as much, at the group's slowest.
    pool = data.pool
    group_rows = data.pooled_rows(np.arange(g_n))            # [G, pool]
    cap = ub * pool / data.gpu_unit[group_rows].max(axis=1) / unit
    load = gc.sum(axis=0) / unit
    big_m = np.minimum(load[:, None], cap[None, :])           # [E, G]
    add(r + ye * g_n + yg, off_y + np.arange(ny), np.ones(ny))
    add(r + se * g_n + sg, off_s + np.arange(ns), np.ones(ns))
    add(r + np.arange(nx), np.arange(nx), -big_m.ravel())
    lo.append(np.full(nx, -np.inf)); hi.append(np.zeros(nx))
    r += nx
    # sigma[g, e] <= n[g, e] x[e, g]
    add(r + np.arange(ns), off_s + np.arange(ns), np.ones(ns))
    add(r + np.arange(ns), se * g_n + sg, -counts[sg, se] / unit)
    lo.append(np.full(ns, -np.inf)); hi.append(np.zeros(ns))
    r += ns
    # Yt[a, g] = sum_e Y[a, e, g]
    add(r + ya * g_n + yg, off_y + np.arange(ny), np.ones(ny))
    add(r + np.arange(nt), off_t + np.arange(nt), -np.ones(nt))
    lo.append(np.zeros(nt)); hi.append(np.zeros(nt))
    r += nt
    # GPUs
    # GPUs: what g serves on g's row, or under --expert-tp 1 / t of it on each row of g's group
    on = group_rows[np.arange(nt) % g_n]                      # [nt, pool]
    add(r + on.ravel(), np.repeat(off_t + np.arange(nt), pool), data.gpu_unit[on].ravel() / pool * scale)
    on = group_rows[sg]                                       # [ns, pool]
    add(r + on.ravel(), np.repeat(off_s + np.arange(ns), pool), data.gpu_unit[on].ravel() / pool * scale)
    add(r + np.arange(g_n), np.full(g_n, col_x), -np.ones(g_n))
    lo.append(np.full(g_n, -np.inf)); hi.append(np.zeros(g_n))
    r += g_n
    # links and link groups
    w_link, w_group, group_size = _min_weights(data, group_of, members)
    for w, size in ((w_link, None), (w_group, group_size)):
        w = (w * scale).tocoo()                               # (A*G, rows)
        if w.nnz == 0:
            continue
        nrow = w.shape[1]
        used = np.unique(w.col)
        remap = np.full(nrow, -1)
        remap[used] = np.arange(used.size)
        add(r + remap[w.col], off_t + w.row, w.data)
        add(r + np.arange(used.size), np.full(used.size, col_mu),
            -(np.ones(used.size) if size is None else size[used].astype(np.float64)))
        lo.append(np.full(used.size, -np.inf)); hi.append(np.zeros(used.size))
        r += used.size
    # slots and cover
    add(r + np.arange(nx) % g_n, np.arange(nx), np.ones(nx))
    lo.append(np.ones(g_n)); hi.append(data.slots.astype(np.float64))
    r += g_n
    add(r + np.arange(nx) // g_n, np.arange(nx), np.ones(nx))
    lo.append(np.ones(e_n)); hi.append(np.full(e_n, np.inf))
    r += e_n
    # schedule: hidden mu - z <= 0, X - z <= 0; the objective between the bounds
    add([r, r, r + 1, r + 1, r + 2, r + 2], [col_mu, col_z, col_x, col_z, col_mu, col_z],
        [hidden, -1.0, 1.0, -1.0, exposed, 1.0])
    lo.append([-np.inf, -np.inf, lb / tau * (1 - 1e-9)]); hi.append([0.0, 0.0, ub / tau * (1 + 1e-9)])
    r += 3
    a = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(r, ncol))
    c = np.zeros(ncol)
    c[col_mu], c[col_z] = exposed, 1.0
    col_lo = np.zeros(ncol)
    col_hi = np.full(ncol, np.inf)
    col_hi[:nx] = 1.0
    is_int = np.zeros(ncol, dtype=bool)
    is_int[:nx] = True
    return _Model(c=c, a=a, row_lo=np.concatenate(lo), row_hi=np.concatenate(hi), col_lo=col_lo,
                  col_hi=col_hi, is_int=is_int, tau=tau, num_x=nx, col_z=col_z, col_mu=col_mu, col_x=col_x,
                  index=(off_y, off_s, off_t, ya, ye, yg, se, sg, unit))


def _min_weights(data: LayerData, group_of: np.ndarray, members: list[np.ndarray]):
    """(W_l [A*G, K], W_L [A*G, groups], |L| per group): per (group a, GPU g), the least seconds
    one assignment from a source of a (other than g) to g puts on each kept link / link group."""
    g_n = data.num_gpus
    inc = pair_incidence_sym(data.lm) @ sp.diags(data.link_unit)     # (G*G, K) seconds
    inc = inc.tocsr()
    member = _link_groups(data)                                      # (K, groups) 0/1
    size = np.asarray(member.sum(axis=0)).ravel()
    w_link, w_group = [], []
    for a, ms in enumerate(members):
        rows = (ms[:, None] * g_n + np.arange(g_n)[None, :]).ravel()    # (|a| * G) pairs (s, g)
        block = inc[rows]
        grp = (block @ member).toarray().reshape(ms.size, g_n, -1)
        blk = block.toarray().reshape(ms.size, g_n, -1)
        self_pair = ms[:, None] == np.arange(g_n)[None, :]             # (|a|, G): s == g
        blk[self_pair] = np.inf
        grp[self_pair] = np.inf
        wl = blk.min(axis=0)
        wg = grp.min(axis=0)
        wl[~np.isfinite(wl)] = 0.0                                     # g is a's only source
        wg[~np.isfinite(wg)] = 0.0
        w_link.append(sp.csr_matrix(wl))
        w_group.append(sp.csr_matrix(wg))
    return sp.vstack(w_link).tocsr(), sp.vstack(w_group).tocsr(), size


def _link_groups(data: LayerData) -> sp.csr_matrix:
    """(K, groups) membership: kept links of one node with the same class and device kinds (a
    node's NIC up-links, its NVLink down-links, ...), and fabric links by their switch and
    direction (a leaf's uplinks, a leaf's downlinks)."""
    topo = data.lm.topology
    graph = topo.graph
    keys: dict[tuple, int] = {}
    rows, cols = [], []
    for k, l in enumerate(data.lm.kept):
        u, v = topo.links[l]
        nu, nv = graph.nodes[u].get("node"), graph.nodes[v].get("node")
        ku, kv = graph.nodes[u]["kind"], graph.nodes[v]["kind"]
        cls = topo.link_class[l]
        node = nu if nu is not None else nv
        if node is not None:
            group_keys = [("node", node, cls, ku, kv)]
        else:
            group_keys = [("from", u, cls), ("to", v, cls)]
        for key in group_keys:
            rows.append(k)
            cols.append(keys.setdefault(key, len(keys)))
    return sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(data.lm.kept.size, max(1, len(keys))))


def _warm_start(model: _Model, data: LayerData, group_of: np.ndarray, layer: LayerPlacement,
                cost: float) -> np.ndarray:
    """A feasible column vector from the incumbent: its placement and its flows, grouped."""
    off_y, off_s, off_t, ya, ye, yg, se, sg, unit = model.index
    g_n, e_n = data.num_gpus, data.num_experts
    x0 = np.zeros(model.c.size)
    for e, ranks in enumerate(layer.replicas):
        x0[e * g_n + np.asarray(ranks)] = 1.0
    a_n = int(group_of.max()) + 1
    flow = np.zeros((a_n, e_n, g_n))
    selfs = np.zeros((g_n, e_n))
    for e, ranks in enumerate(layer.replicas):
        f = data.counts[:, e][:, None] * layer.split[e]              # [G, R_e]
        for j, t in enumerate(ranks):
            selfs[t, e] += f[t, j]
            col = f[:, j].copy()
            col[t] = 0.0
            np.add.at(flow[:, e, t], group_of, col)
    x0[off_y:off_y + ya.size] = flow[ya, ye, yg] / unit
    x0[off_s:off_s + se.size] = selfs[sg, se] / unit
    yt = flow.sum(axis=1).ravel() / unit
    x0[off_t:off_t + yt.size] = yt
    _, link_s, gpu_s = data.time_of(layer.flows(data.counts))
    x0[model.col_mu], x0[model.col_x] = link_s / model.tau, gpu_s / model.tau
    x0[model.col_z] = max(data.schedule.hidden * x0[model.col_mu], x0[model.col_x])
    return x0


def _run(model: _Model, solver: str, start: np.ndarray, deadline: float | None, gap: float):
    """Solve through PuLP by ``deadline`` (time.monotonic()). Returns (x or None, dual bound in
    z units or None, status)."""
    import pulp

    from epplan.placement.lp import new_highs

    prob = pulp.LpProblem("placement", pulp.LpMinimize)
    ncol = model.c.size
    # PuLP >= 3.3 attaches variables to the model; older PuLP builds them free-standing.
    new_var = getattr(prob, "add_variable", None) or pulp.LpVariable
    xs = [new_var(f"v{j:07d}", lowBound=float(model.col_lo[j]),
                  upBound=None if not np.isfinite(model.col_hi[j]) else float(model.col_hi[j]),
                  cat=pulp.LpInteger if model.is_int[j] else pulp.LpContinuous)
          for j in range(ncol)]
    prob += pulp.LpAffineExpression([(xs[j], float(model.c[j])) for j in np.flatnonzero(model.c)])
    a = model.a.tocsr()
    for i in range(a.shape[0]):
        lo_i, hi_i = a.indptr[i], a.indptr[i + 1]
        expr = pulp.LpAffineExpression(zip([xs[j] for j in a.indices[lo_i:hi_i]], a.data[lo_i:hi_i]))
        lo, hi = model.row_lo[i], model.row_hi[i]
        if lo == hi:
            prob += expr == float(lo)
        else:
            if np.isfinite(hi):
                prob += expr <= float(hi)
            if np.isfinite(lo):
                prob += expr >= float(lo)
    for j in range(ncol):
        xs[j].setInitialValue(float(start[j]))
    # What is left after building the model (PuLP's Python objects are not free at this size).
    time_limit = None if deadline is None else max(0.5, deadline - time.monotonic())
    if solver == "cbc":
        return _run_cbc(prob, xs, model, time_limit, gap)
    new_highs()  # the licence banner, silenced once per process
    warm = _HiGHSWarm(msg=False, timeLimit=time_limit, gapRel=gap, threads=1)
    warm.start = [(xs[j], float(start[j])) for j in range(ncol)]
    prob.solve(warm)
    h = prob.solverModel
    info = h.getInfo()
    status = _highs_status(h)
    bound = float(info.mip_dual_bound) if np.isfinite(info.mip_dual_bound) else None
    x = np.array([v.varValue if v.varValue is not None else np.nan for v in xs])
    if not np.all(np.isfinite(x)):
        x = None
    return x, bound, status


class _HiGHSWarm:
    """PuLP's HiGHS interface, handing the incumbent to HiGHS before it runs."""

    def __new__(cls, **kwargs):
        import pulp

        class Warm(pulp.HiGHS):
            def callSolver(self, lp):
                import highspy

                h = lp.solverModel
                sol = highspy.HighsSolution()
                sol.col_value = [value for _, value in sorted(self.start, key=lambda p: p[0].index)]
                sol.value_valid = True
                h.setSolution(sol)
                h.run()

        return Warm(**kwargs)


def _highs_status(h) -> str:
    import highspy

    s = h.getModelStatus()
    if s == highspy.HighsModelStatus.kOptimal:
        return "optimal"
    if s == highspy.HighsModelStatus.kTimeLimit:
        return "time_limit"
    return "failed"


def _run_cbc(prob, xs, model: _Model, time_limit: float | None, gap: float):

    fd, log = tempfile.mkstemp(suffix=".log", prefix="epplan-cbc-")
    os.close(fd)
    try:
        prob.solve(_cbc_command(msg=False, timeLimit=time_limit, gapRel=gap, warmStart=True,
                                threads=1, logPath=log))
        text = open(log).read()
    finally:
        os.unlink(log)
    # "Optimal solution found (within gap tolerance)" is not a proof of optimality: it comes
    # with a "Lower bound" line, which is what we take.
    proven = bool(re.search(r"Result - Optimal solution found\s*\n", text))
    status = "optimal" if "Result - Optimal solution found" in text else (
        "time_limit" if "Stopped on time" in text else "failed")
    bound = _cbc_bound(text, optimal=proven)
    x = np.array([v.varValue if v.varValue is not None else np.nan for v in xs])
    if not np.all(np.isfinite(x)):
        x = None
    return x, bound, status


def _cbc_command(**options):
    """CBC through PuLP: a CBC on the PATH (COIN_CMD; PuLP 4 installs it with pulp[cbc]) or
    the binary bundled with PuLP 3 (PULP_CBC_CMD, deprecated there)."""
    import warnings

    import pulp

    from epplan.errors import param, PlacementError

    coin = getattr(pulp, "COIN_CMD", None)
    if coin is not None and coin(msg=False).available():
        return coin(**options)
    bundled = getattr(pulp, "PULP_CBC_CMD", None)
    if bundled is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            cmd = bundled(**options)
        if cmd.available():
            return cmd
    raise PlacementError(f"{param('solver', 'cbc')}: no CBC found through PuLP; install it (pip install "
                         f"'pulp[cbc]') or use {param('solver', 'highs')}")


def _cbc_bound(text: str, *, optimal: bool) -> float | None:
    """CBC's best possible objective from its log: the objective itself when it proved
    optimality, else the final summary's "Lower bound" (or the last progress line's)."""
    if optimal:
        found = re.findall(r"Objective value:\s*([-+0-9.eE]+)", text)
        if found:
            return float(found[-1])
    found = re.findall(r"Lower bound:\s*([-+0-9.eE]+)", text)
    if found:
        return float(found[-1])
    found = re.findall(r"best possible\s*([-+0-9.eE]+)", text)
    return float(found[-1]) if found else None
