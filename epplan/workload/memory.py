"""Memory per GPU of a training run, for each recompute and optimizer-sharding choice.

What the runtime holds (``epplan.train``), by the names of ``Cost``'s memory columns:

weights     every parameter the rank holds (all dense parameters, its expert replicas) in the
            storage dtype ``storage_bytes``: fp32 for bf16/fp16/fp32 models (the fp32 weights
            are the master copy; GPUs compute under bf16 autocast), fp64 for fp64 models.
grads       one gradient of the same dtype per parameter (``sync_gradients`` reduces them in
            place; ZeRO-1 keeps them whole).
optimizer   AdamW's two moments per element and one scalar ``step`` tensor per parameter tensor,
            for the parameters whose state this rank keeps: all of its own under sharding
            ``none``; under ``dense`` the dense parameters' state is split over all ranks by
            ``torch.distributed.optim.ZeroRedundancyOptimizer`` (whole tensors, largest first to
            the least-loaded rank: ``zero_partition`` replays its rule), experts keep theirs;
            under ``all`` each expert's state is also split, over the ranks holding its
            replicas (one ZeroRedundancyOptimizer per replica set, whole slot tensors: w1, w2(,
            w3) of each expert in (layer, expert) order; ``expert_optimizer_elements``), each
            slot tensor with its own ``step``.
activations kept for backward, for one micro-batch (``micro_batches`` divides the rank's tokens
            and the assignments it serves), by ``recompute``:
            none       every block's activations (``flops.ModelCosts.act_bytes_*``);
            attention  attention keeps only its input (the fp32 norm output, 4 d per token),
                       plus one layer's attention recomputed at a time in backward;
            block      each block keeps its input (the fp32 residual stream, 4 d) and its routing
                       (k int64 expert ids per token of a MoE layer, replayed by the recompute),
                       plus, at a time in backward, either the LM head's peak or the fullest
                       block recomputed;
            and, on a bf16/fp16 model (GPU autocast), the low-precision copies of the weights:
            autocast caches the cast of every linear weight until the forward ends (dense
            linears: attention, LM head, dense/shared MLPs), and the experts' casts are saved for
            backward unless the block is recomputed (then one layer's at a time).

The columns are held at once at the end of the last micro-batch's forward (the earlier
micro-batches' gradients are there); with one micro-batch the gradients replace activations as
backward runs, so their sum is an upper bound. AdamW runs fused on GPUs (no temporaries).
"""

from __future__ import annotations

from typing import Literal, get_args

import numpy as np

from epplan.workload.config import ModelConfig
from epplan.workload.flops import ModelCosts, mlp_matrices

Recompute = Literal["none", "attention", "block"]
RECOMPUTE: tuple[Recompute, ...] = get_args(Recompute)
OptimizerSharding = Literal["none", "dense", "all"]
OPTIMIZER_SHARDING: tuple[OptimizerSharding, ...] = get_args(OptimizerSharding)
_FP32 = 4
_STEP_BYTES = 4  # AdamW's per-tensor fp32 step counter


def storage_bytes(config: ModelConfig) -> int:
    """Bytes per element of parameters, gradients and AdamW moments in the runtime."""
    return 8 if config.dtype_bytes > 4 else 4


def dense_parameter_shapes(config: ModelConfig) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every non-expert parameter of ``runtime.model.Transformer``, in its
    ``named_parameters`` order."""
    c, d = config, config.d_model
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    out: list[tuple[str, tuple[int, ...]]] = [("tok_emb.weight", (c.vocab_size, d)),
                                              ("pos_emb.weight", (c.seq_len, d))]

    def mlp(prefix: str, hidden: int) -> None:
        out.extend([(f"{prefix}.w1", (d, hidden)), (f"{prefix}.w2", (hidden, d))])
        if c.activation == "swiglu":
            out.append((f"{prefix}.w3", (d, hidden)))

    for i in range(c.num_layers):
        p = f"layers.{i}"
        out += [(f"{p}.attn_norm.weight", (d,)), (f"{p}.attn.wq.weight", (q, d)),
                (f"{p}.attn.wkv.weight", (2 * kv, d)), (f"{p}.attn.wo.weight", (d, q)),
                (f"{p}.ffn_norm.weight", (d,))]
        if i < c.num_dense_layers:
            mlp(f"{p}.ffn", c.dense_d_ff)
        else:
            out.append((f"{p}.ffn.router.gate.weight", (c.num_experts, d)))
            if c.num_shared_experts:
                mlp(f"{p}.ffn.shared", c.num_shared_experts * c.d_ff)
    out += [("norm.weight", (d,)), ("lm_head.weight", (c.vocab_size, d))]
    return out


def zero_partition(group_sizes: list[list[int]], num_ranks: int) -> list[list[list[int]]]:
    """ZeroRedundancyOptimizer's partition: for each parameter group (in order), its tensors
    sorted by size, largest first (stable), each to the rank with the fewest elements so far
    (the lowest such rank). Returns [group][rank] -> indices into that group's list."""
    sizes = [0] * num_ranks
    out = []
    for group in group_sizes:
        per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
        for i in sorted(range(len(group)), key=lambda j: group[j], reverse=True):
            rank = min(range(num_ranks), key=lambda r: sizes[r])
            per_rank[rank].append(i)
            sizes[rank] += group[i]
        out.append(per_rank)
    return out


def dense_optimizer_elements(config: ModelConfig, num_ranks: int, sharding: str) -> tuple[np.ndarray, np.ndarray]:
    """(elements, tensors) of dense parameters whose AdamW state each rank keeps: int64 [G] each.

    The groups are the trainer's: weight-decayed matrices, then vectors (norm weights)."""
    if sharding not in OPTIMIZER_SHARDING:
        raise ValueError(f"optimizer sharding {sharding!r}: use {', '.join(OPTIMIZER_SHARDING)}")
    sizes = [int(np.prod(s)) for _, s in dense_parameter_shapes(config)]
    dims = [len(s) for _, s in dense_parameter_shapes(config)]
    groups = [[n for n, k in zip(sizes, dims) if k >= 2], [n for n, k in zip(sizes, dims) if k < 2]]
    if sharding == "none":
        return (np.full(num_ranks, sum(sizes), np.int64), np.full(num_ranks, len(sizes), np.int64))
    elements, tensors = np.zeros(num_ranks, np.int64), np.zeros(num_ranks, np.int64)
    for group, per_rank in zip(groups, zero_partition(groups, num_ranks)):
        for r, idx in enumerate(per_rank):
            elements[r] += sum(group[i] for i in idx)
            tensors[r] += len(idx)
    return elements, tensors


def expert_optimizer_elements(config: ModelConfig, replicas: list[list], num_ranks: int) -> tuple[np.ndarray, np.ndarray]:
    """(elements, tensors) of expert AdamW state each rank keeps under ``--optimizer-sharding
    all``: int64 [G] each. replicas: [L][E] the ranks holding each expert's replicas.

    As ``train.optim`` builds it: every expert slot's w1, w2(, w3) is a tensor of its own; the
    slots of a replica set of more than one rank go, in (layer, expert, weight) order, to one
    ZeroRedundancyOptimizer over that set (its group ranks are the set's ranks, ascending);
    an unreplicated expert's tensors stay with its rank."""
    c = config
    shapes = [(c.d_model, c.d_ff), (c.d_ff, c.d_model)] + ([(c.d_model, c.d_ff)] if c.activation == "swiglu" else [])
    sizes = [a * b for a, b in shapes]
    elements, tensors = np.zeros(num_ranks, np.int64), np.zeros(num_ranks, np.int64)
    sets: dict[tuple[int, ...], list[int]] = {}  # replica set -> its tensors' sizes, in order
    for layer in replicas:
        for ranks in layer:
            ranks = tuple(sorted(int(r) for r in ranks))
            if len(ranks) == 1:
                elements[ranks[0]] += sum(sizes)
                tensors[ranks[0]] += len(sizes)
            else:
                sets.setdefault(ranks, []).extend(sizes)
    for ranks, group in sets.items():
        for i, idx in enumerate(zero_partition([group], len(ranks))[0]):
            elements[ranks[i]] += sum(group[k] for k in idx)
            tensors[ranks[i]] += len(idx)
    return elements, tensors


def weight_cast_bytes(config: ModelConfig, costs: ModelCosts, replicas_held: np.ndarray,
                      recompute: str) -> np.ndarray:
    """float64 [G]: autocast's low-precision weight copies held at once (0 for fp32/fp64 models):
    every dense linear weight (autocast's cache lives until the forward ends) and the experts'
    (saved for backward; one layer's at a time when blocks are recomputed)."""
    c = config
    held = np.asarray(replicas_held, dtype=np.float64)
    if c.dtype_bytes >= 4:
        return np.zeros_like(held)
    linear = (c.num_layers * costs.params_attention + c.num_moe_layers * costs.params_shared_experts
              + c.num_dense_layers * costs.params_dense_mlp + costs.params_lm_head)
    experts = held * costs.params_per_expert
    if recompute == "block":
        experts = experts / max(1, c.num_moe_layers)
    return c.dtype_bytes * (linear + experts)


def memory_per_gpu(config: ModelConfig, costs: ModelCosts, *, replicas_held: np.ndarray,
                   tokens_per_rank: float, served: np.ndarray,
                   micro_batches: int, recompute: str, optimizer_sharding: str,
                   replicas: list[list] | None = None) -> dict[str, np.ndarray]:
    """Bytes per GPU by column (see the module docstring), float64 [G] each.

    replicas_held:   [G] expert replicas each rank holds, summed over MoE layers (every rank has
                     one w1/w2(/w3) tensor per MoE layer, empty if it holds no expert there,
                     each with its AdamW ``step``).
    tokens_per_rank: tokens of one optimizer step on each rank (data parallel).
    served:          [L, G] token-assignments each rank serves per layer and step.
    replicas:        [L][E] the ranks holding each expert's replicas (needed for sharding ``all``).
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r}: use {', '.join(RECOMPUTE)}")
    c = config
    num_gpus = len(replicas_held)
    s = storage_bytes(c)
    held = np.asarray(replicas_held, dtype=np.float64)
    expert_params = held * costs.params_per_expert
    # The runtime's dense parameters (ModelCosts.params_dense leaves out the position embedding).
    params = sum(int(np.prod(shape)) for _, shape in dense_parameter_shapes(c)) + expert_params
    dense_elems, dense_tensors = dense_optimizer_elements(c, num_gpus, optimizer_sharding)
    if optimizer_sharding == "all":
        if replicas is None:
            raise ValueError("optimizer sharding 'all' needs the experts' replica sets")
        expert_elems, expert_tensors = expert_optimizer_elements(c, replicas, num_gpus)
    else:  # one stacked tensor per weight and MoE layer, each with its step (empty if no expert there)
        expert_elems, expert_tensors = expert_params, c.num_moe_layers * mlp_matrices(c.activation)
    optimizer = 2 * s * (dense_elems + expert_elems) + _STEP_BYTES * (dense_tensors + expert_tensors)

    tokens = tokens_per_rank / micro_batches
    served = np.asarray(served, dtype=np.float64) / micro_batches             # [L, G]
    d, k = c.d_model, c.top_k
    attention, moe_local = costs.act_bytes_per_token_attention, costs.act_bytes_per_token_moe_local
    dense_mlp, per_assignment = costs.act_bytes_per_token_dense_mlp, costs.act_bytes_per_assignment
    head = costs.act_bytes_per_token_head
    layer_tokens = c.num_moe_layers * moe_local + c.num_dense_layers * dense_mlp
    if recompute == "none":
        act = tokens * (c.num_layers * attention + layer_tokens + head) + served.sum(axis=0) * per_assignment
    elif recompute == "attention":
        kept = _FP32 * (d + 1) + _FP32 * d  # norm input and rstd, the norm output (attention's input)
        act = (tokens * (c.num_layers * kept + layer_tokens + head + (attention - kept))
               + served.sum(axis=0) * per_assignment)
    else:
        kept = tokens * (c.num_layers * _FP32 * d + c.num_moe_layers * 8 * k)
        fullest_moe = tokens * (attention + moe_local) + served.max(axis=0, initial=0.0) * per_assignment
        fullest = np.maximum(fullest_moe, tokens * (attention + dense_mlp)) if c.num_dense_layers else fullest_moe
        act = kept + np.maximum(tokens * head, fullest)
    act = act + weight_cast_bytes(c, costs, held, recompute)
    return {
        "weight_bytes": params * s,
        "grad_bytes": params * s,
        "optimizer_bytes": np.asarray(optimizer, dtype=np.float64),
        "activation_bytes": np.broadcast_to(np.asarray(act, dtype=np.float64), (num_gpus,)).copy(),
    }
