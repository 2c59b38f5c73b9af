"""Expert parallelism driven by a ``Placement``, applied to a built single-device ``Transformer``.

Shape legend:
    N = local tokens, D = d_model, E = experts per MoE layer, k = experts per token,
    A = N * k local assignments, G = ranks in the expert-parallel group, R = max replicas of an
    expert (padding for ragged per-expert tables), E_loc = experts this rank holds in a layer,
    S = rows this rank sends in dispatch, Q = rows it receives, L = MoE layers.

Every rank runs attention and all dense parameters data-parallel on its own tokens. In each MoE
layer a rank keeps the weights of the experts the placement gives it (E_loc may be 0, 1 or more),
and one forward is:

    route locally -> pick a replica per assignment (split[e][rank], largest remainder)
    -> sort by (destination rank, expert) -> all_to_all counts [G, E]  (the one host sync)
    -> all_to_all rows (uneven splits) -> regroup by local expert -> expert GEMMs
    -> reverse all_to_all -> weighted combine into tokens.

The receiver learns which rows belong to which expert from the counts matrix (rows from each
source arrive sorted by expert), so expert ids need not travel with the rows.

By default the row exchange and the expert GEMMs are chunked and overlapped (``overlap.py``:
dispatch of chunk c + 1 and combine of chunk c - 1 run under chunk c's GEMMs, likewise in
backward); ``overlap=False`` keeps the unchunked path above as the reference.

Gradients: ``sync_gradients`` all-reduces dense gradients over the group and each expert's
gradients among exactly the ranks holding a replica of it (one ``dist.new_group`` per distinct
replica set), so replicas stay identical after every optimizer step.

All exchanges use ``dist.all_to_all_single`` with uneven splits, which both NCCL and gloo (CPU)
support; backward is the same exchange with the splits swapped (``_AllToAll``).

``dispatch="hierarchical"`` replaces the one exchange by two, over rail and node process groups,
sending a token once per destination node (``hierarchical.py``); the replica choice, the
experts, the statistics and the gradient synchronisation are the same.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh

from epplan.errors import param, RuntimeSetupError
from epplan.placement.types import LayerPlacement, Placement
from epplan.runtime.combine import combine, token_rows
from epplan.runtime.experts import GroupedExperts, compute_dtype, expert_mlp
from epplan.runtime import expert_tensor_parallel as etp_
from epplan.runtime.expert_tensor_parallel import ExpertTP
from epplan.runtime.hierarchical import (DISPATCH, HierarchicalDispatch, NodeLayout, distinct_rows,
                                         new_hierarchical_groups, pair_counts)
from epplan.runtime.init import init_weights
from epplan.runtime.model import Transformer
from epplan.runtime.recompute import record_or_replay
from epplan.runtime import overlap as _overlap
from epplan.runtime.overlap import (DEFAULT_OVERLAP_CTAS, ChunkPlan, ExchangeSettings,
                                    auto_num_chunks, chunk_of_row, chunked_experts,
                                    new_overlap_group)
from epplan.runtime.router import count_keys, position_in_expert
from epplan.workload.config import ModelConfig


# Optional timer of the unchunked exchanges (``start(name)`` / ``stop(name)``, e.g.
# ``epplan.train.timing.StepTimer``): marks on the compute stream before each exchange is issued
# and after the stream waits for it.
_exchange_timer: Any = None


def set_exchange_timer(timer: Any) -> None:
    """Time every unchunked row exchange as ``timer``'s "exchange" component (None: stop)."""
    global _exchange_timer
    _exchange_timer = timer


def _exchange(out: torch.Tensor, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
              group: dist.ProcessGroup | None) -> None:
    timer = _exchange_timer
    if timer is not None:
        timer.start("exchange")
    _overlap.exchange_rows(out, x, output_splits, input_splits, group).wait()
    if timer is not None:
        timer.stop("exchange")


class _AllToAll(torch.autograd.Function):
    """Rows of x go to ranks in input_splits sizes; backward sends gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, output_splits: list[int], input_splits: list[int],
                group: dist.ProcessGroup | None) -> torch.Tensor:
        ctx.splits, ctx.group = (output_splits, input_splits), group
        out = x.new_empty((sum(output_splits), *x.shape[1:]))
        _exchange(out, x.contiguous(), output_splits, input_splits, group)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        output_splits, input_splits = ctx.splits
        grad_in = grad_out.new_empty((sum(input_splits), *grad_out.shape[1:]))
        _exchange(grad_in, grad_out.contiguous(), input_splits, output_splits, ctx.group)
        return grad_in, None, None, None


def all_to_all(x: torch.Tensor, output_splits: list[int], input_splits: list[int],
               group: dist.ProcessGroup | None = None) -> torch.Tensor:
    """Differentiable uneven all-to-all of rows: x (sum(input_splits), ...) -> (sum(output_splits), ...)."""
    return _AllToAll.apply(x, output_splits, input_splits, group)


def split_assignments(num_per_expert: torch.Tensor, shares: torch.Tensor) -> torch.Tensor:
    """Integer assignments per replica, following one source's shares exactly in total.

    num_per_expert: int64 (E,), this source's assignments to each expert.
    shares:         float64 (E, R), share of each replica (0 in padding columns), rows sum to 1.
    Returns int64 (E, R), rows summing to num_per_expert.

    Rounding rule (largest remainder): replica r first gets floor(share_r * n); the assignments
    still unplaced go one each to the replicas with the largest fractional parts (ties: the lower
    replica index); a replica of share 0 never gets one. Any residue from floating-point error
    lands on the replica of the largest share.
    """
    n = num_per_expert.to(torch.float64)[:, None]  # (E, 1)
    quota = shares * n  # (E, R)
    base = torch.floor(quota)
    frac = torch.where(shares > 0, quota - base, -1.0)  # (E, R); padding sorts last
    short = n - base.sum(dim=1, keepdim=True)  # (E, 1)
    by_frac = torch.argsort(-frac, dim=1, stable=True)  # (E, R)
    place = torch.argsort(by_frac, dim=1)  # (E, R) rank of each replica by fractional part
    counts = (base + ((place < short) & (shares > 0))).to(torch.int64)  # (E, R)
    residue = num_per_expert - counts.sum(dim=1)  # (E,) 0 unless shares were off by rounding
    return counts.scatter_add(1, shares.argmax(dim=1, keepdim=True), residue[:, None])


@dataclass
class ExpertParallelStats:
    """This rank's routing statistics since the last ``reset()``, from forward passes.

    num_tokens_per_expert: int64 [L, E], token-assignments this rank routed to each expert (after
        capacity drops), summed over forward calls.
    dispatch_bytes: int64 [L, G], bytes this rank sent to each rank in dispatch
        (rows * d_model * element size); column ``rank`` never leaves the device.
    combine_bytes:  int64 [L, G], bytes this rank sent to each rank in combine (results of the
        rows it received). Backward sends the same amounts again (its dispatch gradient mirrors
        combine and vice versa), so a training step moves twice these numbers. Under
        hierarchical dispatch both stages' rows count (a pair of ranks on different nodes only
        ever exchanges stage-1 rows, a pair on one node stage-2 rows); the diagonal holds both
        stages' rows a rank passes to itself.
    pairs:     int64 [L, E, E], this rank's tokens that selected both i and j (i < j; zeros on
        and below the diagonal).
    gpu_rows:  int64 [L, G], distinct (token, GPU) pairs of this rank's tokens per GPU.
    node_rows: int64 [L, M], distinct (token, node) pairs per node (M = nodes of the layout).
    expert_tp_bytes: int64 [L, G], under ``--expert-tp`` the bytes this rank sent to each other rank
        of its TP group in the forward exchanges of ``expert_tensor_parallel.group_expert_mlp``:
        its own received rows to every group rank (the gather) and each group rank's rows' partial
        outputs back to it (the reduce-scatter), Q_me + Q_h rows to rank h; zeros without it.
        Backward repeats both (a block recompute once more): ``tensor_parallel.expert_tp_passes``.
    """

    num_tokens_per_expert: np.ndarray
    dispatch_bytes: np.ndarray
    combine_bytes: np.ndarray
    pairs: np.ndarray
    gpu_rows: np.ndarray
    node_rows: np.ndarray
    expert_tp_bytes: np.ndarray
    num_forward: int = 0  # forward calls of the whole model (counted at MoE layer 0)
    row_bytes: int = 0  # bytes of one row on the wire (d_model * the exchange dtype's size)

    @classmethod
    def zeros(cls, num_layers: int, num_experts: int, num_ranks: int,
              num_nodes: int = 1) -> "ExpertParallelStats":
        return cls(np.zeros((num_layers, num_experts), np.int64),
                   np.zeros((num_layers, num_ranks), np.int64),
                   np.zeros((num_layers, num_ranks), np.int64),
                   np.zeros((num_layers, num_experts, num_experts), np.int64),
                   np.zeros((num_layers, num_ranks), np.int64),
                   np.zeros((num_layers, num_nodes), np.int64),
                   np.zeros((num_layers, num_ranks), np.int64))

    def reset(self) -> None:
        for array in (self.num_tokens_per_expert, self.dispatch_bytes, self.combine_bytes,
                      self.pairs, self.gpu_rows, self.node_rows, self.expert_tp_bytes):
            array.fill(0)
        self.num_forward = 0


class ExpertParallelExperts(nn.Module):
    """Drop-in for ``GroupedExperts``: this rank's replicas of one MoE layer.

    w1, w3: (E_loc, D, F); w2: (E_loc, F, D) for ``local_experts`` (ascending expert ids).
    overlap:    True: the chunked exchange of ``overlap.py`` (communication under the expert
                GEMMs); False: the unchunked reference (plain autograd through ``all_to_all``
                and ``expert_mlp``), kept for tests and comparisons.
    num_chunks: chunks per layer when overlapping; None picks ``auto_num_chunks``. Ranks may
                differ: the layer uses the largest any rank asks for.
    overlap_group, reserve_sms: see ``overlap.ExchangeSettings`` (default: hidden exchanges on
                ``group``, no SMs reserved).
    node_of:    int64 (G,) node of each rank (statistics per node); None: one node.
    hierarchical: the layer's hierarchical exchange, or None for flat dispatch.
    expert_tp:  this rank's TP group when the expert GEMMs split their hidden dimension over it
                (``expert_tensor_parallel.py``): then ``local_experts`` are the group's experts,
                w1, w3 (E_loc, D, F / t) and w2 (E_loc, F / t, D) this rank's slices, and the
                layer runs the unchunked exchange whatever ``overlap`` says.
    """

    def __init__(self, experts: GroupedExperts, layer: LayerPlacement, layer_index: int,
                 group: dist.ProcessGroup | None, stats: ExpertParallelStats,
                 overlap: bool = True, num_chunks: int | None = None,
                 overlap_group: dist.ProcessGroup | None = None, reserve_sms: int = 0,
                 node_of: np.ndarray | None = None,
                 hierarchical: HierarchicalDispatch | None = None,
                 expert_tp: ExpertTP | None = None) -> None:
        super().__init__()
        if num_chunks is not None and (not isinstance(num_chunks, int) or num_chunks < 1):
            raise RuntimeSetupError(f"num_chunks must be a positive integer or None (automatic), "
                                    f"got {num_chunks!r}")
        self.group = group
        self.rank = dist.get_rank(group)
        self.num_ranks = dist.get_world_size(group)
        self.num_experts = experts.num_experts
        self.activation, self.impl = experts.activation, experts.impl
        self.overlap, self.num_chunks = overlap, num_chunks
        self.overlap_group, self.reserve_sms = overlap_group, reserve_sms
        self.layer_index = layer_index
        self.stats = stats
        self.hierarchical = hierarchical
        self.expert_tp = expert_tp
        node_of = np.zeros(self.num_ranks, np.int64) if node_of is None else np.asarray(node_of, np.int64)
        self.num_nodes = int(node_of.max()) + 1
        self._node_of = node_of
        self.follow(layer)
        local = torch.tensor(self.local_experts, dtype=torch.int64, device=experts.w1.device)

        def slot_weights(name: str, w: torch.Tensor) -> nn.Parameter:
            w = w.detach()[local]  # (E_loc, D, F) or (E_loc, F, D)
            if expert_tp is not None:
                w = etp_.shard(name, w, expert_tp)
            return nn.Parameter(w.clone())

        self.w1 = slot_weights("w1", experts.w1)
        self.w2 = slot_weights("w2", experts.w2)
        self.w3 = None if experts.w3 is None else slot_weights("w3", experts.w3)

    def follow(self, layer: LayerPlacement) -> None:
        """Take ``layer``'s replicas and splits: local experts, owners, replica sets and dispatch
        tables. The weights are the caller's: w1/w2/w3 must then hold ``local_experts`` in order
        (``epplan.train.replan`` moves them when a run re-places its experts)."""
        self.received_experts = layer.experts_on_rank(self.num_ranks)[self.rank]  # rows arrive for these
        self.replica_sets = [tuple(int(r) for r in ranks) for ranks in layer.replicas]
        if self.expert_tp is None:
            self.local_experts = self.received_experts
            # The lowest-ranked replica owns an expert in gathered checkpoints.
            self.owner = [int(ranks[0]) for ranks in layer.replicas]
            self.shard_sets = list(enumerate(self.replica_sets))
        else:  # the TP group's experts, a hidden slice of each
            self.local_experts = etp_.group_experts(layer, self.num_ranks, self.expert_tp)
            self.owner = etp_.owners(layer, self.expert_tp)
            self.shard_sets = etp_.shard_sets(layer, self.expert_tp.size)
        # Dispatch tables, padded to R columns; plain attributes so that .to(dtype) and
        # state_dict leave them alone (moved to the input's device on first use).
        num_replicas = max(len(ranks) for ranks in layer.replicas)
        replica_ranks = torch.zeros(self.num_experts, num_replicas, dtype=torch.int64)  # (E, R)
        shares = torch.zeros(self.num_experts, num_replicas, dtype=torch.float64)  # (E, R)
        for e, (ranks, split) in enumerate(zip(layer.replicas, layer.split)):
            row = np.clip(np.asarray(split[self.rank], dtype=np.float64), 0.0, None)
            replica_ranks[e, :len(ranks)] = torch.as_tensor(np.asarray(ranks, dtype=np.int64))
            shares[e, :len(ranks)] = torch.as_tensor(row / row.sum())
        self._tables = (replica_ranks, shares, torch.from_numpy(self._node_of))

    def _tables_on(self, device: torch.device) -> tuple[torch.Tensor, ...]:
        if self._tables[0].device != device:
            self._tables = tuple(t.to(device) for t in self._tables)
        return self._tables

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x: (N, D), topk_idx: (N, k) with -1 for dropped, topk_weight: (N, k) -> (N, D).

        Under autocast the rows travel and the experts run in the autocast dtype (bf16 rows are
        what the planner counts on the wire); the output comes back in x's dtype.
        """
        out_dtype = x.dtype
        dtype = compute_dtype(x)
        x = x.to(dtype)
        # The experts cast the (fp32 master) weights to x's dtype themselves: once per change
        # of the weights, gradients straight into the masters (experts.py, "Mixed precision").
        w1, w2, w3 = self.w1, self.w2, self.w3
        num_tokens, top_k = topk_idx.shape
        G, E = self.num_ranks, self.num_experts
        key = self._destination_keys(topk_idx)  # (A,) dest * E + expert; G * E if dropped
        routing = self._routing_rows(key, topk_idx)  # (E * E + G + M,) for the statistics
        if self.hierarchical is not None and G > 1:
            return self._forward_hierarchical(x, key, topk_weight, routing, (w1, w2, w3)).to(out_dtype)
        send_counts = count_keys(key, G * E + 1)[:G * E].view(G, E)  # [t, e]
        if self.expert_tp is not None:
            return self._forward_expert_tp(x, key, send_counts, topk_weight, routing,
                                           (w1, w2, w3)).to(out_dtype)

        # Counts exchange, with each rank's chunk proposal in an extra column so that every
        # rank learns the layer's chunk count from the same message.
        proposal = 1
        if self.overlap:
            num_matrices = 2 if w3 is None else 3
            flops_per_row = 2 * num_matrices * w1.shape[1] * w1.shape[2]  # w1: (E_loc, D, F)
            proposal = self.num_chunks or auto_num_chunks(num_tokens * top_k, G, E, flops_per_row)
        # Unchunked, the rows go in key order whatever the counts say: the sort is queued before
        # the counts' host sync, so the GPU sorts while the host waits (the host's launches of a
        # sort after the sync left the GPU idle 0.3-0.6 ms per layer, call Z's profiled step).
        by_key = torch.argsort(key, stable=True) if G == 1 or not self.overlap else None  # (A,)
        # A block recompute replays the forward's counts (epplan.runtime.recompute): the same
        # splits, no second counts exchange, statistics recorded once.
        send_host, recv_host, num_chunks = record_or_replay(
            self, "counts", partial(self._exchange_counts, send_counts, proposal, routing, x))
        num_sent = int(send_host.sum())

        if G == 1:  # nothing to exchange, nothing to overlap: the rows stay, in expert order
            order = by_key[:num_sent]  # (S,) by expert
            y = expert_mlp(token_rows(x, order, top_k), send_host[0].tolist(), w1, w2, w3, self.activation,
                           self.impl)  # (S, D)
            weight = topk_weight.reshape(-1)[order].to(y.dtype)  # (S,)
            out = combine(y, weight, order, num_tokens, top_k)
            return out.to(out_dtype)
        if not self.overlap:
            order = by_key[:num_sent]  # (S,) by (dest, expert)
            return self._forward_reference(x, order, topk_weight, send_host, recv_host,
                                           (w1, w2, w3)).to(out_dtype)

        # Send rows ordered (chunk, dest, expert), flat order inside.
        chunk = chunk_of_row(key, position_in_expert(key, G * E), send_counts.reshape(-1), num_chunks)
        order = torch.argsort(chunk * (G * E) + key, stable=True)[:num_sent]  # (S,)
        grouped = _overlap.use_grouped_gemm(x, self.w1, self.impl)
        plan = ChunkPlan.build(send_host, recv_host, self.local_experts, num_chunks, x.device, grouped)
        settings = ExchangeSettings(self.group, self.overlap_group, self.reserve_sms, self.activation)
        y = chunked_experts(token_rows(x, order, top_k), plan, settings, w1, w2, w3)  # (S, D)
        weight = topk_weight.reshape(-1)[order].to(y.dtype)  # (S,)
        out = combine(y, weight, order, num_tokens, top_k)
        return out.to(out_dtype)

    def _forward_expert_tp(self, x: torch.Tensor, key: torch.Tensor, send_counts: torch.Tensor,
                           topk_weight: torch.Tensor, routing: torch.Tensor,
                           weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """Unchunked dispatch over all ranks, the TP group's sliced experts
        (``expert_tensor_parallel.group_expert_mlp``), unchunked combine."""
        top_k = topk_weight.shape[1]
        send_host, recv_host, group_recv = record_or_replay(
            self, "counts", partial(self._exchange_counts_expert_tp, send_counts, routing, x))
        order = torch.argsort(key, stable=True)[:int(send_host.sum())]  # (S,) by (dest, expert)
        input_splits = send_host.sum(axis=1).tolist()  # rows to each rank
        output_splits = recv_host.sum(axis=1).tolist()  # rows from each rank
        recv_x = all_to_all(token_rows(x, order, top_k), output_splits, input_splits, self.group)  # (Q, D)
        y = etp_.group_expert_mlp(recv_x, group_recv, self.local_experts, weights, self.activation,
                                  self.impl, self.expert_tp)  # (Q, D)
        y = all_to_all(y, input_splits, output_splits, self.group)  # (S, D)
        weight = topk_weight.reshape(-1)[order].to(y.dtype)  # (S,)
        return combine(y, weight, order, x.shape[0], top_k)

    def _exchange_counts_expert_tp(self, send_counts: torch.Tensor, routing: torch.Tensor,
                                   x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``_exchange_counts``, then the TP group's received counts: int64 (t, G, E) on the host.
        NOTE: host sync (the group's row counts shape the gather and the GEMMs)."""
        send_host, recv_host, _ = self._exchange_counts(send_counts, 1, routing, x)
        group_recv = etp_.gather_counts(torch.as_tensor(recv_host, device=x.device), self.expert_tp)
        group_recv = group_recv.cpu().numpy()
        # Recorded here, once per forward (a recompute replays these counts): Q_me + Q_h rows to h.
        etp = self.expert_tp
        num_rows = group_recv.sum(axis=(1, 2))  # (t,) Q of each group rank
        sent = (num_rows[etp.rank] + num_rows) * x.shape[1] * x.element_size()
        sent[etp.rank] = 0
        self.stats.expert_tp_bytes[self.layer_index, list(etp.ranks)] += sent
        return send_host, recv_host, group_recv

    def _exchange_counts(self, send_counts: torch.Tensor, proposal: int, routing: torch.Tensor,
                         x: torch.Tensor) -> tuple[np.ndarray, np.ndarray, int]:
        """send_counts: int64 (G, E) -> (send_host, recv_host) int64 (G, E) on the host and the
        layer's chunk count; records the statistics (``routing``: see ``_routing_rows``)."""
        G, E = self.num_ranks, self.num_experts
        send_meta = torch.cat([send_counts, send_counts.new_full((G, 1), proposal)], dim=1)
        recv_meta = send_meta  # [s, e]: rows from s for my expert e; [s, E]
        if G > 1:
            recv_meta = torch.empty_like(send_meta)
            dist.all_to_all_single(recv_meta, send_meta, group=self.group)
        # NOTE: host sync (the split sizes of the row exchange and the GEMM shapes)
        host = torch.cat([torch.stack([send_meta, recv_meta]).reshape(-1), routing]).cpu().numpy()
        send_host, recv_host = host[:2 * send_meta.numel()].reshape(2, G, E + 1)
        num_chunks = int(recv_host[:, E].max())
        send_host, recv_host = send_host[:, :E], recv_host[:, :E]
        row_bytes = x.shape[1] * x.element_size()
        self._record(send_host.sum(axis=0), send_host.sum(axis=1) * row_bytes,
                     recv_host.sum(axis=1) * row_bytes, host[2 * send_meta.numel():], row_bytes)
        return send_host, recv_host, num_chunks

    def _routing_rows(self, key: torch.Tensor, topk_idx: torch.Tensor) -> torch.Tensor:
        """int64 (E * E + G + M,): this forward's expert pairs (``pair_counts``), distinct
        (token, GPU) and distinct (token, node) rows, for the statistics."""
        G, E, M = self.num_ranks, self.num_experts, self.num_nodes
        node_of = self._tables_on(key.device)[2]
        dest = torch.where(key < G * E, key // E, G).view(topk_idx.shape)  # (N, k); G if dropped
        node = torch.where(dest < G, node_of[dest.clamp(max=G - 1)], M)
        return torch.cat([pair_counts(topk_idx, E), distinct_rows(dest, G), distinct_rows(node, M)])

    def _forward_hierarchical(self, x: torch.Tensor, key: torch.Tensor, topk_weight: torch.Tensor,
                              routing: torch.Tensor,
                              weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """Two-stage dispatch and combine (``hierarchical.py``), chunked when overlapping."""
        hier = self.hierarchical
        num_chunks = 1
        if self.overlap:
            num_chunks = self.num_chunks or record_or_replay(
                self, "chunks", partial(self._agree_num_chunks, key.numel(), weights[0]))
        send1 = hier.count_message(key, topk_weight.shape[1], num_chunks)
        counts = record_or_replay(self, "counts", partial(self._exchange_hier_counts, send1, routing, x))
        return hier.forward(x, key, topk_weight, counts, self.local_experts, weights,
                            self.activation, self.impl, timer=None if self.overlap else _exchange_timer)

    def _agree_num_chunks(self, num_assignments: int, w1: torch.Tensor) -> int:
        """The largest chunk count any rank proposes (``auto_num_chunks``).
        NOTE: host sync (the chunk count shapes the counts message)."""
        num_matrices = 2 if self.w3 is None else 3
        flops_per_row = 2 * num_matrices * w1.shape[1] * w1.shape[2]  # w1: (E_loc, D, F)
        proposal = torch.tensor([auto_num_chunks(num_assignments, self.num_ranks, self.num_experts,
                                                 flops_per_row)], device=w1.device)
        dist.all_reduce(proposal, op=dist.ReduceOp.MAX, group=self.group)
        return int(proposal.item())

    def _exchange_hier_counts(self, send1: torch.Tensor, routing: torch.Tensor, x: torch.Tensor):
        counts, routing_host = self.hierarchical.exchange_counts(send1, routing)
        found = self.hierarchical.statistics(counts)
        row_bytes = x.shape[1] * x.element_size()
        self._record(found["tokens"], found["dispatch_rows"] * row_bytes,
                     found["combine_rows"] * row_bytes, routing_host, row_bytes)
        return counts

    def _destination_keys(self, topk_idx: torch.Tensor) -> torch.Tensor:
        """int64 (A,): destination rank * E + expert of every assignment; G * E if dropped.

        The j-th assignment (flat order) of this rank to expert e goes to replica r when it
        falls in r's block of split_assignments' counts.
        """
        G, E = self.num_ranks, self.num_experts
        replica_ranks, shares, _ = self._tables_on(topk_idx.device)
        flat = topk_idx.reshape(-1)  # (A,)
        is_valid = flat >= 0
        expert = flat.clamp(min=0)  # (A,)
        num_per_expert = count_keys(torch.where(is_valid, flat, E), E + 1)[:E]  # (E,)
        bounds = torch.cumsum(split_assignments(num_per_expert, shares), dim=1)  # (E, R)
        pos = position_in_expert(flat, E)  # (A,)
        replica = (pos[:, None] >= bounds[expert]).sum(dim=1)  # (A,)
        dest = replica_ranks[expert, replica]  # (A,)
        return torch.where(is_valid, dest * E + expert, G * E)

    def _forward_reference(self, x: torch.Tensor, order: torch.Tensor, topk_weight: torch.Tensor,
                           send_host: np.ndarray, recv_host: np.ndarray,
                           weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]) -> torch.Tensor:
        """Unchunked: one dispatch, the experts, one combine; autograd does the backward."""
        top_k = topk_weight.shape[1]
        input_splits = send_host.sum(axis=1).tolist()  # rows to each rank
        output_splits = recv_host.sum(axis=1).tolist()  # rows from each rank
        recv_x = all_to_all(token_rows(x, order, top_k), output_splits, input_splits, self.group)  # (Q, D)

        # Rows arrive as (source, expert) blocks; the GEMMs want (expert, source).
        num_local = recv_host[:, self.local_experts]  # (G, E_loc)
        by_expert = self._source_to_expert_order(num_local, x.device)  # (Q,)
        y = expert_mlp(recv_x[by_expert], num_local.sum(axis=0).tolist(), *weights,
                       self.activation, self.impl)  # (Q, D), (expert, source) order
        inverse = torch.empty_like(by_expert)
        inverse[by_expert] = torch.arange(by_expert.numel(), device=x.device)
        y = all_to_all(y[inverse], input_splits, output_splits, self.group)  # (S, D)

        weight = topk_weight.reshape(-1)[order].to(y.dtype)  # (S,)
        return combine(y, weight, order, x.shape[0], top_k)

    @staticmethod
    def _source_to_expert_order(num_local: np.ndarray, device: torch.device) -> torch.Tensor:
        """num_local: int64 (G, E_loc) block sizes. Returns int64 (Q,): for each position in
        (expert, source) order, the row index in (source, expert) order."""
        G, E_loc = num_local.shape
        sizes = torch.as_tensor(num_local.reshape(-1), device=device)  # (G * E_loc,)
        block = torch.repeat_interleave(torch.arange(G * E_loc, device=device), sizes,
                                        output_size=int(num_local.sum()))  # (Q,) block of each row
        return torch.argsort((block % max(E_loc, 1)) * G + block // max(E_loc, 1), stable=True)

    def _record(self, num_tokens: np.ndarray, dispatch_bytes: np.ndarray, combine_bytes: np.ndarray,
                routing: np.ndarray, row_bytes: int) -> None:
        """num_tokens (E,), dispatch_bytes / combine_bytes (G,) to each rank, routing: host
        ``_routing_rows``, row_bytes: one row's bytes."""
        G, E, li = self.num_ranks, self.num_experts, self.layer_index
        self.stats.num_tokens_per_expert[li] += num_tokens
        self.stats.dispatch_bytes[li] += dispatch_bytes
        self.stats.combine_bytes[li] += combine_bytes
        self.stats.pairs[li] += routing[:E * E].reshape(E, E)
        self.stats.gpu_rows[li] += routing[E * E:E * E + G]
        self.stats.node_rows[li] += routing[E * E + G:]
        self.stats.row_bytes = row_bytes
        if li == 0:
            self.stats.num_forward += 1


@dataclass
class ExpertParallelState:
    """What ``parallelize_experts`` attaches to the model as ``model.expert_parallel``."""

    group: dist.ProcessGroup | None
    rank: int
    num_ranks: int
    stats: ExpertParallelStats
    layers: list[ExpertParallelExperts]
    # (process group, [(layer module, local slot)]) per replica set (>1 rank) holding this rank.
    replica_groups: list[tuple[dist.ProcessGroup, list[tuple[ExpertParallelExperts, int]]]] = \
        field(default_factory=list)
    dispatch: str = "flat"
    node_ranks: tuple[tuple[int, ...], ...] = ()  # the ranks of each node, local GPU order
    # Every replica set's process group created so far (every rank holds the same keys), reused
    # when the placement changes: dist.new_group is collective and groups are never freed.
    group_of: dict[tuple[int, ...], dist.ProcessGroup] = field(default_factory=dict)


def _all_reduce_sum(t: torch.Tensor, group: dist.ProcessGroup | None) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t, group=group)
    return t


def parallelize_experts(model: Transformer, placement: Placement,
                        group: dist.ProcessGroup | None = None, overlap: bool = True,
                        num_chunks: int | None = None,
                        overlap_ctas: int | None = DEFAULT_OVERLAP_CTAS,
                        dispatch: str = "flat",
                        nodes: list[list[int]] | tuple[tuple[int, ...], ...] | None = None,
                        expert_tp: DeviceMesh | None = None) -> Transformer:
    """Make ``model`` expert-parallel over ``group`` (default: the world), in place.

    overlap, num_chunks: see ``ExpertParallelExperts`` (default: chunked, automatic count).
    overlap_ctas: with overlap, exchanges hidden under expert GEMMs go through a second
        communicator of the same ranks limited to this many CTAs, and the GEMMs leave as many
        SMs free (``overlap.ExchangeSettings``); None: they share ``group``, no SMs reserved.
        (Flat dispatch only: the hierarchical exchange runs on its rail and node groups.)
    dispatch: "flat" (one row per (token, expert)) or "hierarchical" (one row per (token,
        node) across nodes, ``hierarchical.py``).
    nodes: the ranks of each node in local GPU order (the manifest's layout); None: one node.
        Hierarchical dispatch needs the same number of GPUs on every node.
    expert_tp: the "tp" mesh of ``tensor_parallel.tensor_parallel_mesh`` to split the expert
        GEMMs' hidden dimension over (``expert_tensor_parallel.py``; flat dispatch, ``group``
        the world); None: every expert whole on the ranks the placement names.

    Every rank must start from the same full model (same weights; or all on the meta device, as
    ``build_expert_parallel_model`` does, so that only local weights are ever allocated) and call
    this collectively:
    the replica process groups are created with ``dist.new_group``, which every process of the
    default group enters, in the same order. Build the optimizer afterwards.
    Raises ``RuntimeSetupError`` if the placement does not fit the model or the group.
    """
    if not dist.is_initialized():
        raise RuntimeSetupError("expert parallelism needs torch.distributed initialised "
                                "(launch with torchrun)")
    num_ranks, rank = dist.get_world_size(group), dist.get_rank(group)
    moes = model.moe_layers()
    config = model.config
    if placement.num_ranks != num_ranks:
        raise RuntimeSetupError(f"the placement is for {placement.num_ranks} ranks but {num_ranks} "
                                f"were launched; launch {placement.num_ranks} processes")
    if placement.num_layers != len(moes) or placement.num_experts != config.num_experts:
        raise RuntimeSetupError(
            f"the placement has {placement.num_layers} MoE layers x {placement.num_experts} experts; "
            f"model {config.name!r} has {len(moes)} x {config.num_experts}")
    placement.validate(experts_per_gpu=config.num_experts)  # the per-GPU limit is the planner's

    if dispatch not in DISPATCH:
        raise RuntimeSetupError(f"dispatch {dispatch!r}: use {' or '.join(DISPATCH)}")
    layout = NodeLayout.one_node(num_ranks) if nodes is None else \
        NodeLayout(tuple(tuple(int(r) for r in ranks) for ranks in nodes))
    layout.check(num_ranks, dispatch)
    etp = None
    if expert_tp is not None:
        if group is not None:
            raise RuntimeSetupError(f"{param('expert_tp')} runs expert parallelism over the world; pass group=None")
        etp = ExpertTP.of(expert_tp)
        etp.check(num_ranks, config.d_ff, dispatch)

    group_ranks = dist.get_process_group_ranks(group or dist.group.WORLD)
    overlap_group = hierarchical = None
    if dispatch == "hierarchical":
        hierarchical = HierarchicalDispatch(new_hierarchical_groups(layout, group_ranks, rank),
                                            num_ranks, config.num_experts)
    elif overlap and overlap_ctas:
        overlap_group = new_overlap_group(group_ranks, max_ctas=overlap_ctas)
    stats = ExpertParallelStats.zeros(len(moes), config.num_experts, num_ranks, layout.num_nodes)
    state = ExpertParallelState(group, rank, num_ranks, stats, layers=[], dispatch=dispatch,
                                node_ranks=layout.node_ranks)
    for li, (moe, layer) in enumerate(zip(moes, placement.layers)):
        moe.experts = ExpertParallelExperts(moe.experts, layer, li, group, stats,
                                            overlap=overlap, num_chunks=num_chunks,
                                            overlap_group=overlap_group,
                                            reserve_sms=overlap_ctas if overlap_group else 0,
                                            node_of=layout.node_of(), hierarchical=hierarchical,
                                            expert_tp=etp)
        moe.router.reduce_load = partial(_all_reduce_sum, group=group)
        state.layers.append(moe.experts)

    model.expert_parallel = state
    set_replica_groups(state)
    return model


def set_replica_groups(state: ExpertParallelState) -> None:
    """Collective: ``state.replica_groups`` from the layers' replica sets, a process group per
    distinct set of more than one rank, in (layer, expert) order on every rank; each collects
    the gradients of all (layer, expert) it serves. Sets seen before reuse their group. Under
    expert tensor parallelism the sets are those of each slice (``ExpertParallelExperts.shard_sets``)."""
    group_ranks = dist.get_process_group_ranks(state.group or dist.group.WORLD)
    members: dict[tuple[int, ...], list[tuple[ExpertParallelExperts, int]]] = {}
    for layer in state.layers:
        for e, ranks in layer.shard_sets:
            if len(ranks) > 1:
                slots = members.setdefault(ranks, [])
                if state.rank in ranks:
                    slots.append((layer, layer.local_experts.index(e)))
    state.replica_groups = []
    for ranks, slots in members.items():
        if ranks not in state.group_of:
            state.group_of[ranks] = dist.new_group([group_ranks[r] for r in ranks])
        if state.rank in ranks:
            state.replica_groups.append((state.group_of[ranks], slots))


def build_expert_parallel_model(config: ModelConfig, placement: Placement, seed: int,
                                device: torch.device, capacity_factor: float | None = None,
                                **parallel: Any) -> Transformer:
    """The model of ``config``, expert-parallel under ``placement``, with only this rank's weights
    ever allocated: built on the meta device, sliced by ``parallelize_experts`` (``parallel``: its
    keyword arguments), then materialised on ``device`` and filled by ``init.init_weights``, whose
    values do not depend on the placement. Collective, like ``parallelize_experts``.
    """
    with torch.device("meta"):
        model = Transformer(config, capacity_factor=capacity_factor)
    parallelize_experts(model, placement, **parallel)
    model.to_empty(device=device)
    init_weights(model, seed)
    return model


def _state(model: nn.Module) -> ExpertParallelState:
    state = getattr(model, "expert_parallel", None)
    if state is None:
        raise RuntimeSetupError("the model is not expert-parallel; call parallelize_experts first")
    return state


def _weights(layer: ExpertParallelExperts) -> list[nn.Parameter]:
    return [w for w in (layer.w1, layer.w2, layer.w3) if w is not None]


def sync_gradients(model: Transformer) -> None:
    """Average gradients for one data-parallel step; call after backward, before optimizer.step().

    Each rank's loss is the mean over its own tokens, so the step's loss is the mean over ranks:
    dense gradients are averaged over the group. An expert's gradient already collects every
    rank's tokens through the exchange; summed over its replicas and divided by G it is the
    gradient of that mean, which all replicas then hold.
    """
    state = _state(model)
    expert_params = {id(w) for layer in state.layers for w in _weights(layer)}
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # never used on this rank this step: contributes zero, still reduced
            p.grad = torch.zeros_like(p)

    if state.num_ranks == 1:  # the mean over one rank is the gradient itself
        return
    dense = [p for p in params if id(p) not in expert_params]
    for dtype in sorted({p.dtype for p in dense}, key=str):
        grads = [p.grad for p in dense if p.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=state.group)
        flat /= state.num_ranks
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))

    sync_expert_gradients(model, state.num_ranks)


def sync_expert_gradients(model: Transformer, num_objectives: int) -> None:
    """Sum each expert's gradient over its replicas and divide by ``num_objectives``, the number
    of losses the step's loss is the mean of (G for data parallelism; the data-parallel degree
    under tensor parallelism, whose groups each hold one loss: ``tensor_parallel.py``)."""
    state = _state(model)
    pending = []
    for pg, slots in state.replica_groups:
        grads = [w.grad[j] for layer, j in slots for w in _weights(layer)]
        flat = torch.cat([g.reshape(-1) for g in grads])
        pending.append((dist.all_reduce(flat, group=pg, async_op=True), grads, flat))
    for work, grads, flat in pending:
        work.wait()
        for g, part in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(part.view_as(g))
    expert_grads = [w.grad for layer in state.layers for w in _weights(layer)]
    if expert_grads:
        torch._foreach_div_(expert_grads, num_objectives)


@torch.no_grad()
def gather_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The single-device model's state_dict (same keys and shapes), on every rank.

    Collective. Each expert's weights come from its lowest-ranked replica (an all-reduce of the
    full expert tensors: meant for checkpoints and tests, not for every step).
    """
    state = _state(model)
    out = {name: t.detach().clone() for name, t in model.state_dict().items()}
    for name, layer in model.named_modules():
        if not isinstance(layer, ExpertParallelExperts):
            continue
        for wname, w in layer.named_parameters(recurse=False):
            shape = list(w.shape[1:])
            if layer.expert_tp is not None:  # slices of the hidden dimension
                shape[etp_.HIDDEN_DIM[wname]] *= layer.expert_tp.size
            full = w.new_zeros((layer.num_experts, *shape))  # (E, ...)
            for j, e in enumerate(layer.local_experts):
                if layer.owner[e] == state.rank:
                    target = full[e] if layer.expert_tp is None else etp_.shard(wname, full[e], layer.expert_tp)
                    target.copy_(w[j])
            dist.all_reduce(full, group=state.group)
            out[f"{name}.{wname}"] = full
    return out


def get_stats(model: Transformer) -> ExpertParallelStats:
    """The model's live routing statistics (``reset()`` them at the start of each step)."""
    return _state(model).stats
