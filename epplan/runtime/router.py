"""Top-k token router with an auxiliary balancing loss, a selection bias and an optional capacity.

Shape legend:
    N = tokens, D = d_model, E = experts, k = experts per token (top_k), A = N * k assignments.

An *assignment* is one (token, expert) pair; the flat assignment order is token-major, slot-minor
(assignment ``a`` is token ``a // k``, slot ``a % k``). Everything downstream (capacity, replica
splits in expert parallelism) processes assignments in this order, so routing is deterministic.

Two balancing mechanisms, usable together:
  * the Switch/GShard auxiliary loss ``coef * E * sum_e f_e * P_e`` (f_e = fraction of assignments
    that selected e, P_e = mean router probability of e), added to the training loss;
  * DeepSeek-V3's aux-loss-free bias: a per-expert buffer added to the probabilities for
    *selection only* (gate weights come from the unbiased probabilities), nudged between steps by
    ``bias += rate * sign(mean_load - load)``.

The module never talks to other processes. Expert parallelism sets ``reduce_load`` to a function
that sums a per-expert count tensor over all ranks, so that f_e and the bias update see the load
of the global batch, exactly as the single-device model would.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from epplan.runtime.recompute import is_replaying, record_or_replay


def count_keys(key: torch.Tensor, num_keys: int) -> torch.Tensor:
    """int64 (num_keys,): how often each value in [0, num_keys) occurs in key (int64 (A,)).

    ``torch.bincount`` on CUDA reads the maximum back to the host to size its output (a device
    sync); a scatter-add into a fixed size does not.
    """
    return torch.zeros(num_keys, dtype=torch.int64, device=key.device).scatter_add_(
        0, key, torch.ones_like(key))


def position_in_expert(flat_expert: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Index of each assignment among the assignments to the same expert, in flat order.

    flat_expert: int64[A], expert of each assignment, -1 for none.
    Returns int64[A]; entries for -1 assignments are meaningless.
    """
    key = torch.where(flat_expert >= 0, flat_expert, num_experts)  # (A,) -1 sorts last
    order = torch.argsort(key, stable=True)  # (A,) grouped by expert, flat order inside a group
    num_per_key = count_keys(key, num_experts + 1)  # (E + 1,)
    start = torch.cumsum(num_per_key, 0) - num_per_key  # (E + 1,) first sorted row of each expert
    sorted_pos = torch.arange(key.numel(), device=key.device) - start[key[order]]
    return torch.empty_like(sorted_pos).scatter_(0, order, sorted_pos)


class Router(nn.Module):
    """Linear gate -> softmax -> top-k with renormalised weights.

    capacity_factor: None for dropless routing; otherwise each expert takes at most
        ``ceil(capacity_factor * A / E)`` assignments of a forward call (first come, in flat
        order) and the rest are dropped (index -1, counted in ``num_dropped``). With expert
        parallelism the capacity applies per rank, to that rank's tokens.
    """

    def __init__(self, dim: int, num_experts: int, top_k: int, aux_loss_coef: float = 0.0,
                 bias_rate: float = 0.0, capacity_factor: float | None = None) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be in 1..num_experts={num_experts}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_coef = aux_loss_coef
        self.bias_rate = bias_rate
        self.capacity_factor = capacity_factor
        self.gate = nn.Linear(dim, num_experts, bias=False)
        # Selection-only bias (part of the training state, so it is checkpointed).
        self.register_buffer("bias", torch.zeros(num_experts, dtype=torch.float32))
        # Assignments per expert since the last bias update, and assignments dropped by capacity.
        self.register_buffer("load", torch.zeros(num_experts, dtype=torch.float32), persistent=False)
        self.register_buffer("num_dropped", torch.zeros((), dtype=torch.int64), persistent=False)
        self.reduce_load: Callable[[torch.Tensor], torch.Tensor] | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, D) -> topk_idx int64 (N, k) with -1 for dropped, topk_weight (N, k), aux_loss ().

        topk_weight is in the router's compute dtype (fp32, or fp64 for an fp64 model).
        """
        num_tokens = x.shape[0]
        # The gate runs in at least fp32, autocast or not (as Megatron-Core's and torchtitan's
        # routers do): small logit errors flip top-k choices.
        compute_dtype = torch.promote_types(x.dtype, torch.float32)
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.to(compute_dtype), self.gate.weight.to(compute_dtype))  # (N, E)
            probs = logits.softmax(dim=-1)  # (N, E)
        # A block recompute replays the forward's selection (epplan.runtime.recompute).
        topk_idx = record_or_replay(self, "topk_idx", lambda: self._select(probs))  # (N, k)
        topk_weight = probs.gather(1, topk_idx)  # (N, k)
        topk_weight = topk_weight / topk_weight.sum(dim=-1, keepdim=True)

        # Load and f_e count what the router selected, before any capacity drop.
        num_per_expert = count_keys(topk_idx.reshape(-1), self.num_experts)  # (E,)
        if not is_replaying():
            with torch.no_grad():
                self.load += num_per_expert.to(self.load.dtype)
        aux_loss = probs.new_zeros(())
        if self.aux_loss_coef > 0:
            counts = num_per_expert.to(compute_dtype)
            if self.reduce_load is not None:
                counts = record_or_replay(self, "load", functools.partial(self.reduce_load, counts))
            f = counts / counts.sum()  # (E,) fraction of assignments, no gradient
            aux_loss = self.aux_loss_coef * self.num_experts * (f * probs.mean(dim=0)).sum()

        if self.capacity_factor is not None:
            capacity = math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
            flat = topk_idx.reshape(-1)  # (A,)
            is_kept = position_in_expert(flat, self.num_experts) < capacity  # (A,)
            if not is_replaying():
                with torch.no_grad():
                    self.num_dropped += (~is_kept).sum()
            topk_idx = torch.where(is_kept, flat, -1).view(num_tokens, self.top_k)
        return topk_idx, topk_weight, aux_loss

    def _select(self, probs: torch.Tensor) -> torch.Tensor:
        """int64 (N, k): the top-k experts by probability plus the selection-only bias."""
        scores = probs.detach() + self.bias.to(probs.dtype)  # (N, E)
        return scores.topk(self.top_k, dim=-1).indices

    @torch.no_grad()
    def update_bias(self) -> None:
        """Move the selection bias toward balance by ``bias_rate`` per expert; reset ``load``.

        With ``reduce_load`` set this is collective: every rank must call it.
        """
        load = self.load.clone()
        if self.reduce_load is not None:
            load = self.reduce_load(load)
        self.bias += self.bias_rate * torch.sign(load.mean() - load).to(self.bias.dtype)
        self.load.zero_()
