"""Quantities derived from a ``ModelConfig``: parameters, FLOPs, bytes on the wire, activations.

Units are in the names: ``params_*`` count scalars, ``flops_*`` count floating-point operations
(a multiply-add is 2), ``*_bytes`` count bytes. Everything "per token" is per token of the
training batch; "per assignment" is per (token, routed expert) pair, of which a token makes
``top_k``.

Assumptions (the same ones the runtime's model code makes):

- No biases anywhere (Llama/Mixtral style). Norms are RMSNorm with one weight vector of d_model.
- An MLP of hidden size f has 2 matrices d_model x f for ``gelu``/``silu`` (up, down) and 3 for
  ``swiglu`` (gate, up, down). Shared experts have the routed experts' hidden size ``d_ff``.
- Attention: q and o are d_model x (num_heads * head_dim); k and v are d_model x
  (num_kv_heads * head_dim) (grouped-query attention).
- The router is a d_model x num_experts matrix. Embeddings and LM head are untied.
- FLOPs count matrix multiplications only; norms, softmax, activations and the residual adds are
  O(d_model) per token and left out, as in Kaplan et al. (2020) and the PaLM MFU convention.

Attention scores and values, per token and layer, forward:

    flops_attention_scores = 2 * 2 * (seq_len / 2) * num_heads * head_dim

One factor 2 is the multiply-add, the other counts the two products (Q K^T and P V); a token
attends on average to seq_len / 2 earlier positions under causal masking, so a causal kernel that
skips masked blocks does half the work of the full square (FlashAttention's benchmark counts the
same: 4 * seq_len^2 * num_heads * head_dim per sequence, halved when causal).

Training = forward + backward = 3 x forward (the backward pass computes gradients with respect
to both inputs and weights, each as costly as the forward product).
"""

from __future__ import annotations

from dataclasses import dataclass

from epplan.workload.config import ModelConfig

# A routed token-assignment crosses the wire 4 times per layer per training step: dispatch and
# combine in the forward pass, and the same two exchanges (swapped) for the gradients in backward.
EXCHANGES_PER_LAYER_PER_STEP = 4
TRAINING_FLOPS_FACTOR = 3
_FP32_BYTES = 4


@dataclass(frozen=True)
class ModelCosts:
    """Parameters, FLOPs, wire bytes and activation memory of one model; build with ``model_costs``.

    Per-layer quantities are for one layer of the named kind (MoE layers are
    ``config.num_moe_layers`` of them, dense layers ``config.num_dense_layers``).
    """

    # --- parameters -------------------------------------------------------------------------
    params_per_expert: int          # one routed (or shared) expert MLP
    params_router: int              # per MoE layer
    params_shared_experts: int      # per MoE layer, all shared experts together
    params_moe_block: int           # per MoE layer: routed experts + router + shared experts
    params_attention: int           # per layer (q, k, v, o)
    params_dense_mlp: int           # per dense layer (0 when the model has none)
    params_norms_per_layer: int     # per layer: the two RMSNorms
    params_embedding: int
    params_lm_head: int
    params_final_norm: int
    params_total: int
    params_routed_experts: int      # all routed experts of all MoE layers
    params_dense: int               # everything else: data-parallel over all ranks
    params_active: int              # used in a matmul by one token: top_k experts, no embedding

    # --- forward FLOPs per token -------------------------------------------------------------
    flops_attention_proj: int       # per layer: 2 * params_attention
    flops_attention_scores: float   # per layer: 2 * seq_len * num_heads * head_dim (causal)
    flops_per_assignment: int       # one token through one expert: 2 * params_per_expert
    flops_routed_experts: int       # per MoE layer: top_k * flops_per_assignment
    flops_shared_experts: int       # per MoE layer
    flops_router: int               # per MoE layer: 2 * d_model * num_experts
    flops_dense_mlp: int            # per dense layer
    flops_lm_head: int              # once per token: 2 * vocab_size * d_model
    flops_fwd_moe_layer: float      # per MoE layer, all of the above that apply
    flops_fwd_dense_layer: float    # per dense layer
    flops_fwd_per_token: float      # whole model, forward
    flops_train_per_token: float    # whole model, 3 x forward
    model_flops_per_step: float     # the MFU numerator: flops_train_per_token * tokens_per_step

    # --- wire bytes -----------------------------------------------------------------------------
    bytes_per_assignment: int       # one token-assignment, one dispatch (combine sends the same)

    # --- activation memory (bytes kept for backward, no recomputation) ------------------------
    act_bytes_per_token_attention: float  # per layer, on the token's own rank
    act_bytes_per_token_moe_local: float  # per MoE layer, on the token's rank: norm, router, shared
    act_bytes_per_assignment: int         # per MoE layer, on the rank that serves the expert
    act_bytes_per_token_dense_mlp: float  # per dense layer, on the token's rank
    act_bytes_per_token_moe_layer: float  # per MoE layer, all of it: local + top_k assignments
    act_bytes_per_token_head: int         # once per token: final norm, the LM-head input's gradient
    act_bytes_per_token: float            # whole model

    def mfu(self, step_time_s: float, num_gpus: int, peak_flops_per_gpu: float) -> float:
        """Model FLOPs utilisation of a step: model_flops_per_step / (time * GPUs * peak)."""
        if step_time_s <= 0 or num_gpus <= 0 or peak_flops_per_gpu <= 0:
            raise ValueError("step_time_s, num_gpus and peak_flops_per_gpu must be positive")
        return self.model_flops_per_step / (step_time_s * num_gpus * peak_flops_per_gpu)


def mlp_matrices(activation: str) -> int:
    """Weight matrices of one MLP: 3 for the gated ``swiglu``, else 2."""
    return 3 if activation == "swiglu" else 2


def model_costs(config: ModelConfig) -> ModelCosts:
    """Every derived quantity of ``config``, as documented on ``ModelCosts`` and the module."""
    c = config
    d, b = c.d_model, c.dtype_bytes
    num_mats = mlp_matrices(c.activation)
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim

    # Parameters.
    per_expert = num_mats * d * c.d_ff
    router = d * c.num_experts
    shared = c.num_shared_experts * per_expert
    moe_block = c.num_experts * per_expert + router + shared
    attention = d * q_width * 2 + d * kv_width * 2
    dense_mlp = num_mats * d * c.dense_d_ff if c.num_dense_layers else 0
    norms = 2 * d
    embedding = lm_head = c.vocab_size * d
    final_norm = d
    total = (c.num_layers * (attention + norms)
             + c.num_moe_layers * moe_block
             + c.num_dense_layers * dense_mlp
             + embedding + lm_head + final_norm)
    routed = c.num_moe_layers * c.num_experts * per_expert
    active = (c.num_layers * attention
              + c.num_moe_layers * (c.top_k * per_expert + router + shared)
              + c.num_dense_layers * dense_mlp
              + lm_head)

    # Forward FLOPs per token.
    f_attn_proj = 2 * attention
    f_attn_scores = 2 * 2 * (c.seq_len / 2) * c.num_heads * c.head_dim
    f_assignment = 2 * per_expert
    f_routed = c.top_k * f_assignment
    f_shared = 2 * shared
    f_router = 2 * router
    f_dense_mlp = 2 * dense_mlp
    f_lm_head = 2 * lm_head
    f_moe_layer = f_attn_proj + f_attn_scores + f_routed + f_shared + f_router
    f_dense_layer = f_attn_proj + f_attn_scores + f_dense_mlp
    f_fwd = c.num_moe_layers * f_moe_layer + c.num_dense_layers * f_dense_layer + f_lm_head
    f_train = TRAINING_FLOPS_FACTOR * f_fwd

    act = _activation_bytes(c)
    act_moe_layer = (act["attention"] + act["moe_local"]
                     + c.top_k * act["assignment"])
    act_dense_layer = act["attention"] + act["dense_mlp"]
    act_total = (c.num_moe_layers * act_moe_layer + c.num_dense_layers * act_dense_layer
                 + act["head"])

    return ModelCosts(
        params_per_expert=per_expert,
        params_router=router,
        params_shared_experts=shared,
        params_moe_block=moe_block,
        params_attention=attention,
        params_dense_mlp=dense_mlp,
        params_norms_per_layer=norms,
        params_embedding=embedding,
        params_lm_head=lm_head,
        params_final_norm=final_norm,
        params_total=total,
        params_routed_experts=routed,
        params_dense=total - routed,
        params_active=active,
        flops_attention_proj=f_attn_proj,
        flops_attention_scores=f_attn_scores,
        flops_per_assignment=f_assignment,
        flops_routed_experts=f_routed,
        flops_shared_experts=f_shared,
        flops_router=f_router,
        flops_dense_mlp=f_dense_mlp,
        flops_lm_head=f_lm_head,
        flops_fwd_moe_layer=f_moe_layer,
        flops_fwd_dense_layer=f_dense_layer,
        flops_fwd_per_token=f_fwd,
        flops_train_per_token=f_train,
        model_flops_per_step=f_train * c.tokens_per_step,
        bytes_per_assignment=d * b,
        act_bytes_per_token_attention=act["attention"],
        act_bytes_per_token_moe_local=act["moe_local"],
        act_bytes_per_assignment=act["assignment"],
        act_bytes_per_token_dense_mlp=act["dense_mlp"],
        act_bytes_per_token_moe_layer=act_moe_layer,
        act_bytes_per_token_head=act["head"],
        act_bytes_per_token=act_total,
    )


def _activation_bytes(c: ModelConfig) -> dict[str, int]:
    """Bytes saved for backward per token, by block: an explicit count of the tensors kept.

    Assumes no activation recomputation, activations in ``c.dtype`` (b bytes), no dropout, and a
    fused (FlashAttention-style) attention kernel that keeps Q, K, V, its output and one fp32
    log-sum-exp per head, never the seq_len x seq_len score matrix. With those assumptions,
    Korthikanti et al. (2022)'s 34 * d_model + 5 * num_heads * seq_len bytes per token and layer
    loses its quadratic term; we count tensor by tensor instead, since MoE layers do not have
    their 4 * d_model MLP.

    Norm inputs are the residual stream, which stays fp32 (the runtime keeps fp32 weights and
    computes under bf16 autocast), each with an fp32 rstd: 4 d + 4 bytes per norm. Each linear
    layer that reads a norm's output keeps its own bf16 copy of it. Measured per module on an H100
    with saved_tensors_hooks (scripts/device/probe_saved.py, docs/benchmarks.md).

    attention:  4 d + 4 (norm input, rstd) + [2 d (the norm output cast for wq and for wkv)
                + (H + 2 H_kv) hd (q, k, v) + H hd (output)] x b + 4 H (log-sum-exp)
    moe_local:  4 d + 4 (norm input, rstd) + d b (router input) + 4 E (fp32 router probs)
                + per shared expert: (m + 1) f + d (up/gate output, activation output, output) [x b]
    assignment: d (expert input) + m f (up/gate output) + f (activation output) + d (expert
                output, kept for the gate weight's gradient) [x b]; m = 2 for swiglu, else 1
    dense_mlp:  4 d + 4 (norm input, rstd) + [m d (the norm output cast for w1, and w3 for
                swiglu) + (m + 1) f_dense] x b (by the same rule; no dense layer was measured)
    head:       4 d + 4 (final norm input, rstd) + d b: the LM head and its loss run in chunks with
                the gradient made in the forward (``runtime.loss``), which keeps the head input's
                gradient (d b) and, once per rank, the head weight's (``memory.memory_per_gpu``);
                no logits outlive their chunk. (The unchunked ``F.cross_entropy`` this replaced kept
                12 V more at its peak, measured on an H100 with scripts/device/probe_memory.py.)
    """
    d, b, f = c.d_model, c.dtype_bytes, c.d_ff
    m = mlp_matrices(c.activation) - 1  # tensors out of the up (and gate) projection
    norm = _FP32_BYTES * (d + 1)  # an fp32 norm input and its rstd
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    return {
        "attention": (norm + b * (2 * d + q_width + 2 * kv_width + q_width)
                      + _FP32_BYTES * c.num_heads),
        "moe_local": (norm + b * d + _FP32_BYTES * c.num_experts
                      + c.num_shared_experts * b * ((m + 1) * f + d)),
        "assignment": b * (d + m * f + f + d),
        "dense_mlp": norm + b * (m * d + (m + 1) * c.dense_d_ff) if c.num_dense_layers else 0,
        "head": norm + b * d,
    }


# --- the run settings' extra work (``--recompute``, ``--optimizer-sharding``) --------------------

def recompute_flops_per_token(costs: ModelCosts, config: ModelConfig, recompute: str) -> dict[str, float]:
    """Forward FLOPs per token that backward repeats, by where they run: ``dense`` (attention,
    router, shared experts and dense MLPs, on the token's rank: per MoE layer for "moe_dense",
    per dense layer for "dense_layer") and ``per_assignment`` (the routed experts, on the rank
    serving the assignment). ``attention`` repeats attention's projections and scores; ``block``
    the whole block; the LM head is never recomputed."""
    attention = costs.flops_attention_proj + costs.flops_attention_scores
    if recompute == "none":
        return {"moe_dense": 0.0, "dense_layer": 0.0, "per_assignment": 0.0}
    if recompute == "attention":
        return {"moe_dense": attention, "dense_layer": attention, "per_assignment": 0.0}
    if recompute == "block":
        return {"moe_dense": costs.flops_fwd_moe_layer - costs.flops_routed_experts,
                "dense_layer": costs.flops_fwd_dense_layer,
                "per_assignment": float(costs.flops_per_assignment)}
    raise ValueError(f"recompute {recompute!r}: use none, attention or block")


def recompute_exchanges_per_layer(recompute: str) -> int:
    """Extra all-to-all exchanges per MoE layer and step: a block recompute dispatches and
    combines its tokens again (the same splits: the routing is replayed)."""
    return 2 if recompute == "block" else 0


def tp_sharded_params(costs: ModelCosts, config: ModelConfig) -> int:
    """Parameters tensor parallelism splits over a TP group (attention, the dense MLPs, the LM
    head: ``runtime.tensor_parallel``); the rest (embeddings, norms, routers, shared and routed
    experts) each TP rank holds whole."""
    c = config
    return c.num_layers * costs.params_attention + c.num_dense_layers * costs.params_dense_mlp + costs.params_lm_head


def optimizer_sync_bytes(costs: ModelCosts, config: ModelConfig, optimizer_sharding: str, tp: int = 1) -> float:
    """Bytes of the dense parameters that ZeroRedundancyOptimizer broadcasts from their owners
    after every step (an all-gather of the updated weights, in the storage dtype); 0 unsharded.
    The gradients are still all-reduced whole (ZeRO-1). Under ``tp`` > 1, a rank's: its shards
    of the TP-sharded weights (the mean over TP ranks) and the replicated ones whole, gathered
    over its data-parallel group."""
    if optimizer_sharding == "none":
        return 0.0
    from epplan.workload.memory import storage_bytes
    sharded = tp_sharded_params(costs, config)
    return float((costs.params_dense - sharded + sharded / tp) * storage_bytes(config))
