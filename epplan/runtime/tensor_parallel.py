"""Tensor parallelism with sequence parallelism, applied to a built expert-parallel ``Transformer``.

Shape legend:
    B = sequences of a TP group, T = sequence length, D = d_model, V = vocab, H = heads,
    Hkv = key/value heads, Dh = head dim, F = dense MLP hidden, t = TP degree, d = data-parallel
    degree, G = d * t ranks.

The engine is torch's (``torch.distributed.tensor.parallel``: DTensor, ``parallelize_module``),
applied from outside the single-device model as gpt-fast and torchtitan do. The ranks form a
("dp", "tp") mesh of shape (d, t), rank = dp * t + tp: a TP group is t consecutive ranks, inside a
node when t divides the GPUs per node. Every rank of a TP group reads the same B sequences.

Layouts (DTensor placements over the TP group):

    embeddings            replicated; the first block's input is cut into its sequence shard
    residual stream       Shard(1): (B, T / t, D) on each rank
    attn_norm, ffn_norm,  SequenceParallel (weights replicated, work on the sequence shard)
    norm
    attn.wq, attn.wkv     ColwiseParallel from Shard(1): all-gather T, then H / t heads per rank
    attn.wo               RowwiseParallel to Shard(1): reduce-scatter back to the sequence shard
    dense MLP             w1, w3 (D, F) split over F, w2 (F, D) over F (``DenseMLPParallel``)
    MoE                   the rank's own sequence shard, as a local (B * T / t, D) token matrix:
                          routing and expert parallelism run over all G ranks as without TP;
                          with expert TP (``parallelize_experts(expert_tp=mesh["tp"])``, before
                          this) each expert's hidden dimension is split over the TP group
                          (``expert_tensor_parallel.py``)
    lm_head               ColwiseParallel from Shard(1) to Replicate: vocab-sharded weight, the
                          logits (B, T, V) all-gathered on every rank of the group (a forward
                          without targets, or with ``fused_loss`` off)
    head + loss           with ``fused_loss`` (``epplan run``): the final norm's output all-gathered
                          (B, T, D), the vocab-parallel chunked loss (``loss.py``) on each rank's
                          (V / t, D) rows, the input gradient's parts reduce-scattered back to the
                          sequence shard (DTensor: ``to_local(grad_placements=[Partial()])``);
                          the (B, T, V) logits are never formed

Losses: the language-model loss is the mean over the TP group's tokens, the same value on its t
ranks (one loss per group, not t). Each rank's router sees only its shard, so its auxiliary loss
is averaged over the group (a scalar all-reduce per MoE layer) before it joins the loss. The
step's loss is the mean of the d groups' losses, which ``sync_gradients`` turns into gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_module, distribute_tensor
from torch.distributed.tensor.parallel import (ColwiseParallel, ParallelStyle, PrepareModuleInput,
                                               PrepareModuleInputOutput, RowwiseParallel,
                                               SequenceParallel, parallelize_module)

from epplan.errors import param, RuntimeSetupError
from epplan.runtime.expert_parallel import gather_state_dict, sync_expert_gradients
from epplan.runtime.loss import linear_cross_entropy, vocab_parallel_chunk_loss
from epplan.runtime.model import MLP, MoE, Transformer
from epplan.runtime.recompute import is_replaying
from epplan.schedule import LOSS_CHUNK_TOKENS


@dataclass
class TensorParallelState:
    """Attached to the model as ``model.tensor_parallel``."""

    mesh: DeviceMesh  # ("dp", "tp") over the world
    tp: int
    dp: int

    @property
    def tp_mesh(self) -> DeviceMesh:
        return self.mesh["tp"]

    @property
    def dp_rank(self) -> int:
        """Which TP group (and so which slice of the batch) this rank is in."""
        return self.mesh.get_local_rank("dp")


def tensor_parallel_mesh(tp: int, device_type: str = "cpu") -> DeviceMesh:
    """Collective: the ("dp", "tp") mesh of the world for TP degree ``tp``.
    Raises ``RuntimeSetupError`` if ``tp`` does not divide the world."""
    world = dist.get_world_size()
    if tp < 1 or world % tp:
        raise RuntimeSetupError(f"{param('tp', tp)} does not divide the {world} ranks; use a divisor of the "
                                "GPUs per node")
    return init_device_mesh(device_type, (world // tp, tp), mesh_dim_names=("dp", "tp"))


class DenseMLPParallel(ParallelStyle):
    """Megatron's split of an MLP held as raw parameters (``model.MLP``: w1, w3 (D, F), w2 (F, D)),
    which ColwiseParallel and RowwiseParallel (nn.Linear and nn.Embedding only) do not take:
    w1 and w3 Shard(1), w2 Shard(0). The sequence-sharded input (B, T / t, D) is all-gathered, the
    partial sums of the output reduce-scattered back to the sequence shard; DTensor propagates
    the placements through ``experts.mlp`` in between."""

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        def partition(name: str, mod: nn.Module, mesh: DeviceMesh) -> None:
            if mod is not module:
                return
            for pname, p in list(mod.named_parameters(recurse=False)):
                placement = Shard(0) if pname == "w2" else Shard(1)
                mod.register_parameter(pname, nn.Parameter(distribute_tensor(p.data, mesh, [placement])))

        def gather_sequence(mod: nn.Module, inputs: tuple, mesh: DeviceMesh) -> tuple:
            (x,) = inputs  # DTensor Shard(1)
            return (x.redistribute(mesh, [Replicate()]),)

        def scatter_sequence(mod: nn.Module, output: DTensor, mesh: DeviceMesh) -> DTensor:
            return output.redistribute(mesh, [Shard(1)])  # Partial -> Shard(1)

        return distribute_module(module, device_mesh, partition, gather_sequence, scatter_sequence)


def parallelize_tensor(model: Transformer, mesh: DeviceMesh,
                       loss_chunk_tokens: int = LOSS_CHUNK_TOKENS) -> Transformer:
    """Make expert-parallel ``model`` tensor-parallel over ``mesh["tp"]``, in place (collective).

    Call after ``expert_parallel.parallelize_experts`` (over the world) and before building the
    optimizer; use this module's ``sync_gradients``. With ``fused_loss`` the loss is the
    vocab-parallel chunked one, in chunks of ``loss_chunk_tokens`` of the group's tokens.
    Raises ``RuntimeSetupError`` when the heads do not split over the TP group.
    """
    if getattr(model, "expert_parallel", None) is None:
        raise RuntimeSetupError("parallelize_tensor needs an expert-parallel model; call parallelize_experts first")
    tp_mesh = mesh["tp"]
    t = tp_mesh.size()
    c = model.config
    for what, n in (("attention heads", c.num_heads), ("key/value heads", c.num_kv_heads)):
        if n % t:
            raise RuntimeSetupError(f"{param('tp', t)}: the model's {n} {what} do not split over {t} ranks; "
                                    f"use a {param('tp')} that divides {n}")
    plan: dict[str, ParallelStyle] = {
        "layers.0": PrepareModuleInput(input_layouts=Replicate(), desired_input_layouts=Shard(1)),
        "norm": SequenceParallel(),
        "lm_head": ColwiseParallel(input_layouts=Shard(1), output_layouts=Replicate()),
    }
    for i, block in enumerate(model.layers):
        p = f"layers.{i}"
        plan[f"{p}.attn_norm"] = SequenceParallel()
        plan[f"{p}.attn.wq"] = ColwiseParallel(input_layouts=Shard(1))
        plan[f"{p}.attn.wkv"] = ColwiseParallel(input_layouts=Shard(1))
        plan[f"{p}.attn.wo"] = RowwiseParallel(output_layouts=Shard(1), use_local_output=False)
        plan[f"{p}.ffn_norm"] = SequenceParallel()
        if isinstance(block.ffn, MoE):
            plan[f"{p}.ffn"] = PrepareModuleInputOutput(
                input_layouts=Shard(1), desired_input_layouts=Shard(1), use_local_input=True,
                output_layouts=Shard(1), desired_output_layouts=Shard(1), use_local_output=False)
        else:
            assert isinstance(block.ffn, MLP)
            plan[f"{p}.ffn"] = DenseMLPParallel()
        block.attn.num_heads //= t  # the heads of this rank's shard of wq, wkv and wo
        block.attn.num_kv_heads //= t
    parallelize_module(model, tp_mesh, plan)
    for moe in model.moe_layers():
        moe.register_forward_hook(_group_mean_aux_loss(tp_mesh))
    model.head_loss = _vocab_parallel_loss(model.lm_head, tp_mesh, loss_chunk_tokens)
    model.tensor_parallel = TensorParallelState(mesh, tp=t, dp=mesh["dp"].size())
    return model


def _vocab_parallel_loss(lm_head: nn.Linear, tp_mesh: DeviceMesh, chunk_tokens: int):
    """The model's ``head_loss`` under TP: h DTensor Shard(1) (B, T / t, D), targets (B, T) of
    the group -> the mean cross-entropy over the group's B * T tokens, the same on its t ranks."""
    weight = lm_head.weight  # DTensor Shard(0): (V / t, D) here
    vocab = weight.shape[0]
    # DTensor's Shard(0) rows: chunks of ceil(V / t), the last ones shorter
    vocab_start = min(vocab, -(-vocab // tp_mesh.size()) * tp_mesh.get_local_rank())
    chunk_fn = partial(vocab_parallel_chunk_loss, vocab_start=vocab_start, group=tp_mesh.get_group())

    def head_loss(h: DTensor, targets: torch.Tensor) -> torch.Tensor:
        B, T = targets.shape
        # all-gather the sequence; the gradient each rank makes is its vocab rows' part (Partial),
        # which the all-gather's backward reduce-scatters back to the sequence shard
        full = h.redistribute(tp_mesh, [Replicate()]).to_local(grad_placements=[Partial()])  # (B, T, D)
        return linear_cross_entropy(full.reshape(B * T, -1), weight.to_local(), targets.reshape(-1),
                                    chunk_tokens, chunk_fn)

    return head_loss


def _group_mean_aux_loss(tp_mesh: DeviceMesh):
    """A MoE forward hook: its auxiliary loss (of this rank's shard) becomes the TP group's mean,
    the same value on every rank of the group, with gradient 1 / t to each rank's term."""
    t = tp_mesh.size()

    def hook(module: MoE, inputs: tuple, output: torch.Tensor) -> None:
        if is_replaying():  # a recompute's copy is not the loss's term
            return
        mine = DTensor.from_local(module.aux_loss / t, tp_mesh, [Partial()])
        module.aux_loss = mine.redistribute(tp_mesh, [Replicate()]).to_local()

    return hook


def _state(model: nn.Module) -> TensorParallelState:
    state = getattr(model, "tensor_parallel", None)
    if state is None:
        raise RuntimeSetupError("the model is not tensor-parallel; call parallelize_tensor first")
    return state


def sync_gradients(model: Transformer) -> None:
    """The gradient of the mean of the d TP groups' losses; call after backward, before the step.

    Within a group autograd already summed what it could: a TP-sharded weight's shard and an
    embedding (replicated, its output cut into shards) hold the whole group's gradient, so they
    are summed over the data-parallel group. The weights that see only the rank's sequence shard
    hold a part: the norms' (DTensor Partial) and the MoE layers' router and shared experts, summed
    over all G ranks. Experts sum over their replicas. Everything is divided by d.
    """
    state = _state(model)
    ep = model.expert_parallel
    expert_params = {id(w) for layer in ep.layers for w in layer.parameters(recurse=False)}
    sharded_view = {id(p) for moe in model.moe_layers() for p in moe.parameters()} - expert_params
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        if p.grad is None:  # never used on this rank this step: contributes zero, still reduced
            p.grad = torch.zeros_like(p)
    over_world: list[nn.Parameter] = []
    over_dp: list[nn.Parameter] = []
    for p in params:
        if id(p) in expert_params:
            continue
        if isinstance(p.grad, DTensor):
            is_part = any(isinstance(pl, Partial) for pl in p.grad.placements)
        else:
            is_part = id(p) in sharded_view
        (over_world if is_part else over_dp).append(p)
    _reduce(over_world, None, state.dp)
    _reduce(over_dp, state.mesh["dp"].get_group(), state.dp)
    sync_expert_gradients(model, state.dp)


def _reduce(params: list[nn.Parameter], group: dist.ProcessGroup | None, divisor: int) -> None:
    """Sum the local gradients of ``params`` over ``group`` (None: the world), divide, and store
    them with their parameter's placements."""
    for dtype in sorted({p.dtype for p in params}, key=str):
        same = [p for p in params if p.dtype == dtype]
        local = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in same]
        flat = torch.cat([g.reshape(-1) for g in local])
        dist.all_reduce(flat, group=group)
        flat /= divisor
        for p, g, part in zip(same, local, flat.split([g.numel() for g in local])):
            part = part.view_as(g)
            p.grad = (DTensor.from_local(part, p.device_mesh, p.placements, shape=p.shape, stride=p.stride())
                      if isinstance(p, DTensor) else part)


@torch.no_grad()
def full_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The single-device model's state_dict (same keys and shapes), on every rank (collective)."""
    return {name: t.full_tensor() if isinstance(t, DTensor) else t
            for name, t in gather_state_dict(model).items()}


def dense_grad_norm_sq(model: Transformer, grads: list[torch.Tensor]) -> torch.Tensor:
    """Collective over the TP group: the squared L2 norm of the whole model's ``grads`` (after
    ``sync_gradients``: sharded ones summed over the group's shards, replicated ones once)."""
    state = _state(model)
    sharded_sq = replicated_sq = None
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        sq = torch.linalg.vector_norm(local, dtype=torch.promote_types(local.dtype, torch.float32)).square()
        if isinstance(g, DTensor) and any(isinstance(pl, Shard) for pl in g.placements):
            sharded_sq = sq if sharded_sq is None else sharded_sq + sq
        else:
            assert not isinstance(g, DTensor) or all(isinstance(pl, Replicate) for pl in g.placements)
            replicated_sq = sq if replicated_sq is None else replicated_sq + sq
    zero = torch.zeros((), dtype=torch.float64 if grads[0].dtype == torch.float64 else torch.float32,
                       device=grads[0].device)
    sharded_sq = zero if sharded_sq is None else sharded_sq
    dist.all_reduce(sharded_sq, group=state.tp_mesh.get_group())
    return sharded_sq + (zero if replicated_sq is None else replicated_sq)


def local_grads(params: list[torch.Tensor]) -> list[torch.Tensor]:
    """The gradients of ``params`` as the tensors this rank holds (a DTensor's local shard), for
    in-place arithmetic with plain tensors (the gradient clip's scale)."""
    return [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in params if p.grad is not None]
