"""The planner's view of the network: per GPU pair, the links its traffic crosses, in seconds.

``Topology.link_loads`` (``epplan.topology.paths``) maps a whole [G, G] traffic matrix to link
loads. An optimisation model needs the map's coefficients instead: for a pair (s, t), the share of
one unit sent s -> t that lands on each link. ``pair_incidence`` rebuilds them from the path
model's sparse segment tables (the same tables ``link_loads`` applies), so that

    link_loads(T)[l] == sum over pairs (s, t), s != t, of T[s, t] * incidence[(s, t), l]

for every T (tested against ``PathModel.pair_fractions``).

Most links can never be a layer's bottleneck, whatever the traffic; ``LinkModel`` drops them so
that the models stay small. A link l is *dominated* when its load is at most a fixed combination
of NIC-port loads with no more capacity than l has:

    every pair crossing l leaves through NIC up-links (shares summing to 1), and
    load_l <= sum_c alpha_c load(up_c)  with  alpha_c = max share of up_c's pairs that cross l;
    if sum_c alpha_c cap(up_c) <= cap_l, then time_l <= max_c time(up_c).

(and the same with NIC down-links). This drops the leaf/spine links of non-blocking fabrics
(their uplinks carry at most what their NICs send) and the PCIe hops that carry exactly one NIC's
traffic at a higher rate. Pairs inside a node never leave through a NIC, so links they use are
always kept. The drop is exact for the bottleneck: the kept links' maximum equals the maximum
over all links whenever it is set by a link, which ``LinkModel.check`` verifies in tests.

Shape legend: G = GPUs, L = links, K = kept links, P = pairs, C = NICs, R = rails,
W = edge switches.
"""

from __future__ import annotations

import weakref

import numpy as np
import scipy.sparse as sp

_CACHE: "weakref.WeakKeyDictionary[object, LinkModel]" = weakref.WeakKeyDictionary()


def link_model(topology) -> "LinkModel":
    """The cached ``LinkModel`` of ``topology``."""
    paths = topology.paths  # Topology is an unhashable dataclass; its path model is the key
    lm = _CACHE.get(paths)
    if lm is None:
        lm = LinkModel(topology)
        _CACHE[paths] = lm
    return lm


class LinkModel:
    """Pair -> link incidence of a topology, restricted to the links that can bind.

    kept:      int64[K] indices (into ``topology.links``) of links that can bind.
    cap:       float64[L] bytes per second of every link.
    """

    def __init__(self, topology) -> None:
        self.topology = topology
        pm = topology.paths
        self.pm = pm
        self.num_gpus = g = topology.num_gpus
        self.num_links = topology.num_links
        self.cap = np.asarray(topology.link_capacity, dtype=np.float64) * 1e9
        self.gpu_node = np.asarray(topology.gpu_node)
        self.has_network = pm.num_nics > 0 and topology.num_nodes > 1
        # Same-node pair -> row of pm.intra.
        self.intra_row = np.full((g, g), -1, dtype=np.int64)
        self.intra_row[pm.intra_src, pm.intra_dst] = np.arange(pm.intra_src.size)
        self._near()
        self.kept = self._undominated()
        self.col_of = np.full(self.num_links, -1, dtype=np.int64)
        self.col_of[self.kept] = np.arange(self.kept.size)

    # ------------------------------------------------------------------ incidence

    def _near(self) -> None:
        """Padded per-GPU NIC tables: near_nic[g, k] (-1 = none), near_w[g, k]."""
        pm = self.pm
        if not self.has_network:
            self.near_nic = np.full((self.num_gpus, 1), -1, dtype=np.int64)
            self.near_w = np.zeros((self.num_gpus, 1))
            self.recv_nic, self.recv_w = self.near_nic, self.near_w
            return

        def padded(m):
            m = m.tocsr()
            width = max(1, int(np.diff(m.indptr).max()))
            nic = np.full((m.shape[0], width), -1, dtype=np.int64)
            w = np.zeros((m.shape[0], width))
            for g in range(m.shape[0]):
                lo, hi = m.indptr[g], m.indptr[g + 1]
                nic[g, :hi - lo] = m.indices[lo:hi]
                w[g, :hi - lo] = m.data[lo:hi]
            return nic, w

        self.near_nic, self.near_w = padded(pm.send_near)
        self.recv_nic, self.recv_w = padded(pm.recv_near)

    def _segment_links(self) -> sp.csr_matrix:
        """Segments x links: rows [intra pairs | egress (G*R) | ingress (G*R) | up (C) | down (C) |
        fabric (W*W)]; the offsets are stored on ``self``."""
        pm, num_links = self.pm, self.num_links
        blocks = [pm.intra.tocsr()]
        self.off_egress = pm.intra.shape[0]
        if not self.has_network:
            self.off_ingress = self.off_up = self.off_down = self.off_fabric = self.off_egress
            return sp.vstack(blocks).tocsr()
        gr = pm.egress.shape[0]
        blocks += [pm.egress.tocsr(), pm.ingress.tocsr()]
        self.off_ingress = self.off_egress + gr
        self.off_up = self.off_ingress + gr
        c = pm.num_nics
        up = sp.csr_matrix((np.ones(c), (np.arange(c), pm.nic_up)), shape=(c, num_links))
        down = sp.csr_matrix((np.ones(c), (np.arange(c), pm.nic_down)), shape=(c, num_links))
        blocks += [up, down]
        self.off_down = self.off_up + c
        self.off_fabric = self.off_down + c
        if pm.num_edge_switches > 1:
            blocks.append(pm.fabric_routes.tocsr())
        return sp.vstack(blocks).tocsr()

    def _pair_segments(self, src: np.ndarray, dst: np.ndarray) -> sp.csr_matrix:
        """Pairs x segments (see ``_segment_links``) for pairs src[i] -> dst[i], src != dst."""
        pm = self.pm
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
        num_pairs = src.size
        rows, cols, vals = [], [], []
        same = self.gpu_node[src] == self.gpu_node[dst]
        idx = np.flatnonzero(same)
        if idx.size:
            r = self.intra_row[src[idx], dst[idx]]
            assert np.all(r >= 0), "same-node pair without an intra-node path"
            rows.append(idx); cols.append(r); vals.append(np.ones(idx.size))
        idx = np.flatnonzero(~same)
        if idx.size and self.has_network:
            s, t = src[idx], dst[idx]
            num_rails, num_w = pm.num_rails, pm.num_edge_switches
            rail, sw = pm.nic_rail, pm.nic_switch
            # Receiving side: the destination's nearest NICs.
            for k in range(self.recv_nic.shape[1]):
                c2 = self.recv_nic[t, k]
                v = self.recv_w[t, k]
                ok = c2 >= 0
                if not ok.any():
                    continue
                i, c2, v, si, ti = idx[ok], c2[ok], v[ok], s[ok], t[ok]
                rows += [i, i]
                cols += [self.off_down + c2, self.off_ingress + ti * num_rails + rail[c2]]
                vals += [v, v]
                # Sending side: the source's nearest NICs (ecmp), or its node's NIC on the
                # receiving rail where it has one (rail_aligned, PXN).
                if pm.routing == "rail_aligned":
                    c1 = pm.node_rail_nic[self.gpu_node[si], rail[c2]]
                    m = c1 >= 0
                    if m.any():
                        self._send(rows, cols, vals, i[m], si[m], c1[m], c2[m], v[m], rail, sw, num_rails, num_w)
                    um = ~m
                else:
                    um = np.ones(i.size, dtype=bool)
                if um.any():
                    for k1 in range(self.near_nic.shape[1]):
                        c1 = self.near_nic[si[um], k1]
                        w1 = self.near_w[si[um], k1]
                        okk = c1 >= 0
                        if okk.any():
                            self._send(rows, cols, vals, i[um][okk], si[um][okk], c1[okk], c2[um][okk],
                                       v[um][okk] * w1[okk], rail, sw, num_rails, num_w)
        if not rows:
            return sp.csr_matrix((num_pairs, self._num_segments()))
        m = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                          shape=(num_pairs, self._num_segments()))
        m.sum_duplicates()
        return m

    def _send(self, rows, cols, vals, i, s, c1, c2, v, rail, sw, num_rails, num_w) -> None:
        rows += [i, i]
        cols += [self.off_egress + s * num_rails + rail[c1], self.off_up + c1]
        vals += [v, v]
        if num_w > 1:
            differ = sw[c1] != sw[c2]
            if differ.any():
                rows.append(i[differ])
                cols.append(self.off_fabric + sw[c1][differ] * num_w + sw[c2][differ])
                vals.append(v[differ])

    def _num_segments(self) -> int:
        pm = self.pm
        if not self.has_network:
            return pm.intra.shape[0]
        n = self.off_fabric
        if pm.num_edge_switches > 1:
            n += pm.num_edge_switches ** 2
        return n

    def pair_incidence(self, src: np.ndarray, dst: np.ndarray, *, all_links: bool = False) -> sp.csr_matrix:
        """float64[P, K] (or [P, L] with ``all_links``): share of one unit sent src[i] -> dst[i]
        on each kept link. Pairs must have src != dst (a GPU's traffic to itself is local)."""
        if not hasattr(self, "_seg_links_all"):
            self._seg_links_all = self._segment_links()
        seg = self._seg_links_all if all_links else self._seg_links_kept
        return (self._pair_segments(src, dst) @ seg).tocsr()

    # ------------------------------------------------------------------ dominance

    def _undominated(self) -> np.ndarray:
        """int64[K] links that are not provably dominated (module docstring)."""
        pm, num_links = self.pm, self.num_links
        self._seg_links_all = seg = self._segment_links()
        keep = np.ones(num_links, dtype=bool)
        if self.has_network:
            cap_up, cap_down = self.cap[pm.nic_up], self.cap[pm.nic_down]
            nic_links = np.zeros(num_links, dtype=bool)
            nic_links[pm.nic_up] = nic_links[pm.nic_down] = True
            intra_used = np.zeros(num_links, dtype=bool)
            intra_used[pm.intra.tocsr().indices] = True
            dominated = np.zeros(num_links, dtype=bool)
            # Fabric links: a NIC's traffic crosses l at most at its switch's largest route share.
            if pm.num_edge_switches > 1:
                num_w = pm.num_edge_switches
                routes = pm.fabric_routes.tocsr()
                fabric = np.zeros(num_links, dtype=bool)
                fabric[routes.indices] = True
                from_w = np.zeros((num_w, num_links))
                to_w = np.zeros((num_w, num_links))
                for w in range(num_w):
                    from_w[w] = routes[w * num_w:(w + 1) * num_w].max(axis=0).toarray().ravel()
                    to_w[w] = routes[np.arange(num_w) * num_w + w].max(axis=0).toarray().ravel()
                by_up = from_w[pm.nic_switch].T @ cap_up <= self.cap * (1 + 1e-9)
                by_down = to_w[pm.nic_switch].T @ cap_down <= self.cap * (1 + 1e-9)
                dominated |= fabric & (by_up | by_down)
            # Node-internal links that only cross-node pairs use (e.g. GPU <-> NIC PCIe): the
            # largest share, over the pairs each NIC carries, of those pairs on the link.
            cand = ~nic_links & ~intra_used & ~dominated
            if pm.num_edge_switches > 1:
                cand &= ~fabric
            cand = np.flatnonzero(cand)
            if cand.size:
                alpha_up, alpha_down = self._alpha(seg[:, cand].tocsr())
                by_up = alpha_up.T @ cap_up <= self.cap[cand] * (1 + 1e-9)
                by_down = alpha_down.T @ cap_down <= self.cap[cand] * (1 + 1e-9)
                dominated[cand[by_up | by_down]] = True
            keep = ~dominated
        kept = np.flatnonzero(keep)
        self._seg_links_kept = seg[:, kept].tocsr()
        return kept

    def _alpha(self, seg_cand: sp.csr_matrix) -> tuple[np.ndarray, np.ndarray]:
        """float64[C, k] twice: per NIC, the max share on each candidate link of the cross-node
        pairs that leave (enter) through that NIC, over all such pairs."""
        pm, g = self.pm, self.num_gpus
        alpha_up = np.zeros((pm.num_nics, seg_cand.shape[1]))
        alpha_down = np.zeros_like(alpha_up)
        chunk = max(1, 2048 * 64 // max(g, 1))
        for lo in range(0, g, chunk):
            src = np.repeat(np.arange(lo, min(g, lo + chunk)), g)
            dst = np.tile(np.arange(g), src.size // g)
            cross = self.gpu_node[src] != self.gpu_node[dst]
            src, dst = src[cross], dst[cross]
            for a, b in ((src, dst), (dst, src)):
                ps = self._pair_segments(a, b)                              # (P, segments)
                on = (ps @ seg_cand).tocoo()                                # (P, k)
                for off, alpha in ((self.off_up, alpha_up), (self.off_down, alpha_down)):
                    share = ps[:, off:off + pm.num_nics].tocsr()
                    share.eliminate_zeros()
                    counts = np.diff(share.indptr)
                    for j in range(int(counts.max(initial=0))):
                        has = counts > j
                        nic = np.full(share.shape[0], -1, dtype=np.int64)
                        nic[has] = share.indices[share.indptr[:-1][has] + j]
                        c = nic[on.row]
                        ok = c >= 0
                        np.maximum.at(alpha, (c[ok], on.col[ok]), on.data[ok])
        return alpha_up, alpha_down

    # ------------------------------------------------------------------ checks

    def check(self, traffic: np.ndarray) -> tuple[float, float]:
        """(max time over all links, over kept links) of one [G, G] matrix in bytes: equal
        whenever the first is not attained on a dropped link only (the dominance guarantee)."""
        loads = self.topology.link_loads(traffic)
        t = loads / self.cap
        return float(t.max(initial=0.0)), float(t[self.kept].max(initial=0.0))
