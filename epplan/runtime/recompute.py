"""Activation recompute (``--recompute none|attention|block``) through ``torch.utils.checkpoint``.

``attention`` keeps each attention's input and recomputes the attention in backward. ``block``
keeps only each transformer block's input and recomputes the whole block, MoE layer included.

Recomputing a MoE layer must not route again: a GPU kernel's rounding (or a tie in top-k) could
pick other experts, and the recompute's all-to-all splits would then disagree with what the other
ranks expect, or its gradients would not be those of the forward. So the forward *records* what
routing decided and the recompute *replays* it (``torch.utils.checkpoint``'s ``context_fn`` runs
the first context around the forward and the second around the recompute):

- the router: the selected experts (before capacity drops) and the global load it all-reduced
  for the auxiliary loss; the replay neither selects again, nor all-reduces, nor adds to the
  load that drives the selection-bias update;
- the expert-parallel layer: the counts matrices and the chunk count that the counts exchange
  returned; the replay skips that exchange (and its host sync) and records no statistics twice.

The row exchanges themselves run again (the recompute needs the experts' inputs). Early stop of
non-reentrant checkpoint is switched off: it ends a recompute after the last saved tensor,
which can come before a collective on one rank (an idle rank saves less) and not on another.

The model code calls ``record_or_replay(module, name, compute)`` and never imports torch.distributed.
"""

from __future__ import annotations

import contextlib
import functools
from collections import deque
from typing import Any, Callable

import torch
import torch.utils.checkpoint as ckpt

from epplan.workload.memory import RECOMPUTE  # the modes the memory model and the planner know

# "record" inside a checkpointed forward, "replay" inside its recompute, None elsewhere. A plain
# module global: the recompute runs in whichever thread autograd uses, one at a time.
_mode: str | None = None


@contextlib.contextmanager
def _set_mode(mode: str):
    global _mode
    previous, _mode = _mode, mode
    try:
        yield
    finally:
        _mode = previous


def _contexts() -> tuple[contextlib.AbstractContextManager, contextlib.AbstractContextManager]:
    return _set_mode("record"), _set_mode("replay")


def is_replaying() -> bool:
    """True inside a checkpoint's recompute."""
    return _mode == "replay"


def record_or_replay(module: Any, name: str, compute: Callable[[], Any]) -> Any:
    """``compute()``'s value; inside a checkpointed forward it is also queued on ``module`` under
    ``name``, and
    inside the recompute the queued value comes back instead of computing again (first in, first
    out: micro-batch i's backward recomputes before micro-batch i + 1's forward)."""
    if _mode is None or (_mode == "record" and not torch.is_grad_enabled()):
        return compute()  # no backward will recompute this forward
    queue = module.__dict__.setdefault(f"_recompute_{name}", deque())
    if _mode == "record":
        value = compute()
        queue.append(value)
        return value
    assert queue, "recompute without a recorded forward"
    return queue.popleft()


def _checkpointed(forward: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    with ckpt.set_checkpoint_early_stop(False):
        return ckpt.checkpoint(forward, *args, use_reentrant=False, context_fn=_contexts)


def apply_recompute(model: torch.nn.Module, mode: str) -> None:
    """Wrap ``model.layers[i].attn`` (``attention``) or ``model.layers[i]`` (``block``) in
    checkpoints; ``none`` leaves the model as it is."""
    if mode not in RECOMPUTE:
        raise ValueError(f"recompute {mode!r}: use {', '.join(RECOMPUTE)}")
    if mode == "none":
        return
    for block in model.layers:
        module = block.attn if mode == "attention" else block
        module.forward = functools.partial(_checkpointed, module.forward)
