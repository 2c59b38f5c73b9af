"""AdamW over an expert-parallel model, its state optionally sharded.

``--optimizer-sharding``:

none   one ``torch.optim.AdamW`` per rank over every parameter it holds (dense and its experts).
dense  the dense parameters' AdamW moments are split over all ranks by
       ``torch.distributed.optim.ZeroRedundancyOptimizer`` (ZeRO-1: whole tensors, largest
       first to the least-loaded rank); each rank updates its share and broadcasts the updated
       weights. The experts keep a plain AdamW on their own ranks.
all    as dense, and each expert's state is split over the ranks holding its replicas: every
       expert slot (one row of a rank's stacked (E_loc, ...) weight) is a parameter of its own
       (a view of that row), and the slots of each replica set of more than one rank go to one
       ``ZeroRedundancyOptimizer`` over that set's process group (the group ``sync_gradients``
       reduces their gradients on), which gives each replica whole tensors to update and
       broadcasts them to the others. Slots of unreplicated experts keep a plain AdamW.

Why ZeroRedundancyOptimizer rather than FSDP2's ``fully_shard`` or DTensor-sharded state: the
runtime's dense gradients are already all-reduced whole by ``sync_gradients`` (which the global
gradient norm and clipping read), and experts are sliced per rank by the placement, not by a
mesh; ZeRO-1 slots in after that reduction without changing the model's parameters or the
exchange, works with gloo and NCCL alike, and keeps the step bit-for-bit AdamW's (the test
compares against the unsharded run). FSDP2 would also shard the fp32 weights and gradients
(more memory saved) but needs the dense modules wrapped, a reduce-scatter instead of our
all-reduce and a mesh per replica set for the experts: the next step, not this one. For the
experts the same holds per replica set: ZeRO over the set's group after ``sync_gradients``'s
all-reduce, whole slot tensors (w1, w2, w3 of each expert) as its units, so the split is as even
as those tensors allow (the cost model replays it: ``workload.memory.expert_optimizer_elements``).

Unsharded, every expert has one state per replica rank (the replicas' gradients are identical
after ``sync_gradients``, so every replica takes the same step).

bf16 moments (the model's ``optimizer_state_dtype``): every optimizer, ZeRO's inner ones too, is
an ``OnePassAdamW``, torch's AdamW whose step is ``epplan.train.adamw.step_with_copies`` with
moments in bf16 (torch's own steps keep moments of the weights' dtype); under any sharding, not
under ``--tp`` (DTensor weights).

Under ``--tp`` (``epplan.runtime.tensor_parallel``) the dense parameters are DTensors over each
TP group, or plain replicated tensors. Sharded dense or all, their state is split over the
data-parallel ranks of each TP position (the ``dp`` dimension of the mesh: the ranks that hold
the same shard), whose gradients ``sync_gradients`` made equal: one ZeroRedundancyOptimizer over
that group, holding each parameter's local tensor (a view of the DTensor's shard, which ZeRO's
broadcast writes in place) in the parameter's stead; a rank keeps 1 / d of its position's state.
ZeRO takes plain tensors only (its broadcast is ``dist.broadcast`` on each tensor), hence the
views. ``state_of``, ``fresh_state`` and ``state_items`` give the state in the parameter's terms
(DTensors over the TP group sharing the views' storage), so checkpoints are the same whatever the
sharding and DCP reshards them across TP degrees. The experts' state is split as without TP
(under ``--expert-tp`` over the replica sets of each hidden slice: ``expert_parallel.set_replica_groups``).
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
import torch.nn as nn
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor

from epplan.runtime.expert_parallel import ExpertParallelExperts
from epplan.runtime.experts import forget_copies
from epplan.runtime.tensor_parallel import local_grads
from epplan.train.adamw import one_pass_available, step_with_copies
from epplan.workload.memory import OPTIMIZER_SHARDING


def local(opt: torch.optim.Optimizer) -> torch.optim.Optimizer:
    """The optimizer whose ``state`` holds this rank's tensors (a ZeRO optimizer's inner one)."""
    return opt.optim if isinstance(opt, ZeroRedundancyOptimizer) else opt


class TrainOptimizer:
    """AdamW over ``model``'s parameters, ``sharding`` none, dense or all (module docstring).

    ``param_groups``: every group, for the learning-rate schedule; ``state_of(p)``: p's AdamW
    state if this rank keeps it, else None; ``set_state(p, state)``; for an expert tensor,
    ``expert_slot_states(w)``: each slot's state under any sharding; ``fresh_state(p)``.
    """

    def __init__(self, model: nn.Module, sharding: str, *, lr: float, weight_decay: float,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, fused: bool = False,
                 state_dtype: torch.dtype | None = None) -> None:
        """state_dtype: the AdamW moments' dtype, None for the parameters' own (torch's AdamW);
        another (bf16) without tensor-parallel weights, every optimizer (ZeRO's inner ones too) an
        ``OnePassAdamW`` stepped by ``step_with_copies`` on every device (torch's AdamW keeps
        moments of the weights' dtype)."""
        if sharding not in OPTIMIZER_SHARDING:
            raise ValueError(f"optimizer sharding {sharding!r}: use {', '.join(OPTIMIZER_SHARDING)}")
        self.state_dtype = state_dtype
        if state_dtype is not None and any(isinstance(p, DTensor) for p in model.parameters()):
            raise ValueError(f"AdamW moments in {state_dtype} need weights without tensor parallelism")
        self.sharding = sharding
        self.fused = fused
        # The one-pass step views each tensor flat: tensor-parallel (DTensor) weights keep
        # torch's fused AdamW, which takes them.
        self.one_pass = fused and not any(isinstance(p, DTensor) for p in model.parameters())
        expert_ids = {id(p) for m in model.modules() if isinstance(m, ExpertParallelExperts)
                      for p in m.parameters(recurse=False)}
        params = list(model.parameters())
        kw = dict(lr=lr, betas=betas, eps=eps, fused=fused) if fused else dict(lr=lr, betas=betas, eps=eps)
        adam: type[torch.optim.AdamW] = torch.optim.AdamW
        if state_dtype is not None:
            adam, kw = OnePassAdamW, {**kw, "state_dtype": state_dtype}

        def groups(ps: list[nn.Parameter]) -> list[dict[str, Any]]:
            decay = [p for p in ps if p.dim() >= 2]  # matrices, experts
            no_decay = [p for p in ps if p.dim() < 2]  # norm weights
            return [g for g in ({"params": decay, "weight_decay": weight_decay},
                                {"params": no_decay, "weight_decay": 0.0}) if g["params"]]

        self.expert_params = [p for p in params if id(p) in expert_ids]
        # under TP with sharding: id(p) -> (p, the view of p's local shard the ZeRO optimizer holds
        # in p's place); its gradient is p.grad's local tensor, set at each step
        self.dense_views: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        # under "all": (id(w), j) -> the view of slot j of stacked expert tensor w, which the
        # optimizers hold in w's place; its gradient is w.grad[j], set at each step
        self.slot_views: dict[tuple[int, int], torch.Tensor] = {}
        if sharding == "none":
            self.optimizers: list[torch.optim.Optimizer] = [adam(groups(params), **kw)]
            self.zero: ZeroRedundancyOptimizer | None = None
            return
        dense = [p for p in params if id(p) not in expert_ids]
        tp = getattr(model, "tensor_parallel", None)
        if tp is not None and tp.tp > 1:  # over the ranks holding the same shards
            self.dense_views = {id(p): (p, _local_view(p)) for p in dense}
            self.zero = ZeroRedundancyOptimizer(groups([self.dense_views[id(p)][1] for p in dense]),
                                                optimizer_class=adam,
                                                process_group=tp.mesh["dp"].get_group(), **kw)
        else:
            self.zero = ZeroRedundancyOptimizer(groups(dense), optimizer_class=adam, **kw)
        self.optimizers = [self.zero]
        if sharding == "dense":
            self.optimizers += [adam(groups(self.expert_params), **kw)] if self.expert_params else []
            return
        state = model.expert_parallel
        for layer in state.layers:
            for w in layer.parameters(recurse=False):
                for j in range(len(layer.local_experts)):
                    self.slot_views[(id(w), j)] = w.detach()[j]
        replicated = set()
        for pg, slots in state.replica_groups:  # the same slots, in the same order, on every member
            keys = [(id(w), j) for layer, j in slots for w in layer.parameters(recurse=False)]
            replicated.update(keys)
            self.optimizers.append(ZeroRedundancyOptimizer(groups([self.slot_views[k] for k in keys]),
                                                           optimizer_class=adam,
                                                           process_group=pg, **kw))
        single = [v for k, v in self.slot_views.items() if k not in replicated]
        if single:
            self.optimizers.append(adam(groups(single), **kw))

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        return [g for opt in self.optimizers for g in opt.param_groups]

    def step(self, grad_scale: torch.Tensor | None = None) -> None:
        """One AdamW step of every optimizer; ``grad_scale``: a () tensor the gradients are
        multiplied by first (gradient clipping), on the device, so that no host sync is needed.

        Fused (GPUs): each plain AdamW runs ``epplan.train.adamw.step_with_copies`` (the scale,
        the update and the bf16 re-cast of the weights that have a copy in one pass); ZeRO's run
        torch's fused AdamW with the scale inside its kernel (the ``grad_scale`` it divides by,
        as ``torch.amp.GradScaler`` passes it). Unfused (CPU), the gradients are multiplied in
        place first. With bf16 moments (``state_dtype``) every optimizer is a plain AdamW stepped
        by ``step_with_copies`` on every device. Under sharding
        "all" the optimizers hold expert-slot views in place of the stacked expert tensors: each
        view's gradient is first set to its row of the tensor's gradient.
        """
        if self.slot_views:
            by_id = {id(w): w for w in self.expert_params}
            for (wid, j), view in self.slot_views.items():
                view.grad = by_id[wid].grad[j]
        for p, view in self.dense_views.values():
            view.grad = None if p.grad is None else (p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad)
        device = next((p.device for g in self.param_groups for p in g["params"]), torch.device("cpu"))
        if self.state_dtype is not None:  # moments of another dtype: the one-pass step (eager off CUDA)
            zeros = [opt for opt in self.optimizers if isinstance(opt, ZeroRedundancyOptimizer)]
            try:
                for opt in self.optimizers:
                    local(opt).clip = grad_scale
                    opt.step()
            finally:
                for opt in self.optimizers:
                    local(opt).clip = None
                if zeros:  # ZeRO's broadcast wrote weights under their copies
                    forget_copies()
            return
        if self.fused:
            # Plain AdamWs: one pass that also writes the bf16 copies (epplan.train.adamw); the
            # copies stay valid. ZeRO's (and all, with tensor-parallel weights or if that pass
            # cannot be compiled here): torch's fused AdamW with the scale in its kernel.
            one_pass = self.one_pass and one_pass_available(device)
            zeros = [opt for opt in self.optimizers if isinstance(opt, ZeroRedundancyOptimizer) or not one_pass]
            inverse = None if grad_scale is None else grad_scale.reciprocal().to(torch.float32)
            try:
                for opt in self.optimizers:
                    if opt in zeros:
                        local(opt).grad_scale = inverse
                        opt.step()
                    else:
                        step_with_copies(opt, grad_scale)
            finally:
                for opt in zeros:
                    local(opt).grad_scale = None
                if zeros:  # their weights changed under the copies, the broadcast's too
                    forget_copies()
            return
        if grad_scale is not None:
            torch._foreach_mul_(local_grads([p for g in self.param_groups for p in g["params"]]), grad_scale)
        try:
            for opt in self.optimizers:
                opt.step()
        finally:
            # The weights changed under their bf16 copies; a write that bypasses the version
            # counters (ZeRO's broadcast) would not show (epplan.runtime.experts).
            forget_copies()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)
        if self.slot_views:  # the stacked expert tensors are in no optimizer
            for w in self.expert_params:
                w.grad = None
        for p, _ in self.dense_views.values():  # nor, under TP, the dense parameters
            p.grad = None

    def _local(self) -> Iterator[torch.optim.Optimizer]:
        """The optimizers whose ``state`` holds this rank's tensors."""
        for opt in self.optimizers:
            yield local(opt)

    def _held(self, p: torch.Tensor) -> torch.Tensor:
        """The tensor the optimizers hold for ``p``: p, or under TP with sharding its local view."""
        entry = self.dense_views.get(id(p))
        return p if entry is None or entry[0] is not p else entry[1]

    def _as_param(self, p: torch.Tensor, state: dict[str, Any]) -> dict[str, Any]:
        """A held view's state in its DTensor parameter ``p``'s terms (moments as DTensors over
        p's mesh, sharing the view's storage); any other state as it is."""
        if not isinstance(p, DTensor) or self._held(p) is p:
            return state
        return {k: v if v.dim() == 0 else DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                             shape=p.shape, stride=p.stride())
                for k, v in state.items()}

    def keeps(self, p: nn.Parameter) -> bool:
        """Whether this rank keeps (and updates) p's AdamW state."""
        p = self._held(p)
        return any(p is q for opt in self._local() for g in opt.param_groups for q in g["params"])

    def state_of(self, p: nn.Parameter) -> dict[str, Any] | None:
        held = self._held(p)
        for opt in self._local():
            if held in opt.state:
                return self._as_param(p, opt.state[held])
        return None

    def set_state(self, p: nn.Parameter, state: dict[str, Any]) -> None:
        """Install ``state`` for ``p`` (under TP with sharding, local tensors of p's view)."""
        p = self._held(p)
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
        """(parameter, its AdamW state) this rank keeps, in the parameter's terms (under
        ``all``, expert slots as their views)."""
        param_of = {id(view): p for p, view in self.dense_views.values()}
        for opt in self._local():
            for q, state in opt.state.items():
                p = param_of.get(id(q), q)
                yield p, self._as_param(p, state)

    def fresh_state(self, p: torch.Tensor) -> dict[str, torch.Tensor]:
        """A fresh AdamW state for ``p`` laid out as ``torch.optim.AdamW`` lays out its own at the
        first step (zero moments like p; the step a float32 scalar, on p's device when the group
        is fused or capturable, else on the CPU), installed and returned, to be filled in place
        (a checkpoint's load, an expert moved from another rank)."""
        held = self._held(p)
        group = next(g for opt in self._local() for g in opt.param_groups if any(held is q for q in g["params"]))
        assert not group.get("amsgrad"), "the trainer's AdamW keeps no max_exp_avg_sq"
        on_device = group.get("fused") or group.get("capturable")
        state = {"step": torch.zeros((), dtype=torch.float32, device=p.device if on_device else "cpu"),
                 "exp_avg": torch.zeros_like(held, dtype=self.state_dtype, memory_format=torch.preserve_format),
                 "exp_avg_sq": torch.zeros_like(held, dtype=self.state_dtype, memory_format=torch.preserve_format)}
        self.set_state(p, state)
        return self._as_param(p, state)

    def expert_slot_states(self, w: nn.Parameter, *, fresh: bool = False) -> list[dict[str, torch.Tensor] | None]:
        """The AdamW state of each slot j of the stacked expert tensor ``w`` (E_loc, ...): the
        moments are that slot's ((D, F) views), the step the tensor's it belongs to; None where
        this rank keeps none (under "all", a slot that another replica updates; before the first
        step, every slot). fresh: first install a fresh state (``fresh_state``) wherever this
        rank keeps one, to be filled in place."""
        num_slots = w.shape[0]
        if self.slot_views:
            views = [self.slot_views[(id(w), j)] for j in range(num_slots)]
            if fresh:
                return [self.fresh_state(v) if self.keeps(v) else None for v in views]
            return [self.state_of(v) or None for v in views]
        state = self.fresh_state(w) if fresh and num_slots else self.state_of(w)
        if not state:
            return [None] * num_slots
        return [{k: v if v.dim() == 0 else v[j] for k, v in state.items()} for j in range(num_slots)]


class OnePassAdamW(torch.optim.AdamW):
    """torch's AdamW whose step is ``step_with_copies`` with moments of ``state_dtype`` (bf16 under
    ``optimizer_state_dtype``), the gradients multiplied by ``clip`` first (a () tensor, set for
    the step by ``TrainOptimizer.step``); ZeRO's inner optimizer under sharding, so that each rank
    keeps its share of the moments in that dtype."""

    def __init__(self, params: Any, *, state_dtype: torch.dtype, **kw: Any) -> None:
        super().__init__(params, **kw)
        self.state_dtype = state_dtype
        self.clip: torch.Tensor | None = None

    @torch.no_grad()
    def step(self, closure: Any = None) -> None:
        assert closure is None, "no closure"
        step_with_copies(self, self.clip, state_dtype=self.state_dtype)


def _local_view(p: torch.Tensor) -> torch.Tensor:
    """The tensor this rank holds of parameter ``p`` (a DTensor's local shard, or p), as a view
    sharing its storage and outside autograd."""
    with torch.no_grad():
        return p.detach().to_local() if isinstance(p, DTensor) else p.detach()
