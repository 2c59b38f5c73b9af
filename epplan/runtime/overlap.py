"""Chunked dispatch -> experts -> combine of one MoE layer, with communication under compute.

Shape legend:
    C = chunks, G = ranks in the expert-parallel group, E = experts per MoE layer,
    E_loc = experts this rank holds, D = d_model, F = expert hidden,
    S = rows this rank sends (its kept assignments), Q = rows it receives, S_c / Q_c = of chunk c.

Chunks. Every (destination, expert) block of n rows a rank sends is cut into C parts; part c is
rows [floor(c n / C), floor((c + 1) n / C)) of the block, so a row at position p goes to chunk
ceil((p + 1) C / n) - 1. The receiver knows n from the counts exchange and applies the same
rule, so the chunking costs no extra message. Send rows are ordered (chunk, destination, expert); rows of a
chunk arrive ordered (source, expert) and are regrouped to (expert, source) for the GEMMs.

Schedule. ProcessGroupNCCL runs a group's collectives on one NCCL stream, in issue order; the
GEMMs run on the caller's current stream. The loop issues the exchanges so that the NCCL stream
always has work queued that the current GEMMs do not wait for:

    forward:   dispatch(0); for c: dispatch(c + 1); wait dispatch(c); experts(c); combine(c)
               NCCL stream: d0 d1 c0 d2 c1 d3 ...   combine(c - 1) and dispatch(c + 1) under experts(c)
    backward:  for c: combine-grad(c + 1); wait combine-grad(c); input grads(c);
               weight grads(c); dispatch-grad(c)
               combine-grad(c + 1) and dispatch-grad(c - 1) under input grads(c).

Exposed: dispatch(0) and combine(C - 1) in forward, combine-grad(0) and dispatch-grad(C - 1) in
backward: 1 / C of the layer's exchange time, if the hidden exchanges do not slow the GEMMs.
They do unless SMs are set aside for them: see ``sm_carveout`` and ``ExchangeSettings``.
No host synchronisation here: every split size comes from the counts the caller already holds.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

from epplan.schedule import DEFAULT_OVERLAP_CTAS, auto_num_chunks  # noqa: F401  (expert_parallel takes them from here)
from epplan.runtime.experts import (_can_grouped_mm, compute_copy, expert_mlp_backward_input,
                                    expert_mlp_backward_weight, expert_mlp_forward, grad_targets)

# The automatic chunk count (auto_num_chunks and its constants) lives in epplan.schedule, with
# the cost model of this schedule, so that the planner and the runtime count the same chunks; so
# does DEFAULT_OVERLAP_CTAS, which 'epplan run' resolves without importing torch.


def chunk_parts(counts: np.ndarray, num_chunks: int) -> np.ndarray:
    """counts: int64 [...] block sizes -> int64 [C, ...], part c of each block (see module doc)."""
    c = np.arange(num_chunks + 1).reshape((-1,) + (1,) * counts.ndim)
    edges = (c * counts[None]) // num_chunks  # [C + 1, ...]
    return np.diff(edges, axis=0)


def chunk_of_row(key: torch.Tensor, position: torch.Tensor, block_size: torch.Tensor,
                 num_chunks: int) -> torch.Tensor:
    """Chunk of each assignment: int64 (A,), num_chunks for invalid ones (key out of range).

    key: int64 (A,) block of each assignment (destination * E + expert), len(block_size) if none;
    position: int64 (A,) its position inside the block; block_size: int64 (G * E,).
    """
    is_valid = key < block_size.numel()
    n = block_size[key.clamp(max=block_size.numel() - 1)].clamp(min=1)
    return torch.where(is_valid, ((position + 1) * num_chunks - 1) // n, num_chunks)


@dataclass
class ChunkPlan:
    """Split sizes and regrouping indices of one layer's chunked exchange on this rank.

    send_rows:   int64 [C, G] rows sent to each rank per chunk (send rows are chunk-major).
    recv_rows:   int64 [C, G] rows received from each rank per chunk.
    bounds:      C lists of E_loc + 1 host ints: row ranges of the local experts in a chunk.
    by_expert:   int64 (Q,) device: for the rows of chunk c in (expert, source) order, their
                 index in the chunk-major receive buffer (entries of chunk c lie in its range).
    offsets:     int32 (C, E_loc) device cumulative rows per expert (grouped GEMM), or None.
    """

    send_rows: np.ndarray
    recv_rows: np.ndarray
    bounds: list[list[int]]
    by_expert: torch.Tensor
    offsets: torch.Tensor | None

    @property
    def num_chunks(self) -> int:
        return self.send_rows.shape[0]

    @staticmethod
    def build(send_counts: np.ndarray, recv_counts: np.ndarray, local_experts: list[int],
              num_chunks: int, device: torch.device, grouped: bool) -> "ChunkPlan":
        """send_counts: int64 [G, E] rows to (rank, expert); recv_counts: int64 [G, E] from."""
        send_parts = chunk_parts(send_counts, num_chunks)  # [C, G, E]
        recv_parts = chunk_parts(recv_counts[:, local_experts], num_chunks)  # [C, G, E_loc]
        C, G, E_loc = recv_parts.shape
        per_expert = recv_parts.sum(axis=1)  # [C, E_loc]
        ends = np.cumsum(per_expert, axis=1)  # [C, E_loc]
        bounds = [[0, *row] for row in ends.tolist()]
        # Block (c, s, j) of the receive buffer; sort blocks by (c, j, s).
        sizes = _to_device(recv_parts.reshape(-1), device)  # (C * G * E_loc,)
        num_blocks = C * G * E_loc
        block = torch.repeat_interleave(torch.arange(num_blocks, device=device), sizes,
                                        output_size=int(recv_parts.sum()))  # (Q,)
        c, rest = block // max(G * E_loc, 1), block % max(G * E_loc, 1)
        s, j = rest // max(E_loc, 1), rest % max(E_loc, 1)
        by_expert = torch.argsort((c * E_loc + j) * G + s, stable=True)  # (Q,)
        offsets = _to_device(ends.astype(np.int32), device) if grouped else None
        return ChunkPlan(send_parts.sum(axis=2), recv_parts.sum(axis=2), bounds, by_expert, offsets)


def _to_device(array: np.ndarray, device: torch.device) -> torch.Tensor:
    """Host array to device without a device sync (pinned memory, non-blocking copy)."""
    t = torch.from_numpy(np.ascontiguousarray(array))
    if device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


@contextmanager
def sm_carveout(num_sms: int) -> Iterator[None]:
    """Matrix kernels launched inside leave num_sms multiprocessors free (0: no limit).

    Hopper GEMMs (cuBLASLt, the CUTLASS grouped GEMM) are persistent: one CTA per SM, tiles
    statically assigned. An NCCL kernel already holding k SMs delays k of those CTAs until it
    ends, so the GEMM finishes late by the whole transfer (measured: 17.0 ms GEMM + 1.2 ms
    all-to-all = 18.3 ms together, docs/benchmarks.md). Launching the GEMM for k fewer SMs
    lets both run at once.
    """
    setter = getattr(torch._C, "_set_sm_carveout_experimental", None)
    if not num_sms or setter is None:
        yield
        return
    previous = torch._C._get_sm_carveout_experimental()
    setter(num_sms)
    try:
        yield
    finally:
        setter(previous)


def exchange_rows(out: torch.Tensor, x: torch.Tensor, output_splits: list[int],
                  input_splits: list[int], group: dist.ProcessGroup | None) -> dist.Work:
    """Start an uneven all-to-all of rows x -> out; wait() on the result orders the caller's
    stream after it. Every row exchange of the runtime goes through here (benchmarks replace it
    to time compute alone)."""
    return dist.all_to_all_single(out, x, output_splits, input_splits, group=group, async_op=True)


@dataclass(frozen=True)
class ExchangeSettings:
    """How one layer's chunked exchange runs.

    group:         exchanges nothing hides (the first dispatch, the last combine, and their
                   mirrors in backward): full-speed NCCL.
    overlap_group: exchanges that run under expert GEMMs; a communicator limited to few CTAs
                   (``new_overlap_group``) takes few SMs from the GEMMs. None: ``group``.
    reserve_sms:   SMs the expert GEMMs leave free while such exchanges run (``sm_carveout``);
                   match the overlap group's CTA limit. 0: none.
    activation:    the experts' activation.
    """

    group: dist.ProcessGroup | None
    overlap_group: dist.ProcessGroup | None = None
    reserve_sms: int = 0
    activation: str = "gelu"

    def pick(self, is_hidden: bool) -> dist.ProcessGroup | None:
        return self.overlap_group if is_hidden and self.overlap_group is not None else self.group


class ChunkedExperts(torch.autograd.Function):
    """send_x (S, D) rows in chunk-major order -> (S, D) expert outputs for the same rows.

    w1, w2, w3 may be fp32 masters of bf16 rows: as ``experts.segment_mlp``, the GEMMs run on
    their ``compute_copy``s and the weight gradients go into the masters' ``.grad``."""

    @staticmethod
    def forward(ctx, send_x: torch.Tensor, plan: ChunkPlan, settings: ExchangeSettings,
                w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None) -> torch.Tensor:
        masters = (w1, w2, w3)
        w1, w2, w3 = (compute_copy(w, send_x.dtype) for w in masters)
        ctx.masters = masters if w1 is not masters[0] else None
        send_x = send_x.contiguous()
        C = plan.num_chunks
        send_per_chunk = plan.send_rows.sum(axis=1).tolist()  # S_c
        recv_per_chunk = plan.recv_rows.sum(axis=1).tolist()  # Q_c
        q_start = np.concatenate([[0], np.cumsum(recv_per_chunk)]).tolist()
        # recv holds dispatched rows, then (chunk by chunk, in place) their expert outputs.
        recv = send_x.new_empty(q_start[-1], send_x.shape[1])  # (Q, D)
        out = send_x.new_empty(send_x.shape)  # (S, D)
        sends, outs = send_x.split(send_per_chunk), out.split(send_per_chunk)
        recvs = recv.split(recv_per_chunk)
        reserve = settings.reserve_sms if C > 1 else 0

        def dispatch(c: int) -> dist.Work:  # hidden under chunk c - 1's GEMMs unless c == 0
            return exchange_rows(recvs[c], sends[c], plan.recv_rows[c].tolist(),
                                 plan.send_rows[c].tolist(), settings.pick(c > 0))

        saved, combines = [], []
        pending = dispatch(0)
        for c in range(C):
            upcoming = dispatch(c + 1) if c + 1 < C else None
            pending.wait()
            rows = plan.by_expert[q_start[c]:q_start[c + 1]]  # (Q_c,)
            x_e = recv.index_select(0, rows)  # (Q_c, D) expert order
            offsets = None if plan.offsets is None else plan.offsets[c]
            with sm_carveout(reserve):
                y, keep = expert_mlp_forward(x_e, plan.bounds[c], offsets, w1, w2, w3,
                                             settings.activation)
            recv.index_copy_(0, rows, y)  # back to (source, expert) order
            # hidden under chunk c + 1's GEMMs unless c is the last
            combines.append(exchange_rows(outs[c], recvs[c], plan.send_rows[c].tolist(),
                                          plan.recv_rows[c].tolist(), settings.pick(c + 1 < C)))
            saved.append((x_e, keep))
            pending = upcoming
        for work in combines:
            work.wait()
        ctx.plan, ctx.settings, ctx.saved = plan, settings, saved
        ctx.q_start, ctx.send_per_chunk, ctx.recv_per_chunk = q_start, send_per_chunk, recv_per_chunk
        ctx.save_for_backward(w1, w2, w3)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        plan, settings, q_start = ctx.plan, ctx.settings, ctx.q_start
        w1, w2, w3 = ctx.saved_tensors
        grad_out = grad_out.contiguous()
        C = plan.num_chunks
        reserve = settings.reserve_sms if C > 1 else 0
        # recv holds the output gradients of received rows, then (in place) their input gradients.
        recv = grad_out.new_empty(q_start[-1], grad_out.shape[1])  # (Q, D)
        grad_in = torch.empty_like(grad_out)  # (S, D)
        grads_out, grads_in = grad_out.split(ctx.send_per_chunk), grad_in.split(ctx.send_per_chunk)
        recvs = recv.split(ctx.recv_per_chunk)
        grads, accumulate, returned = grad_targets(ctx.masters or (w1, w2, w3), (w1, w2, w3))

        def combine_grad(c: int) -> dist.Work:  # the reverse of combine: same way as dispatch
            return exchange_rows(recvs[c], grads_out[c], plan.recv_rows[c].tolist(),
                                 plan.send_rows[c].tolist(), settings.pick(c > 0))

        # Per chunk: input-gradient GEMMs (SMs reserved: combine-grad(c + 1) and
        # dispatch-grad(c - 1) move meanwhile), weight-gradient GEMMs, then dispatch-grad(c).
        # Sending dispatch-grad(c) after the weight GEMMs keeps NCCL off their SMs.
        dispatches = []
        pending = combine_grad(0)
        for c in range(C):
            upcoming = combine_grad(c + 1) if c + 1 < C else None
            pending.wait()
            rows = plan.by_expert[q_start[c]:q_start[c + 1]]
            dy = recv.index_select(0, rows)  # (Q_c, D) expert order
            x_e, keep = ctx.saved[c]
            offsets = None if plan.offsets is None else plan.offsets[c]
            with sm_carveout(reserve):
                dx, dh, dg = expert_mlp_backward_input(dy, keep, plan.bounds[c], offsets, w1, w2, w3,
                                                       settings.activation)
            recv.index_copy_(0, rows, dx)
            expert_mlp_backward_weight(x_e, dy, dh, dg, keep, plan.bounds[c], grads,
                                       accumulate=accumulate or c > 0)
            dispatches.append(exchange_rows(grads_in[c], recvs[c], plan.send_rows[c].tolist(),
                                            plan.recv_rows[c].tolist(), settings.pick(c + 1 < C)))
            ctx.saved[c] = None  # free this chunk's activations now
            pending = upcoming
        for work in dispatches:
            work.wait()
        return grad_in, None, None, *(grads if returned else (None, None, None))


def chunked_experts(send_x: torch.Tensor, plan: ChunkPlan, settings: ExchangeSettings,
                    w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None) -> torch.Tensor:
    """Differentiable: send_x (S, D) chunk-major rows -> (S, D) outputs of their experts."""
    return ChunkedExperts.apply(send_x, plan, settings, w1, w2, w3)


def new_overlap_group(ranks: list[int] | None = None,
                      max_ctas: int = DEFAULT_OVERLAP_CTAS) -> dist.ProcessGroup:
    """A process group for exchanges hidden under GEMMs: NCCL limited to max_ctas CTAs on a
    high-priority stream (gloo: a plain group). Collective, like ``dist.new_group``."""
    if dist.get_backend() != "nccl":
        return dist.new_group(ranks)
    options = dist.ProcessGroupNCCL.Options()
    options.is_high_priority_stream = True
    options.config.max_ctas = max_ctas
    return dist.new_group(ranks, pg_options=options)


def use_grouped_gemm(x: torch.Tensor, w1: torch.Tensor, impl: str) -> bool:
    """The chunked path uses torch._grouped_mm where ``expert_mlp`` would, else one GEMM per expert."""
    return impl == "grouped" and w1.shape[0] > 0 and _can_grouped_mm(x, w1)
