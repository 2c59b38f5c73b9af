"""The training step outside the MoE layer's exchange, from calibrated rates: per GPU, seconds.

Shape legend: L = MoE layers, G = GPUs.

Each component is FLOPs over a calibrated FLOP/s plus bytes over a calibrated bytes/s
(``epplan.cost.calibration``); the byte counts below are the ones ``epplan calibrate`` divides its
timings by, so that a calibrated shape is reproduced exactly and others scale by their bytes.
Training = forward + backward; ``M`` micro-batches run the same work on 1 / M of the tokens.
Weights are fp32 under bf16 autocast, as ``epplan run`` trains, and the residual stream is bf16:
the attention projections are cast by autocast once per micro-batch; the experts and the LM head
keep a bf16 copy, which the optimizer step rewrites in its pass (``epplan.train.adamw``), and
accumulate fp32 gradients straight from their GEMMs (``epplan.runtime.experts``,
``epplan.runtime.loss``).

    attention     per layer: tokens * 3 * (projection + score FLOPs) / the attention half's
                  measured rate at this model's shape (``attention_block``); for a shape not
                  calibrated, composed: each projection at its gemm rate, the scores at the
                  attention rate, norm bytes and projection casts
    moe_dense     per MoE layer: the router's and shared experts' GEMMs, the norm, and the
                  memory-bound routing work (``moe_local_bytes``: router, permutation, combine,
                  the unchunked exchange's local copies) at the rate measured at this model's
                  shape (else the first calibrated model's), with the shape's measured fixed
                  cost once per micro-batch
    experts       per MoE layer and GPU: assignments served * 3 * FLOPs per assignment / the
                  grouped expert rate at the GPU's rows per expert (per micro-batch), + master
                  weight bytes
    lm_head_loss  tokens * 3 * LM-head FLOPs / the chunked head's measured rate at this model's
                  shape (``lm_head``) + final norm + the weight gradient's accumulation over
                  micro-batches; for a shape not calibrated, composed: the head's GEMMs at the
                  gemm rate, loss bytes, final norm, head bytes
    embedding     token and position embedding, forward + backward
    dense_layers  models with dense layers: their attention and MLP (the MLP at the grouped
                  expert rate of its shape at all the micro-batch's tokens)
    optimizer     every parameter the GPU holds: norm for clipping, AdamW with the clip and the
                  copies' re-cast in its pass; the step's fixed cost at the model's number of
                  parameter tensors (``optimizer_fixed``: launches, host round trips): its part
                  up to the gradient norm's host sync added, the rest or the passes over large
                  tensors, whichever is longer

Under ``--tp t`` (``epplan.workload.tensor_parallel``) a rank's FLOPs are its group's over t, so
those of its own tokens as without TP, at the shard's shapes: attention's projections t times the
rows at 1 / t of the width, its scores at 1 / t of the heads (the measured half at the unsharded
shape, scaled by the composed time of the shard over that of the whole), the dense MLPs and the
LM head likewise (its chunked, vocab-parallel loss on the group's tokens and 1 / t of the
vocabulary); casts and the optimizer are the shards'. The embeddings run on the group's tokens
(replicated; the first block cuts its input). With ``expert_tp`` a rank computes its hidden
slice (d_ff / t) of every assignment its group serves.

Byte counts (per step unless said):

    norm       10 d per token per norm: a bf16 RMSNorm reads x and writes y forward, reads x and
               dy and writes dx backward
    cast       16 per parameter per micro-batch: fp32 -> bf16 copy (4 + 2), the bf16 gradient's
               cast back and accumulation into the fp32 gradient (2 + 4 + 4)
    master     6 M - 4 per expert parameter: the weight-gradient GEMMs writing fp32 instead of
               bf16 (+2 on the first micro-batch, +6 on each later one, which reads and writes the
               fp32 gradient); at the cast rate (the bf16 copy is the optimizer's)
    head       the LM head's weight, per parameter: per micro-batch its fp32 gradient written by
               the first chunk's GEMM and read and written by each later one's (4 + 8 (C - 1),
               C = chunks of ``schedule.LOSS_CHUNK_TOKENS``), scaled (8), and accumulated from the
               second micro-batch on (12); at the cast rate. With the head's measured rate, which
               includes one micro-batch's, only the accumulation (12 (M - 1))
    loss       6 V per token: a chunk's bf16 logits read twice (log-sum-exp, then the softmax)
               and their bf16 gradient written
    moe_local  per token: 24 d k (k assignments, each gathered, exchanged, regrouped and combined
               forward and backward in bf16) + 16 d (the router's fp32 input and its gradient)
    optimizer  32 per parameter: the gradient read for its norm (4), AdamW (parameter, gradient
               and two moments read, parameter and moments written: 28) with the clip scale in
               its pass; + 2 per parameter with a bf16 copy (the experts, the LM head), written
               in the same pass; 24 with bf16 moments (``optimizer_state_dtype``)
    embedding  24 d per token: two gathers and the sum forward, two scatter-adds backward (fp32)
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from epplan.cost.calibration import Calibration
from epplan.schedule import LOSS_CHUNK_TOKENS as CHUNK_TOKENS
from epplan.workload.config import ModelConfig
from epplan.workload.flops import TRAINING_FLOPS_FACTOR, ModelCosts, tp_sharded_params
from epplan.workload.memory import state_bytes, tp_group_sum

COMPONENTS = ("attention", "moe_dense", "experts", "lm_head_loss", "embedding", "optimizer", "dense_layers")


def norm_bytes(tokens: float, d_model: int) -> float:
    return 10.0 * tokens * d_model


def cast_bytes(params: float) -> float:
    return 16.0 * params


def master_bytes(params: float, micro_batches: int) -> float:
    return (6.0 * micro_batches - 4.0) * params


def head_bytes(params: float, micro_batches: int, tokens_per_micro_batch: float) -> float:
    chunks = max(1, math.ceil(tokens_per_micro_batch / CHUNK_TOKENS))
    return params * (micro_batches * (4.0 + 8.0 * (chunks - 1) + 8.0) + head_accumulation(micro_batches))


def head_accumulation(micro_batches: int) -> float:
    """Bytes per LM-head parameter of accumulating its gradient over micro-batches (12 each from
    the second on)."""
    return 12.0 * (micro_batches - 1)


def loss_bytes(tokens: float, vocab_size: int) -> float:
    return 6.0 * tokens * vocab_size


def moe_local_bytes(tokens: float, d_model: int, top_k: int) -> float:
    return tokens * (24.0 * d_model * top_k + 16.0 * d_model)


def optimizer_bytes(params: float, copied: float = 0.0, moment_bytes: int = 4) -> float:
    """The norm's read (4) and AdamW's (parameter, gradient, both moments read; parameter and
    moments written) per parameter, moments of ``moment_bytes`` each, and 2 per bf16 copy."""
    return (16.0 + 4.0 * moment_bytes) * params + 2.0 * copied


def num_param_tensors(config: ModelConfig) -> int:
    """Parameter tensors of ``config``'s model on one GPU (``epplan.runtime.model.Transformer``):
    embeddings, final norm, LM head; per layer two norms and three projections, and a router with
    stacked expert weights (and a shared MLP) or a dense MLP."""
    mlp = 3 if config.activation == "swiglu" else 2
    moe = 1 + mlp + (mlp if config.num_shared_experts else 0)
    dense = config.num_dense_layers
    return 4 + config.num_layers * 5 + dense * mlp + (config.num_layers - dense) * moe


def embedding_bytes(tokens: float, d_model: int) -> float:
    return 24.0 * tokens * d_model


@dataclass(frozen=True)
class StepParts:
    """Seconds per optimizer step of each component on each GPU.

    attention, moe_dense, experts: float64[L, G] (experts: the grouped GEMMs of the assignments
    the GPU serves; attention and moe_dense: the GPU's own tokens); lm_head_loss, embedding,
    optimizer: float64[G]. ``expert_rate``: float64[L, G] FLOP/s used for ``experts``.
    """

    attention: np.ndarray
    moe_dense: np.ndarray
    experts: np.ndarray
    lm_head_loss: np.ndarray
    embedding: np.ndarray
    optimizer: np.ndarray
    dense_layers: np.ndarray
    expert_rate: np.ndarray

    def per_gpu(self) -> dict[str, np.ndarray]:
        """float64[G] per component, layers summed."""
        return {"attention": self.attention.sum(axis=0), "moe_dense": self.moe_dense.sum(axis=0),
                "experts": self.experts.sum(axis=0), "lm_head_loss": self.lm_head_loss,
                "embedding": self.embedding, "optimizer": self.optimizer, "dense_layers": self.dense_layers}


def expert_rows_per_expert(served: np.ndarray, experts_held: np.ndarray, micro_batches: int) -> np.ndarray:
    """float64[L, G]: rows per local expert of one grouped GEMM call (per micro-batch)."""
    return served / np.maximum(experts_held, 1) / micro_batches


def step_parts(config: ModelConfig, costs: ModelCosts, calibrations: list[Calibration],
               tokens_per_gpu: float, served: np.ndarray, experts_held: np.ndarray,
               micro_batches: int, chunks: int = 0, recompute: str = "none", tp: int = 1,
               expert_tp: bool = False) -> StepParts:
    """Every component of ``COMPONENTS`` for each GPU.

    calibrations: one per GPU (the same object for GPUs of one node type).
    served:       float64[L, G] token-assignments each GPU's experts serve per step.
    experts_held: int64[L, G] experts (replicas) each GPU holds per layer; under ``expert_tp`` the
                  experts of its TP group (``tensor_parallel.expert_tp_group_experts``).
    chunks:       0: the unchunked expert path; C >= 1: the overlap path in C chunks (its own
                  measured rate, at 1 / C of the rows per call).
    recompute:    none, attention or block (``epplan.workload.flops.recompute_flops_per_token``):
                  backward repeats the recomputed part's forward, a third of its training time.
    tp, expert_tp:    the TP layout (module docstring); tokens_per_gpu stays a rank's own tokens.
    """
    c, f3 = config, TRAINING_FLOPS_FACTOR
    again = 1.0 + 1.0 / f3  # a recomputed part: its forward once more
    att_scale = again if recompute in ("attention", "block") else 1.0
    block_scale = again if recompute == "block" else 1.0
    num_layers, num_gpus = served.shape
    d = c.d_model
    q_width, kv_width = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    tokens = float(tokens_per_gpu)
    attention = np.zeros(num_gpus)
    moe_dense = np.zeros(num_gpus)
    lm_head = np.zeros(num_gpus)
    embedding = np.zeros(num_gpus)
    optimizer = np.zeros(num_gpus)
    experts = np.zeros((num_layers, num_gpus))
    rate = np.zeros((num_layers, num_gpus))
    d_ff = c.d_ff
    if expert_tp:  # every rank: its hidden slice of all the group's assignments and replicas
        served = tp_group_sum(served, tp) / tp
        rows = expert_rows_per_expert(served * tp, experts_held, micro_batches) / max(chunks, 1)
        experts_held, d_ff = experts_held / tp, c.d_ff // tp
    else:
        rows = expert_rows_per_expert(served, experts_held, micro_batches) / max(chunks, 1)
    path = "chunked" if chunks else "unchunked"
    expert_params_held = experts_held.sum(axis=0) * costs.params_per_expert  # [G]
    dense_params = costs.params_dense - tp_sharded_params(costs, c) * (1 - 1 / tp)
    by_cal: dict[int, list[int]] = {}
    for g, cal in enumerate(calibrations):
        by_cal.setdefault(id(cal), []).append(g)
    for gpus in by_cal.values():
        cal = calibrations[gpus[0]]
        mem = cal.memory_rate
        # Attention of one layer: the whole half as measured at this shape, else composed of
        # projections, scores, its norm and the projections' weight casts.
        half = cal.attention_block_flops(d, c.seq_len, c.num_heads, c.num_kv_heads, c.head_dim)

        def composed(t: int) -> float:
            """Attention's GEMMs and scores of a rank's tokens at TP degree t: t times the rows
            at 1 / t of the width (so the same FLOPs), the scores over 1 / t of the heads."""
            proj = sum(2 * k * n / cal.gemm_flops(k // kt, n // nt) for k, n, kt, nt in
                       ((d, q_width, 1, t), (d, 2 * kv_width, 1, t), (q_width, d, t, 1)))
            return tokens * f3 * (proj + costs.flops_attention_scores
                                  / cal.attention_flops(c.seq_len, c.num_heads // t, c.head_dim))

        if half is not None:
            scale = composed(tp) / composed(1) if tp > 1 else 1.0
            att = (scale * tokens * f3 * (costs.flops_attention_proj + costs.flops_attention_scores) / half
                   + (micro_batches - 1) * cast_bytes(costs.params_attention / tp) / mem("cast"))
        else:
            att = (composed(tp) + norm_bytes(tokens, d) / mem("norm")
                   + micro_batches * cast_bytes(costs.params_attention / tp) / mem("cast"))
        attention[gpus] = att * att_scale
        # The MoE layer's own dense work: router (fp32, tiny), shared experts, norm, routing.
        shared = costs.flops_shared_experts
        # the routing work: a fixed cost per call (one per micro-batch) and its bytes
        moe = (norm_bytes(tokens, d) / mem("norm") + micro_batches * cal.moe_local_seconds(
            d, c.num_experts, c.top_k, moe_local_bytes(tokens / micro_batches, d, c.top_k)))
        if shared:
            moe += tokens * f3 * shared / cal.expert_flops(d, c.num_shared_experts * c.d_ff, c.activation,
                                                           tokens / micro_batches)
        moe_dense[gpus] = moe * block_scale
        rate[:, gpus] = cal.expert_flops_at(d, d_ff, c.activation, np.maximum(rows[:, gpus], 1.0), path)
        experts[:, gpus] = block_scale * served[:, gpus] * costs.flops_per_assignment * f3 / rate[:, gpus]
        experts[:, gpus] += (master_bytes(experts_held[:, gpus] * costs.params_per_expert, micro_batches)
                             / mem("cast"))
        head_rate = cal.lm_head_flops(d, c.vocab_size) if tp == 1 else None
        if head_rate is not None:  # the chunked head as run, one micro-batch's weight gradient in it
            lm_head[gpus] = (tokens * f3 * costs.flops_lm_head / head_rate
                             + norm_bytes(tokens, d) / mem("norm")
                             + head_accumulation(micro_batches) * costs.params_lm_head / mem("cast"))
        else:  # under TP: the group's tokens over the rank's V / t rows (the same bytes of logits)
            lm_head[gpus] = (tokens * f3 * costs.flops_lm_head / cal.gemm_flops(d, c.vocab_size // tp)
                             + loss_bytes(tokens * tp, c.vocab_size / tp) / mem("loss")
                             + norm_bytes(tokens, d) / mem("norm")
                             + head_bytes(costs.params_lm_head / tp, micro_batches, tokens * tp / micro_batches)
                             / mem("cast"))
        embedding[gpus] = embedding_bytes(tokens * tp, d) / mem("embedding")
        copied = expert_params_held[gpus] + costs.params_lm_head / tp  # the weights with a bf16 copy
        # The fixed cost is host time (launches, round trips) measured where the bytes are nil.
        # Up to the gradient norm's host sync the device waits for it; after, the device's passes
        # run under the rest: that part and the passes, whichever is longer (calls G and H, one
        # H200: the whole fixed cost added, medium's optimizer came out +43-50 %; the whole under
        # the passes, -33 to -36 % in calls Q and R; docs/benchmarks.md).
        fixed = cal.optimizer_fixed_seconds(num_param_tensors(c))
        before_sync = cal.optimizer_before_sync_seconds(num_param_tensors(c))
        optimizer[gpus] = before_sync + np.maximum(
            optimizer_bytes(dense_params + expert_params_held[gpus], copied, state_bytes(c)) / mem("optimizer"),
            fixed - before_sync)
    # Dense layers (models with num_dense_layers) count as attention + a dense MLP each; their
    # MLP runs at the shared-expert rate of its shape.
    dense_mlp = np.zeros(num_gpus)
    if c.num_dense_layers:
        for gpus in by_cal.values():
            cal = calibrations[gpus[0]]
            dense_mlp[gpus] = c.num_dense_layers * (
                tokens * f3 * costs.flops_dense_mlp / cal.expert_flops(d, c.dense_d_ff // tp, c.activation,
                                                                     tokens * tp / micro_batches)
                + norm_bytes(tokens, d) / cal.memory_rate("norm"))
    return StepParts(attention=np.broadcast_to(attention, (num_layers, num_gpus)).copy(),
                     moe_dense=np.broadcast_to(moe_dense, (num_layers, num_gpus)).copy(),
                     experts=experts, lm_head_loss=lm_head, embedding=embedding, optimizer=optimizer,
                     dense_layers=c.num_dense_layers * attention + dense_mlp, expert_rate=rate)
