"""The AdamW update on a side stream, behind the next step's forward.

After step n's backward, the update of every weight is memory-bound work (30 bytes a parameter,
``epplan.train.adamw``: 41 ms of a 0.80 s step at the seed dims on one H200, docs/benchmarks.md)
that nothing in step n needs. ``StepBehind.step`` queues it on a side stream in the order step
n + 1's forward reads the weights, one group per gate:

    the token and position embeddings    gate: ``tok_emb``'s forward
    each block's attention norm + attention   gate: its ``attn_norm``'s forward
    each block's FFN norm + FFN (router, experts)   gate: its ``ffn_norm``'s forward
    the final norm and the LM head       gate: ``norm``'s forward (the LM head is read after it)

and a forward pre-hook on each gate makes the compute stream wait for that group's event, so the
forward of block 0 runs while block 1's experts are updated, and the GPU's idle gaps of the
forward (host launches, the counts' host sync) are filled with update work. The update is the one
``TrainOptimizer.step`` runs (``step_with_copies``, the same kernels on the same tensors, in a
different order across tensors), so the weights are bitwise the same; the gradients and the
clipping scale are kept alive for the side stream (``record_stream``) until it has read them.

Anything other than the next forward that reads the weights or the optimizer state (a
checkpoint, an expert moved by a re-plan, the end of the run) calls ``settle`` first.

Why not torch's own means: ``torch.optim``'s ``foreach``/``fused`` steps run on the current
stream in one call over all tensors, and the optimizer-in-backward hooks
(``register_post_accumulate_grad_hook``) update before the global gradient norm that clipping
needs is known; FSDP2 overlaps its own collectives, not the update.

Taken where ``TrainOptimizer`` steps with the one-pass kernel on one optimizer (CUDA, sharding
none, no tensor parallelism) and ``epplan.train.trainer.STEP_BEHIND`` is set; elsewhere the
trainer steps inline. Measured on one H200 (docs/benchmarks.md, 2026-12-03 call R): the same
weights bitwise as the inline step (``scripts/device/check_step_behind.py``), and the seed dims'
step 0.7945 -> 0.7859 s (-1.1 %, one pair in one call) of the update's 41 ms: the compute
stream's optimizer part fell from 42.1 to 27.0 ms, the rest of the step grew by 7.5 ms. Off by
default until the cost model predicts what the update hides.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from epplan.train.adamw import step_with_copies


def forward_order(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(gate module, the parameters its forward and what follows it first read) in forward order;
    every parameter of ``model`` in exactly one group (any not under a gate: the first)."""
    groups: list[tuple[nn.Module, list[nn.Parameter]]] = [(model.tok_emb, [*model.tok_emb.parameters(),
                                                                           *model.pos_emb.parameters()])]
    for block in model.layers:
        groups.append((block.attn_norm, [*block.attn_norm.parameters(), *block.attn.parameters()]))
        groups.append((block.ffn_norm, [*block.ffn_norm.parameters(), *block.ffn.parameters()]))
    groups.append((model.norm, [*model.norm.parameters(), *model.lm_head.parameters()]))
    seen: set[int] = set()
    for _, params in groups:
        unique = []
        for p in params:
            if id(p) not in seen:
                seen.add(id(p))
                unique.append(p)
        params[:] = unique
    rest = [p for p in model.parameters() if id(p) not in seen]
    groups[0][1].extend(rest)
    return groups


class StepBehind:
    """The optimizer step of ``optimizer`` (a ``torch.optim.AdamW`` with the one-pass kernel) on
    a side stream, gated into ``model``'s next forward (module docstring)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.AdamW, device: torch.device) -> None:
        self.model, self.optimizer = model, optimizer
        self.stream = torch.cuda.Stream(device)
        self.pending: dict[int, torch.cuda.Event] = {}  # id(gate) -> its group's update done
        for gate, _ in forward_order(model):
            gate.register_forward_pre_hook(self._wait)

    def _wait(self, module: nn.Module, args: tuple) -> None:
        event = self.pending.pop(id(module), None)
        if event is not None:
            torch.cuda.current_stream().wait_event(event)

    def step(self, grad_scale: torch.Tensor | None) -> None:
        """Queue the update of every parameter with a gradient (after all the compute stream has
        queued so far), group by group; the caller may drop the gradients at once."""
        self.settle()  # the previous step's update is done before this one is queued
        compute = torch.cuda.current_stream()
        self.stream.wait_stream(compute)
        groups = forward_order(self.model)  # at every step: a re-plan replaces expert tensors
        for _, params in groups:
            for p in params:
                if p.grad is not None:
                    p.grad.record_stream(self.stream)
        if grad_scale is not None:
            grad_scale.record_stream(self.stream)
        with torch.cuda.stream(self.stream):
            for gate, params in groups:
                step_with_copies(self.optimizer, grad_scale, only={id(p) for p in params})
                event = torch.cuda.Event()
                event.record(self.stream)
                self.pending[id(gate)] = event

    def settle(self) -> None:
        """Make the compute stream wait for the update in flight (before anything but the next
        forward reads the weights or the optimizer state)."""
        if self.pending:
            torch.cuda.current_stream().wait_stream(self.stream)
            self.pending.clear()
