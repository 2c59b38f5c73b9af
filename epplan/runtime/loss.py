"""The LM head and its cross-entropy, in chunks of tokens, with the gradient made in the forward.

Shape legend: N = tokens, D = d_model, V = vocab, n = tokens of one chunk.

``F.cross_entropy(lm_head(h).float(), targets)`` keeps the whole (N, V) logits in bf16 and in
fp32 and makes their fp32 gradient: at the seed dims (40,000 tokens a micro-batch, V = 32,000)
about 36 bytes of traffic and 6 bytes of memory per logit, 46 GB and 7.7 GB. Here each chunk of
``chunk_tokens`` tokens is projected, reduced to its loss and turned into the gradient of its
logits (softmax - one-hot) at once; its input gradient and the head's weight gradient (fp32,
accumulated over chunks by the GEMM) follow, and the chunk's logits are dropped. The backward only
scales what the forward kept by the loss's incoming gradient. The loss is the mean over tokens,
computed in fp32 from logits of the head's compute dtype, as before.

On CUDA the elementwise part of a chunk (upcast, log-sum-exp, the target's logit, the softmax
and its cast) is one Triton kernel (``_rows``): a program per token reads its row of
logits twice (an online max and sum of exponentials, then the gradient) and writes the row's
gradient and loss. Hand-written rather than ``torch.compile``'s: compiled with dynamic shapes
(the chunk's row count changes at a micro-batch's end), inductor does not know V and took 1.01
ms a chunk of 8,192 x 32,000 bf16 logits at the seed dims, 1.5 TB/s over its 1.6 GB (call Z,
docs/benchmarks.md). Liger-Kernel's fused linear cross-entropy does the same in Triton. Without
Triton, or if the kernel fails, the compiled function runs (``torch.compile``), and elsewhere the
eager one (the same arithmetic).

Vocab-parallel (the LM head under tensor parallelism, ``tensor_parallel.py``): each rank of a TP
group holds rows ``vocab_start : vocab_start + V / t`` of the head and the group's N tokens; a
chunk's logits are (n, V / t) on each rank (``vocab_parallel_chunk_loss``): each rank's
log-sum-exp and target logit over its vocab slice are all-gathered over the group, (t, 2, n), to
the whole log-sum-exp and target logit, as Megatron's vocab-parallel cross-entropy does, and each
rank makes the gradient of its own logits. The (N, V) logits exist nowhere; the input gradient
each rank makes is its vocab slice's part (the caller sums it over the group). Eager on every
device (the collective sits inside the chunk).
"""

from __future__ import annotations

import warnings
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from epplan.runtime.compiled import CompiledOnCuda, TritonKernel
from epplan.runtime.experts import mm_into, compute_copy
from epplan.schedule import LOSS_CHUNK_TOKENS as CHUNK_TOKENS


def _chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits (n, V), targets int64 (n,) -> (summed loss () in at least fp32, d(loss sum)/d(logits)
    (n, V) in the logits' dtype)."""
    lf = logits.to(torch.promote_types(logits.dtype, torch.float32))
    lse = torch.logsumexp(lf, dim=1, keepdim=True)  # (n, 1)
    is_target = torch.arange(lf.shape[1], device=lf.device)[None, :] == targets[:, None]  # (n, V)
    picked = torch.where(is_target, lf, 0.0).sum(dim=1, keepdim=True)  # (n, 1)
    grad = torch.exp(lf - lse) - is_target.to(lf.dtype)
    return (lse - picked).sum(), grad.to(logits.dtype)


_chunk_loss_compiled = CompiledOnCuda(_chunk_loss, "the chunked cross-entropy")

_ROWS_BLOCK = 4096  # logits a program holds per pass over its row


def _define_rows(triton, tl):
    """The Triton kernel of ``_chunk_loss`` (``_rows``)."""
    @triton.jit
    def _cross_entropy_rows(logits, targets, grad, loss, V, stride_logits, stride_grad, BLOCK: tl.constexpr):
        # One token: its V logits -> its loss (fp32) and its row of softmax - one-hot.
        row = tl.program_id(0).to(tl.int64)
        src = logits + row * stride_logits
        dst = grad + row * stride_grad
        target = tl.load(targets + row)
        top = tl.full([BLOCK], float("-inf"), tl.float32)  # each lane's running max
        total = tl.zeros([BLOCK], tl.float32)  # each lane's sum of exp(x - top)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(src + offs, mask=offs < V, other=float("-inf")).to(tl.float32)
            new_top = tl.maximum(top, x)
            ref = tl.where(new_top == float("-inf"), 0.0, new_top)  # a lane with nothing yet
            total = total * tl.exp(top - ref) + tl.exp(x - ref)
            top = new_top
        row_max = tl.max(top, axis=0)
        lse = row_max + tl.log(tl.sum(total * tl.exp(top - row_max), axis=0))
        in_vocab = (target >= 0) & (target < V)  # else no logit is the target's (as eager)
        picked = tl.load(src + target, mask=in_vocab, other=0.0).to(tl.float32)
        tl.store(loss + row, lse - picked)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            x = tl.load(src + offs, mask=mask, other=0.0).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(offs == target, 1.0, 0.0)
            tl.store(dst + offs, g.to(dst.dtype.element_ty), mask=mask)

    return _cross_entropy_rows


_rows = TritonKernel(_define_rows)


def _chunk_loss_rows(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``_chunk_loss`` by the ``_rows`` kernel: CUDA logits of at most fp32, rows contiguous; None
    where the kernel is not there or does not apply."""
    kernel = _rows.get()
    if (kernel is None or logits.dtype not in (torch.bfloat16, torch.float16, torch.float32)
            or logits.stride(1) != 1 or targets.dtype != torch.int64):
        return None
    num_rows, vocab = logits.shape
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)  # (n, V)
    per_row = torch.empty(num_rows, dtype=torch.float32, device=logits.device)  # (n,)
    if num_rows:
        try:
            kernel[(num_rows,)](logits, targets.contiguous(), grad, per_row, vocab, logits.stride(0),
                                grad.stride(0), BLOCK=_ROWS_BLOCK, num_warps=8)
        except Exception as exc:  # a compiler failure costs speed, never the run
            _rows.fail(repr(exc))
            warnings.warn(f"the cross-entropy kernel failed ({type(exc).__name__}: {exc}); "
                          "compiling the chunk's loss with torch.compile instead")
            return None
    return per_row.sum(), grad


def chunk_loss(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``_chunk_loss`` as training runs it: on CUDA one Triton kernel (else compiled, else
    eager: module docstring), eager elsewhere. logits (n, V), targets int64 (n,) -> (loss sum
    (), gradient of the logits (n, V))."""
    if logits.is_cuda:
        out = _chunk_loss_rows(logits, targets)
        if out is not None:
            return out
    return _chunk_loss_compiled(logits, targets)


def vocab_parallel_chunk_loss(logits: torch.Tensor, targets: torch.Tensor, vocab_start: int,
                              group: dist.ProcessGroup) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective over ``group``: ``_chunk_loss`` of logits whose columns are this rank's vocab
    slice. logits (n, V_loc) for vocab ids vocab_start .. vocab_start + V_loc - 1, targets int64
    (n,) over the whole vocab -> (summed loss () over the whole vocab, the same on every rank;
    d(loss sum)/d(logits) (n, V_loc))."""
    lf = logits.to(torch.promote_types(logits.dtype, torch.float32))
    local_target = targets - vocab_start  # (n,); outside 0 .. V_loc - 1: another rank's
    is_target = torch.arange(lf.shape[1], device=lf.device)[None, :] == local_target[:, None]  # (n, V_loc)
    stats = torch.stack([torch.logsumexp(lf, dim=1), torch.where(is_target, lf, 0.0).sum(dim=1)])  # (2, n)
    parts = [torch.empty_like(stats) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, stats, group=group)
    gathered = torch.stack(parts)  # (t, 2, n): each rank's log-sum-exp and target logit
    lse = torch.logsumexp(gathered[:, 0], dim=0)  # (n,)
    picked = gathered[:, 1].sum(dim=0)  # (n,): only the target's owner adds a nonzero
    grad = torch.exp(lf - lse[:, None]) - is_target.to(lf.dtype)
    return (lse - picked).sum(), grad.to(logits.dtype)


ChunkLoss = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


class _LinearCrossEntropy(torch.autograd.Function):
    """h (N, D), weight (V, D), targets (N,) -> mean cross-entropy of h @ weight.T ()."""

    @staticmethod
    def forward(ctx, h, weight, targets, dtype, chunk_tokens, chunk_fn):
        w = compute_copy(weight, dtype)  # (V, D), cast once until the weight changes
        hc = h.to(dtype)
        num_tokens = h.shape[0]
        grad_h = torch.empty_like(hc)  # (N, D)
        grad_w = torch.empty(weight.shape, dtype=weight.dtype, device=weight.device)  # (V, D)
        total = torch.zeros((), dtype=torch.promote_types(dtype, torch.float32), device=h.device)
        for i, start in enumerate(range(0, num_tokens, chunk_tokens)):
            rows = slice(start, min(start + chunk_tokens, num_tokens))
            logits = hc[rows] @ w.t()  # (n, V)
            loss, grad_logits = chunk_fn(logits, targets[rows])
            del logits
            total += loss
            torch.mm(grad_logits, w, out=grad_h[rows])
            mm_into(grad_w, grad_logits.t(), hc[rows], accumulate=i > 0)
        if num_tokens == 0:
            grad_w.zero_()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.h_dtype, ctx.num_tokens = h.dtype, max(num_tokens, 1)
        return total / ctx.num_tokens

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        scale = grad_loss / ctx.num_tokens
        return (grad_h * scale.to(grad_h.dtype)).to(ctx.h_dtype), grad_w * scale, None, None, None, None


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         chunk_tokens: int = CHUNK_TOKENS, chunk_fn: ChunkLoss = chunk_loss) -> torch.Tensor:
    """Mean cross-entropy of the logits h (N, D) @ weight (V, D).T against targets int64 (N,),
    without the (N, V) logits (module docstring). Under autocast the GEMMs run in its dtype, the
    loss in fp32; the gradients come back in h's and weight's dtypes. chunk_fn: a chunk's loss
    and logit gradient (``chunk_loss``; ``vocab_parallel_chunk_loss`` with weight the rank's
    vocab rows, whose h gradient is then this rank's part)."""
    device = h.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    with torch.autocast(device, enabled=False):
        return _LinearCrossEntropy.apply(h, weight, targets, dtype, chunk_tokens, chunk_fn)


def reference_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The plain form ``linear_cross_entropy`` replaces (for tests)."""
    logits = F.linear(h, weight)
    return F.cross_entropy(logits.to(torch.promote_types(logits.dtype, torch.float32)), targets)
