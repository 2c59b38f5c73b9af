"""The planner's view of the network: per GPU pair, the links its traffic crosses, in seconds.

An optimisation model needs the traffic -> link-load map's coefficients: for a pair (s, t), the
share of one unit sent s -> t that lands on each link, ``LinkMap.pair_incidence``
(``epplan.cost.linkmap``, the one owner of the map), so that

    link_loads(T)[l] == sum over pairs (s, t), s != t, of T[s, t] * incidence[(s, t), l]

for every T (tested against a slow per-pair reference composed from the graph).

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
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from epplan.cost.linkmap import link_map as link_map_of

if TYPE_CHECKING:  # for the annotations only (no import cycle at run time)
    from epplan.topology import Topology


_CACHE: "weakref.WeakKeyDictionary[object, LinkModel]" = weakref.WeakKeyDictionary()


def link_model(topology: Topology) -> LinkModel:
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
        self.pm = topology.paths
        self.map = link_map_of(topology)
        self.num_gpus = topology.num_gpus
        self.num_links = topology.num_links
        self.cap = np.asarray(topology.link_capacity, dtype=np.float64) * 1e9
        self.gpu_node = np.asarray(topology.gpu_node)
        self.has_network = self.map.has_network
        self.kept = self._undominated()
        self.col_of = np.full(self.num_links, -1, dtype=np.int64)
        self.col_of[self.kept] = np.arange(self.kept.size)

    def pair_incidence(self, src: np.ndarray, dst: np.ndarray, *, all_links: bool = False) -> sp.csr_matrix:
        """float64[P, K] (or [P, L] with ``all_links``): share of one unit sent src[i] -> dst[i]
        on each kept link (``LinkMap.pair_incidence`` restricted). Pairs must have src != dst."""
        return self.segment_incidence(self.map.pair_segments(src, dst), all_links=all_links)

    def segment_incidence(self, segments: sp.spmatrix, *, all_links: bool = False) -> sp.csr_matrix:
        """float64[n, K] (or [n, L]): rows of segment amounts float64[n, segments] (rows of
        ``LinkMap.segment_links``) as shares on each kept link."""
        seg = self.map.segment_links if all_links else self._seg_links_kept
        return (segments @ seg).tocsr()

    # ------------------------------------------------------------------ dominance

    def _undominated(self) -> np.ndarray:
        """int64[K] links that are not provably dominated (module docstring)."""
        pm, num_links = self.pm, self.num_links
        seg = self.map.segment_links
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
                ps = self.map.pair_segments(a, b)                           # (P, segments)
                on = (ps @ seg_cand).tocoo()                                # (P, k)
                for off, alpha in ((self.map.off_up, alpha_up), (self.map.off_down, alpha_down)):
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
