"""AdamW over an expert-parallel model, with the dense parameters' state optionally sharded.

``--optimizer-sharding``:

none   one ``torch.optim.AdamW`` per rank over every parameter it holds (dense and its experts).
dense  the dense parameters' AdamW moments are split over all ranks by
       ``torch.distributed.optim.ZeroRedundancyOptimizer`` (ZeRO-1: whole tensors, largest
       first to the least-loaded rank); each rank updates its share and broadcasts the updated
       weights. The experts keep a plain AdamW on their own ranks.

Why ZeroRedundancyOptimizer rather than FSDP2's ``fully_shard`` or DTensor-sharded state: the
runtime's dense gradients are already all-reduced whole by ``sync_gradients`` (which the global
gradient norm and clipping read), and experts are sliced per rank by the placement, not by a
mesh; ZeRO-1 slots in after that reduction without changing the model's parameters or the
exchange, works with gloo and NCCL alike, and keeps the step bit-for-bit AdamW's (the test
compares against the unsharded run). FSDP2 would also shard the fp32 weights and gradients
(more memory saved) but needs the dense modules wrapped, a reduce-scatter instead of our
all-reduce and a mesh per replica set for the experts: the next step, not this one.

Every expert has one state per replica rank (the replicas' gradients are identical after
``sync_gradients``, so every replica takes the same step).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer

from epplan.runtime.expert_parallel import ExpertParallelExperts
from epplan.runtime.experts import forget_copies
from epplan.workload.memory import OPTIMIZER_SHARDING


class TrainOptimizer:
    """AdamW over ``model``'s parameters, ``sharding`` none or dense (module docstring).

    ``param_groups``: every group, for the learning-rate schedule; ``state_of(p)``: p's AdamW
    state if this rank keeps it, else None; ``set_state(p, state)``.
    """

    def __init__(self, model: nn.Module, sharding: str, *, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, fused: bool = False) -> None:
        if sharding not in OPTIMIZER_SHARDING:
            raise ValueError(f"optimizer sharding {sharding!r}: use {', '.join(OPTIMIZER_SHARDING)}")
        self.sharding = sharding
        self.fused = fused
        expert_ids = {id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts)
                      for p in m.parameters(recurse=False)}
        params = list(model.parameters())
        kw = dict(lr=lr, betas=betas, eps=eps, fused=fused) if fused else dict(lr=lr, betas=betas, eps=eps)

        def groups(ps: list[nn.Parameter]) -> list[dict[str, Any]]:
            decay = [p for p in ps if p.dim() >= 2]  # matrices, experts
            no_decay = [p for p in ps if p.dim() < 2]  # norm weights
            return [g for g in ({"params": decay, "weight_decay": weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if g["params"]]

        if sharding == "none":
            self.optimizers: list[torch.optim.Optimizer] = [torch.optim.AdamW(groups(params), **kw)]
            self.zero: ZeroRedundancyOptimizer | None = None
            return
        dense = [p for p in params if id(p) not in expert_ids]
        experts = [p for p in params if id(p) in expert_ids]
        self.zero = ZeroRedundancyOptimizer(groups(dense), optimizer_class=torch.optim.AdamW, **kw)
        self.optimizers = [self.zero] + ([torch.optim.AdamW(groups(experts), **kw)] if experts else [])

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        """One AdamW step of every optimizer; ``grad_scale``: a () tensor the gradients are
        multiplied by first (gradient clipping), on the device, so that no host sync is needed.

        Fused AdamW takes the scale inside its kernel (the ``grad_scale`` it divides by, as
        ``torch.amp.GradScaler`` passes it): one pass over the gradients fewer than multiplying
        them first. Unfused (CPU), the gradients are multiplied in place first.
        """
        if grad_scale is not None and self.fused:
            inverse = grad_scale.reciprocal().to(torch.float32)
            for opt in self._local():
                opt.grad_scale = inverse
        elif grad_scale is not None:
            torch._foreach_mul_([p.grad for g in self.param_groups for p in g["params"]
                                 if p.grad is not None], grad_scale)
        try:
            for opt in self.optimizers:
                opt.step()
        finally:
            for opt in self._local():
                opt.grad_scale = None
            # The weights changed under their bf16 copies: fused AdamW (and ZeRO's broadcast)
            # write them without advancing their version counters (epplan.runtime.experts).
            forget_copies()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def _local(self) -> Iterator[torch.optim.Optimizer]:
        """The optimizers whose ``state`` holds this rank's tensors."""
        for opt in self.optimizers:
            yield opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt

    def keeps(self, p: nn.Parameter) -> bool:
        """Whether this rank keeps (and updates) p's AdamW state."""
        return any(p is q for opt in self._local() for g in opt.param_groups for q in g["params"])

    def state_of(self, p: nn.Parameter) -> dict[str, Any] | None:
        for opt in self._local():
            if p in opt.state:
                return opt.state[p]
        return None

    def set_state(self, p: nn.Parameter, state: dict[str, Any]) -> None:
        for opt in self._local():
            if any(p is q for g in opt.param_groups for q in g["params"]):
                opt.state[p] = state
                return
        raise KeyError("this rank does not keep the optimizer state of that parameter")

    def replace(self, old: nn.Parameter, new: nn.Parameter) -> None:
        """Put ``new`` where ``old`` is, in its parameter group (a re-placed expert tensor: other
        shape, same hyper-parameters and place in the group); ``old``'s state is dropped and
        ``new`` has none until ``set_state`` or its first step."""
        for opt in self._local():
            for g in opt.param_groups:
                for i, q in enumerate(g["params"]):
                    if q is old:
                        g["params"][i] = new
                        opt.state.pop(old, None)
                        return
        raise KeyError("this rank does not keep the optimizer state of that parameter")

    def state_items(self) -> Iterator[tuple[nn.Parameter, dict[str, Any]]]:
        for opt in self._local():
            yield from opt.state.items()
