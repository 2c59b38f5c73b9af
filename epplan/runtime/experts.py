"""Routed experts: stacked MLP weights, a grouped GEMM path and a per-expert reference loop.

Shape legend:
    N = tokens, D = d_model, F = d_ff (expert hidden), E = experts (held by this module),
    k = experts per token, A = N * k assignments, M = rows after permutation (kept assignments).

Layout: the rows given to ``expert_mlp`` are sorted by expert; ``num_tokens[e]`` rows of expert e
follow those of expert e - 1. ``GroupedExperts`` produces that layout from the router's output
(permute once), runs the experts and combines the rows back into tokens with their gate weights.
The expert-parallel module (``expert_parallel.py``) reuses ``expert_mlp`` on the rows it receives.

Mixed precision. Under bf16 autocast the weights stay fp32 (the optimizer's master copy) and the
GEMMs run in bf16. On the segment path (``segment_mlp``) a weight is cast once until it changes
(``compute_copy``: the bf16 copy is kept against the weight's version counter and storage, and
dropped by ``forget_copies``, which the optimizer step and a checkpoint load call: fused AdamW
writes the weights without advancing their version counters), not once per micro-batch, and its
gradient is accumulated straight into the fp32 ``.grad`` by the weight-gradient GEMMs (fp32
output, beta = 1 after the first micro-batch), as Megatron-Core's gradient-accumulation fusion
does: no bf16 gradient, no cast back, no separate accumulation. At the seed dims that is 14 bytes
of traffic per expert parameter per step with 2 micro-batches instead of 32.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.weak import WeakIdKeyDictionary

from epplan.runtime.combine import combine, token_rows

EXPERT_IMPLS = ("grouped", "loop")
# From this many rows per expert (the mean of one call) up, "grouped" on CUDA runs one cuBLAS GEMM
# per expert instead of torch._grouped_mm: at 20,000 rows per expert the grouped kernel ran at
# 0.89-0.93 of torch.mm's rate on H200, at 1,250-4,096 rows at 1.02-1.29 (docs/benchmarks.md).
# Between them it depends on the balance: with every expert at the mean, grouped was 3 % faster
# at 4,096 and 5,000 rows and 1-4 % slower from 6,144 up; in training at seed dims (5,000 rows
# per expert on average, the busiest expert at 2.8-4.3 times the mean) one GEMM per expert made
# the step 20 ms shorter (0.802 against 0.822 s, one H200, call J of 2026-12-02), and 24 ms in
# call K's interleaved repeat (0.823 and 0.825 against 0.847 and 0.848 s).
LOOP_MIN_ROWS = 4608
# With one GEMM per expert (``_segment_mm`` without offsets), a GEMM whose M is an expert's row
# count runs on the rows rounded up to a multiple of this, so that its shape repeats from step to
# step. Each new shape costs cuBLAS a heuristic query on the host: 100-185 us median per launch and
# milliseconds for some (one H200, ``scripts/device/probe_mm_host.py``, docs/benchmarks.md),
# against 17-30 us for a shape it has seen; every expert's row count is new at every step.
# Hopper's GEMM tiles are 64 to 256 rows, so the extra rows mostly fill a tile the kernel computes
# anyway. Measured (call T, 2026-12-03): bitwise the same results; the medium model's step 2.9 %
# shorter, the seed dims' a tie. 0: exact shapes.
ROW_QUANTUM = 128


def mlp(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None,
        activation: str) -> torch.Tensor:
    """One MLP: x (..., D) @ w1 (D, F) -> act -> @ w2 (F, D); swiglu gates with x @ w3 (D, F)."""
    h = x @ w1  # (..., F)
    g = None if w3 is None else x @ w3  # (..., F)
    return _act(h, g, activation) @ w2  # (..., D)


def _act(h: torch.Tensor, g: torch.Tensor | None, activation: str) -> torch.Tensor:
    if activation == "gelu":
        return F.gelu(h)
    if activation == "silu":
        return F.silu(h)
    if activation == "swiglu":
        return F.silu(h) * g
    raise ValueError(f"unknown activation {activation!r}")


def _can_grouped_mm(x: torch.Tensor, w1: torch.Tensor) -> bool:
    # torch._grouped_mm wants bf16 on sm90+ with 16-byte aligned rows. The weights run in x's
    # dtype (fp32 master weights are cast by compute_copy), so only x's dtype matters.
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and w1.dtype in (torch.bfloat16, torch.float32)
            and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and w1.shape[1] % 8 == 0 and w1.shape[2] % 8 == 0)


# weight -> ((version, data_ptr, dtype), its copy in dtype); entries go with their weights.
_COPIES: WeakIdKeyDictionary = WeakIdKeyDictionary()


def compute_copy(w: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``w`` (a master weight) in ``dtype``, without autograd, cast again only once w changed.

    Changed means a new version counter (an in-place write through autograd-visible ops:
    ``copy_``, ``mul_``, ``init_weights``) or new storage. Writes that bypass the counter are not
    seen: fused optimizer kernels (``torch.optim.AdamW(fused=True)`` leaves it as it was),
    collectives writing into w, ``w.data`` assignments; whoever makes them calls
    ``forget_copies`` (``TrainOptimizer.step`` does, after every step). The copy is kept until
    then (one bf16 copy of this rank's expert and LM-head weights).
    """
    if w is None or w.dtype == dtype:
        return w
    key = (w._version, w.data_ptr(), dtype)
    cached = _COPIES.get(w)
    if cached is None or cached[0] != key:
        with torch.no_grad():
            cached = (key, w.detach().to(dtype))
        _COPIES[w] = cached
    return cached[1]


def cached_copy(w: torch.Tensor) -> torch.Tensor | None:
    """The copy ``compute_copy`` keeps of ``w``, whatever its validity, or None (for an optimizer
    that writes it in place with the new weight, then calls ``record_copy``)."""
    cached = _COPIES.get(w)
    return None if cached is None else cached[1]


def record_copy(w: torch.Tensor, copy: torch.Tensor) -> None:
    """Record ``copy`` as ``w``'s current copy in copy's dtype (it was written from w as it is now)."""
    _COPIES[w] = ((w._version, w.data_ptr(), copy.dtype), copy)


def forget_copies() -> None:
    """Drop every ``compute_copy`` (after weights were written by means that bypass their
    version counters: the fused optimizer step, a checkpoint load)."""
    _COPIES.clear()


_MM_OUT_DTYPE: dict[str, bool] = {}  # device type -> torch.mm(..., out_dtype=) runs there


def _has_mm_out_dtype(device: torch.device) -> bool:
    """Whether bf16 GEMMs can write fp32 output (``torch.mm(a, b, out_dtype=)``, CUDA) here."""
    if device.type not in _MM_OUT_DTYPE:
        try:
            a = torch.randn(16, 16, device=device)
            b = torch.randn(16, 16, device=device)
            got = torch.mm(a.bfloat16(), b.bfloat16(), out_dtype=torch.float32)
            ref = a.bfloat16().double() @ b.bfloat16().double()
            ok = got.dtype == torch.float32 and bool(torch.allclose(got.double(), ref, rtol=1e-3, atol=1e-3))
        except (RuntimeError, NotImplementedError, TypeError):
            ok = False
        _MM_OUT_DTYPE[device.type] = ok
    return _MM_OUT_DTYPE[device.type]


def mm_into(out: torch.Tensor, a: torch.Tensor, b: torch.Tensor, accumulate: bool) -> None:
    """out = a @ b, or out += a @ b; out may be wider than a and b (fp32 gradients of bf16
    GEMMs): then the GEMM writes fp32 itself where torch can, else through a temporary."""
    if out.dtype == a.dtype:
        if accumulate:
            out.addmm_(a, b)
        else:
            torch.mm(a, b, out=out)
    elif _has_mm_out_dtype(out.device):
        if accumulate:
            torch.addmm(out, a, b, out_dtype=out.dtype, out=out)
        else:
            torch.mm(a, b, out_dtype=out.dtype, out=out)
    elif accumulate:
        out.add_(a @ b)
    else:
        out.copy_(a @ b)


def grad_targets(masters: Sequence[torch.Tensor | None], compute: Sequence[torch.Tensor | None]
                 ) -> tuple[tuple[torch.Tensor | None, ...], bool, bool]:
    """Where a backward writes the weight gradients of ``compute`` (the copies its GEMMs ran on).

    Returns (buffers, accumulate, returned): with fp32 masters of bf16 copies, the masters'
    ``.grad`` themselves (created on the first micro-batch; accumulate then True from the second),
    and the backward returns None for the weights; otherwise fresh buffers of the weights' dtype
    that the backward returns to autograd.
    """
    fused = masters[0] is not compute[0]
    if not fused:
        return tuple(None if w is None else torch.empty_like(w) for w in compute), False, True
    accumulate = masters[0].grad is not None
    for w in masters:
        if w is not None and w.grad is None:
            w.grad = torch.empty_like(w)
    return tuple(None if w is None else w.grad for w in masters), accumulate, False


def expert_mlp(x: torch.Tensor, num_tokens: Sequence[int], w1: torch.Tensor, w2: torch.Tensor,
               w3: torch.Tensor | None, activation: str, impl: str = "grouped") -> torch.Tensor:
    """Run each expert on its rows.

    x:          (M, D), rows sorted by expert.
    num_tokens: E host ints, rows per expert, summing to M (host values: no device sync here).
    w1, w3:     (E, D, F);  w2: (E, F, D); of x's dtype, or wider (fp32 master weights under
                bf16 autocast: cast to x's dtype, see the module docstring).
    impl:       "grouped": torch._grouped_mm on CUDA bf16, else a padded batched matmul;
                "loop": one matmul per expert (the reference).
    Returns (M, D), rows in the order of x.
    """
    num_experts = w1.shape[0]
    assert len(num_tokens) == num_experts and sum(num_tokens) == x.shape[0], (num_tokens, x.shape)
    if num_experts == 0:
        # A rank holding no expert of this layer receives no rows; return x (M = 0) itself so that
        # the autograd graph stays connected and the reverse exchange runs on every rank.
        return x
    if impl == "loop":
        w1, w2, w3 = (None if w is None else w.to(x.dtype) for w in (w1, w2, w3))
        bounds = [0, *itertools.accumulate(num_tokens)]
        # Zero-row segments still run, keeping every weight in the graph (zero gradients).
        outs = [mlp(x[bounds[e]:bounds[e + 1]], w1[e], w2[e], None if w3 is None else w3[e], activation)
                for e in range(num_experts)]
        return torch.cat(outs)
    if impl != "grouped":
        raise ValueError(f"unknown expert impl {impl!r}; known: {', '.join(EXPERT_IMPLS)}")
    if _can_grouped_mm(x, w1):
        bounds = [0, *itertools.accumulate(num_tokens)]
        offs = None  # one cuBLAS GEMM per expert
        if x.shape[0] < LOOP_MIN_ROWS * num_experts:
            offs = torch.tensor(bounds[1:], dtype=torch.int32, device=x.device)
        return segment_mlp(x, bounds, offs, w1, w2, w3, activation)
    w1, w2, w3 = (None if w is None else w.to(x.dtype) for w in (w1, w2, w3))
    return _padded_bmm(x, num_tokens, w1, w2, w3, activation)


class _SegmentMLP(torch.autograd.Function):
    """Autograd for ``expert_mlp_forward``: backward is ``expert_mlp_backward_input`` then
    ``expert_mlp_backward_weight`` (one GEMM per expert for the weight gradients, whose K is the
    expert's rows: autograd through torch._grouped_mm would run them as one ragged-K kernel).
    w1, w2, w3 may be fp32 masters of bf16 x: the GEMMs run on ``compute_copy``s and the weight
    gradients go into the masters' ``.grad`` (``grad_targets``)."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, bounds, offsets, activation):
        c1, c2, c3 = (compute_copy(w, x.dtype) for w in (w1, w2, w3))
        y, saved = expert_mlp_forward(x, bounds, offsets, c1, c2, c3, activation)
        ctx.bounds, ctx.offsets, ctx.activation = bounds, offsets, activation
        ctx.has_w3 = w3 is not None
        # the masters by reference (their .grad is written), the copies as saved tensors
        ctx.masters = (w1, w2, w3) if c1 is not w1 else None
        h, g, a = saved
        ctx.save_for_backward(x, c1, c2, *((c3, g) if c3 is not None else ()), h, a)
        return y

    @staticmethod
    def backward(ctx, dy):
        if ctx.has_w3:
            x, w1, w2, w3, g, h, a = ctx.saved_tensors
        else:
            (x, w1, w2, h, a), w3, g = ctx.saved_tensors, None, None
        saved = (h, g, a)
        dy = dy.contiguous()
        dx, dh, dg = expert_mlp_backward_input(dy, saved, ctx.bounds, ctx.offsets, w1, w2, w3,
                                               ctx.activation)
        grads, accumulate, returned = grad_targets(ctx.masters or (w1, w2, w3), (w1, w2, w3))
        expert_mlp_backward_weight(x, dy, dh, dg, saved, ctx.bounds, grads, accumulate=accumulate)
        return dx, *(grads if returned else (None, None, None)), None, None, None


def segment_mlp(x: torch.Tensor, bounds: Sequence[int], offsets: torch.Tensor | None,
                w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None, activation: str) -> torch.Tensor:
    """``expert_mlp`` on rows x (M, D) split by ``bounds`` (E + 1 host ints), with autograd;
    offsets: int32 (E,) device copy of bounds[1:] for torch._grouped_mm, None for one GEMM per
    expert. Returns (M, D)."""
    return _SegmentMLP.apply(x, w1, w2, w3, list(bounds), offsets, activation)


def _segment_mm(x: torch.Tensor, w: torch.Tensor, bounds: Sequence[int],
                offsets: torch.Tensor | None) -> torch.Tensor:
    """Rows bounds[e]:bounds[e + 1] of x (M, K) times w[e] (E, K, N) -> (M, N).

    offsets: int32 (E,) device copy of bounds[1:] for ``torch._grouped_mm``; None for the loop.
    """
    if x.shape[0] == 0:
        return x.new_empty(0, w.shape[2])
    if offsets is not None:
        return torch._grouped_mm(x, w, offs=offsets)
    rows = x.shape[0]
    out = x.new_empty(rows, w.shape[2])
    for e, end in _quantised_ends(bounds, rows):
        # Rows past bounds[e + 1] belong to later experts, whose own GEMMs, queued after this
        # one on the stream, overwrite what this one writes there.
        torch.mm(x[bounds[e]:end], w[e], out=out[bounds[e]:end])
    return out


def _quantised_ends(bounds: Sequence[int], rows: int) -> list[tuple[int, int]]:
    """(expert, end row) of each expert with rows, in order: its segment's start plus its rows
    rounded up to ``ROW_QUANTUM``, where that stays within ``rows``; else its own end (the
    last expert's, mostly)."""
    out = []
    for e in range(len(bounds) - 1):
        start, end = bounds[e], bounds[e + 1]
        if end > start:
            padded = start + -(-(end - start) // ROW_QUANTUM) * ROW_QUANTUM if ROW_QUANTUM > 0 else end
            out.append((e, padded if padded <= rows else end))
    return out


def expert_mlp_forward(x: torch.Tensor, bounds: Sequence[int], offsets: torch.Tensor | None,
                       w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None,
                       activation: str) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
    """``expert_mlp`` without autograd, keeping what ``expert_mlp_backward`` needs.

    x: (M, D) rows sorted by expert; bounds: E + 1 host ints (row ranges); offsets as in
    ``_segment_mm``. Returns y (M, D) and saved = (h, g, a): (M, F) each, g None unless swiglu.
    """
    h = _segment_mm(x, w1, bounds, offsets)  # (M, F)
    g = None if w3 is None else _segment_mm(x, w3, bounds, offsets)
    a = _act(h, g, activation)  # (M, F)
    return _segment_mm(a, w2, bounds, offsets), (h, g, a)


def expert_mlp_backward_input(dy: torch.Tensor, saved: tuple[torch.Tensor | None, ...],
                              bounds: Sequence[int], offsets: torch.Tensor | None,
                              w1: torch.Tensor, w2: torch.Tensor, w3: torch.Tensor | None,
                              activation: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Input gradient of ``expert_mlp_forward``: dy (M, D) -> dx (M, D), dh (M, F), dg (M, F) | None.

    dh and dg feed ``expert_mlp_backward_weight``; split from it so that a caller can send dx
    before the weight-gradient GEMMs run.
    """
    h, g, _ = saved
    da = _segment_mm(dy, w2.transpose(-2, -1), bounds, offsets)  # (M, F)
    dg = None
    if activation == "gelu":
        dh = torch.ops.aten.gelu_backward(da, h)
    elif activation == "silu":
        dh = torch.ops.aten.silu_backward(da, h)
    elif activation == "swiglu":
        dh = torch.ops.aten.silu_backward(da * g, h)
        dg = da * F.silu(h)
    else:
        raise ValueError(f"unknown activation {activation!r}")
    dx = _segment_mm(dh, w1.transpose(-2, -1), bounds, offsets)  # (M, D)
    if dg is not None:
        dx += _segment_mm(dg, w3.transpose(-2, -1), bounds, offsets)
    return dx, dh, dg


def expert_mlp_backward_weight(x: torch.Tensor, dy: torch.Tensor, dh: torch.Tensor,
                               dg: torch.Tensor | None, saved: tuple[torch.Tensor | None, ...],
                               bounds: Sequence[int], grads: Sequence[torch.Tensor | None],
                               accumulate: bool) -> None:
    """Weight gradients of ``expert_mlp_forward`` into grads = (dw1, dw2, dw3), in place.

    accumulate=False overwrites, True adds (the GEMM's beta = 1: a chunked caller sums its
    chunks' contributions without a separate pass). One GEMM per expert: each has K = its rows
    and a large D x F output, so the loop costs nothing against a grouped kernel. grads may be
    fp32 for bf16 rows (``grad_targets``): the GEMMs then write fp32.
    """
    a = saved[2]
    dw1, dw2, dw3 = grads
    for e in range(dw1.shape[0]):
        rows = slice(bounds[e], bounds[e + 1])
        for dw, left, right in ((dw1, x, dh), (dw2, a, dy), (dw3, x, dg)):
            if dw is None:
                continue
            mm_into(dw[e], left[rows].t(), right[rows], accumulate)


def _padded_bmm(x: torch.Tensor, num_tokens: Sequence[int], w1: torch.Tensor, w2: torch.Tensor,
                w3: torch.Tensor | None, activation: str) -> torch.Tensor:
    """Grouped fallback: pad every expert to the busiest one's rows, one bmm per weight."""
    num_experts, dim = w1.shape[0], w1.shape[1]
    max_rows = max(num_tokens)
    counts = torch.tensor(list(num_tokens), device=x.device)  # (E,)
    expert_of_row = torch.repeat_interleave(torch.arange(num_experts, device=x.device), counts,
                                            output_size=x.shape[0])  # (M,)
    start = torch.cumsum(counts, 0) - counts  # (E,)
    row_in_expert = torch.arange(x.shape[0], device=x.device) - start[expert_of_row]  # (M,)
    padded = x.new_zeros(num_experts, max_rows, dim)  # (E, max_rows, D); padding rows stay 0
    padded = padded.index_put((expert_of_row, row_in_expert), x)
    h = torch.bmm(padded, w1)  # (E, max_rows, F)
    g = None if w3 is None else torch.bmm(padded, w3)
    y = torch.bmm(_act(h, g, activation), w2)  # (E, max_rows, D)
    return y[expert_of_row, row_in_expert]  # (M, D)


class GroupedExperts(nn.Module):
    """E routed experts with stacked weights; dispatch and combine on one device."""

    def __init__(self, num_experts: int, dim: int, hidden: int, activation: str,
                 impl: str = "grouped") -> None:
        super().__init__()
        if impl not in EXPERT_IMPLS:
            raise ValueError(f"unknown expert impl {impl!r}; known: {', '.join(EXPERT_IMPLS)}")
        self.num_experts = num_experts
        self.activation = activation
        self.impl = impl
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.w3 = nn.Parameter(torch.empty(num_experts, dim, hidden)) if activation == "swiglu" else None
        self.reset_parameters()

    def reset_parameters(self, std: float = 0.02) -> None:
        for w in (self.w1, self.w2, self.w3):
            if w is not None:
                nn.init.normal_(w, std=std)

    def forward(self, x: torch.Tensor, topk_idx: torch.Tensor, topk_weight: torch.Tensor) -> torch.Tensor:
        """x: (N, D), topk_idx: (N, k) with -1 for dropped, topk_weight: (N, k) -> (N, D).

        Under autocast the experts run in the autocast dtype; the output has x's dtype.
        """
        out_dtype, dtype = x.dtype, compute_dtype(x)
        x = x.to(dtype)
        w1, w2, w3 = self.w1, self.w2, self.w3  # expert_mlp casts them to x's dtype
        num_tokens, top_k = topk_idx.shape
        flat = topk_idx.reshape(-1)  # (A,)
        key = torch.where(flat >= 0, flat, self.num_experts)  # (A,) dropped sort last
        order = torch.argsort(key, stable=True)  # (A,) assignment ids grouped by expert
        num_per_expert = torch.bincount(key, minlength=self.num_experts + 1)[:self.num_experts]
        # NOTE: host sync (rows per expert decide the GEMM shapes)
        num_per_expert = num_per_expert.tolist()
        order = order[:sum(num_per_expert)]  # (M,)
        rows = token_rows(x, order, top_k)  # (M, D)
        y = expert_mlp(rows, num_per_expert, w1, w2, w3, self.activation, self.impl)  # (M, D)
        weight = topk_weight.reshape(-1)[order].to(y.dtype)  # (M,)
        out = combine(y, weight, order, num_tokens, top_k)
        return out.to(out_dtype)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The autocast dtype of x's device where autocast is on, else x's own dtype.

    The expert GEMMs are hand-dispatched (grouped GEMM, custom autograd), which autocast does not
    see, so the expert modules cast rows and weights themselves, as autocast would.
    """
    device = x.device.type
    if torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return x.dtype

