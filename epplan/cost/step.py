"""The training step outside the MoE layer's exchange, from calibrated rates: per GPU, seconds.

Shape legend: L = MoE layers, G = GPUs.

Each component is FLOPs over a calibrated FLOP/s plus bytes over a calibrated bytes/s
(``epplan.cost.calibration``); the byte counts below are the ones ``epplan calibrate`` divides its
timings by, so that a calibrated shape is reproduced exactly and others scale by their bytes.
Training = forward + backward; ``M`` micro-batches run the same work on 1 / M of the tokens, and
the weights are cast to bf16 once per micro-batch (fp32 weights under bf16 autocast, as
``epplan run`` trains).

    attention     per layer: tokens * 3 * projection FLOPs / gemm rate of each projection
                  + tokens * 3 * score FLOPs / attention rate + norm bytes + projection casts
    moe_dense     per MoE layer: the router's and shared experts' GEMMs, the norm, and the
                  memory-bound routing work (``moe_local_bytes``: router, permutation, combine,
                  the unchunked exchange's local copies)
    experts       per MoE layer and GPU: assignments served * 3 * FLOPs per assignment / the
                  grouped expert rate at the GPU's rows per expert (per micro-batch), + casts
    lm_head_loss  tokens * 3 * LM-head FLOPs / gemm rate + loss bytes + final norm + cast
    embedding     token and position embedding, forward + backward
    dense_layers  models with dense layers: their attention and MLP (the MLP at the grouped
                  expert rate of its shape at all the micro-batch's tokens)
    optimizer     every parameter the GPU holds: norm for clipping, clip, fused AdamW

Byte counts (per step unless said):

    norm       20 d per token per norm: an fp32 RMSNorm reads x and writes y forward, reads x and
               dy and writes dx backward
    cast       16 per parameter per micro-batch: fp32 -> bf16 copy (4 + 2), the bf16 gradient's
               cast back and accumulation into the fp32 gradient (2 + 4 + 4)
    loss       36 V per token: bf16 logits -> fp32 (2 + 4), log-softmax (4 + 4), its backward
               (4 + 4 + 4) and the cast of the gradient to bf16 (4 + 2), plus 4 for the target pick
    moe_local  per token: 24 d k (k assignments, each gathered, exchanged, regrouped and combined
               forward and backward in bf16) + 16 d (the router's fp32 input and its gradient)
    optimizer  40 per parameter: the gradient read for its norm (4), the clip (4 + 4), AdamW
               (parameter, gradient and two moments read, parameter and moments written: 28)
    embedding  24 d per token: two gathers and the sum forward, two scatter-adds backward (fp32)
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epplan.cost.calibration import Calibration
from epplan.workload.config import ModelConfig
from epplan.workload.flops import TRAINING_FLOPS_FACTOR, ModelCosts

COMPONENTS = ("attention", "moe_dense", "experts", "lm_head_loss", "embedding", "optimizer", "dense_layers")


def norm_bytes(tokens: float, d_model: int) -> float:
    return 20.0 * tokens * d_model


def cast_bytes(params: float) -> float:
    return 16.0 * params


def loss_bytes(tokens: float, vocab_size: int) -> float:
    return 36.0 * tokens * vocab_size


def moe_local_bytes(tokens: float, d_model: int, top_k: int) -> float:
    return tokens * (24.0 * d_model * top_k + 16.0 * d_model)


def optimizer_bytes(params: float) -> float:
    return 40.0 * params


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
               micro_batches: int, chunks: int = 0, recompute: str = "none") -> StepParts:
    """Every component of ``COMPONENTS`` for each GPU.

    calibrations: one per GPU (the same object for GPUs of one node type).
    served:       float64[L, G] token-assignments each GPU's experts serve per step.
    experts_held: int64[L, G] experts (replicas) each GPU holds per layer.
    chunks:       0: the unchunked expert path; C >= 1: the overlap path in C chunks (its own
                  measured rate, at 1 / C of the rows per call).
    recompute:    none, attention or block (``epplan.workload.flops.recompute_flops_per_token``):
                  backward repeats the recomputed part's forward, a third of its training time.
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
    rows = expert_rows_per_expert(served, experts_held, micro_batches) / max(chunks, 1)
    path = "chunked" if chunks else "unchunked"
    expert_params_held = experts_held.sum(axis=0) * costs.params_per_expert  # [G]
    by_cal: dict[int, list[int]] = {}
    for g, cal in enumerate(calibrations):
        by_cal.setdefault(id(cal), []).append(g)
    for gpus in by_cal.values():
        cal = calibrations[gpus[0]]
        mem = cal.memory_rate
        # Attention of one layer: projections, scores, its norm, the projections' weight casts.
        proj = sum(2 * k * n / cal.gemm_flops(k, n) for k, n in
                   ((d, q_width), (d, 2 * kv_width), (q_width, d)))
        att = (tokens * f3 * proj
               + tokens * f3 * costs.flops_attention_scores / cal.attention_flops(c.seq_len, c.num_heads,
                                                                                   c.head_dim)
               + norm_bytes(tokens, d) / mem("norm")
               + micro_batches * cast_bytes(costs.params_attention) / mem("cast"))
        attention[gpus] = att * att_scale
        # The MoE layer's own dense work: router (fp32, tiny), shared experts, norm, routing.
        shared = costs.flops_shared_experts
        moe = (norm_bytes(tokens, d) / mem("norm")
               + moe_local_bytes(tokens, d, c.top_k) / mem("moe_local"))
        if shared:
            moe += tokens * f3 * shared / cal.expert_flops(d, c.num_shared_experts * c.d_ff, c.activation,
                                                           tokens / micro_batches)
        moe_dense[gpus] = moe * block_scale
        for g in gpus:
            for li in range(num_layers):
                rate[li, g] = cal.expert_flops(d, c.d_ff, c.activation, max(rows[li, g], 1.0), path)
        experts[:, gpus] = block_scale * served[:, gpus] * costs.flops_per_assignment * f3 / rate[:, gpus]
        experts[:, gpus] += (micro_batches * cast_bytes(experts_held[:, gpus] * costs.params_per_expert)
                             / mem("cast"))
        lm_head[gpus] = (tokens * f3 * costs.flops_lm_head / cal.gemm_flops(d, c.vocab_size)
                         + loss_bytes(tokens, c.vocab_size) / mem("loss")
                         + norm_bytes(tokens, d) / mem("norm")
                         + micro_batches * cast_bytes(costs.params_lm_head) / mem("cast"))
        embedding[gpus] = embedding_bytes(tokens, d) / mem("embedding")
        optimizer[gpus] = optimizer_bytes(costs.params_dense + expert_params_held[gpus]) / mem("optimizer")
    # Dense layers (models with num_dense_layers) count as attention + a dense MLP each; their
    # MLP runs at the shared-expert rate of its shape.
    dense_mlp = np.zeros(num_gpus)
    if c.num_dense_layers:
        for gpus in by_cal.values():
            cal = calibrations[gpus[0]]
            dense_mlp[gpus] = c.num_dense_layers * (
                tokens * f3 * costs.flops_dense_mlp / cal.expert_flops(d, c.dense_d_ff, c.activation,
                                                                     tokens / micro_batches)
                + norm_bytes(tokens, d) / cal.memory_rate("norm"))
    return StepParts(attention=np.broadcast_to(attention, (num_layers, num_gpus)).copy(),
                     moe_dense=np.broadcast_to(moe_dense, (num_layers, num_gpus)).copy(),
                     experts=experts, lm_head_loss=lm_head, embedding=embedding, optimizer=optimizer,
                     dense_layers=c.num_dense_layers * attention + dense_mlp, expert_rate=rate)
