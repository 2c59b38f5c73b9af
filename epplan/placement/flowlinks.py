"""Link loads of the split LP's flows through a few aggregates, not one row per (group, GPU).

The split LP (``splits.py``) has a flow y[i] from source group a = ya[i] to the replica on GPU
t = yt[i]; a kept link's seconds are sum_i coef[(a, t)] y[i] (``LayerData.coef``: every source
s of a, with its share w_s, sends s -> t and gets t -> s back). Written so, every cross-node
flow touches every link of its path in both directions (34 links per flow at 1,024 GPUs: 0.9M
nonzeros, and HiGHS's interior point factors the 4,096 link rows' dense coupling). Grouping the
flows by what their paths share gives the same link loads from far fewer nonzeros.

For s, t on different nodes the pair form factors (``LinkMap.cross_factors``) as

    pair(s -> t) = recv[t] + sum_j combo[t, j] send[s, j]     (j: rail and edge switch of a NIC)

so, with W[a, s] = w_s (the sources of a, all on one node) and P[a, j] = sum_s w_s combo[s, j]
(a's receiving profile), a cross-node flow y[i] from a to t puts on the links

    dispatch  sum_s w_s pair(s -> t) = recv[t] + sum_j combo[t, j] (W send)[a, j]
    combine   sum_s w_s pair(t -> s) = (W recv)[a] + sum_j P[a, j] send[t, j]

(sum_s w_s = 1). Summed over the flows, the links' seconds are linear in four aggregates:

    I[t]    = sum of cross-node y[i] into t                  on recv[t]
    O[a]    = sum of cross-node y[i] out of a                on (W recv)[a]
    F[a, j] = sum of cross-node y[i] out of a times combo[t, j]   on (W send)[a, j]
    H[t, p] = sum of cross-node y[i] into t from groups of profile p   on sum_j P[p, j] send[t, j]

(groups with equal rows of P share a profile: one per scalable unit at 1,024 GPUs). Same-node
flows keep their own coefficients (``direct``). The identity

    coef[(ya[i], yt[i])] == direct[i] + sum_v of_flow[v, i] links[v]

holds term by term, so the LP with the aggregates as columns defined by equality rows has the
same feasible flows, the same link loads and the same optimum as the one with ``coef``'s rows
(tests/test_flow_links.py checks both the identity and the two LPs' optima). Each flow touches
four aggregates; the aggregates' link rows are short and local (one node's links, or one GPU's).

``form="pairs"`` gives the unaggregated form (one aggregate Y[a, t] per (group, GPU) pair with
``coef``'s row), the slow reference.

Shape legend: n = flows, V = aggregates, K = kept links, G = GPUs, A = source groups,
J = (rail, edge switch) combinations of NICs, S = segments (``LinkMap.segment_links``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from epplan.placement.layer import LayerData


@dataclass
class FlowLinks:
    """Seconds on each kept link of flows y float64[n]: y @ direct + (of_flow @ y) @ links."""

    of_flow: sp.csr_matrix   # float64[V, n] aggregate v = sum_i of_flow[v, i] y[i]
    links: sp.csr_matrix     # float64[V, K] seconds on each kept link per unit of aggregate v
    direct: sp.csr_matrix    # float64[n, K] seconds per assignment of flows no aggregate carries

    @property
    def num_aggregates(self) -> int:
        return int(self.of_flow.shape[0])


def flow_links(data: LayerData, ya: np.ndarray, yt: np.ndarray, *, form: str = "aggregated") -> FlowLinks:
    """``FlowLinks`` of the flows group ya[i] -> GPU yt[i] (int64[n] each); ``form``: "aggregated"
    (module docstring) or "pairs" (one aggregate per distinct (group, GPU) pair, ``coef``'s rows)."""
    ya, yt = np.asarray(ya, dtype=np.int64), np.asarray(yt, dtype=np.int64)
    n, g, num_links = ya.size, data.num_gpus, data.link_unit.size
    if form == "pairs":
        pairs, y2p = np.unique(ya * g + yt, return_inverse=True)
        of_flow = sp.csr_matrix((np.ones(n), (y2p, np.arange(n))), shape=(pairs.size, n))
        return FlowLinks(of_flow=of_flow, links=data.coef()[pairs].tocsr(), direct=sp.csr_matrix((n, num_links)))
    if form != "aggregated":
        raise ValueError(f"form must be 'aggregated' or 'pairs', got {form!r}")
    lm = data.lm
    node = lm.gpu_node
    num_groups = data.num_groups
    group_node = np.zeros(num_groups, dtype=np.int64)
    group_node[data.group_of] = node            # a group's sources share a node (``source_groups``)
    cross = node[yt] != group_node[ya]
    seconds = sp.diags(data.link_unit)
    ic = np.flatnonzero(cross)
    a, t = ya[ic], yt[ic]
    blocks: list[tuple[np.ndarray, np.ndarray, np.ndarray, sp.csr_matrix]] = []   # (key, flow, value, seg rows)
    if ic.size:
        cf = lm.map.cross_factors()
        num_j = cf.num_combos
        w = sp.csr_matrix((data.weight, (data.group_of, np.arange(g))), shape=(num_groups, g))   # [A, G]
        profile = np.asarray((w @ cf.combo).todense())                                         # [A, J]
        profiles, p_of = np.unique(np.round(profile, 12), axis=0, return_inverse=True)
        p_of = p_of.ravel()
        ones = np.ones(ic.size)
        blocks.append((t, ic, ones, cf.recv))                                                 # I[t]
        blocks.append((a, ic, ones, (w @ cf.recv).tocsr()))                                   # O[a]
        combo = cf.combo[t].tocoo()                                                           # F[a, j]
        blocks.append((a[combo.row] * num_j + combo.col, ic[combo.row], combo.data,
                       (sp.kron(w, sp.identity(num_j)) @ cf.send).tocsr()))
        blocks.append((t * profiles.shape[0] + p_of[a], ic, ones,                             # H[t, p]
                       (sp.kron(sp.identity(g), sp.csr_matrix(profiles)) @ cf.send).tocsr()))
    rows, cols, vals, link_rows = [], [], [], []
    v0 = 0
    for key, flow, value, seg in blocks:
        keys, k_of = np.unique(key, return_inverse=True)
        rows.append(v0 + k_of.ravel())
        cols.append(flow)
        vals.append(value)
        link_rows.append(lm.segment_incidence(seg[keys]) @ seconds)
        v0 += keys.size
    if rows:
        of_flow = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=(v0, n))
        links = sp.vstack(link_rows).tocsr()
    else:
        of_flow, links = sp.csr_matrix((0, n)), sp.csr_matrix((0, num_links))
    return FlowLinks(of_flow=of_flow, links=links, direct=_same_node(data, ya, yt, np.flatnonzero(~cross)) @ seconds)


def _same_node(data: LayerData, ya: np.ndarray, yt: np.ndarray, idx: np.ndarray) -> sp.csr_matrix:
    """float64[n, K] shares on the kept links of the flows ``idx`` (same node): sum over the
    sources s != t of their group, w_s (incidence(s -> t) + incidence(t -> s)); other rows 0."""
    n = ya.size
    order = np.argsort(data.group_of, kind="stable")                 # sources by group
    size = np.bincount(data.group_of, minlength=data.num_groups)
    start = np.concatenate([[0], np.cumsum(size)[:-1]])
    flow = np.repeat(idx, size[ya[idx]])
    pos = np.arange(flow.size) - np.repeat(np.cumsum(size[ya[idx]]) - size[ya[idx]], size[ya[idx]])
    src = order[start[ya[flow]] + pos]
    dst = yt[flow]
    keep = src != dst
    flow, src, dst = flow[keep], src[keep], dst[keep]
    if flow.size == 0:
        return sp.csr_matrix((n, data.link_unit.size))
    inc = data.lm.pair_incidence(src, dst) + data.lm.pair_incidence(dst, src)        # [pairs, K]
    pick = sp.csr_matrix((data.weight[src], (flow, np.arange(flow.size))), shape=(n, flow.size))
    return (pick @ inc).tocsr()
