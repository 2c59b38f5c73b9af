"""Hierarchical (node-deduplicated) dispatch and combine of one MoE layer.

Shape legend:
    N = local tokens, D = d_model, E = experts per MoE layer, k = experts per token, A = N * k,
    G = ranks, M = nodes, H = GPUs per node, C = chunks, E_loc = experts this rank holds.
    S1 / Q1 = rows this rank sends / receives in stage 1 (over its rail, between nodes),
    S2 / Q2 = rows it sends / receives in stage 2 (inside its node).

Flat dispatch sends one row per (token, expert). Here a token crosses the network once per
destination node, as DeepEP and NCCL's PXN do:

    stage 1  source s -> its rail peer p(s, n), the GPU of node n with s's local index: one row
             per (token, node n) for every node n holding one of the token's experts (after the
             manifest's per-source replica split, chosen as flat dispatch chooses it). For s's own
             node p(s, n) = s: the row stays.
    stage 2  p -> each GPU g of its node serving the token's experts: one row per (token, g);
             a token whose experts share a GPU is sent to it once.
    experts  g runs its experts on the rows and sums each token's gate-weighted outputs.
    combine  g -> p one row per (token, g); p sums them per token; p -> s one row per
             (token, node). Backward sends the same rows again, the other way each time.

Stage 1 runs over the rail groups (one process group per local GPU index, one rank per node),
stage 2 over the node groups. Gate weights travel with their assignments (one float each), with
the expert id and the row index (int64) as metadata: the measured and predicted bytes count the
d_model rows only, as for flat dispatch, where the counts exchange is not counted either.

Counts. Before the rows move, every rank learns all split sizes in one host sync: s sends its
rail peer on node n, per chunk, [rows for node n, rows for each GPU h of n, assignments per
(h, expert)]; p adds up what its rail sources sent for each GPU of its node and passes
[rows, assignments per expert] on to it. Both are small exchanges on the device, read back once.

Chunks (``overlap``). Tokens are cut into C consecutive ranges; chunk c runs the whole pipeline
above. Every stage-1 send of the layer is issued first; stage 2 of chunk c + 1 and the combine of
chunk c - 1 are in flight while chunk c's expert GEMMs run. Exchanges are split-phase autograd
functions (``_Start`` issues, ``_Finish`` waits; backward issues in ``_Finish`` and waits in
``_Start``). Every ``_Finish`` also passes an empty ordering tensor on to the next one, so that
backward issues the reverse exchanges in exactly the reverse of the forward's order on every
rank: autograd alone would order independent chunks by readiness, which differs between ranks
with different experts, and collectives on one group must be entered in one order everywhere.

Not (yet) here, unlike the flat chunked path: a few-CTA communicator and an SM carve-out for the
hidden exchanges. Its speed on GPUs is unmeasured.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from epplan.errors import param, RuntimeSetupError
from epplan.runtime.experts import expert_mlp
from epplan.runtime.overlap import _to_device, exchange_rows
from epplan.runtime.router import count_keys
from epplan.schedule import DISPATCH_MODES

DISPATCH = DISPATCH_MODES


@dataclass(frozen=True)
class NodeLayout:
    """Which expert-parallel ranks share a node: ``node_ranks[n]`` in local GPU order."""

    node_ranks: tuple[tuple[int, ...], ...]

    @classmethod
    def one_node(cls, num_ranks: int) -> "NodeLayout":
        return cls((tuple(range(num_ranks)),))

    @property
    def num_nodes(self) -> int:
        return len(self.node_ranks)

    def node_of(self) -> np.ndarray:
        """int64 (G,): the node of each rank."""
        out = np.empty(sum(len(r) for r in self.node_ranks), np.int64)
        for n, ranks in enumerate(self.node_ranks):
            out[list(ranks)] = n
        return out

    def local_of(self) -> np.ndarray:
        """int64 (G,): each rank's local GPU index on its node."""
        out = np.empty(sum(len(r) for r in self.node_ranks), np.int64)
        for ranks in self.node_ranks:
            out[list(ranks)] = np.arange(len(ranks))
        return out

    def check(self, num_ranks: int, dispatch: str) -> None:
        """RuntimeSetupError unless every rank is on exactly one node (and, for hierarchical
        dispatch, every node has the same number of GPUs: each rank needs a rail peer on each)."""
        ranks = sorted(r for node in self.node_ranks for r in node)
        if ranks != list(range(num_ranks)):
            raise RuntimeSetupError(f"the node layout must hold every rank 0..{num_ranks - 1} once, "
                                    f"it holds {ranks}")
        sizes = sorted({len(node) for node in self.node_ranks})
        if dispatch == "hierarchical" and len(sizes) > 1:
            raise RuntimeSetupError(
                f"{param('dispatch', 'hierarchical')} needs the same number of GPUs on every node (a rank "
                f"forwards through the GPU of its local index on each node); the manifest's nodes "
                f"have {', '.join(map(str, sizes))} GPUs; use {param('dispatch', 'flat')}")


@dataclass
class HierarchicalGroups:
    """This rank's rail and node process groups and how their members map to EP ranks.

    rail_members: int64 (M,) EP ranks of the rail group in group-rank order; rail_node: their
    nodes. node_members: int64 (H,) EP ranks of the node group in group-rank order; node_local:
    their local indices. (``dist.new_group`` orders members by global rank.)
    """

    layout: NodeLayout
    rail: dist.ProcessGroup
    node: dist.ProcessGroup
    rail_members: np.ndarray
    rail_node: np.ndarray
    node_members: np.ndarray
    node_local: np.ndarray


def new_hierarchical_groups(layout: NodeLayout, group_ranks: list[int], rank: int) -> HierarchicalGroups:
    """One process group per node and one per rail (local GPU index). Collective: every process
    of the default group enters every ``dist.new_group``, in the same order."""
    node_of, local_of = layout.node_of(), layout.local_of()
    mine = {}
    for n, ranks in enumerate(layout.node_ranks):
        pg = dist.new_group(sorted(group_ranks[r] for r in ranks))
        if n == node_of[rank]:
            mine["node"] = pg
    for h in range(len(layout.node_ranks[0])):
        rail = [node[h] for node in layout.node_ranks]
        pg = dist.new_group(sorted(group_ranks[r] for r in rail))
        if h == local_of[rank]:
            mine["rail"] = pg
    by_global = lambda ranks: np.array(sorted(ranks, key=lambda r: group_ranks[r]), np.int64)
    rail_members = by_global([node[local_of[rank]] for node in layout.node_ranks])
    node_members = by_global(layout.node_ranks[node_of[rank]])
    return HierarchicalGroups(layout, mine["rail"], mine["node"], rail_members,
                              node_of[rail_members], node_members, local_of[node_members])


def distinct_rows(dest: torch.Tensor, num_bins: int) -> torch.Tensor:
    """dest: int64 (N, k) bin of each assignment, num_bins for dropped -> int64 (num_bins,):
    the distinct (token, bin) pairs per bin (a token counts once per bin however many of its
    assignments land there)."""
    s = dest.sort(dim=1).values  # (N, k)
    is_first = torch.ones_like(s, dtype=torch.bool)
    is_first[:, 1:] = s[:, 1:] != s[:, :-1]
    return count_keys(torch.where(is_first, s, num_bins).reshape(-1), num_bins + 1)[:num_bins]


def pair_counts(topk_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """topk_idx: int64 (N, k), -1 dropped -> int64 (E * E,): tokens that selected both i and j at
    i * E + j for i < j, zeros elsewhere."""
    N, k = topk_idx.shape
    E = num_experts
    if k < 2:
        return topk_idx.new_zeros(E * E)
    a, b = torch.triu_indices(k, k, offset=1, device=topk_idx.device)
    lo = torch.minimum(topk_idx[:, a], topk_idx[:, b])  # (N, k (k - 1) / 2)
    hi = torch.maximum(topk_idx[:, a], topk_idx[:, b])
    key = torch.where(lo >= 0, lo * E + hi, E * E)
    return count_keys(key.reshape(-1), E * E + 1)[:E * E]


# ----------------------------------------------------------------------------- split-phase exchange

class _Exchange:
    """One exchange of several tensors over ``group`` (send_splits[i] / recv_splits[i]: per group
    member, rows of tensor i), started and waited for separately, in forward and in backward.
    ``timer`` (``expert_parallel.set_exchange_timer``'s, unchunked only): its "exchange" component
    runs from each start to its wait."""

    def __init__(self, group: dist.ProcessGroup, send_splits: list[list[int]],
                 recv_splits: list[list[int]], timer=None) -> None:
        self.group, self.send_splits, self.recv_splits = group, send_splits, recv_splits
        self.timer = timer
        self.works: list[dist.Work] = []
        self.buffers: list[torch.Tensor] = []

    def start(self, tensors: tuple[torch.Tensor, ...], backward: bool) -> list[torch.Tensor]:
        send, recv = (self.recv_splits, self.send_splits) if backward else (self.send_splits, self.recv_splits)
        if self.timer is not None:
            self.timer.start("exchange")
        self.buffers, self.works = [], []
        for t, s, r in zip(tensors, send, recv):
            out = t.new_empty((sum(r), *t.shape[1:]))
            self.works.append(exchange_rows(out, t.contiguous(), r, s, self.group))
            self.buffers.append(out)
        return self.buffers

    def wait(self) -> list[torch.Tensor]:
        """The receive buffers, complete; the exchange lets go of them (no copy kept to backward)."""
        for work in self.works:
            work.wait()
        if self.timer is not None:
            self.timer.stop("exchange")
        out, self.works, self.buffers = self.buffers, [], []
        return out


class _Start(torch.autograd.Function):
    @staticmethod
    def forward(ctx, exchange: _Exchange, *tensors: torch.Tensor):
        ctx.exchange = exchange
        return tuple(exchange.start(tensors, backward=False))

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):
        return None, *ctx.exchange.wait()  # the gradients _Finish.backward started sending


class _Finish(torch.autograd.Function):
    @staticmethod
    def forward(ctx, exchange: _Exchange, order: torch.Tensor, *buffers: torch.Tensor):
        ctx.exchange = exchange
        exchange.wait()
        return (order.view_as(order), *(b.view_as(b) for b in buffers))

    @staticmethod
    def backward(ctx, grad_order: torch.Tensor, *grads: torch.Tensor):
        ctx.exchange.start(grads, backward=True)  # _Start.backward waits for it
        return None, grad_order, *grads


class _Flight:
    """Differentiable exchanges in flight, finished in the order the caller asks for, with one
    ordering tensor threaded through every finish (see the module docstring)."""

    def __init__(self, order: torch.Tensor, timer=None) -> None:
        self.order, self.timer = order, timer

    def start(self, group: dist.ProcessGroup, send_splits: list[list[int]], recv_splits: list[list[int]],
              *tensors: torch.Tensor) -> tuple[_Exchange, tuple[torch.Tensor, ...]]:
        exchange = _Exchange(group, send_splits, recv_splits, self.timer)
        return exchange, _Start.apply(exchange, *tensors)

    def finish(self, started: tuple[_Exchange, tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        exchange, buffers = started
        self.order, *out = _Finish.apply(exchange, self.order, *buffers)
        return tuple(out)


def _exclusive_cumsum(counts: np.ndarray) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)


def _to(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """int64 host array on ``device`` without a device sync (``overlap._to_device``)."""
    return _to_device(np.asarray(array, dtype=np.int64), device)


# ----------------------------------------------------------------------------- the layer

@dataclass
class HierarchicalCounts:
    """Host split sizes of one layer's hierarchical exchange (from the one counts exchange).

    send1: int64 [M, C, 1 + H + H E] what this rank told each rail member (rail group order):
        per chunk, rows for that member's node, rows per GPU h of it, assignments per (h, e).
    recv1: the same from each rail member (as source).
    send2: int64 [H, C, 1 + E] what this rank forwards to each node member (node group order):
        per chunk, rows and assignments per expert.
    recv2: the same from each node member (as rail peer).
    """

    send1: np.ndarray
    recv1: np.ndarray
    send2: np.ndarray
    recv2: np.ndarray

    @property
    def num_chunks(self) -> int:
        return self.send1.shape[1]

    def rows1(self, which: np.ndarray) -> np.ndarray:  # [M, C] -> [C, M]
        return which[:, :, 0].T

    def assignments1(self, which: np.ndarray) -> np.ndarray:  # [C, M]
        H = self.send2.shape[0]
        return which[:, :, 1 + H:].sum(axis=2).T

    def rows2(self, which: np.ndarray) -> np.ndarray:  # [H, C] -> [C, H]
        return which[:, :, 0].T

    def assignments2(self, which: np.ndarray) -> np.ndarray:  # [C, H]
        return which[:, :, 1:].sum(axis=2).T


class HierarchicalDispatch:
    """The hierarchical exchange of one expert-parallel layer on this rank (see module doc)."""

    def __init__(self, groups: HierarchicalGroups, num_ranks: int, num_experts: int) -> None:
        self.groups, self.num_ranks, self.num_experts = groups, num_ranks, num_experts
        layout = groups.layout
        self.node_of, self.local_of = layout.node_of(), layout.local_of()
        self.num_nodes, self.gpus_per_node = layout.num_nodes, len(layout.node_ranks[0])
        # position of each node in my rail group, of each local index in my node group
        self.rail_pos = np.empty(self.num_nodes, np.int64)
        self.rail_pos[groups.rail_node] = np.arange(self.num_nodes)
        self.node_pos = np.empty(self.gpus_per_node, np.int64)
        self.node_pos[groups.node_local] = np.arange(self.gpus_per_node)
        self._device_tables: dict[torch.device, tuple[torch.Tensor, ...]] = {}

    def _tables(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if device not in self._device_tables:
            ranks = np.array(self.groups.layout.node_ranks, np.int64)  # (M, H)
            self._device_tables[device] = tuple(_to(a, device) for a in (
                self.node_of, self.local_of, self.rail_pos, self.node_pos, ranks[self.groups.rail_node]))
        return self._device_tables[device]

    # -- counts -------------------------------------------------------------------------------

    def count_message(self, key: torch.Tensor, top_k: int, num_chunks: int) -> torch.Tensor:
        """key: int64 (A,) destination * E + expert (G * E dropped) -> int64 (M, C, 1 + H + H E),
        the stage-1 counts message to each rail member (module doc)."""
        G, E, M, H, C = self.num_ranks, self.num_experts, self.num_nodes, self.gpus_per_node, num_chunks
        node_of, _, rail_pos, _, rail_ranks = self._tables(key.device)
        num_tokens = key.numel() // top_k
        is_valid = key < G * E
        dest = torch.where(is_valid, key // E, G).view(num_tokens, top_k)  # (N, k)
        chunk = torch.arange(num_tokens, device=key.device) * C // max(num_tokens, 1)  # (N,)
        node = torch.where(dest < G, rail_pos[node_of[dest.clamp(max=G - 1)]], M)  # (N, k) rail position
        # distinct (token, node) per (chunk, rail position); distinct (token, GPU) per (chunk, GPU)
        rows_node = distinct_rows(torch.where(node < M, chunk[:, None] * M + node, C * M), C * M)
        rows_gpu = distinct_rows(torch.where(dest < G, chunk[:, None] * G + dest, C * G), C * G)
        expert = key % E
        block = torch.where(is_valid, (chunk.repeat_interleave(top_k) * G + key // E) * E + expert, C * G * E)
        per_expert = count_keys(block, C * G * E + 1)[:C * G * E].view(C, G, E)
        rows_gpu = rows_gpu.view(C, G)[:, rail_ranks]  # (C, M, H): GPU h of each rail member's node
        per_expert = per_expert[:, rail_ranks]  # (C, M, H, E)
        return torch.cat([rows_node.view(C, M, 1), rows_gpu, per_expert.reshape(C, M, H * E)],
                         dim=2).transpose(0, 1).contiguous()

    def exchange_counts(self, send1: torch.Tensor, extra: torch.Tensor
                        ) -> tuple[HierarchicalCounts, np.ndarray]:
        """The counts exchange (both stages) of ``count_message``'s send1, and ``extra`` (int64,
        any length) read back with it. NOTE: one host sync at the end."""
        M, C = send1.shape[:2]
        H, E = self.gpus_per_node, self.num_experts
        recv1 = torch.empty_like(send1)
        dist.all_to_all_single(recv1, send1, group=self.groups.rail)
        per_gpu = recv1.sum(dim=0)  # (C, 1 + H + H E): over the rail sources
        rows = per_gpu[:, 1:1 + H]  # (C, H) by local index
        per_expert = per_gpu[:, 1 + H:].view(C, H, E)
        send2 = torch.cat([rows[:, :, None], per_expert], dim=2).transpose(0, 1)  # (H, C, 1 + E) by local
        send2 = send2[_to(self.groups.node_local, send1.device)].contiguous()  # node group order
        recv2 = torch.empty_like(send2)
        dist.all_to_all_single(recv2, send2, group=self.groups.node)
        flat = torch.cat([t.reshape(-1) for t in (send1, recv1, send2, recv2, extra)]).cpu().numpy()  # NOTE: host sync
        n1, n2 = send1.numel(), send2.numel()
        counts = HierarchicalCounts(flat[:n1].reshape(send1.shape), flat[n1:2 * n1].reshape(send1.shape),
                                    flat[2 * n1:2 * n1 + n2].reshape(send2.shape),
                                    flat[2 * n1 + n2:2 * (n1 + n2)].reshape(send2.shape))
        return counts, flat[2 * (n1 + n2):]

    def statistics(self, counts: HierarchicalCounts) -> dict[str, np.ndarray]:
        """This rank's routing statistics and bytes (in rows) from the host counts:
        tokens per expert (E,), node_rows (M,) by node index, gpu_rows (G,), dispatch_rows and
        combine_rows (G,) sent to each rank in both stages."""
        G, E, M, H = self.num_ranks, self.num_experts, self.num_nodes, self.gpus_per_node
        g = self.groups
        send1 = counts.send1.sum(axis=1)  # (M, 1 + H + H E)
        ranks = np.array(g.layout.node_ranks, np.int64)[g.rail_node]  # (M, H)
        gpu_rows = np.zeros(G, np.int64)
        gpu_rows[ranks.reshape(-1)] = send1[:, 1:1 + H].reshape(-1)
        tokens = send1[:, 1 + H:].reshape(M * H, E).sum(axis=0)
        node_rows = np.zeros(M, np.int64)
        node_rows[g.rail_node] = send1[:, 0]
        dispatch, combine = np.zeros(G, np.int64), np.zeros(G, np.int64)
        np.add.at(dispatch, g.rail_members, counts.rows1(counts.send1).sum(axis=0))
        np.add.at(dispatch, g.node_members, counts.rows2(counts.send2).sum(axis=0))
        np.add.at(combine, g.rail_members, counts.rows1(counts.recv1).sum(axis=0))
        np.add.at(combine, g.node_members, counts.rows2(counts.recv2).sum(axis=0))
        return {"tokens": tokens, "node_rows": node_rows, "gpu_rows": gpu_rows,
                "dispatch_rows": dispatch, "combine_rows": combine}

    # -- rows ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, key: torch.Tensor, topk_weight: torch.Tensor,
                counts: HierarchicalCounts, local_experts: list[int],
                weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
                activation: str, impl: str, timer: Any = None) -> torch.Tensor:
        """x: (N, D), key: int64 (A,) as for ``count_message``, topk_weight: (N, k) -> (N, D).
        timer: see ``_Exchange`` (pass it for one chunk only: chunks' exchanges overlap)."""
        G, E, M = self.num_ranks, self.num_experts, self.num_nodes
        C = counts.num_chunks
        device = x.device
        node_of, local_of, rail_pos, node_pos, _ = self._tables(device)
        num_tokens, top_k = topk_weight.shape
        rail, node = self.groups.rail, self.groups.node

        # Stage-1 send order: assignments by (chunk, rail position, token), flat order inside.
        send_rows1, send_asg1 = counts.rows1(counts.send1), counts.assignments1(counts.send1)  # [C, M]
        recv_rows1, recv_asg1 = counts.rows1(counts.recv1), counts.assignments1(counts.recv1)
        is_valid = key < G * E
        dest = key // E
        token = torch.arange(key.numel(), device=device) // top_k  # (A,)
        chunk = token * C // max(num_tokens, 1)
        pos = rail_pos[node_of[dest.clamp(max=G - 1)]]
        key1 = torch.where(is_valid, (chunk * M + pos) * num_tokens + token, C * M * num_tokens)
        num_valid = int(send_asg1.sum())
        order1 = torch.argsort(key1, stable=True)[:num_valid]  # (A1,)
        key1 = key1[order1]
        is_first = torch.ones_like(key1, dtype=torch.bool)
        is_first[1:] = key1[1:] != key1[:-1]
        row1 = torch.cumsum(is_first, 0) - 1  # (A1,) row in the stage-1 send buffer
        num_rows1 = int(send_rows1.sum())
        rows1_token = token[order1][torch.argsort(~is_first, stable=True)[:num_rows1]]  # (S1,)
        block_start = _to(_exclusive_cumsum(send_rows1.reshape(-1)), device)  # (C * M,)
        in_block = row1 - block_start[key1 // num_tokens]
        expert = key[order1] % E
        meta1 = torch.stack([in_block, local_of[dest[order1]], expert], dim=1)  # (A1, 3)
        w1 = topk_weight.reshape(-1)[order1]  # (A1,)

        flight = _Flight(x.reshape(-1)[:0], timer)  # empty: the ordering tensor
        r_off, a_off = _exclusive_cumsum(send_rows1.sum(axis=1)), _exclusive_cumsum(send_asg1.sum(axis=1))
        stage1, meta1_in = [], []
        for c in range(C):  # every stage-1 send first: the network is the slow link
            rows = rows1_token[r_off[c]:r_off[c] + send_rows1[c].sum()]
            a = slice(a_off[c], a_off[c] + send_asg1[c].sum())
            stage1.append(flight.start(rail, [send_rows1[c].tolist(), send_asg1[c].tolist()],
                                       [recv_rows1[c].tolist(), recv_asg1[c].tolist()],
                                       x.index_select(0, rows), w1[a]))
            recv_meta = meta1.new_empty((int(recv_asg1[c].sum()), 3))
            meta1_in.append((exchange_rows(recv_meta, meta1[a].contiguous(), recv_asg1[c].tolist(),
                                           send_asg1[c].tolist(), rail), recv_meta))

        send_rows2, send_asg2 = counts.rows2(counts.send2), counts.assignments2(counts.send2)  # [C, H]
        recv_rows2, recv_asg2 = counts.rows2(counts.recv2), counts.assignments2(counts.recv2)
        H = self.gpus_per_node

        def begin_stage2(c: int):
            """At the rail peer: chunk c's stage-1 rows in, stage 2 out (one row per (token, GPU))."""
            x1, w1_in = flight.finish(stage1[c])  # (Q1_c, D), (A1_c,)
            work, m1 = meta1_in[c]
            work.wait()
            src = torch.repeat_interleave(torch.arange(M, device=device), _to(recv_asg1[c], device),
                                          output_size=m1.shape[0])
            r = _to(_exclusive_cumsum(recv_rows1[c]), device)[src] + m1[:, 0]  # (A,) row of x1
            q = node_pos[m1[:, 1]]
            key2 = q * max(x1.shape[0], 1) + r
            order2 = torch.argsort(key2, stable=True)
            key2 = key2[order2]
            first = torch.ones_like(key2, dtype=torch.bool)
            first[1:] = key2[1:] != key2[:-1]
            row2 = torch.cumsum(first, 0) - 1
            num_rows2 = int(send_rows2[c].sum())
            rows2_src = r[order2][torch.argsort(~first, stable=True)[:num_rows2]]  # (S2_c,)
            start2 = _to(_exclusive_cumsum(send_rows2[c]), device)
            meta2 = torch.stack([row2 - start2[q[order2]], m1[order2, 2]], dim=1)  # (A2_c, 2)
            started = flight.start(node, [send_rows2[c].tolist(), send_asg2[c].tolist()],
                                   [recv_rows2[c].tolist(), recv_asg2[c].tolist()],
                                   x1.index_select(0, rows2_src), w1_in[order2])
            recv_meta = meta2.new_empty((int(recv_asg2[c].sum()), 2))
            work = exchange_rows(recv_meta, meta2, recv_asg2[c].tolist(), send_asg2[c].tolist(), node)
            return started, (work, recv_meta), rows2_src, x1.shape[0]

        def experts(c: int, stage2) -> tuple:
            """At the expert GPU: chunk c's rows through the local experts, summed per row."""
            started, (work, m2), _, _ = stage2
            x2, w2_in = flight.finish(started)  # (Q2_c, D), (A2_c,)
            work.wait()
            src = torch.repeat_interleave(torch.arange(H, device=device), _to(recv_asg2[c], device),
                                          output_size=m2.shape[0])
            r = _to(_exclusive_cumsum(recv_rows2[c]), device)[src] + m2[:, 0]
            by_expert = torch.argsort(m2[:, 1], stable=True)  # local experts ascending, as the weights
            num_local = counts.recv2[:, c, 1:][:, local_experts].sum(axis=0).tolist()
            rows = r[by_expert]
            y = expert_mlp(x2.index_select(0, rows), num_local, *weights, activation, impl)  # (A2_c, D)
            y = y * w2_in[by_expert].to(y.dtype)[:, None]
            z2 = x2.new_zeros(x2.shape).index_add(0, rows, y)  # (Q2_c, D)
            return flight.start(node, [recv_rows2[c].tolist()], [send_rows2[c].tolist()], z2)

        def combine_stage1(c: int, stage2, combine2) -> tuple:
            """At the rail peer: chunk c's per-GPU sums in, summed per (token, node), sent home."""
            _, _, rows2_src, num_rows1_in = stage2
            (z,) = flight.finish(combine2)  # (S2_c, D)
            z1 = z.new_zeros((num_rows1_in, z.shape[1])).index_add(0, rows2_src, z)  # (Q1_c, D)
            return flight.start(rail, [recv_rows1[c].tolist()], [send_rows1[c].tolist()], z1)

        stage2 = {0: begin_stage2(0)}
        combine2, combine1 = {}, {}
        for c in range(C):
            if c + 1 < C:
                stage2[c + 1] = begin_stage2(c + 1)  # moves while chunk c's experts run
            combine2[c] = experts(c, stage2[c])
            if c > 0:
                combine1[c - 1] = combine_stage1(c - 1, stage2[c - 1], combine2[c - 1])
        combine1[C - 1] = combine_stage1(C - 1, stage2[C - 1], combine2[C - 1])
        out = x.new_zeros(x.shape)
        for c in range(C):
            (z,) = flight.finish(combine1[c])  # (S1_c, D)
            rows = rows1_token[r_off[c]:r_off[c] + send_rows1[c].sum()]
            out = out.index_add(0, rows, z)
        return out + flight.order.sum()  # the ordering tensor joins the graph (adds 0)
