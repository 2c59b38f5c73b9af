"""Memory per GPU of a training run, for each recompute and optimizer-sharding choice.

What the runtime holds (``epplan.train``), by the names of ``Cost``'s memory columns:

weights     every parameter the rank holds (all dense parameters, its expert replicas) in the
            storage dtype ``storage_bytes``: fp32 for bf16/fp16/fp32 models (the fp32 weights
            are the master copy; GPUs compute under bf16 autocast), fp64 for fp64 models.
grads       one gradient of the same dtype per parameter (``sync_gradients`` reduces them in
            place; ZeRO-1 keeps them whole): all of them at the peak with more than one
            micro-batch; with one, those backward has made when the peak comes (below).
optimizer   AdamW's two moments per element (``state_bytes``: the storage dtype, or 2 bytes with the
            model's ``optimizer_state_dtype`` bf16) and one scalar ``step`` tensor per parameter tensor,
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
                       plus, at a time in backward, the block being recomputed;
            the LM head's: the chunked loss (``runtime.loss``) keeps the head input's gradient per
            token and the head weight's gradient once (V d in the storage dtype);
            and, on a bf16/fp16 model (GPU autocast), the low-precision copies of the weights:
            autocast caches the cast of every linear weight until the forward ends (dense
            linears: attention, LM head, dense/shared MLPs), and the experts' casts are saved for
            backward unless the block is recomputed (then one layer's at a time).

The peak is the largest of these moments (per GPU), each holding the weights, the optimizer's
state, the casts and:
  the forward's end   every kept activation, a loss chunk's logits and their gradient (2 x
                      chunk x V in the compute dtype), and every gradient if earlier
                      micro-batches made them;
  the head's backward the kept activations and the head weight's scaled gradient;
  each layer's backward, last to first
                      the activations of the layers not yet back-propagated (and the recomputed
                      part of this one), the gradients made so far, and the experts' backward:
                      first the input pass (dy, dx, and da with dh (and dg) at once: b (2 d +
                      2 m f) per assignment served, m = 2 for swiglu, else 1), then the weight
                      pass (b (2 d + m f)) with, under one micro-batch, the layer's expert
                      gradients newly made (``runtime.experts.grad_targets`` makes them at once);
  the step's end      every gradient, no activation.
With one micro-batch the gradients replace the activations as backward runs, so the peak holds
some of them: at the seed dims on one H200 (2 layers, 16 experts, 80,000 tokens) the model says
126.3 GB in one micro-batch where the allocator's high-water mark was 120.4 GB, and 113.2 GB in 2
against 110.2; on the seven runs of docs/benchmarks.md (2026-12-04, calls AB-AD: the seed dims
with 2 and 4 layers, Mixtral's, the medium model, fp32 and bf16 moments) it is 2.2-6.3 % above
the peak. The ``grads`` and ``activations`` columns are those of the peak.

Under ``--tp t`` (``epplan.workload.tensor_parallel``; rank g is TP rank g mod t): every rank
holds its shard of attention, the dense MLPs and the LM head (weights, gradients and AdamW state)
and whole copies of the rest; sharding splits its dense tensors' AdamW state over the ranks of its
TP rank's data-parallel group (``dense_optimizer_elements``), under ``all`` with ``expert_tp``
each expert slice's over that slice's replica set (``expert_optimizer_elements``). Activations of a rank's own
n tokens stay as above where sequence parallelism keeps them on the shard (norms, the residual
stream, the MoE layers, attention's q, k, v and output, whose heads split as the tokens gather);
what a colwise linear saves is its all-gathered input, the group's N = t n tokens: attention's
two (wq, wkv: 2 d b per group token), the dense MLP's (m d b) and the LM head's: the chunked,
vocab-parallel loss keeps its input's gradient for the group's tokens (d b per group token) and
the gradient of its 1 / t of the head weight; a chunk's logits are (chunk, V / t). Autocast's
weight copies are of the shards. With ``expert_tp`` a rank holds 1 / t of each expert its TP group
holds (the union of its ranks'), and keeps, per assignment the group serves, the gathered row (d b) and its
hidden slice ((m + 1) f / t b), per assignment it serves itself the combined output (d b); its
backward's transients are the same counts over the group's rows with f / t.

AdamW runs fused on GPUs (no temporaries).
"""

from __future__ import annotations

import heapq
from typing import Literal, get_args

import numpy as np

from epplan.schedule import LOSS_CHUNK_TOKENS as CHUNK_TOKENS
from epplan.workload.config import ModelConfig
from epplan.workload.flops import ModelCosts, mlp_matrices, tp_sharded_params
from epplan.workload.tensor_parallel import shard_size, tp_sharded_dim

Recompute = Literal["none", "attention", "block"]
RECOMPUTE: tuple[Recompute, ...] = get_args(Recompute)
OptimizerSharding = Literal["none", "dense", "all"]
OPTIMIZER_SHARDING: tuple[OptimizerSharding, ...] = get_args(OptimizerSharding)
_FP32 = 4
_STEP_BYTES = 4  # AdamW's per-tensor fp32 step counter


def optimizer_state_conflict(config: ModelConfig, optimizer_sharding: str, tp: int = 1) -> str | None:
    """Why bf16 AdamW moments (``optimizer_state_dtype``) cannot run with these settings, or None:
    under tensor parallelism the dense weights are DTensors, which only torch's fused AdamW steps
    (its moments are the weights' dtype); the runtime's own one-pass step, which keeps bf16
    moments (ZeRO's shares too), views plain tensors. ``optimizer_sharding`` is any."""
    if config.optimizer_state_dtype == "fp32" or tp == 1:
        return None
    return (f"model {config.name!r}: optimizer_state_dtype={config.optimizer_state_dtype} (AdamW's moments) "
            f"runs with --tp 1 only, not --tp {tp} (--optimizer-sharding {optimizer_sharding}); use --tp 1, "
            "or keep the moments in fp32 (plan with --set optimizer_state_dtype=fp32)")


def storage_bytes(config: ModelConfig) -> int:
    """Bytes per element of parameters and gradients in the runtime (and of AdamW's moments,
    unless ``state_bytes`` says otherwise)."""
    return 8 if config.dtype_bytes > 4 else 4


def state_bytes(config: ModelConfig) -> int:
    """Bytes per element of each of AdamW's two moments: the storage dtype's, or 2 where the
    model's ``optimizer_state_dtype`` is bf16."""
    return 2 if config.optimizer_state_dtype == "bf16" else storage_bytes(config)


def dense_parameter_shapes(config: ModelConfig, tp: int = 1, tp_rank: int = 0) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every non-expert parameter of ``runtime.model.Transformer``, in its
    ``named_parameters`` order; with ``tp`` > 1, the shapes of TP rank ``tp_rank``'s shards."""
    if tp > 1:
        out = []
        for name, shape in dense_parameter_shapes(config):
            dim = tp_sharded_dim(name)
            if dim is not None:
                shape = tuple(shard_size(n, tp, tp_rank) if i == dim else n for i, n in enumerate(shape))
            out.append((name, shape))
        return out
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
    # A heap of (elements so far, rank) pops the rank torch's ``min(sizes)`` picks (the fewest,
    # the lowest rank on a tie) in log(ranks), not a scan of every rank per tensor (1,024 ranks
    # x 1,000 tensors took 2 s per memory estimate).
    heap = [(0, r) for r in range(num_ranks)]
    out = []
    for group in group_sizes:
        per_rank: list[list[int]] = [[] for _ in range(num_ranks)]
        for i in sorted(range(len(group)), key=lambda j: group[j], reverse=True):
            size, rank = heap[0]
            per_rank[rank].append(i)
            heapq.heapreplace(heap, (size + group[i], rank))
        out.append(per_rank)
    return out


def dense_optimizer_elements(config: ModelConfig, num_ranks: int, sharding: str,
                             tp: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(elements, tensors) of dense parameters whose AdamW state each rank keeps: int64 [G] each.

    The groups are the trainer's: weight-decayed matrices, then vectors (norm weights). Under
    ``tp`` > 1 each rank's tensors are its shards (rank g is TP rank g mod t), and sharding splits
    them over the data-parallel group of its TP rank (the G / t ranks holding the same shards)."""
    if sharding not in OPTIMIZER_SHARDING:
        raise ValueError(f"optimizer sharding {sharding!r}: use {', '.join(OPTIMIZER_SHARDING)}")
    elements, tensors = np.zeros(num_ranks, np.int64), np.zeros(num_ranks, np.int64)
    for i in range(tp):  # each TP rank's shards over its data-parallel group: ranks i, i + t, ...
        shapes = dense_parameter_shapes(config, tp, i)
        sizes = [int(np.prod(s)) for _, s in shapes]
        dp_ranks = np.arange(i, num_ranks, tp)
        if sharding == "none":
            elements[dp_ranks], tensors[dp_ranks] = sum(sizes), len(sizes)
            continue
        groups = [[n for n, (_, s) in zip(sizes, shapes) if len(s) >= 2],
                  [n for n, (_, s) in zip(sizes, shapes) if len(s) < 2]]
        for group, per_rank in zip(groups, zero_partition(groups, dp_ranks.size)):
            for r, idx in enumerate(per_rank):
                elements[dp_ranks[r]] += sum(group[k] for k in idx)
                tensors[dp_ranks[r]] += len(idx)
    return elements, tensors


def expert_optimizer_elements(config: ModelConfig, replicas: list[list], num_ranks: int,
                              expert_tp: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(elements, tensors) of expert AdamW state each rank keeps under ``--optimizer-sharding
    all``: int64 [G] each. replicas: [L][E] the ranks holding each expert's replicas.

    As ``train.optim`` builds it: every expert slot's w1, w2(, w3) is a tensor of its own; the
    slots of a replica set of more than one rank go, in (layer, expert, weight) order, to one
    ZeroRedundancyOptimizer over that set (its group ranks are the set's ranks, ascending);
    an unreplicated expert's tensors stay with its rank. Under ``--expert-tp`` (``expert_tp`` =
    t > 1) a slot is a hidden slice (1 / t of each tensor) and the sets are each slice's: TP rank
    j of every TP group holding the expert (``runtime.expert_tensor_parallel.shard_sets``), so an
    expert on two ranks of one group is one slice per rank, not two replicas."""
    c, t = config, expert_tp
    shapes = [(c.d_model, c.d_ff), (c.d_ff, c.d_model)] + ([(c.d_model, c.d_ff)] if c.activation == "swiglu" else [])
    sizes = [a * b // t for a, b in shapes]
    elements, tensors = np.zeros(num_ranks, np.int64), np.zeros(num_ranks, np.int64)
    sets: dict[tuple[int, ...], list[int]] = {}  # replica set -> its tensors' sizes, in order
    for layer in replicas:
        for expert_ranks in layer:
            groups = sorted({int(r) // t for r in expert_ranks})
            for ranks in ([tuple(sorted(int(r) for r in expert_ranks))] if t == 1
                          else [tuple(g * t + j for g in groups) for j in range(t)]):
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
                      recompute: str, tp: int = 1) -> np.ndarray:
    """float64 [G]: autocast's low-precision weight copies held at once (0 for fp32/fp64 models):
    every dense linear weight (autocast's cache lives until the forward ends; under ``tp`` the
    shards of the sharded ones) and the experts' (saved for backward; one layer's at a time when
    blocks are recomputed). replicas_held: expert replicas' worth of weights each rank holds."""
    c = config
    held = np.asarray(replicas_held, dtype=np.float64)
    if c.dtype_bytes >= 4:
        return np.zeros_like(held)
    linear = tp_sharded_params(costs, c) / tp + c.num_moe_layers * costs.params_shared_experts
    experts = held * costs.params_per_expert
    if recompute == "block":
        experts = experts / max(1, c.num_moe_layers)
    return c.dtype_bytes * (linear + experts)


def tp_group_sum(values: np.ndarray, tp: int) -> np.ndarray:
    """values [..., G] summed over each TP group of ``tp`` consecutive ranks, given to each of
    its ranks: [..., G]."""
    values = np.asarray(values, dtype=np.float64)
    if tp == 1:
        return values
    shape = values.shape
    grouped = values.reshape(*shape[:-1], shape[-1] // tp, tp).sum(axis=-1, keepdims=True)
    return np.broadcast_to(grouped, (*shape[:-1], shape[-1] // tp, tp)).reshape(shape)


def expert_tp_rows(served: np.ndarray, tp: int, expert_tp: bool) -> np.ndarray:
    """float64[..., G] assignments' worth of expert FLOPs each rank computes from served [..., G]
    (the rows it receives): its own, or under ``--expert-tp`` 1 / t of its TP group's (each rank
    holds a 1 / t hidden slice of every expert its group holds, so a group's rows are computed
    by all its ranks alike). The one rule for this: ``evaluate`` and the planner's layer clock
    (``LayerData.time_of``) use it."""
    if not expert_tp or tp == 1:
        return np.asarray(served, dtype=np.float64)
    return tp_group_sum(served, tp) / tp


def _vocab_rows(config: ModelConfig, tp: int) -> int:
    """Rows of the LM head a rank holds: the vocabulary, or its largest TP shard."""
    return shard_size(config.vocab_size, tp, 0) if tp > 1 else config.vocab_size


def _dense_params(config: ModelConfig, tp: int, num_gpus: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Non-expert parameters on each rank, float64: all of them [G], per layer [num_layers, G],
    and those of the final norm and LM head [G] (the first gradients backward makes); under
    ``tp`` rank g's shards (TP rank g mod t)."""
    total, per_layer, head = np.zeros(tp), np.zeros((tp, config.num_layers)), np.zeros(tp)
    for i in range(tp):
        for name, shape in dense_parameter_shapes(config, tp, i):
            size = float(np.prod(shape))
            total[i] += size
            if name.startswith("layers."):
                per_layer[i, int(name.split(".")[1])] += size
            elif name.startswith(("norm.", "lm_head.")):
                head[i] += size
    ranks = np.arange(num_gpus) % tp
    return total[ranks], per_layer[ranks].T, head[ranks]


def _experts_by_layer(config: ModelConfig, held: np.ndarray, replicas: list[list] | None,
                      expert_tp: bool) -> np.ndarray:
    """Experts' worth of weights each rank holds per MoE layer, float64 [L, G]: counted from the
    replica sets where given, else ``held`` (summed over layers) split evenly over them, as a
    plan with the same slots on a GPU in every layer holds them (also under ``expert_tp``, where
    ``held`` counts slices)."""
    num_layers = max(1, config.num_moe_layers)
    if replicas is None or expert_tp:
        return np.repeat(held[None, :] / num_layers, config.num_moe_layers, axis=0)
    return np.array([np.bincount(np.concatenate([np.asarray(r, dtype=np.int64).ravel() for r in layer]
                                                or [np.zeros(0, np.int64)]), minlength=held.size)
                     for layer in replicas], dtype=np.float64).reshape(len(replicas), held.size)


def memory_per_gpu(config: ModelConfig, costs: ModelCosts, *, replicas_held: np.ndarray,
                   tokens_per_rank: float, served: np.ndarray,
                   micro_batches: int, recompute: str, optimizer_sharding: str,
                   replicas: list[list] | None = None, tp: int = 1,
                   expert_tp: bool = False) -> dict[str, np.ndarray]:
    """Bytes per GPU by column (see the module docstring), float64 [G] each.

    replicas_held:   [G] expert replicas each rank holds, summed over MoE layers (every rank has
                     one w1/w2(/w3) tensor per MoE layer, empty if it holds no expert there,
                     each with its AdamW ``step``); under ``expert_tp`` the experts' worth of
                     its slices (``tensor_parallel.expert_tp_held``).
    tokens_per_rank: tokens of one optimizer step on each rank (data parallel; under TP its
                     sequence shard of its group's tokens).
    served:          [L, G] token-assignments each rank serves per layer and step.
    replicas:        [L][E] the ranks holding each expert's replicas (needed for sharding ``all``).
    tp, expert_tp:   the TP degree and whether the experts are TP-sharded too.
    """
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute {recompute!r}: use {', '.join(RECOMPUTE)}")
    c = config
    num_gpus = len(replicas_held)
    s = storage_bytes(c)
    held = np.asarray(replicas_held, dtype=np.float64)
    expert_params = held * costs.params_per_expert
    # The runtime's dense parameters (ModelCosts.params_dense leaves out the position embedding).
    dense_params, layer_grads, head_grads = _dense_params(c, tp, num_gpus)
    params = dense_params + expert_params
    dense_elems, dense_tensors = dense_optimizer_elements(c, num_gpus, optimizer_sharding, tp)
    if optimizer_sharding == "all":
        if replicas is None:
            raise ValueError("optimizer sharding 'all' needs the experts' replica sets")
        expert_elems, expert_tensors = expert_optimizer_elements(c, replicas, num_gpus, tp if expert_tp else 1)
    else:  # one stacked tensor per weight and MoE layer, each with its step (empty if no expert there)
        expert_elems, expert_tensors = expert_params, c.num_moe_layers * mlp_matrices(c.activation)
    optimizer = 2 * state_bytes(c) * (dense_elems + expert_elems) + _STEP_BYTES * (dense_tensors + expert_tensors)

    tokens = tokens_per_rank / micro_batches
    served = np.asarray(served, dtype=np.float64) / micro_batches             # [L, G]
    d, k, b, f = c.d_model, c.top_k, c.dtype_bytes, c.d_ff
    m = mlp_matrices(c.activation) - 1  # tensors out of an MLP's up (and gate) projection
    attention, moe_local = costs.act_bytes_per_token_attention, costs.act_bytes_per_token_moe_local
    dense_mlp, per_assignment = costs.act_bytes_per_token_dense_mlp, costs.act_bytes_per_assignment
    head = costs.act_bytes_per_token_head
    if tp > 1:  # per own token: the colwise linears' inputs are the group's t tokens
        attention = attention + (tp - 1) * 2 * d * b
        dense_mlp = dense_mlp + (tp - 1) * m * d * b if c.num_dense_layers else dense_mlp
        norm = _FP32 * (d + 1)
        head = norm + tp * (head - norm)
    if expert_tp:  # the group's gathered rows and this rank's hidden slice, its own combined output
        rows = tp_group_sum(served, tp)
        assignment_bytes = rows * b * (d + (m + 1) * f / tp) + served * b * d   # [L, G]
        input_transient = rows * b * (d + 2 * m * f / tp) + served * b * d
        weight_transient = rows * b * (d + m * f / tp) + served * b * d
    else:
        assignment_bytes = served * per_assignment
        input_transient = served * b * (2 * d + 2 * m * f)   # dy, dx and, at once, da and dh (and dg)
        weight_transient = served * b * (2 * d + m * f)     # dy, dx, dh (and dg)
    expert_grads = _experts_by_layer(c, held, replicas, expert_tp) * costs.params_per_expert  # [L, G]
    kept_attention = _FP32 * (d + 1) + _FP32 * d  # norm input and rstd, the norm output (attention's input)

    # Per layer, in the model's order: what its forward keeps for backward, what its backward
    # adds while it runs (a recomputed part, transients), the gradients it makes.
    kept, extra, layers = [], [], []
    for j in range(c.num_layers):
        moe = j >= c.num_dense_layers
        i = j - c.num_dense_layers
        mlp = tokens * moe_local + assignment_bytes[i] if moe else np.full(num_gpus, tokens * dense_mlp)
        full = tokens * attention + mlp
        if recompute == "none":
            keep = full
        elif recompute == "attention":
            keep = tokens * kept_attention + mlp
        else:  # the block's input (the fp32 residual stream) and a MoE layer's routing
            keep = np.full(num_gpus, tokens * (_FP32 * d + (8 * k if moe else 0)))
        kept.append(keep)
        extra.append(full - keep)
        if moe:  # the experts' input gradient, then their weight gradients (made at once)
            layers.append((input_transient[i], weight_transient[i], expert_grads[i] * s, layer_grads[j] * s))
        else:
            mlp_transient = np.full(num_gpus, tokens * b * (2 * d + 2 * m * c.dense_d_ff))
            layers.append((mlp_transient, mlp_transient, np.zeros(num_gpus), layer_grads[j] * s))

    all_grads = params * s
    chunk_rows = min(CHUNK_TOKENS, tokens * tp)
    head_weight = s * _vocab_rows(c, tp) * d          # the head weight's gradient, made in the forward
    head_kept = tokens * head + head_weight
    logits = 2 * b * chunk_rows * _vocab_rows(c, tp)  # a chunk's logits and their gradient
    total_kept = np.sum(kept, axis=0) + head_kept
    # Candidate peaks, each (activations + gradients, of them gradients) [G]: with more than one
    # micro-batch every gradient is there from the first one's backward on; with one, the
    # gradients backward has made so far. Then the largest per GPU.
    accumulated = micro_batches > 1
    held_grads = all_grads if accumulated else head_grads * s
    at_forward_end = all_grads if accumulated else np.zeros(num_gpus)
    points = [(total_kept + logits + at_forward_end, at_forward_end),    # inside the loss's last chunk
              # the head's backward: its scaled weight gradient (with one micro-batch, that is its .grad)
              (total_kept + held_grads + (head_weight if accumulated else 0.0), held_grads)]
    freed = np.zeros(num_gpus)
    for j in reversed(range(c.num_layers)):
        t_input, t_weight, experts, dense = layers[j]
        before = total_kept - freed + extra[j] + held_grads
        if accumulated:
            points.append((before + np.maximum(t_input, t_weight), held_grads))
        else:  # the input pass's transients, or the weight pass's with the experts' new gradients
            points.append((before + dense + t_input, held_grads + dense))
            points.append((before + dense + t_weight + experts, held_grads + dense + experts))
            held_grads = held_grads + dense + experts
        freed = freed + kept[j]
    points.append((all_grads, all_grads))  # the step's end: every gradient, no activation
    totals = np.array([np.broadcast_to(p, (num_gpus,)) for p, _ in points])     # [points, G]
    grads_at = np.array([np.broadcast_to(g, (num_gpus,)) for _, g in points])
    worst = totals.argmax(axis=0)
    gpus = np.arange(num_gpus)
    grads_at_peak = grads_at[worst, gpus]
    act = totals[worst, gpus] - grads_at_peak
    act = act + weight_cast_bytes(c, costs, held, recompute, tp)
    return {
        "weight_bytes": params * s,
        "grad_bytes": grads_at_peak,
        "optimizer_bytes": np.asarray(optimizer, dtype=np.float64),
        "activation_bytes": np.broadcast_to(np.asarray(act, dtype=np.float64), (num_gpus,)).copy(),
    }
