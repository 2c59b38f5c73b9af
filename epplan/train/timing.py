"""Per-step timings of the parts of a training step that the cost model predicts.

Components (seconds per optimizer step, all micro-batches, forward + backward):

    attention     each block's attention norm + attention (projections, SDPA), recompute included
    moe           each block's MoE norm + MoE layer (router, permutation, exchange, expert GEMMs)
    dense_mlp     each dense block's MLP norm + MLP (models with dense layers)
    exchange      the row exchanges of the unchunked path, as the compute stream waits on them
                  (part of ``moe``; absent when the run overlaps them with the expert GEMMs)
    lm_head_loss  final norm, LM head and the loss
    optimizer     gradient synchronisation, clipping, the optimizer step, zeroing, router biases
    step          the whole step (``other`` = step - the others: embeddings, data, host work)

On CUDA every mark is a ``torch.cuda.Event`` recorded on the current stream: recording is
asynchronous and adds no host synchronisation. The events of step n are read after step n + 1
has passed its own host syncs (the counts exchange of the first MoE layer), when they are
complete; ``StepTimer.collect`` therefore returns the previous step's timings. On CPU the marks
are host clocks (CPU work is synchronous).

Forward marks are module hooks; backward marks are identity autograd functions placed on a
component's input and output, whose backward records the mark as the gradient passes.
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn as nn

COMPONENTS = ("attention", "moe", "dense_mlp", "exchange", "lm_head_loss", "optimizer", "step")


class _Mark:
    """A point in the stream's timeline: a CUDA event, or a host clock reading on CPU."""

    __slots__ = ("event", "host")

    def __init__(self, device: torch.device) -> None:
        self.event = None
        self.host = None
        if device.type == "cuda":
            self.event = torch.cuda.Event(enable_timing=True)
            self.event.record()
        else:
            self.host = time.perf_counter()

    def seconds_to(self, end: "_Mark") -> float:
        if self.event is not None:
            return self.event.elapsed_time(end.event) * 1e-3
        return end.host - self.host


class StepTimer:
    """Collects (start, end) marks per component for the step in progress."""

    def __init__(self, device: torch.device, enabled: bool = True) -> None:
        self.device, self.enabled = device, enabled
        self._spans: dict[str, list[tuple[_Mark, _Mark]]] = {}
        self._open: dict[str, list[_Mark]] = {}
        self._pending: tuple[int, dict[str, list[tuple[_Mark, _Mark]]]] | None = None

    def start(self, name: str) -> None:
        if self.enabled:
            self._open.setdefault(name, []).append(_Mark(self.device))

    def stop(self, name: str) -> None:
        if self.enabled:
            begin = self._open[name].pop()
            self._spans.setdefault(name, []).append((begin, _Mark(self.device)))

    def finish_step(self, step: int) -> None:
        """Close the step in progress (its marks become readable after the next step's syncs)."""
        assert not any(self._open.values()), self._open
        self._pending, self._spans = (step, self._spans), {}

    def collect(self) -> tuple[int, dict[str, float]] | None:
        """(step, seconds per component) of the step finished before the last, or None.

        Call once the current step has synchronised with the device (its marks are then complete).
        """
        if self._pending is None:
            return None
        step, spans = self._pending
        self._pending = None
        return step, {name: sum(a.seconds_to(b) for a, b in pairs) for name, pairs in spans.items()}

    def flush(self) -> tuple[int, dict[str, float]] | None:
        """The last finished step's timings, synchronising first (for the end of a run)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return self.collect()


class _Boundary(torch.autograd.Function):
    """Identity; its backward marks ``name`` started (on a component's output) or stopped (on
    its input) as the gradient passes."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, timer: StepTimer, name: str, is_output: bool) -> torch.Tensor:
        ctx.timer, ctx.name, ctx.is_output = timer, name, is_output
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (ctx.timer.start if ctx.is_output else ctx.timer.stop)(ctx.name)
        return grad, None, None, None


def _boundary(x: Any, timer: StepTimer, name: str, is_output: bool) -> Any:
    if isinstance(x, torch.Tensor) and x.requires_grad and torch.is_grad_enabled():
        return _Boundary.apply(x, timer, name, is_output)
    return x


def _time_span(first: nn.Module, last: nn.Module, timer: StepTimer, name: str) -> None:
    """Time from ``first``'s input to ``last``'s output, forward and backward."""

    def pre(module: nn.Module, args: tuple) -> tuple:
        timer.start(name)
        return (_boundary(args[0], timer, name, is_output=False), *args[1:])

    def post(module: nn.Module, args: tuple, out: Any) -> Any:
        timer.stop(name)
        if isinstance(out, tuple):  # the model: (logits, loss); the loss carries the backward
            return (out[0], _boundary(out[1], timer, name, is_output=True), *out[2:])
        return _boundary(out, timer, name, is_output=True)

    first.register_forward_pre_hook(pre)
    last.register_forward_hook(post)


def instrument(model: nn.Module, timer: StepTimer) -> None:
    """Hook ``timer`` into a ``Transformer``: attention and MoE spans of every block, and the
    head (final norm through the loss). The exchange is timed by the runtime itself
    (``epplan.runtime.expert_parallel.set_exchange_timer``)."""
    for block in model.layers:
        _time_span(block.attn_norm, block.attn, timer, "attention")
        is_moe = hasattr(block.ffn, "router")
        _time_span(block.ffn_norm, block.ffn, timer, "moe" if is_moe else "dense_mlp")
    _time_span(model.norm, model, timer, "lm_head_loss")


def timing_record(step: int, seconds: dict[str, float]) -> dict[str, Any]:
    """The ``metrics.jsonl`` record of one step's component timings (``kind: timing``)."""
    parts = {name: seconds[name] for name in COMPONENTS if name in seconds}
    if "step" in parts:
        parts["other"] = parts["step"] - sum(v for k, v in parts.items() if k not in ("step", "exchange"))
    return {"kind": "timing", "step": step, "components_s": parts}
