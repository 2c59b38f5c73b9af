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

Small tensors are stepped together. The per-tensor step costs the host a compiled call and the
step counter's own launch per tensor: 2.26 ms for the medium model's 20 tensors (call X), 0.11
ms a tensor, more than the GPU takes to update a tensor of a few million elements; in the medium
step's trace (call S) the GPU sat idle 0.3-0.5 ms before each small tensor's update. On CUDA
every tensor under ``MANY_BELOW`` elements goes into one Triton kernel per parameter group and
copy kind (``_adamw_many``: a table of the tensors' addresses, a program per block of each; the
same arithmetic in fp32) after one ``_foreach_add_`` of their step counters, queued after the
larger tensors, whose per-tensor kernels the host launches faster than the GPU runs them.
Triton, not inductor: a compiled function over a list of tensors is specialised to the list's
length and mix, and would be compiled again for every group of every model.
bf16 moments (the model's ``optimizer_state_dtype``; ``TrainOptimizer(state_dtype=)``): the
moments are read into fp32, updated there, used unrounded for the weight's update and stored
rounded to bf16, 22 bytes per parameter with a copy instead of 30. On CUDA every such tensor whose
size is a multiple of 8 takes the Triton kernel (``MOMENT`` bf16; a large one by itself), since
inductor's kernel for the mixed dtypes ran at 2.30 TB/s against 3.39 for fp32 moments over 2**28
elements, slower than the fp32 step though it moves 27 % fewer bytes; the kernel: 1.64 ms against
fp32's 2.17 ms, 3.60 TB/s (calls AB and AC, docs/benchmarks.md). Elsewhere the same eager function.
``MANY_BELOW = 0`` steps every tensor by itself (``scripts/device/train_nockpt.py``'s
``ADAMW_MANY_BELOW`` times both). Measured on one H200 (docs/benchmarks.md, call X): within
3.3e-7 of the per-tensor step, the host's time for the medium model's 20 tensors 2.26 -> 1.26
ms; the training steps of the medium model and the seed dims a tie within their runs' spread.
"""

from __future__ import annotations

import warnings

import torch

from epplan.runtime.compiled import CompiledOnCuda, TritonKernel
from epplan.runtime.experts import cached_copy, record_copy


def adamw_update(param: torch.Tensor, grad: torch.Tensor, exp_avg: torch.Tensor, exp_avg_sq: torch.Tensor,
                 copy: torch.Tensor | None, lr: torch.Tensor, step: torch.Tensor, scale: torch.Tensor,
                 beta1: float, beta2: float, eps: float, weight_decay: float) -> None:
    """One AdamW update of one tensor, in place: param, grad (P,) of param's dtype, exp_avg,
    exp_avg_sq (P,) of param's dtype or bf16 (``optimizer_state_dtype``: the moments are updated
    in param's dtype and stored rounded; the update uses them unrounded); copy (P,) in a narrower
    dtype or None, written from the new param; lr, step (already advanced) and scale (the
    clipping factor the gradient is multiplied by): () tensors on param's device; lr and scale in
    at least fp32 (the bias corrections are computed in lr's dtype)."""
    g = grad * scale.to(grad.dtype)
    param.mul_(1.0 - lr * weight_decay)
    if exp_avg.dtype == g.dtype:
        exp_avg.lerp_(g, 1.0 - beta1)
        exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
        m, v = exp_avg, exp_avg_sq
    else:
        m = exp_avg.to(g.dtype).lerp(g, 1.0 - beta1)
        v = exp_avg_sq.to(g.dtype).mul(beta2).addcmul(g, g, value=1.0 - beta2)
        exp_avg.copy_(m)
        exp_avg_sq.copy_(v)
    t = step.to(lr.dtype)
    bias1 = 1.0 - torch.pow(beta1, t)
    bias2 = 1.0 - torch.pow(beta2, t)
    denom = v.sqrt() / bias2.sqrt() + eps
    param.sub_((lr / bias1) * m / denom)
    if copy is not None:
        copy.copy_(param)


_update = CompiledOnCuda(adamw_update, "the AdamW update")

# Tensors with fewer elements are stepped in one kernel per group on CUDA (module docstring).
MANY_BELOW = 1 << 24  # 16.8 M elements: 0.13 ms of the GPU's update at 4 TB/s
_MANY_BLOCK = 2048
_MANY_TENSORS = 4096  # tensors per launch


def _define_many(triton, tl):
    """The multi-tensor Triton kernel (``_many``)."""
    @triton.jit
    def _adamw_many(table, lr_ptr, scale_ptr, beta1, beta2, eps, weight_decay,
                    HAS_COPY: tl.constexpr, MOMENT: tl.constexpr, BLOCK: tl.constexpr):
        # table: int64 (T, 7): addresses of param, grad, exp_avg, exp_avg_sq, copy, step; numel.
        # MOMENT: the moments' dtype (fp32, or bf16: loaded to fp32, stored rounded).
        row = table + tl.program_id(1) * 7
        n = tl.multiple_of(tl.load(row + 6), 8)  # the alignment hints let loads be 16 bytes wide
        start = tl.program_id(0).to(tl.int64) * BLOCK
        if start < n:
            p_ptr = tl.multiple_of(tl.load(row).to(tl.pointer_type(tl.float32)), 16)
            g_ptr = tl.multiple_of(tl.load(row + 1).to(tl.pointer_type(tl.float32)), 16)
            m_ptr = tl.multiple_of(tl.load(row + 2).to(tl.pointer_type(MOMENT)), 16)
            v_ptr = tl.multiple_of(tl.load(row + 3).to(tl.pointer_type(MOMENT)), 16)
            t = tl.load(tl.load(row + 5).to(tl.pointer_type(tl.float32)))
            lr = tl.load(lr_ptr)
            scale = tl.load(scale_ptr)
            bias1 = 1.0 - tl.exp2(t * tl.log2(beta1))
            bias2 = 1.0 - tl.exp2(t * tl.log2(beta2))
            offs = start + tl.arange(0, BLOCK)
            mask = offs < n
            g = tl.load(g_ptr + offs, mask=mask) * scale
            p = tl.load(p_ptr + offs, mask=mask) * (1.0 - lr * weight_decay)
            m = tl.load(m_ptr + offs, mask=mask).to(tl.float32)
            m = m + (1.0 - beta1) * (g - m)
            v = tl.load(v_ptr + offs, mask=mask).to(tl.float32) * beta2 + (1.0 - beta2) * g * g
            p = p - (lr / bias1) * m / (tl.sqrt(v) / tl.sqrt(bias2) + eps)
            tl.store(p_ptr + offs, p, mask=mask)
            tl.store(m_ptr + offs, m.to(MOMENT), mask=mask)
            tl.store(v_ptr + offs, v.to(MOMENT), mask=mask)
            if HAS_COPY:
                c_ptr = tl.multiple_of(tl.load(row + 4).to(tl.pointer_type(tl.bfloat16)), 16)
                tl.store(c_ptr + offs, p.to(tl.bfloat16), mask=mask)

    return _adamw_many


_many = TritonKernel(_define_many)


def _many_kernel():
    """The multi-tensor kernel, or None where it is not there (``TritonKernel.get``)."""
    return _many.get()


def _steps_together(items: list[tuple], lr: torch.Tensor, scale: torch.Tensor, beta1: float, beta2: float,
                    eps: float, weight_decay: float) -> bool:
    """Step ``items`` (param, grad, exp_avg, exp_avg_sq, copy or None, step; flat fp32 CUDA
    tensors, copies bf16, all of one kind as to the copy) in one launch, the step counters first;
    False (nothing changed) where the kernel is not there."""
    kernel = _many_kernel()
    if kernel is None:
        return False
    has_copy = items[0][4] is not None
    table = torch.tensor([[t.data_ptr() for t in (p, g, m, v)] + [c.data_ptr() if has_copy else 0, step.data_ptr(),
                           p.numel()] for p, g, m, v, c, step in items], dtype=torch.int64)
    table = table.to(lr.device, non_blocking=True)
    torch._foreach_add_([item[5] for item in items], 1.0)
    blocks = -(-max(item[0].numel() for item in items) // _MANY_BLOCK)
    import triton.language as tl  # there: the kernel is

    moment = tl.bfloat16 if items[0][2].dtype == torch.bfloat16 else tl.float32
    try:
        kernel[(blocks, len(items))](table, lr, scale, beta1, beta2, eps, weight_decay,
                                     HAS_COPY=has_copy, MOMENT=moment, BLOCK=_MANY_BLOCK)
    except Exception as exc:  # a compiler failure costs speed, never the run
        torch._foreach_sub_([item[5] for item in items], 1.0)
        _many.fail(repr(exc))
        warnings.warn(f"the multi-tensor AdamW kernel failed ({type(exc).__name__}: {exc}); "
                      "stepping every tensor by itself")
        return False
    for p, _, m, v, _, _ in items:  # the weights and moments changed outside autograd's view
        for t in (p, m, v):
            torch.autograd.graph.increment_version(t)
    return True


def _together(p: torch.Tensor, grad: torch.Tensor, state: dict, copy: torch.Tensor | None) -> bool:
    """Whether this parameter can take the Triton step: small (any size with bf16 moments), a
    multiple of 8 elements, fp32 (moments fp32 or bf16), contiguous, 16-byte aligned, on CUDA,
    its copy (if any) bf16 (what the kernel's alignment hints promise)."""
    tensors = [p, grad, state["exp_avg"], state["exp_avg_sq"]] + ([] if copy is None else [copy])
    moment = state["exp_avg"].dtype
    return (p.is_cuda and (p.numel() < MANY_BELOW or moment == torch.bfloat16) and p.numel() % 8 == 0
            and all(t.dtype == torch.float32 for t in tensors[:2])
            and moment in (torch.float32, torch.bfloat16) and state["exp_avg_sq"].dtype == moment
            and (copy is None or copy.dtype == torch.bfloat16) and state["step"].dtype == torch.float32
            and all(t.is_contiguous() and t.data_ptr() % 16 == 0 and t.device == p.device for t in tensors)
            and state["step"].device == p.device)


def one_pass_available(device: torch.device) -> bool:
    """Whether the one-pass step runs as one kernel per tensor on ``device``: False on CUDA once
    compiling failed (``TrainOptimizer`` then takes torch's fused AdamW, which is faster than the
    eager form there). Elsewhere the eager form is the step (CPU tests)."""
    return device.type != "cuda" or _update.available(device)


@torch.no_grad()
def step_with_copies(opt: torch.optim.AdamW, grad_scale: torch.Tensor | None,
                     only: set[int] | None = None, state_dtype: torch.dtype | None = None) -> None:
    """``opt.step()`` for a plain ``torch.optim.AdamW`` (no amsgrad, not maximize), with the
    bf16 copy of every parameter that has one (``compute_copy``) written in the same pass and
    kept valid (re-recorded against the new weight). grad_scale: () clipping factor the
    gradients are multiplied by, or None. only: the ids of the parameters to step (default:
    all); each tensor's update depends on its own state alone, so stepping the parameters in
    parts gives the same weights. state_dtype: the moments' dtype where a parameter has no state
    yet (None: the parameter's; bf16 for ``optimizer_state_dtype`` bf16)."""
    scalars: dict[tuple[torch.device, torch.dtype, float], tuple[torch.Tensor, torch.Tensor]] = {}
    for group in opt.param_groups:
        assert not group.get("amsgrad") and not group.get("maximize"), "plain AdamW only"
        beta1, beta2 = group["betas"]
        together: dict[tuple[torch.device, bool, torch.dtype], list[tuple]] = {}  # (device, has copy, moments) -> items
        for p in group["params"]:
            if p.grad is None or (only is not None and id(p) not in only):
                continue
            state = opt.state[p]
            if not state:
                state["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                state["exp_avg"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, dtype=state_dtype, memory_format=torch.preserve_format)
            step = state["step"]
            if step.device != p.device:  # a state made for an unfused AdamW (CPU step)
                step = state["step"] = step.to(p.device)
            copy = cached_copy(p)
            if MANY_BELOW > 0 and _together(p, p.grad, state, copy):
                item = (p.view(-1), p.grad.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                        None if copy is None else copy.view(-1), step)
                if p.numel() < MANY_BELOW:
                    together.setdefault((p.device, copy is not None, state["exp_avg"].dtype), []).append((p, item))
                    continue
                # a large tensor with bf16 moments: a launch of its own (inductor's kernel for the
                # mixed dtypes ran at 2.3 TB/s against fp32's 3.4 TB/s, call AB)
                lr, scale = _scalars(scalars, p.device, torch.float32, group["lr"], grad_scale)
                if _steps_together([item], lr, scale, beta1, beta2, group["eps"], group["weight_decay"]):
                    if copy is not None:
                        record_copy(p, copy)
                    continue
            step += 1
            lr, scale = _scalars(scalars, p.device, p.dtype, group["lr"], grad_scale)
            _update(p.view(-1), p.grad.view(-1), state["exp_avg"].view(-1), state["exp_avg_sq"].view(-1),
                        None if copy is None else copy.view(-1), lr, step, scale,
                        beta1, beta2, group["eps"], group["weight_decay"])
            if copy is not None:
                record_copy(p, copy)
        for (device, has_copy, _), entries in together.items():
            lr, scale = _scalars(scalars, device, torch.float32, group["lr"], grad_scale)
            items = [item for _, item in entries]
            for i in range(0, len(items), _MANY_TENSORS):  # the grid's second axis has room for 65,535
                chunk = items[i:i + _MANY_TENSORS]
                if not _steps_together(chunk, lr, scale, beta1, beta2, group["eps"], group["weight_decay"]):
                    for p, g, m, v, c, step in chunk:  # the kernel is not there: one tensor at a time
                        step += 1
                        _update(p, g, m, v, c, lr, step, scale, beta1, beta2, group["eps"], group["weight_decay"])
            if has_copy:
                for p, item in entries:
                    record_copy(p, cached_copy(p))


def _scalars(cache: dict, device: torch.device, dtype: torch.dtype, lr: float,
             grad_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The () learning-rate and clipping-scale tensors on ``device`` in at least fp32 (fp64
    models step in fp64), made once per step and rate: filled on the device (no host-to-device
    copy, no sync)."""
    hi = torch.promote_types(dtype, torch.float32)
    key = (device, hi, lr)
    if key not in cache:
        cache[key] = (torch.full((), lr, dtype=hi, device=device),
                      grad_scale.to(device=device, dtype=hi) if grad_scale is not None
                      else torch.ones((), dtype=hi, device=device))
    return cache[key]
