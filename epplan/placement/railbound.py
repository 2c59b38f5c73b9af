"""Rail-cover bound: what the NICs and the spine of an ECMP rail fabric must carry together,
because an expert's replicas are near few sources.

Under ECMP on a rail-optimised fabric a source s reaches, without crossing a switch-to-switch
link, only the GPUs of its own node and the GPUs on its rail under its leaf (its rail group).
The GPUs of a scalable unit (a block) form a grid: N_u nodes x R_u rail groups, one GPU in each
cell. Every pair of different blocks, and every pair of one block on different nodes and rails,
is far: it puts at least w_F seconds on the links of a fabric link class F together (dispatch
and combine, forward and backward: ``LayerData.coef``), and every pair on different nodes puts
at least w_B on the NIC links (the links between a node and the fabric, class B).

A plan that puts k replicas of expert e in block u holds e on at most k of its nodes and k of
its rail groups, so at least (N_u - k)(R_u - k) of the block's sources have none of e's replicas
near (none on their node, none on their rail group) and at least N_u - k of its nodes none on
the node: the block's far demand for e is at least far_ue(k), the sum of the (N_u - k)(R_u - k)
smallest source demands for e in the block, and its off-node demand at least off_ue(k), the sum
of the N_u - k smallest node demands. The busiest link is at least each class's mean, so for any
lambda in [0, 1]

    busiest >= lambda (w_B / |B|) sum off + (1 - lambda) (w_F / |F|) sum far,

and with the block's slots S_u >= sum_e k_ue, for any mu_u >= 0 (weak duality)

    busiest >= sum_u [ sum_e min_k ( lambda a off_ue(k) + (1 - lambda) b far_ue(k) + mu_u k ) - mu_u S_u ]

with a = w_B / |B|, b = w_F / |F|: valid at every (lambda, mu), maximised by bisection on each
mu_u (the bracket is concave in mu_u) and golden section on lambda (concave in lambda). It holds
whatever the GPU time, so ``bounds.tradeoff_bound`` takes it with the cuts.

Why: the cut bounds see a node's NICs and a block's uplinks, but a block holds every expert,
so its cut is empty, while under ECMP most of a node's remote traffic crosses the spine anyway
(only a pair on one rail stays under the leaf); the link-class LP (``farbound.py``) sees that
but is too large past 64 GPUs x 128 experts, and its relaxation lets a fractional replica be near
23 sources at once. Measured on ``scripts/bench_planner.py`` instance 8 (DeepSeek-V3, 256 GPUs,
2:1 leaf/spine, 2026-12-04): the plan's 512 leaf-spine links all bind at 1.037 s, its NICs at
0.866 s (mean 0.560 s), the node cuts see 0.514 s; this bound 0.618 s (docs/planner.md).

Only under ECMP routing, where the near relation has that grid form (checked from the pair
weights: rail groups are cliques with one GPU per node, each node of a block in every rail group
of it), and G <= MAX_GPUS (the pair weights are G^2 rows); elsewhere 0. Under rail-aligned
routing (NCCL's PXN) a source reaches every GPU of its unit through the NIC on the receiver's
rail, so there are no rail groups to count.

Shape legend: G = GPUs, E = experts, U = blocks, K = replicas of an expert in a block (0..).
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
from scipy.sparse.csgraph import connected_components

from epplan.placement.layer import LayerData, pair_incidence_sym

MAX_GPUS = 512
_NEAR_TOL = 1e-12   # relative: a pair with fabric weight below this x the largest is near


class RailCover:
    """The rail-cover bound of one layer (module docstring); ``usable`` False where the
    fabric has no kept switch-to-switch link or the near relation is not a grid."""

    def __init__(self, data: LayerData) -> None:
        self.usable = False
        lm = data.lm
        topo = lm.topology
        g_n = data.num_gpus
        if not 2 <= g_n <= MAX_GPUS or topo.num_nodes < 2 or topo.routing != "ecmp":
            return    # under rail-aligned routing a source reaches its whole unit: no rail groups
        node_of = dict(topo.graph.nodes(data="node"))
        inside = np.array([(node_of[topo.links[l][0]] is not None, node_of[topo.links[l][1]] is not None)
                           for l in lm.kept], dtype=bool).reshape(-1, 2)
        fabric = ~inside[:, 0] & ~inside[:, 1]            # switch to switch
        boundary = inside[:, 0] != inside[:, 1]           # node to fabric (the NIC links)
        if not fabric.any() or not boundary.any():
            return
        coef = (pair_incidence_sym(lm) @ sp.diags(data.link_unit)).tocsc()        # [G*G, K] s

        def weight(cols: np.ndarray) -> np.ndarray:
            return np.asarray(coef[:, cols].sum(axis=1)).reshape(g_n, g_n)

        node = np.asarray(topo.gpu_node)
        cross = node[:, None] != node[None, :]
        w_fab = weight(np.flatnonzero(fabric))
        near = (w_fab <= _NEAR_TOL * max(float(w_fab.max()), 1e-300)) & cross
        num_groups, group = connected_components(sp.csr_matrix(near), directed=False)
        if not np.array_equal(near, (group[:, None] == group[None, :]) & cross):
            return                                         # rail groups are not cliques
        if np.bincount(group * topo.num_nodes + node).max() > 1:
            return                                         # two GPUs of a node in one rail group
        # blocks: the nodes and rail groups joined by a GPU
        link = sp.csr_matrix((np.ones(g_n), (node, topo.num_nodes + group)),
                             shape=(topo.num_nodes + num_groups,) * 2)
        _, comp = connected_components(link, directed=False)
        block_of_gpu = comp[node]
        far = cross & ~near
        if not far.any():
            return
        self.blocks = []
        for u in np.unique(block_of_gpu):
            gpus = np.flatnonzero(block_of_gpu == u)
            nodes, groups = np.unique(node[gpus]), np.unique(group[gpus])
            if nodes.size * groups.size != gpus.size:
                return                                     # not a grid
            self.blocks.append((gpus, nodes, groups.size))
        # the class of fabric links whose mean a far pair raises most
        classes = np.array(topo.link_class)[lm.kept]
        self.b = 0.0
        for name in np.unique(classes[fabric]):
            cols = np.flatnonzero(fabric & (classes == name))
            self.b = max(self.b, float(weight(cols)[far].min()) / cols.size)
        cols = np.flatnonzero(boundary)
        self.a = float(weight(cols)[cross].min()) / cols.size
        self.counts = data.counts
        self.node = node
        self.slots = data.slots
        self.usable = self.b > 0

    def _costs(self) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """Per block: (off float64[E, K], far float64[E, K], slots), K = 0..max(N_u, R_u)."""
        out = []
        for gpus, nodes, num_rails in self.blocks:
            num_nodes = nodes.size
            k = np.arange(max(num_nodes, num_rails) + 1)
            d = np.sort(self.counts[gpus], axis=0)                                  # [Gu, E] ascending
            far_cum = np.concatenate([np.zeros((1, d.shape[1])), np.cumsum(d, axis=0)]).T   # [E, Gu + 1]
            nd = np.zeros((self.node.max() + 1, self.counts.shape[1]))
            np.add.at(nd, self.node, self.counts)
            nd = np.sort(nd[nodes], axis=0)
            off_cum = np.concatenate([np.zeros((1, nd.shape[1])), np.cumsum(nd, axis=0)]).T  # [E, Nu + 1]
            m_far = np.maximum(num_nodes - k, 0) * np.maximum(num_rails - k, 0)
            m_off = np.maximum(num_nodes - k, 0)
            out.append((off_cum[:, m_off], far_cum[:, m_far], int(self.slots[gpus].sum())))
        return out

    def link_bound(self, iters: int = 40) -> float:
        """Seconds: the busiest link's time in every plan (module docstring)."""
        if not self.usable:
            return 0.0
        blocks = self._costs()

        def value(lam: float) -> float:
            total = 0.0
            for off, far, slots in blocks:
                c = lam * self.a * off + (1.0 - lam) * self.b * far                 # [E, K]
                k = np.arange(c.shape[1])

                def dual(mu: float) -> tuple[float, int]:
                    v = c + mu * k[None, :]
                    best = v.argmin(axis=1)
                    return float(v.min(axis=1).sum() - mu * slots), int(k[best].sum())

                lo, hi = 0.0, float(c[:, 0].max()) + 1e-300
                best_v = dual(0.0)[0]
                if dual(0.0)[1] > slots:
                    for _ in range(iters):
                        mid = 0.5 * (lo + hi)
                        v, used = dual(mid)
                        best_v = max(best_v, v)
                        if used > slots:
                            lo = mid
                        else:
                            hi = mid
                    best_v = max(best_v, dual(hi)[0])
                total += best_v
            return total

        golden = (np.sqrt(5.0) - 1.0) / 2.0
        lo, hi = 0.0, 1.0
        x1, x2 = hi - golden * (hi - lo), lo + golden * (hi - lo)
        f1, f2 = value(x1), value(x2)
        best = max(value(0.0), value(1.0), f1, f2)
        for _ in range(iters // 2):
            if f1 < f2:
                lo, x1, f1 = x1, x2, f2
                x2 = lo + golden * (hi - lo)
                f2 = value(x2)
            else:
                hi, x2, f2 = x2, x1, f1
                x1 = hi - golden * (hi - lo)
                f1 = value(x1)
            best = max(best, f1, f2)
        return float(best)


def rail_cover_bound(data: LayerData) -> float:
    """Seconds: the rail-cover bound of ``data`` (0 where it does not apply)."""
    return RailCover(data).link_bound()
