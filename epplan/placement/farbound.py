"""Link-class bounds: the traffic a class of links must carry because no plan can serve every
source near, under the GPU time the plan may spend.

The cut bounds (``bounds.py``) and the node-level model (``nodelp.py``) see what crosses a set of
nodes' boundary. Under ECMP on a rail-optimised fabric most of what a node sends crosses a spine
even inside its scalable unit: only pairs on one rail stay under their leaf. The path, not a cut,
decides which links a pair loads, so this bound works from the pairs.

For a class L of kept switch-to-switch links (a link class of ``Topology.link_class``: all
leaf-spine links, all spine-core links) let w(s, g) be the seconds one assignment of source s served on GPU g puts
on L's links together (dispatch and combine, forward and backward: ``LayerData.coef``). Then

    sum_{l in L} time_l = sum_{s, g} w(s, g) T[s, g] <= |L| max_l time_l,

with T[s, g] the assignments s sends to g. Cut w into levels w_1 < w_2 < ...: a pair with
w(s, g) >= w_j puts at least sum_{i <= j} (w_i - w_{i-1}) on L, so the sum is at least
sum_j (w_j - w_{j-1}) F_j, F_j the assignments on pairs with w >= w_j. And F_j >= W - near_j(t),
near_j(t) the most a plan whose busiest GPU is within t can serve on pairs below w_j, bounded by
the LP (a relaxation: every true plan gives a feasible point)

    max sum z[g, e]   z[g, e] <= v[g, e] x[g, e],  v[g, e] = min(t / c_g, sum_{s near g} n[s, e])
                      sum_g z[g, e] <= n_e,  sum_e z[g, e] <= t / c_g,  sum_e x[g, e] <= slots_g,
                      0 <= x <= 1

(x: g holds e; z: what g serves of e for sources near it). ``bounds.tradeoff_bound`` takes the
resulting L(t) with its own cut bounds and searches over t.

With the holders' NIC rows (``joint_link_bound``): the LP lets every plan spend its replicas on near
service, and the holders' bound (``bounds._Holders``) lets every plan spend them on its cold
experts' NICs; a plan has one set of replica counts R for both. For a level Lambda (the busiest
link's time) the holders' rows give each expert a least R_e (its holders' receiving NICs within
Lambda, and R_e >= n_e / (t x the fastest rate)); a class step j's near pairs of e's R_e holders
reach at most cover_j(R_e) sources (``_covers``: the most sources near any R GPUs, a max-coverage
MILP's dual bound per R, at most R k_j with k_j the most near one GPU, taken with its least concave
majorant), those with the largest demand for e at most, and serve at most R_e t / c_fastest, so

    near_je(R_e) = min(n_e, R_e t / c_fastest, top_e(cover_j(R_e)))

(top_e(m): the m largest n[s, e] summed, linear between integers; concave in R_e), and the class's
links carry at least sum_j step_j (W - sum_e near_je(R_e)) / |L|. Lambda is feasible where some
integer R above those floors, within the slots, puts at most Lambda on the class: the greedy over
the marginal near service (separable concave, so exact) finds the most near service; feasibility
grows with Lambda (the floors fall), so the least feasible Lambda, by bisection, is at most every
plan's busiest link. Measured on ``scripts/bench_planner.py`` instance 7's layer 0 at 1.15 x the
compute bound (the plan's GPU time): holders 0.010216 s, this LP 0.006979 s, together 0.010550 s
with R k_j for the cover and 0.011419 s with the MILP's (11 / 22 / 31 / 40 / 47 / 54 / 59 / 64
sources for 1-8 GPUs where R k_j gives 11 / 22 / 33 / 44 / 55 / 64: two holders in a scalable unit
share its leaves' sources, 2.5 s once per cluster); the plan 0.011873 s, its leaf-spine links' mean
0.5 % below their most (on the same cluster without oversubscription the plan comes within 1 % of
the bound, its NICs' mean within 0.7 % of their most).

Why an LP here and not in ``bounds.py``: w couples sources and GPUs pair by pair, and which GPUs
hold an expert decides both near service and compute, a transportation structure with no
greedy. The LP has 2 G E columns (64 GPUs x 16 experts: 2,048, 0.1-0.5 s per solve on the
2-core machine), built up to ``MAX_COLUMNS`` and ``MAX_GPUS``: at 512 GPUs x 16 experts one
solve took over a minute under load, more than a layer's share of the time limit. Measured on
scripts/bench_planner.py instance 7 (8 x DGX H100, 2:1 oversubscribed rail leaf/spine, ECMP):
the leaf-spine class lifts the layer's bound from 0.0107 s (cuts) to 0.0116 s at the compute
bound's GPU time.

Shape legend: G = GPUs, E = experts, K = kept links.
"""

from __future__ import annotations

import time

import numpy as np
import scipy.sparse as sp

from epplan.placement.bounds import _Holders, compute_bound, cut_link_bound, tradeoff_bound
from epplan.placement.layer import LayerData, pair_incidence_sym
from epplan.placement.lp import LP

MAX_COLUMNS = 8_192    # 2 G E: LP columns above which the class bounds are not built
MAX_GPUS = 128         # and GPUs above which (the pair weights are G^2 rows)
MAX_LEVELS = 3         # weight levels per class (any subset of levels is valid)


class FarBound:
    """L(t) from the link classes of one layer (module docstring)."""

    def __init__(self, data: LayerData) -> None:
        self.data = data
        self.classes: list[tuple[str, int, list[tuple[np.ndarray, float]]]] = []
        g_n = data.num_gpus
        if 2 * g_n * data.num_experts > MAX_COLUMNS or not 2 <= g_n <= MAX_GPUS:
            return
        topo = data.lm.topology
        coef = (pair_incidence_sym(data.lm) @ sp.diags(data.link_unit)).tocsc()   # [G*G, K] s
        # Switch-to-switch classes only: every cross-node pair crosses one NIC up-link and one
        # down-link each way, which the node cuts already count.
        node_of = dict(topo.graph.nodes(data="node"))
        fabric = np.array([node_of[topo.links[l][0]] is None and node_of[topo.links[l][1]] is None
                           for l in data.lm.kept], dtype=bool)
        cls = np.array(topo.link_class)[data.lm.kept]
        for name in np.unique(cls[fabric]):
            cols = np.flatnonzero((cls == name) & fabric)
            w = np.asarray(coef[:, cols].sum(axis=1)).ravel().reshape(g_n, g_n)
            pos = w[w > 0]
            if pos.size == 0:
                continue
            levels = np.unique(np.round(pos / pos.max(), 6)) * pos.max()
            if levels.size > MAX_LEVELS:
                levels = levels[np.linspace(0, levels.size - 1, MAX_LEVELS).round().astype(int)]
            steps, prev = [], 0.0
            for level in levels:
                near = w < level * (1 - 1e-6)
                low = float(w[~near].min())          # every far pair puts at least this on L
                if low > prev:
                    steps.append((near, low - prev))
                    prev = low
            self.classes.append((str(name), int(cols.size), steps))
        # the largest demands per expert (``joint_link_bound``): top[m, e] = the sum of the m
        # largest n[s, e]
        ranked = -np.sort(-data.counts, axis=0)
        self.top = np.vstack([np.zeros(data.num_experts), np.cumsum(ranked, axis=0)])   # [G + 1, E]

    def link_bound(self, t: float, *, only: str | None = None,
                   time_limit: float | None = None) -> tuple[float, str | None]:
        """(seconds, class): the busiest link's time in every plan whose busiest GPU is within t,
        from the class that gives the most (of class ``only``, if given)."""
        data = self.data
        total = float(data.counts.sum())
        cap = t / data.gpu_unit
        best, which = 0.0, None
        for name, size, steps in self.classes:
            if only is not None and name != only:
                continue
            loaded = 0.0
            for near, step in steps:
                served = near_max(data.counts, near, cap, data.slots, time_limit=time_limit)
                if served is None:
                    break
                loaded += step * max(0.0, total - served)
            if loaded / size > best:
                best, which = loaded / size, name
        return best, which

    def joint_link_bound(self, t: float, holders: _Holders, *, deadline: float | None = None) -> float:
        """Seconds: the busiest link's time in every plan whose busiest GPU is within t, from each
        class's far traffic and the holders' NIC rows with one set of replica counts (module
        docstring); 0.0 where the holders' rows do not apply (``_Holders.usable``). ``deadline``
        (time.monotonic()): for the covers' MILPs, on the first call per cluster."""
        if not self.classes or not holders.usable:
            return 0.0
        data = self.data
        num_gpus, num_experts = data.counts.shape
        num_slots = int(data.slots.sum())
        need = holders.need(t)                                                    # [E]
        if need.max() > num_gpus or need.sum() > num_slots:
            return float("inf")    # no plan has every GPU within t
        cap = t * holders.rate
        load = holders.load
        total = float(data.counts.sum())
        experts = np.arange(num_experts)
        best = 0.0
        for _, size, steps in self.classes:
            covers = [_covers(near, deadline) for near, _ in steps]               # [G + 1] each
            weight = sum(step for _, step in steps)

            def served(r: np.ndarray) -> np.ndarray:
                """float64[E] sum_j step_j near_je(r_e), seconds."""
                out = np.zeros(num_experts)
                for (_, step), cover in zip(steps, covers):
                    m = cover[r]
                    low = np.minimum(np.floor(m).astype(np.int64), num_gpus - 1)
                    top = self.top[low, experts] + (m - low) * (self.top[low + 1, experts] - self.top[low, experts])
                    out += step * np.minimum(np.minimum(load, r * cap), top)
                return out

            def fits(lam: float) -> bool:
                floors = holders.floors(lam / holders.unit, need)
                if floors is None:
                    return False
                r = np.minimum(floors, num_gpus).astype(np.int64)
                if r.sum() > num_slots:
                    return False
                now = served(r)
                gain = np.where(r < num_gpus, served(np.minimum(r + 1, num_gpus)) - now, -np.inf)
                for _ in range(num_slots - int(r.sum())):
                    e = int(np.argmax(gain))
                    if not gain[e] > 0:
                        break
                    r[e] += 1
                    now[e] += gain[e]
                    gain[e] = served(np.minimum(r + 1, num_gpus))[e] - now[e] if r[e] < num_gpus else -np.inf
                return (weight * total - now.sum()) / size <= lam

            hi = max(holders.unit * float(holders.levels.max()), weight * total / size)
            if not fits(hi):   # a guard: at hi the floors are need alone and the class carries at most hi
                continue
            lo = 0.0
            while hi - lo > 1e-6 * hi:
                mid = 0.5 * (lo + hi)
                if fits(mid):
                    hi = mid
                else:
                    lo = mid
            best = max(best, lo)
        return best


def far_tradeoff_bound(data: LayerData, *, deadline: float | None = None) -> float | None:
    """Seconds: ``bounds.tradeoff_bound`` with the link classes' L(t) beside the cuts', or None
    where no class sees more than the cuts at the compute bound's GPU time (L(t) only falls as
    t grows, so such a class would rarely help; the classes are dropped there to save the
    LPs, which keeps the bound valid, only no tighter)."""
    far = FarBound(data)
    c = compute_bound(data)
    if not far.classes or c <= 0:
        return None
    floor = cut_link_bound(data, c)
    left = None if deadline is None else max(0.05, deadline - time.monotonic())
    far.classes = [k for k in far.classes if far.link_bound(c, only=k[0], time_limit=left)[0] > floor * (1 + 1e-9)]
    if not far.classes:
        return None

    holders = _Holders(data)

    def extra(t: float) -> float:
        left = None if deadline is None else max(0.05, deadline - time.monotonic())
        return max(far.link_bound(t, time_limit=left)[0], far.joint_link_bound(t, holders, deadline=deadline))

    return tradeoff_bound(data, extra=extra, max_evals=20, deadline=deadline)


_COVERS: dict[bytes, np.ndarray] = {}
_COVER_SECONDS = 2.0    # per MILP (one per replica count); its dual bound is valid when stopped
_COVERS_SECONDS = 10.0  # all of one cluster's; past it (or the caller's deadline), r k


def _covers(near: np.ndarray, deadline: float | None = None) -> np.ndarray:
    """float64[G + 1]: at least the most sources near any r GPUs (near[s, g]), r = 0..G, concave
    in r. Per r the max-coverage MILP (x_g: g chosen, y_s <= sum of x over the GPUs near s,
    sum x = r; maximise sum y) gives its dual bound, rounded down; at most r k (k the most sources
    near one GPU) and the number of sources; then the least concave majorant (the greedy in
    ``FarBound.joint_link_bound`` needs concave gains). Past ``deadline`` or ``_COVERS_SECONDS``,
    r k for the counts left. Cached per near matrix (the topology's, shared by its layers), also
    when cut short (the values hold; the next layers do not pay again)."""
    key = np.packbits(near).tobytes() + bytes(str(near.shape), "ascii")
    hit = _COVERS.get(key)
    if hit is not None:
        return hit
    num_sources, num_gpus = near.shape
    k = int(near.sum(axis=0).max())
    r = np.arange(num_gpus + 1)
    value = np.minimum(r * k, num_sources).astype(np.float64)
    stop = time.monotonic() + _COVERS_SECONDS
    stop = stop if deadline is None else min(stop, deadline)
    a = sp.hstack([-sp.csr_matrix(near.astype(np.float64)), sp.eye(num_sources, format="csr")])
    a = sp.vstack([a, sp.hstack([sp.csr_matrix(np.ones((1, num_gpus))), sp.csr_matrix((1, num_sources))])]).tocsc()
    for count in range(2, num_gpus + 1):
        if value[count - 1] >= num_sources:
            value[count:] = num_sources
            break
        left = stop - time.monotonic()
        if left <= 0.05:
            break
        lp = LP(np.concatenate([np.zeros(num_gpus), -np.ones(num_sources)]), a,
                np.concatenate([np.full(num_sources, -np.inf), [count]]),
                np.concatenate([np.zeros(num_sources), [count]]),
                np.zeros(num_gpus + num_sources), np.ones(num_gpus + num_sources),
                integrality=np.concatenate([np.ones(num_gpus, dtype=bool), np.zeros(num_sources, dtype=bool)]))
        res = lp.solve(min(_COVER_SECONDS, left))
        if res.status in ("optimal", "time_limit"):
            dual = -float(lp.h.getInfo().mip_dual_bound)       # the most coverage any r GPUs reach
            if np.isfinite(dual):
                value[count] = min(value[count], np.floor(dual + 1e-6))
    # least concave majorant (upper hull) of (r, value)
    hull: list[int] = []
    for i in range(num_gpus + 1):
        while len(hull) >= 2 and (value[hull[-1]] - value[hull[-2]]) * (i - hull[-2]) <= \
                (value[i] - value[hull[-2]]) * (hull[-1] - hull[-2]):
            hull.pop()
        hull.append(i)
    out = np.interp(r, np.array(hull), value[hull])
    if len(_COVERS) > 16:
        _COVERS.clear()
    _COVERS[key] = out
    return out


def near_max(counts: np.ndarray, near: np.ndarray, cap: np.ndarray, slots: np.ndarray, *,
             time_limit: float | None = None) -> float | None:
    """An upper bound on the assignments any plan serves on near pairs (near[s, g]) with GPU g
    serving at most cap[g]: the LP of the module docstring. None if it did not solve."""
    g_n, e_n = counts.shape
    unit = max(float(counts.sum()) / g_n, 1e-30)
    need = near.T.astype(np.float64) @ counts / unit                       # [G, E] near demand
    v = np.minimum(cap[:, None] / unit, need)
    n_e = counts.sum(axis=0) / unit
    nz = g_n * e_n
    idx = np.arange(nz)
    g, e = idx // e_n, idx % e_n
    # columns: z (g, e) | x (g, e); rows: z - v x <= 0 | sum_g z <= n_e | sum_e z <= cap | sum_e x <= slots
    rows = np.concatenate([idx, idx, nz + e, nz + e_n + g, nz + e_n + g_n + g])
    cols = np.concatenate([idx, nz + idx, idx, idx, nz + idx])
    vals = np.concatenate([np.ones(nz), -v.ravel(), np.ones(nz), np.ones(nz), np.ones(nz)])
    a = sp.csc_matrix((vals, (rows, cols)), shape=(nz + e_n + 2 * g_n, 2 * nz))
    row_hi = np.concatenate([np.zeros(nz), n_e, cap / unit, slots.astype(np.float64)])
    row_lo = np.full(row_hi.size, -np.inf)
    c = np.concatenate([-np.ones(nz), np.zeros(nz)])
    col_hi = np.concatenate([np.full(nz, np.inf), np.ones(nz)])
    lp = LP(c, a, row_lo, row_hi, np.zeros(2 * nz), col_hi)
    res = lp.solve(time_limit)
    if res.status != "optimal":
        return None
    # The LP's dual objective bounds its optimum from above; HiGHS meets it to 1e-7 relative.
    return -res.objective * unit * (1 + 1e-6) + 1e-9 * unit
