"""The dispatch's first step and the combine's last: a token's rows gathered, and summed back.

Shape legend: N tokens, k = top_k, A = N * k assignments (flat order: token-major), S rows
served (assignments not dropped), D model width.

``combine(y, weight, order, num_tokens, top_k)`` is ``zeros(N, D).index_add(0, order // k,
y * weight[:, None])``, the form the runtime used before, written as a gather: every token reads
its k rows, times their gate weights, and sums them (``gather_sum``; a dropped assignment adds
nothing). ``index_add`` scatters with atomics, bf16 ones under autocast, at about a tenth of the
memory's rate on an H200 (13.2 ms a step at the seed dims, ``torch.profiler``,
docs/benchmarks.md); a gather streams. On CUDA ``gather_sum`` is compiled (``CompiledOnCuda``)
into one kernel that reads each row once and adds the k terms in fp32 before rounding once, where
``index_add`` rounds after each atomic add: a bf16 result can differ from it in the last bits.
The backward is a gather too (each row reads its token's gradient), written by hand because
autograd's backward of a gather is a scatter.

``token_rows(x, order, top_k)`` is ``x[order // k]``, the rows a rank sends, whose backward under
autograd is the same atomic scatter (``index_put`` with accumulate): here it is the gather-sum.
"""

from __future__ import annotations

import torch

from epplan.runtime.compiled import CompiledOnCuda


def combine(y: torch.Tensor, weight: torch.Tensor, order: torch.Tensor, num_tokens: int,
            top_k: int) -> torch.Tensor:
    """y: (S, D) the served rows, weight: (S,) their gate weights (y's dtype), order: int64 (S,)
    the flat assignment each row serves (distinct) -> (N, D) of y's dtype."""
    return _Combine.apply(y, weight, order, num_tokens, top_k)


def token_rows(x: torch.Tensor, order: torch.Tensor, top_k: int) -> torch.Tensor:
    """x: (N, D), order: int64 (S,) distinct flat assignments -> (S, D), row s = x[order[s] // k]."""
    return _TokenRows.apply(x, order, top_k)


def _sum_rows(rows: torch.Tensor, order: torch.Tensor, num_tokens: int, top_k: int,
              weight: torch.Tensor | None = None) -> torch.Tensor:
    """rows: (S, D), row s for assignment order[s], weight: (S,) or None -> (N, D): each token's
    rows (times their weights) summed; a dropped assignment adds nothing."""
    num_rows, width = rows.shape
    if num_rows == 0:
        return rows.new_zeros(num_tokens, width)
    num_assignments = num_tokens * top_k
    row_of = torch.zeros(num_assignments, dtype=torch.long, device=rows.device)  # (A,)
    row_of[order] = torch.arange(num_rows, device=rows.device)
    scale = rows.new_zeros(num_assignments)  # (A,): the row's weight, 0 where dropped
    if weight is None:
        # index_fill_, not ``scale[order] = 1``: that copies the 1 from host memory, a copy that
        # waits for the GPU (0.6-0.8 ms idle per call in the seed dims' backward, call Z's
        # profiled step).
        scale.index_fill_(0, order, 1)
    else:
        scale[order] = weight
    return _gather_sum(rows, row_of, scale, num_tokens, top_k)


def gather_sum(rows: torch.Tensor, row_of: torch.Tensor, scale: torch.Tensor, num_tokens: int,
               top_k: int) -> torch.Tensor:
    """rows: (R, D), row_of: int64 (N * k,) in [0, R), scale: (N * k,) of rows' dtype -> (N, D):
    out[n] = sum over j < k of rows[row_of[n * k + j]] * scale[n * k + j], the term 0 wherever the
    scale is 0 (a dropped assignment points at row 0 with scale 0, whatever that row holds). On
    CUDA compiled into one kernel; elsewhere, and if compiling fails, these eager passes."""
    picked = rows.index_select(0, row_of).view(num_tokens, top_k, rows.shape[1])  # (N, k, D)
    scale = scale.view(num_tokens, top_k, 1)
    terms = torch.where(scale != 0, picked * scale, 0)
    out = terms[:, 0]
    for j in range(1, top_k):
        out = out + terms[:, j]
    return out


_gather_sum = CompiledOnCuda(gather_sum, "the combine's gather-sum")


class _TokenRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, order, top_k):
        ctx.save_for_backward(order)
        ctx.top_k, ctx.num_tokens = top_k, x.shape[0]
        return x.index_select(0, order // top_k)

    @staticmethod
    def backward(ctx, grad_rows):
        (order,) = ctx.saved_tensors
        return _sum_rows(grad_rows, order, ctx.num_tokens, ctx.top_k), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, weight, order, num_tokens, top_k):
        ctx.save_for_backward(y, weight, order)
        ctx.top_k = top_k
        return _sum_rows(y, order, num_tokens, top_k, weight)  # (N, D)

    @staticmethod
    def backward(ctx, grad_out):
        y, weight, order = ctx.saved_tensors
        grad_rows = grad_out.index_select(0, order // ctx.top_k)  # (S, D): each row's token
        grad_y = grad_rows * weight[:, None] if ctx.needs_input_grad[0] else None
        grad_weight = (grad_rows * y).sum(dim=1) if ctx.needs_input_grad[1] else None
        return grad_y, grad_weight, None, None, None
