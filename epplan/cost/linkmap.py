"""Link loads of many traffic matrices, fast: the path model's linear map as a few thin GEMMs.

``Topology.link_loads(T)`` (``epplan.topology.paths.PathModel``) is the reference: a linear map
from a [G, G] traffic matrix to per-link loads. Scoring a placement needs it for every MoE layer
and both directions of the all-to-all (dispatch s->t, combine t->s), some 30 matrices at 1,024
GPUs, and each reference call walks the dense matrix several times (~0.1 s).

``LinkMap`` computes exactly the same numbers from a handful of contractions of the matrix with
thin dense matrices (G x k, k = a few rails and edge switches), which it precomputes from the
path model's tables. A matrix and its transpose share the two GEMMs (``T @ D`` and ``T.T @ D``),
so ``pair_loads(T)`` returns loads(T) and loads(T.T) for about the price of one. T may also be
scipy-sparse (gradient rings) or ``LowRank`` factors T = A @ B: a layer whose experts split
every source's tokens alike has flows C @ S of rank <= E, scored in O(G * E).

Why this is exact (``PathModel.link_loads`` in the same notation): everything a cross-node pair
puts on a link depends on the traffic only through
  - per source s and receiving rail r:  Y[s, r] = sum_t cross[s, t] * recv_rail[t, r];
  - per destination t and rail r:       Z[t, r] = sum_s cross[s, t] * w[s, r], where w says
    whether s's node sends rail r's traffic itself (rail-aligned PXN) or through its nearest NIC;
  - per source s and (rail, edge switch) j of the receiving NIC: Q[s, j] (the fabric routes);
  - row and column sums,
and the same-node part through the traffic of same-node pairs only. ``cross`` (T without its
same-node entries) is never built: products are taken on T and the same-node entries' share is
subtracted with a sparse matrix of G x gpus_per_node entries.

The map is checked against the reference on a random dense matrix when it is built (once per
topology object); if they disagree (the path model changed underneath), ``LinkMap`` falls back
to the reference and warns.

Shape legend: G = GPUs, L = links, C = NICs, R = rails, W = edge switches, J = distinct
(rail, edge switch) pairs of NICs, P = same-node ordered pairs (s != t).
"""

from __future__ import annotations

import warnings
import weakref

import numpy as np
import scipy.sparse as sp

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
    """x @ y for thin operands, without BLAS: threaded BLAS stalls for tens of ms on tiny
    products when the cores are oversubscribed, and these take well under a millisecond."""
    return np.einsum("ij,jk->ik", x, y)


_CACHE: "weakref.WeakKeyDictionary[object, LinkMap]" = weakref.WeakKeyDictionary()


def link_map(topology) -> "LinkMap":
    """The (cached) ``LinkMap`` of ``topology``; builds the path model if it has not been yet."""
    paths = topology.paths
    lm = _CACHE.get(paths)
    if lm is None:
        lm = LinkMap(topology)
        _CACHE[paths] = lm
    return lm


class LinkMap:
    """loads(T) = topology.link_loads(T), for [G, G] matrices, via precomputed thin factors."""

    def __init__(self, topology, *, check: bool = True) -> None:
        # Weak: the cache maps the topology's path model to this map, so a strong reference back
        # would keep every topology ever scored alive.
        self._topology = weakref.ref(topology)
        self.name = topology.name
        pm = topology.paths
        self.num_gpus = g = topology.num_gpus
        self.num_links = topology.num_links
        self.exact = True
        try:
            self._build(pm)
        except (AttributeError, ValueError, IndexError, AssertionError) as exc:  # tables changed shape
            self._fallback(f"cannot read the path model's tables ({exc!r})")
            return
        if check:
            rng = np.random.default_rng(12345)
            probe = rng.random((g, g))
            ref, ref_t = topology.link_loads(probe), topology.link_loads(probe.T)
            got, got_t = self.pair_loads(probe)
            scale = max(float(ref.max(initial=0.0)), 1e-30)
            if not (np.allclose(got, ref, rtol=1e-9, atol=1e-9 * scale)
                    and np.allclose(got_t, ref_t, rtol=1e-9, atol=1e-9 * scale)):
                self._fallback("its link loads disagree with Topology.link_loads")

    def _fallback(self, why: str) -> None:
        warnings.warn(f"epplan.cost: fast link map of {self.name!r} disabled, {why}; "
                      "scoring with Topology.link_loads (slower)", RuntimeWarning, stacklevel=3)
        self.exact = False

    # ------------------------------------------------------------------ construction

    @property
    def topology(self):
        topo = self._topology()
        assert topo is not None, "the topology of this LinkMap was garbage-collected"
        return topo

    def _build(self, pm) -> None:
        topo = self.topology
        g = self.num_gpus
        self.intra = pm.intra.tocsr()                       # (P, L)
        self.intra_src, self.intra_dst = pm.intra_src, pm.intra_dst
        gpu_node = np.asarray(topo.gpu_node)
        # Same-node pairs including s == t: what ``cross`` removes from T.
        same_s, same_t = [], []
        for n in range(topo.num_nodes):
            ranks = np.flatnonzero(gpu_node == n)
            same_s.append(np.repeat(ranks, ranks.size))
            same_t.append(np.tile(ranks, ranks.size))
        self.same_s = np.concatenate(same_s) if same_s else np.zeros(0, np.int64)
        self.same_t = np.concatenate(same_t) if same_t else np.zeros(0, np.int64)
        self.has_network = pm.num_nics > 0 and topo.num_nodes > 1
        if not self.has_network:
            return
        self.routing = pm.routing
        num_rails = pm.num_rails
        recv_near, send_near = pm.recv_near.tocoo(), pm.send_near.tocsr()
        onehot = pm.nic_rail_onehot
        self.recv_rail = np.asarray((pm.recv_near @ onehot).todense())   # (G, R)
        self.send_rail = np.asarray((pm.send_near @ onehot).todense())   # (G, R)
        self.send_near_t = send_near.T.tocsr()                             # (C, G)
        self.recv_near_t = pm.recv_near.T.tocsr()                          # (C, G)
        self.rn_t, self.rn_q, self.rn_v = recv_near.row, recv_near.col, recv_near.data
        self.nic_rail = pm.nic_rail
        self.nic_up, self.nic_down = pm.nic_up, pm.nic_down
        self.egress_t, self.ingress_t = pm.egress.T.tocsr(), pm.ingress.T.tocsr()  # (L, G*R)
        self.num_nics, self.num_rails = pm.num_nics, num_rails
        self.num_switches = num_w = pm.num_edge_switches
        nic_switch = pm.nic_switch
        if num_w > 1:
            self.fabric_routes_t = pm.fabric_routes.T.tocsr()               # (L, W*W)
            assert np.all(nic_switch >= 0)
        right, left = [], []
        if self.routing == "rail_aligned":
            has = pm.node_rail_nic >= 0                                     # (N, R)
            self.has_g = has[gpu_node].astype(np.float64)                   # (G, R)
            self.um_g = 1.0 - self.has_g
            sn1 = np.asarray(pm.send_near.sum(axis=1)).ravel()
            w = self.has_g + sn1[:, None] * self.um_g                       # (G, R)
            # NIC of the source's node on rail r (valid where has_g).
            self.src_nic = pm.node_rail_nic[gpu_node]                       # (G, R), -1 if none
            right.append(self.recv_rail)                                    # -> Y
            left.append(np.ones((g, 1)))                                    # -> column sums
            left.append(w)                                                  # -> Z
            if num_w > 1:
                combo = pm.nic_rail * num_w + nic_switch                    # (C,) (rail, switch) id
                combos, cq = np.unique(combo, return_inverse=True)
                self.j_rail, self.j_switch = combos // num_w, combos % num_w
                self.j_onehot = np.eye(num_w)[self.j_switch]                 # (J, W)
                k = np.zeros((g, combos.size))
                np.add.at(k, (self.rn_t, cq[self.rn_q]), self.rn_v)        # (G, J)
                right.append(k)                                             # -> Q
                # swAR[s, j]: edge switch of the NIC that source s's node sends rail r_j on.
                sw_src = np.where(self.src_nic >= 0, nic_switch[np.maximum(self.src_nic, 0)], 0)
                self.sw_src_j = sw_src[:, self.j_rail]                      # (G, J)
                self.has_j = self.has_g[:, self.j_rail]                     # (G, J)
                self.um_j = self.um_g[:, self.j_rail]
                n2s = pm.nic_to_switch
                self.send_switch_t = (pm.send_near @ n2s).T.tocsr()         # (W, G)
        else:
            r1 = np.asarray(pm.recv_near.sum(axis=1)).ravel()
            sn1 = np.asarray(pm.send_near.sum(axis=1)).ravel()
            right.append(np.ones((g, 1)))                                   # -> row sums
            right.append(r1[:, None])
            left.append(np.ones((g, 1)))                                    # -> column sums
            left.append(sn1[:, None])
            if num_w > 1:
                n2s = pm.nic_to_switch
                right.append(np.asarray((pm.recv_near @ n2s).todense()))    # Pr (G, W)
                self.send_switch_t = (pm.send_near @ n2s).T.tocsr()         # Ps^T (W, G)
        self.d_right = np.ascontiguousarray(np.hstack(right))   # (G, kr)
        self.d_left = np.ascontiguousarray(np.hstack(left))     # (G, kl)
        self.d_rl = np.hstack([self.d_right, self.d_left])
        self.d_lr = np.hstack([self.d_left, self.d_right])
        # Sparse pattern of T's same-node entries; data refilled per matrix.
        order = np.lexsort((self.same_t, self.same_s))
        self.same_s, self.same_t = self.same_s[order], self.same_t[order]
        self._same_indptr = np.searchsorted(self.same_s, np.arange(g + 1)).astype(np.int64)

    # ------------------------------------------------------------------ evaluation

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
        if not self.exact:
            dense = t.dense() if isinstance(t, LowRank) else (t.toarray() if sp.issparse(t) else t)
            ref = self.topology.link_loads
            return ref(dense), (ref(np.ascontiguousarray(dense.T)) if transpose else None)
        out = self.intra.T @ _entries(t, self.intra_src, self.intra_dst)
        out_t = self.intra.T @ _entries(t, self.intra_dst, self.intra_src) if transpose else None
        if not self.has_network:
            return out, out_t
        same = sp.csr_matrix((_entries(t, self.same_s, self.same_t), self.same_t, self._same_indptr),
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

    def _network(self, right: np.ndarray, left: np.ndarray) -> np.ndarray:
        """Cross-node loads from right = cross @ d_right (G, k_r) and left = cross.T @ d_left."""
        num_rails, num_w = self.num_rails, self.num_switches
        loads = np.zeros(self.num_links)
        colsum = left[:, 0]
        received = self.recv_rail * colsum[:, None]                         # (G, R)
        nic_row = np.zeros(self.num_nics)
        if self.routing == "rail_aligned":
            y = right[:, :num_rails]                                        # (G, R)
            z = left[:, 1:1 + num_rails]                                    # (G, R)
            unmatched = (self.um_g * y).sum(axis=1)                         # (G,)
            sent = self.has_g * y + self.send_rail * unmatched[:, None]
            is_m = self.src_nic >= 0
            nic_row += np.bincount(self.src_nic[is_m], weights=y[is_m], minlength=self.num_nics)
            nic_row += self.send_near_t @ unmatched
            nic_col = np.bincount(self.rn_q, weights=self.rn_v * z[self.rn_t, self.nic_rail[self.rn_q]],
                                  minlength=self.num_nics)
            if num_w > 1:
                q = right[:, num_rails:]                                    # (G, J)
                sw = np.bincount((self.sw_src_j * num_w + self.j_switch).ravel(),
                                 weights=(self.has_j * q).ravel(), minlength=num_w * num_w)
                sw = sw.reshape(num_w, num_w)
                u = self.um_j * q                                           # (G, J)
                if np.any(u):
                    sw += (self.send_switch_t @ u) @ self.j_onehot          # (W, J) @ (J, W)
        else:
            rowsum, to_recv, from_send = right[:, 0], right[:, 1], left[:, 1]
            sent = self.send_rail * rowsum[:, None]
            nic_row += self.send_near_t @ to_recv
            nic_col = self.recv_near_t @ from_send
            if num_w > 1:
                sw = self.send_switch_t @ right[:, 2:2 + num_w]             # (W, W)
        loads += self.egress_t @ sent.ravel()
        loads += self.ingress_t @ received.ravel()
        np.add.at(loads, self.nic_up, nic_row)
        np.add.at(loads, self.nic_down, nic_col)
        if num_w > 1:
            sw = np.asarray(sw)
            np.fill_diagonal(sw, 0.0)
            loads += self.fabric_routes_t @ sw.ravel()
        return loads
