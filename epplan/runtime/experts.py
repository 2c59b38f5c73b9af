"""Routed experts: stacked MLP weights, a grouped GEMM path and a per-expert reference loop.

Shape legend:
    N = tokens, D = d_model, F = d_ff (expert hidden), E = experts (held by this module),
    k = experts per token, A = N * k assignments, M = rows after permutation (kept assignments).

Layout: the rows given to ``expert_mlp`` are sorted by expert; ``num_tokens[e]`` rows of expert e
follow those of expert e - 1. ``GroupedExperts`` produces that layout from the router's output
(permute once), runs the experts and combines the rows back into tokens with their gate weights.
The expert-parallel module (``expert_parallel.py``) reuses ``expert_mlp`` on the rows it receives.
"""

from __future__ import annotations

import itertools
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

EXPERT_IMPLS = ("grouped", "loop")
# From this many rows per expert (the mean of one call) up, "grouped" on CUDA runs one cuBLAS GEMM
# per expert instead of torch._grouped_mm: at 20,000 rows per expert the grouped kernel ran at
# 0.89-0.93 of torch.mm's rate on H200, at 1,250-4,096 rows at 1.02-1.29 (docs/benchmarks.md).
LOOP_MIN_ROWS = 8192


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
    # torch._grouped_mm wants bf16 on sm90+ with 16-byte aligned rows.
    return (hasattr(torch, "_grouped_mm") and x.is_cuda and x.dtype == torch.bfloat16
            and w1.dtype == torch.bfloat16 and torch.cuda.get_device_capability(x.device) >= (9, 0)
            and w1.shape[1] % 8 == 0 and w1.shape[2] % 8 == 0)


def expert_mlp(x: torch.Tensor, num_tokens: Sequence[int], w1: torch.Tensor, w2: torch.Tensor,
               w3: torch.Tensor | None, activation: str, impl: str = "grouped") -> torch.Tensor:
    """Run each expert on its rows.

    x:          (M, D), rows sorted by expert.
    num_tokens: E host ints, rows per expert, summing to M (host values: no device sync here).
    w1, w3:     (E, D, F);  w2: (E, F, D).
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
    return _padded_bmm(x, num_tokens, w1, w2, w3, activation)


class _SegmentMLP(torch.autograd.Function):
    """Autograd for ``expert_mlp_forward``: backward is ``expert_mlp_backward_input`` then
    ``expert_mlp_backward_weight`` (one GEMM per expert for the weight gradients, whose K is the
    expert's rows: autograd through torch._grouped_mm would run them as one ragged-K kernel)."""

    @staticmethod
    def forward(ctx, x, w1, w2, w3, bounds, offsets, activation):
        y, saved = expert_mlp_forward(x, bounds, offsets, w1, w2, w3, activation)
        ctx.bounds, ctx.offsets, ctx.activation = bounds, offsets, activation
        ctx.has_w3 = w3 is not None
        h, g, a = saved
        ctx.save_for_backward(x, w1, w2, *((w3, g) if w3 is not None else ()), h, a)
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
        grads = tuple(None if w is None else torch.empty_like(w) for w in (w1, w2, w3))
        expert_mlp_backward_weight(x, dy, dh, dg, saved, ctx.bounds, grads, accumulate=False)
        return dx, *grads, None, None, None


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
    out = x.new_empty(x.shape[0], w.shape[2])
    for e in range(w.shape[0]):
        if bounds[e + 1] > bounds[e]:
            torch.mm(x[bounds[e]:bounds[e + 1]], w[e], out=out[bounds[e]:bounds[e + 1]])
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
    and a large D x F output, so the loop costs nothing against a grouped kernel.
    """
    a = saved[2]
    dw1, dw2, dw3 = grads
    for e in range(dw1.shape[0]):
        rows = slice(bounds[e], bounds[e + 1])
        for dw, left, right in ((dw1, x, dh), (dw2, a, dy), (dw3, x, dg)):
            if dw is None:
                continue
            if accumulate:
                dw[e].addmm_(left[rows].t(), right[rows])
            else:
                torch.mm(left[rows].t(), right[rows], out=dw[e])


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
        w1, w2, w3 = (None if w is None else w.to(dtype) for w in (self.w1, self.w2, self.w3))
        num_tokens, top_k = topk_idx.shape
        flat = topk_idx.reshape(-1)  # (A,)
        key = torch.where(flat >= 0, flat, self.num_experts)  # (A,) dropped sort last
        order = torch.argsort(key, stable=True)  # (A,) assignment ids grouped by expert
        num_per_expert = torch.bincount(key, minlength=self.num_experts + 1)[:self.num_experts]
        # NOTE: host sync (rows per expert decide the GEMM shapes)
        num_per_expert = num_per_expert.tolist()
        order = order[:sum(num_per_expert)]  # (M,)
        token_of_row = order // top_k  # (M,)
        y = expert_mlp(x[token_of_row], num_per_expert, w1, w2, w3, self.activation, self.impl)  # (M, D)
        weight = topk_weight.reshape(-1)[order].to(y.dtype)  # (M,)
        out = x.new_zeros(num_tokens, x.shape[1]).index_add(0, token_of_row, y * weight[:, None])
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

