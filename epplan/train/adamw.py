"""AdamW's step with the bf16 re-cast of the weights it updates in the same pass over memory.

Shape legend: P = elements of one parameter (every tensor is viewed flat, (P,)).

``torch.optim.AdamW(fused=True)`` reads the fp32 weight, its gradient and both moments and writes
the weight and the moments (28 bytes per parameter). The experts and the LM head then need their
bf16 copy again (``epplan.runtime.experts.compute_copy``): a second pass that reads the fp32
weight once more and writes the copy (6 bytes). Here one kernel per tensor does both: it reads
the same 16 bytes, writes the weight and the moments and, where the tensor has a bf16 copy, writes
the copy from the new weight in registers (30 bytes per parameter with a copy, 28 without). That
is what Megatron-Core's optimizer does with Transformer Engine's or Apex's fused Adam
(``FusedAdam`` with master weights); torch ships no AdamW that writes a second dtype, so the
update is the eager function ``adamw_update`` below, compiled on CUDA by ``torch.compile`` into
one Triton kernel (inductor fuses the in-place writes). On CPU, or if compiling fails, it runs
eagerly (the same function, several passes).

The arithmetic is ``torch.optim.AdamW``'s (decoupled weight decay, bias corrections from the
step, ``eps`` added after the square root, the gradient multiplied by the clipping scale first);
the state is laid out as torch's fused AdamW lays out its own (``step`` a float32 scalar on the
parameter's device, ``exp_avg``, ``exp_avg_sq``), so checkpoints and ``TrainOptimizer``'s state
accessors read it unchanged. The learning rate and the step travel as device scalars: no
recompilation when the schedule moves the rate, no host sync.
"""

from __future__ import annotations

import torch

from epplan.runtime.compiled import CompiledOnCuda
from epplan.runtime.experts import cached_copy, record_copy


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 copy: torch.Tensor | None, lr: torch.Tensor, step: torch.Tensor, scale: torch.Tensor,
                 beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update of one tensor, in place: param, grad, exp_avg, exp_avg_sq (P,) of
    param's dtype; copy (P,) in a narrower dtype or None, written from the new param; lr, step
    (already advanced) and scale (the clipping factor the gradient is multiplied by): () tensors
    on param's device; lr and scale in at least fp32 (the bias corrections are computed in lr's
    dtype)."""
    g = grad * scale.to(grad.dtype)
    param.mul_(1.0 - lr * weight_decay)
    exp_avg.lerp_(g, 1.0 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
    t = step.to(lr.dtype)
    bias1 = 1.0 - torch.pow(beta1, t)
    bias2 = 1.0 - torch.pow(beta2, t)
    denom = exp_avg_sq.sqrt() / bias2.sqrt() + eps
    param.sub_((lr / bias1) * exp_avg / denom)
    if copy is not None:
        copy.copy_(param)


_update = CompiledOnCuda(adamw_update, "the AdamW update")


def one_pass_available(device: torch.device) -> bool:
    """Whether the one-pass step runs as one kernel per tensor on ``device``: False on CUDA once
    compiling failed (``TrainOptimizer`` then takes torch's fused AdamW, which is faster than the
    eager form there). Elsewhere the eager form is the step (CPU tests)."""
    return device.type != "cuda" or _update.available(device)


@torch.no_grad()
def step_with_copies(opt: torch.optim.AdamW, grad_scale: torch.Tensor | None,
                     only: set[int] | None = None) -> None:
    """``opt.step()`` for a plain ``torch.optim.AdamW`` (no amsgrad, not maximize), with the
    bf16 copy of every parameter that has one (``compute_copy``) written in the same pass and
    kept valid (re-recorded against the new weight). grad_scale: () clipping factor the
    gradients are multiplied by, or None. only: the ids of the parameters to step (default:
    all); each tensor's update depends on its own state alone, so stepping the parameters in
    parts gives the same weights."""
    scalars: dict[tuple[torch.device, torch.dtype, float], tuple[torch.Tensor, torch.Tensor]] = {}
    for group in opt.param_groups:
        assert not group.get("amsgrad") and not group.get("maximize"), "plain AdamW only"
        beta1, beta2 = group["betas"]
        for p in group["params"]:
            if p.grad is None or (only is not None and id(p) not in only):
                continue
            state = opt.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            step = state["step"]
            if step.device != p.device:  # a state made for an unfused AdamW (CPU step)
                step = state["step"] = step.to(p.device)
            step += 1
            hi = torch.promote_types(p.dtype, torch.float32)  # fp64 models step in fp64
            key = (p.device, hi, group["lr"])
            if key not in scalars:  # filled on the device (no host-to-device copy, no sync)
                scalars[key] = (torch.full((), group["lr"], dtype=hi, device=p.device),
                                grad_scale.to(device=p.device, dtype=hi) if grad_scale is not None
                                else torch.ones((), dtype=hi, device=p.device))
            lr, scale = scalars[key]
            copy = cached_copy(p)
            _update(p.view(-1), p.grad.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                        None if copy is None else copy.view(-1), lr, step, scale,
                        beta1, beta2, group["eps"], group["weight_decay"])
            if copy is not None:
                record_copy(p, copy)
