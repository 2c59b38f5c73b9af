"""The one map from traffic to link loads: a [G, G] matrix, or single GPU pairs, to per-link load.

``epplan.topology.paths.PathModel`` holds the path tables a topology's routing gives (the
segments inside servers, the NICs' up- and down-links, the fabric routes between edge switches,
and which NIC sends what: ``PathModel.send_nics``). This module applies them, in two forms of the
same linear map:

- ``LinkMap.loads(T)`` / ``pair_loads(T)``: per-link loads of whole traffic matrices (the cost
  function scores every MoE layer in both directions, forward and backward; some 30 matrices at
  1,024 GPUs), as a handful of contractions of T with thin precomputed matrices (G x k, k = a few
  rails and edge switches). A matrix and its transpose share the two GEMMs (``T @ D`` and
  ``T.T @ D``), so ``pair_loads(T)`` returns loads(T) and loads(T.T) for about the price of one.
  T may be dense, scipy-sparse (gradient rings) or ``LowRank`` factors T = A @ B: a layer whose
  experts split every source's tokens alike has flows C @ S of rank <= E, scored in O(G * E).
- ``LinkMap.pair_incidence(src, dst)``: the map's coefficients, the share of one unit sent
  src[i] -> dst[i] on each link (what an optimisation model needs; ``epplan.placement.linkmodel``
  keeps the links that can bind).

``Topology.link_loads`` is ``link_map(topology).loads``. The tests hold a slow reference
composed pair by pair from the graph and compare both forms against it (tests/test_topology.py,
tests/test_cost.py, tests/test_planner.py).

Why the matrix form is exact: everything a cross-node pair puts on a link depends on the traffic
only through
  - per source s and receiving rail r:  Y[s, r] = sum_t cross[s, t] * recv_rail[t, r];
  - per destination t and rail r:       Z[t, r] = sum_s cross[s, t] * w[s, r], where w says
    whether s's node sends rail r's traffic from its own NIC on that rail (``own_rail``,
    rail-aligned PXN) or through s's nearest NICs;
  - per source s and (rail, edge switch) j of the receiving NIC: Q[s, j] (the fabric routes);
  - column sums,
and the same-node part through the traffic of same-node pairs only. ``cross`` (T without its
same-node entries) is never built: products are taken on T and the same-node entries' share is
subtracted with a sparse matrix of G x gpus_per_node entries. ECMP is the case own_rail = 0.

Shape legend: G = GPUs, L = links, C = NICs, R = rails, W = edge switches, J = distinct
(rail, edge switch) pairs of NICs, P = pairs.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

if TYPE_CHECKING:  # for the annotations only (no import cycle at run time)
    from epplan.topology import Topology



class LowRank:
    """A [G, G] traffic matrix kept as factors: T = a @ b, a float64[G, r], b float64[r, G]."""

    def __init__(self, a: np.ndarray, b: np.ndarray) -> None:
        self.a, self.b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        assert self.a.shape[1] == self.b.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return (self.a.shape[0], self.b.shape[1])

    def dense(self) -> np.ndarray:
        return self.a @ self.b


def _entries(t: "np.ndarray | LowRank", rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """t[rows, cols] for a dense or a ``LowRank`` matrix."""
    if isinstance(t, LowRank):
        return np.einsum("ij,ji->i", t.a[rows], t.b[:, cols])
    if sp.issparse(t):
        if rows.size == 0:  # scipy answers an empty fancy index with one element
            return np.zeros(0)
        return np.asarray(t[rows, cols]).ravel()
    return t[rows, cols]


def _mm(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """x @ y; thin operands without BLAS: threaded BLAS stalls for tens of ms on tiny products
    when the cores are oversubscribed, and these take well under a millisecond. Large ones (a
    layer of 4,096 experts at 1,024 GPUs: 0.4 GFLOP) go to BLAS, 20-50x faster than einsum."""
    if x.shape[0] * x.shape[1] * y.shape[1] > _BLAS_ABOVE:
        return x @ y
    return np.einsum("ij,jk->ik", x, y)


_BLAS_ABOVE = 2_000_000   # multiply-adds


_CACHE: "weakref.WeakKeyDictionary[object, LinkMap]" = weakref.WeakKeyDictionary()


def link_map(topology: Topology) -> LinkMap:
    """The (cached) ``LinkMap`` of ``topology``; builds the path model if it has not been yet."""
    paths = topology.paths
    lm = _CACHE.get(paths)
    if lm is None:
        lm = LinkMap(topology)
        _CACHE[paths] = lm
    return lm


class LinkMap:
    """Traffic -> per-link load of one topology (module docstring): ``loads``, ``pair_loads``,
    ``pair_incidence``."""

    def __init__(self, topology) -> None:
        # Weak: the cache maps the topology's path model to this map, so a strong reference back
        # would keep every topology ever scored alive.
        self._topology = weakref.ref(topology)
        self.name = topology.name
        self.pm = pm = topology.paths
        self.num_gpus = topology.num_gpus
        self.num_links = topology.num_links
        self.gpu_node = np.asarray(topology.gpu_node)
        self.has_network = pm.num_nics > 0 and topology.num_nodes > 1
        self._build_factors(pm)
        self._build_segments(pm)
        self._cross: CrossFactors | None = None   # ``cross_factors``, built on first use

    @property
    def topology(self) -> Topology:
        topo = self._topology()
        assert topo is not None, "the topology of this LinkMap was garbage-collected"
        return topo

    # ------------------------------------------------------------------ matrix form: construction

    def _build_factors(self, pm) -> None:
        topo, g = self.topology, self.num_gpus
        gpu_node = self.gpu_node
        self.intra = pm.intra.tocsr()                       # (P_same, L)
        self.intra_src, self.intra_dst = pm.intra_src, pm.intra_dst
        # Same-node pairs including s == t: what ``cross`` removes from T.
        same_s, same_t = [], []
        for n in range(topo.num_nodes):
            ranks = np.flatnonzero(gpu_node == n)
            same_s.append(np.repeat(ranks, ranks.size))
            same_t.append(np.tile(ranks, ranks.size))
        self.same_s = np.concatenate(same_s) if same_s else np.zeros(0, np.int64)
        self.same_t = np.concatenate(same_t) if same_t else np.zeros(0, np.int64)
        # Same-node blocks of T (``_node_blocks``): rank s's row of its node's block starts at
        # block_pos[s, 0]; block_pos[s, j] = that + j, j = the local index of the column's rank.
        self.node_ranks = [np.flatnonzero(gpu_node == n) for n in range(topo.num_nodes)]
        self.local_of = np.zeros(g, dtype=np.int64)
        width = max((r.size for r in self.node_ranks), default=1)
        self.block_pos = np.zeros((g, width), dtype=np.int64)
        offset = 0
        for ranks in self.node_ranks:
            k = ranks.size
            self.local_of[ranks] = np.arange(k)
            self.block_pos[ranks] = offset + k * np.arange(k)[:, None] + np.arange(width)[None, :]
            offset += k * k
        if not self.has_network:
            return
        num_rails = pm.num_rails
        recv_near = pm.recv_near.tocoo()
        onehot = pm.nic_rail_onehot
        self.recv_rail = np.asarray((pm.recv_near @ onehot).todense())   # (G, R)
        self.send_rail = np.asarray((pm.send_near @ onehot).todense())   # (G, R)
        self.send_near_t = pm.send_near.T.tocsr()                          # (C, G)
        self.rn_t, self.rn_q, self.rn_v = recv_near.row, recv_near.col, recv_near.data
        self.nic_rail = pm.nic_rail
        self.nic_up, self.nic_down = pm.nic_up, pm.nic_down
        self.egress_t, self.ingress_t = pm.egress.T.tocsr(), pm.ingress.T.tocsr()  # (L, G*R)
        self.num_nics, self.num_rails = pm.num_nics, num_rails
        self.num_switches = num_w = pm.num_edge_switches
        nic_switch = pm.nic_switch
        own = pm.is_own_rail.astype(np.float64)                            # (G, R)
        self.own_g, self.near_g = own, 1.0 - own
        self.any_own = bool(pm.is_own_rail.any())
        sn1 = np.asarray(pm.send_near.sum(axis=1)).ravel()
        w = own + sn1[:, None] * self.near_g                               # (G, R)
        # The NIC of the source's node on rail r where it sends that rail itself, else -1.
        self.src_nic = np.where(pm.is_own_rail, pm.node_rail_nic[gpu_node], -1)  # (G, R)
        right = [self.recv_rail]                                           # -> Y
        left = [np.ones((g, 1)), w]                                        # -> column sums, Z
        if num_w > 1:
            self.fabric_routes_t = pm.fabric_routes.T.tocsr()               # (L, W*W)
            assert np.all(nic_switch >= 0)
            combo = pm.nic_rail * num_w + nic_switch                        # (C,) (rail, switch) id
            combos, cq = np.unique(combo, return_inverse=True)
            self.j_rail, self.j_switch = combos // num_w, combos % num_w
            self.j_onehot = np.eye(num_w)[self.j_switch]                     # (J, W)
            k = np.zeros((g, combos.size))
            np.add.at(k, (self.rn_t, cq[self.rn_q]), self.rn_v)            # (G, J)
            right.append(k)                                                 # -> Q
            # Edge switch of the NIC that source s's node sends rail r_j on (where it does).
            sw_src = np.where(self.src_nic >= 0, nic_switch[np.maximum(self.src_nic, 0)], 0)
            self.sw_src_j = sw_src[:, self.j_rail]                          # (G, J)
            self.own_j, self.near_j = own[:, self.j_rail], self.near_g[:, self.j_rail]
            self.send_switch_t = (pm.send_near @ pm.nic_to_switch).T.tocsr()  # (W, G)
        self.d_right = np.ascontiguousarray(np.hstack(right))   # (G, kr)
        self.d_left = np.ascontiguousarray(np.hstack(left))     # (G, kl)
        self.d_rl = np.hstack([self.d_right, self.d_left])
        self.d_lr = np.hstack([self.d_left, self.d_right])
        # Sparse pattern of T's same-node entries; data refilled per matrix.
        order = np.lexsort((self.same_t, self.same_s))
        self.same_s, self.same_t = self.same_s[order], self.same_t[order]
        self._same_indptr = np.searchsorted(self.same_s, np.arange(g + 1)).astype(np.int64)

    # ------------------------------------------------------------------ matrix form: evaluation

    def loads(self, traffic: np.ndarray) -> np.ndarray:
        """float64[L] per-link load of traffic[s, t] (any unit); the diagonal is ignored."""
        return self.pair_loads(traffic, transpose=False)[0]

    def pair_loads(self, traffic: "np.ndarray | LowRank",
                   transpose: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
        """(loads(T), loads(T.T)) as float64[L] each; the second is None if ``transpose`` is False.

        ``traffic`` is a dense float[G, G], a scipy sparse matrix (O(nnz)) or a ``LowRank``
        factorisation T = A @ B (O(G * rank) instead of O(G^2)).
        """
        if isinstance(traffic, LowRank):
            t = traffic
        elif sp.issparse(traffic):
            t = sp.csr_matrix(traffic, dtype=np.float64)
        else:
            t = np.asarray(traffic, dtype=np.float64)
        assert t.shape == (self.num_gpus, self.num_gpus), t.shape
        if isinstance(t, LowRank):   # T's same-node blocks, one small product per node
            blocks = self._node_blocks(t)
            entries = lambda rows, cols: blocks[self.block_pos[rows, self.local_of[cols]]]  # noqa: E731
        else:
            entries = lambda rows, cols: _entries(t, rows, cols)  # noqa: E731
        out = self.intra.T @ entries(self.intra_src, self.intra_dst)
        out_t = self.intra.T @ entries(self.intra_dst, self.intra_src) if transpose else None
        if not self.has_network:
            return out, out_t
        same = sp.csr_matrix((entries(self.same_s, self.same_t), self.same_t, self._same_indptr),
                             shape=t.shape)
        kr, kl = self.d_right.shape[1], self.d_left.shape[1]
        right = self.d_rl if transpose else self.d_right
        left = self.d_lr if transpose else self.d_left
        # The only passes over the matrix: cross @ [Dr | Dl] and cross.T @ [Dl | Dr], with
        # cross = t - same (same-node entries removed).
        if isinstance(t, LowRank):
            a = _mm(t.a, _mm(t.b, right)) - same @ right        # (G, kr [+ kl])
            b = _mm(t.b.T, _mm(t.a.T, left)) - same.T @ left    # (G, kl [+ kr])
        else:  # dense (BLAS) or sparse (scipy): same expressions
            a = np.asarray(t @ right) - same @ right
            b = np.asarray(t.T @ left) - same.T @ left
        out += self._network(a[:, :kr], b[:, :kl])
        if transpose:
            # cross(T.T) = cross.T: its right products are cross.T @ Dr, its left ones cross @ Dl.
            out_t += self._network(b[:, kl:], a[:, kr:])
        return out, out_t

    def _node_blocks(self, t: LowRank) -> np.ndarray:
        """float64[sum_n k_n^2]: every node's block T[R_n, R_n] = a[R_n] @ b[:, R_n], raveled in
        node order (``block_pos`` indexes it). Gathering a[s] for each same-node pair instead
        would copy gpus_per_node x G x rank numbers (268 MB at 1,024 GPUs x 4,096 experts)."""
        return np.concatenate([_mm(t.a[ranks], t.b[:, ranks]).ravel() for ranks in self.node_ranks])

    def _network(self, right: np.ndarray, left: np.ndarray) -> np.ndarray:
        """Cross-node loads from right = cross @ d_right (G, k_r) and left = cross.T @ d_left."""
        num_rails, num_w = self.num_rails, self.num_switches
        loads = np.zeros(self.num_links)
        colsum = left[:, 0]
        received = self.recv_rail * colsum[:, None]                         # (G, R)
        y = right[:, :num_rails]                                            # (G, R)
        z = left[:, 1:1 + num_rails]                                        # (G, R)
        via_near = (self.near_g * y).sum(axis=1)                            # (G,)
        sent = self.own_g * y + self.send_rail * via_near[:, None]
        nic_row = self.send_near_t @ via_near
        if self.any_own:
            is_own = self.src_nic >= 0
            nic_row += np.bincount(self.src_nic[is_own], weights=y[is_own], minlength=self.num_nics)
        nic_col = np.bincount(self.rn_q, weights=self.rn_v * z[self.rn_t, self.nic_rail[self.rn_q]],
                              minlength=self.num_nics)
        loads += self.egress_t @ sent.ravel()
        loads += self.ingress_t @ received.ravel()
        np.add.at(loads, self.nic_up, nic_row)
        np.add.at(loads, self.nic_down, nic_col)
        if num_w > 1:
            q = right[:, num_rails:]                                        # (G, J)
            sw = (self.send_switch_t @ (self.near_j * q)) @ self.j_onehot   # (W, J) @ (J, W)
            if self.any_own:
                sw += np.bincount((self.sw_src_j * num_w + self.j_switch).ravel(),
                                  weights=(self.own_j * q).ravel(),
                                  minlength=num_w * num_w).reshape(num_w, num_w)
            sw = np.asarray(sw)
            np.fill_diagonal(sw, 0.0)
            loads += self.fabric_routes_t @ sw.ravel()
        return loads

    # ------------------------------------------------------------------ pair form

    def _build_segments(self, pm) -> None:
        """Segments x links: rows [same-node pairs | egress (G*R) | ingress (G*R) | up (C) |
        down (C) | fabric (W*W)]; the offsets are kept on ``self``."""
        g, num_links = self.num_gpus, self.num_links
        self.intra_row = np.full((g, g), -1, dtype=np.int64)               # same-node pair -> row
        self.intra_row[pm.intra_src, pm.intra_dst] = np.arange(pm.intra_src.size)
        blocks = [pm.intra.tocsr()]
        self.off_egress = pm.intra.shape[0]
        if not self.has_network:
            self.off_ingress = self.off_up = self.off_down = self.off_fabric = self.off_egress
            self.segment_links = sp.vstack(blocks).tocsr()
            return
        gr = pm.egress.shape[0]
        c = pm.num_nics
        up = sp.csr_matrix((np.ones(c), (np.arange(c), pm.nic_up)), shape=(c, num_links))
        down = sp.csr_matrix((np.ones(c), (np.arange(c), pm.nic_down)), shape=(c, num_links))
        blocks += [pm.egress.tocsr(), pm.ingress.tocsr(), up, down]
        self.off_ingress = self.off_egress + gr
        self.off_up = self.off_ingress + gr
        self.off_down = self.off_up + c
        self.off_fabric = self.off_down + c
        if pm.num_edge_switches > 1:
            blocks.append(pm.fabric_routes.tocsr())
        self.segment_links = sp.vstack(blocks).tocsr()                      # (segments, L)
        self.near_nic, self.near_w = _padded(pm.send_near)                  # (G, k) each
        self.recv_nic, self.recv_w = _padded(pm.recv_near)

    @property
    def num_segments(self) -> int:
        return self.segment_links.shape[0]

    def pair_segments(self, src: np.ndarray, dst: np.ndarray) -> sp.csr_matrix:
        """float64[P, segments] (rows of ``segment_links``): what one unit sent src[i] -> dst[i]
        puts on each segment; pairs must have src != dst."""
        pm = self.pm
        src, dst = np.asarray(src, dtype=np.int64), np.asarray(dst, dtype=np.int64)
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
            rail = pm.nic_rail
            for k in range(self.recv_nic.shape[1]):   # the destination's nearest NICs
                c2, v = self.recv_nic[t, k], self.recv_w[t, k]
                ok = c2 >= 0
                if not ok.any():
                    continue
                i, c2, v, si, ti = idx[ok], c2[ok], v[ok], s[ok], t[ok]
                rows += [i, i]
                cols += [self.off_down + c2, self.off_ingress + ti * pm.num_rails + rail[c2]]
                vals += [v, v]
                # The sending NIC: the node's own on the receiving rail where it sends that rail
                # itself, else the source's nearest ones (``PathModel.is_own_rail``).
                own = pm.is_own_rail[si, rail[c2]]
                if own.any():
                    c1 = pm.node_rail_nic[self.gpu_node[si[own]], rail[c2[own]]]
                    self._send(rows, cols, vals, i[own], si[own], c1, c2[own], v[own])
                near = ~own
                for k1 in range(self.near_nic.shape[1]):
                    c1, w1 = self.near_nic[si, k1], self.near_w[si, k1]
                    m = near & (c1 >= 0)
                    if m.any():
                        self._send(rows, cols, vals, i[m], si[m], c1[m], c2[m], v[m] * w1[m])
        shape = (src.size, self.num_segments)
        if not rows:
            return sp.csr_matrix(shape)
        m = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))), shape=shape)
        m.sum_duplicates()
        return m

    def _send(self, rows, cols, vals, i, s, c1, c2, v) -> None:
        """Append the sending half of pairs i (source s, sending NIC c1, receiving NIC c2)."""
        pm = self.pm
        rows += [i, i]
        cols += [self.off_egress + s * pm.num_rails + pm.nic_rail[c1], self.off_up + c1]
        vals += [v, v]
        if pm.num_edge_switches > 1:
            sw = pm.nic_switch
            differ = sw[c1] != sw[c2]
            if differ.any():
                rows.append(i[differ])
                cols.append(self.off_fabric + sw[c1][differ] * pm.num_edge_switches + sw[c2][differ])
                vals.append(v[differ])

    def cross_factors(self) -> CrossFactors:
        """The pair form of cross-node pairs factored (cached): for every s, t on different nodes

            pair_segments(s, t) == recv[t] + sum_j combo[t, j] * send[s * J + j]

        j = the (rail, edge switch) of a receiving NIC. Exact because a cross-node pair's
        receiving half (its NICs' down-links and ingress segments) depends on t alone, and its
        sending half (egress segment, sending NIC's up-link, fabric route) on s and on the rail
        and edge switch of the receiving NIC alone (``pair_segments``: the sending NIC is the
        source node's own on that rail or the source's nearest, ``PathModel.is_own_rail``)."""
        if self._cross is None:
            self._cross = self._build_cross_factors()
        return self._cross

    def _build_cross_factors(self) -> CrossFactors:
        g, nseg = self.num_gpus, self.num_segments
        if not self.has_network:
            empty = sp.csr_matrix((g, nseg))
            return CrossFactors(recv=empty, combo=sp.csr_matrix((g, 0)), send=sp.csr_matrix((0, nseg)))
        pm = self.pm
        rail, num_w = pm.nic_rail, pm.num_edge_switches
        switch = np.maximum(pm.nic_switch, 0)
        combos, nic_combo = np.unique(rail * max(num_w, 1) + switch, return_inverse=True)
        j_rail, j_switch = combos // max(num_w, 1), combos % max(num_w, 1)
        num_j = combos.size
        # Receiving half, per t: its nearest NICs' down-links and ingress segments.
        ok = self.recv_nic >= 0                                              # [G, k]
        t = np.broadcast_to(np.arange(g)[:, None], ok.shape)[ok]
        c2, v = self.recv_nic[ok], self.recv_w[ok]
        recv = sp.csr_matrix((np.concatenate([v, v]), (np.concatenate([t, t]), np.concatenate(
            [self.off_down + c2, self.off_ingress + t * pm.num_rails + rail[c2]]))), shape=(g, nseg))
        combo = sp.csr_matrix((v, (t, nic_combo[c2])), shape=(g, num_j))
        # Sending half, per (s, j): the own NIC on j's rail where the node sends that rail itself,
        # else the source's nearest NICs, each on to j's edge switch.
        s = np.repeat(np.arange(g), num_j)
        j = np.tile(np.arange(num_j), g)
        rows, cols, vals = [], [], []

        def send(idx: np.ndarray, c1: np.ndarray, w: np.ndarray) -> None:
            row = s[idx] * num_j + j[idx]
            rows.extend([row, row])
            cols.extend([self.off_egress + s[idx] * pm.num_rails + rail[c1], self.off_up + c1])
            vals.extend([w, w])
            if num_w > 1:
                differ = switch[c1] != j_switch[j[idx]]
                rows.append(row[differ])
                cols.append(self.off_fabric + switch[c1][differ] * num_w + j_switch[j[idx]][differ])
                vals.append(w[differ])

        own = pm.is_own_rail[s, j_rail[j]]
        idx = np.flatnonzero(own)
        send(idx, pm.node_rail_nic[self.gpu_node[s[idx]], j_rail[j[idx]]], np.ones(idx.size))
        for k1 in range(self.near_nic.shape[1]):
            c1, w1 = self.near_nic[s, k1], self.near_w[s, k1]
            idx = np.flatnonzero(~own & (c1 >= 0))
            send(idx, c1[idx], w1[idx])
        out = sp.csr_matrix((np.concatenate(vals), (np.concatenate(rows), np.concatenate(cols))),
                            shape=(g * num_j, nseg))
        out.sum_duplicates()
        return CrossFactors(recv=recv, combo=combo, send=out)

    def pair_incidence(self, src: np.ndarray, dst: np.ndarray) -> sp.csr_matrix:
        """float64[P, L]: share of one unit sent src[i] -> dst[i] on each link (src != dst)."""
        return (self.pair_segments(src, dst) @ self.segment_links).tocsr()

    def pair_fractions(self, src: int, dst: int) -> dict[int, float]:
        """{link index: fraction} of one unit sent from rank ``src`` to rank ``dst`` (src != dst)."""
        row = self.pair_incidence(np.array([src]), np.array([dst]))
        row.eliminate_zeros()
        return {int(i): float(f) for i, f in zip(row.indices, row.data) if f > 1e-12}


@dataclass
class CrossFactors:
    """``LinkMap.cross_factors``: the pair form of cross-node pairs as a receiving and a sending
    half (S = segments, J = distinct (rail, edge switch) of NICs)."""

    recv: sp.csr_matrix    # float64[G, S] the receiving half of any pair into t
    combo: sp.csr_matrix   # float64[G, J] t's receiving NICs' shares by (rail, edge switch)
    send: sp.csr_matrix    # float64[G * J, S] row s * J + j: the sending half from s to a NIC of j

    @property
    def num_combos(self) -> int:
        return int(self.combo.shape[1])


def _padded(m: sp.spmatrix) -> tuple[np.ndarray, np.ndarray]:
    """A sparse [G, C] share table as padded columns: int64[G, k] NIC (-1 = none), float64[G, k]."""
    m = m.tocsr()
    width = max(1, int(np.diff(m.indptr).max(initial=0)))
    counts = np.diff(m.indptr)
    nic = np.full((m.shape[0], width), -1, dtype=np.int64)
    w = np.zeros((m.shape[0], width))
    rows = np.repeat(np.arange(m.shape[0]), counts)
    pos = np.arange(m.indices.size) - np.repeat(m.indptr[:-1], counts)
    nic[rows, pos], w[rows, pos] = m.indices, m.data
    return nic, w
