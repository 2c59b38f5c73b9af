"""A decoder-only MoE transformer on one device, built from a ``ModelConfig``.

Shape legend:
    B = batch (sequences), T = sequence length, D = d_model, V = vocab,
    H = attention heads, Hkv = key/value heads (GQA when Hkv < H), Dh = head dim,
    N = B * T tokens, E = routed experts, k = experts per token, F = MLP hidden.

Blocks ``[0, num_dense_layers)`` carry a dense MLP, the rest a ``MoE`` (router + routed experts +
optional shared experts). This file never imports ``torch.distributed``: expert parallelism is
applied afterwards by ``epplan.runtime.expert_parallel.parallelize_experts``, which swaps each
``MoE.experts`` for a distributed module with the same call signature, and tensor parallelism by
``epplan.runtime.tensor_parallel.parallelize_tensor``.

Parameters are created in fp32 (cast the model with ``.to(dtype)`` for bf16 or fp64). Under
autocast (bf16 on GPUs, as ``epplan run`` trains) the residual stream is in the autocast dtype
from the embeddings on: the blocks' inputs, outputs and their gradients are bf16, the norms
compute their statistics in fp32, the loss is computed in fp32. The router computes in at least
fp32 whatever the model dtype.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from epplan.runtime.experts import GroupedExperts, mlp
from epplan.runtime.loss import linear_cross_entropy
from epplan.runtime.recompute import is_replaying
from epplan.runtime.router import Router
from epplan.workload.config import ModelConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # One fused kernel each way on CUDA (statistics in fp32 for bf16 inputs); the composite
        # of upcast, square, mean, rsqrt and casts took about 5 % of a seed-spec block step.
        # In x's dtype whatever autocast would choose: a bf16 residual stream stays bf16.
        with torch.autocast(x.device.type, enabled=False):
            return F.rms_norm(x, (x.shape[-1],), self.weight.to(x.dtype), self.eps)


# Fused attention kernels in order of preference (the first that supports the inputs runs). cuDNN
# first: at the seed spec's 8 x 32 heads x 10,000 tokens, forward + backward took 45.5 ms with
# cuDNN against 75.2 ms with FlashAttention-2 on H100 and H200 (docs/benchmarks.md); torch's own
# order puts FlashAttention-2 first.
SDPA_BACKENDS = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                 SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]


class Attention(nn.Module):
    """Causal multi-head attention with grouped key/value heads."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.wq = nn.Linear(config.d_model, config.num_heads * config.head_dim, bias=False)
        self.wkv = nn.Linear(config.d_model, 2 * config.num_kv_heads * config.head_dim, bias=False)
        self.wo = nn.Linear(config.num_heads * config.head_dim, config.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, self.num_heads, self.head_dim).transpose(1, 2)  # (B, H, T, Dh)
        # wkv's output features are (Hkv, 2, Dh): each head's key beside its value, so that a
        # contiguous split of the features (tensor parallelism's colwise shard) keeps whole heads.
        k, v = self.wkv(x).view(B, T, self.num_kv_heads, 2, self.head_dim).unbind(3)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, Dh)
        if self.num_kv_heads != self.num_heads:
            rep = self.num_heads // self.num_kv_heads
            k = k.repeat_interleave(rep, dim=1)  # (B, H, T, Dh)
            v = v.repeat_interleave(rep, dim=1)
        with sdpa_kernel(SDPA_BACKENDS, set_priority=True):
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, H, T, Dh)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))  # (B, T, D)


class MLP(nn.Module):
    """Dense MLP with the experts' layout: w1, w3 (D, F), w2 (F, D)."""

    def __init__(self, dim: int, hidden: int, activation: str) -> None:
        super().__init__()
        self.activation = activation
        self.w1 = nn.Parameter(torch.randn(dim, hidden) * 0.02)
        self.w2 = nn.Parameter(torch.randn(hidden, dim) * 0.02)
        self.w3 = nn.Parameter(torch.randn(dim, hidden) * 0.02) if activation == "swiglu" else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return mlp(x, self.w1, self.w2, self.w3, self.activation)  # (..., D)


class MoE(nn.Module):
    """Router -> routed experts (weighted sum of k) + shared experts (every token)."""

    def __init__(self, config: ModelConfig, capacity_factor: float | None = None,
                 expert_impl: str = "grouped") -> None:
        super().__init__()
        self.router = Router(config.d_model, config.num_experts, config.top_k,
                             aux_loss_coef=config.router_aux_loss_coef,
                             bias_rate=config.router_bias_rate, capacity_factor=capacity_factor)
        self.experts = GroupedExperts(config.num_experts, config.d_model, config.d_ff,
                                      config.activation, impl=expert_impl)
        # num_shared_experts MLPs of hidden d_ff, summed, are one MLP of hidden n * d_ff.
        self.shared = (MLP(config.d_model, config.num_shared_experts * config.d_ff, config.activation)
                       if config.num_shared_experts else None)
        self.aux_loss: torch.Tensor | None = None  # of the last forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        x = x.reshape(B * T, D)  # (N, D)
        topk_idx, topk_weight, aux_loss = self.router(x)  # (N, k), (N, k), ()
        if not is_replaying():  # a recompute's copy is not the loss's term
            self.aux_loss = aux_loss
        y = self.experts(x, topk_idx, topk_weight)  # (N, D)
        if self.shared is not None:
            y = y + self.shared(x)
        return y.view(B, T, D)


class Block(nn.Module):
    def __init__(self, config: ModelConfig, is_moe: bool, capacity_factor: float | None,
                 expert_impl: str) -> None:
        super().__init__()
        self.attn_norm = RMSNorm(config.d_model)
        self.attn = Attention(config)
        self.ffn_norm = RMSNorm(config.d_model)
        self.ffn = (MoE(config, capacity_factor, expert_impl) if is_moe
                    else MLP(config.d_model, config.dense_d_ff, config.activation))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x))  # (B, T, D)
        return x + self.ffn(self.ffn_norm(x))


class Transformer(nn.Module):
    """Token + learned position embeddings, blocks, final norm, LM head (untied).

    ``fused_loss``: with targets, the LM head and the loss run in chunks of tokens without the
    full logits (``epplan.runtime.loss``; forward then returns None for the logits). Off by
    default; ``epplan run`` turns it on. ``head_loss``: that loss, (h (B, T, D), targets (B, T))
    -> (); None: ``linear_cross_entropy`` over ``lm_head.weight`` (tensor parallelism sets a
    vocab-parallel one).
    """

    def __init__(self, config: ModelConfig, capacity_factor: float | None = None,
                 expert_impl: str = "grouped") -> None:
        super().__init__()
        self.config = config
        self.tok_emb = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_emb = nn.Embedding(config.seq_len, config.d_model)
        self.layers = nn.ModuleList(
            Block(config, i >= config.num_dense_layers, capacity_factor, expert_impl)
            for i in range(config.num_layers))
        self.norm = RMSNorm(config.d_model)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.fused_loss = False
        self.head_loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Embedding)):
                nn.init.normal_(module.weight, std=0.02)

    def moe_layers(self) -> list[MoE]:
        """The MoE modules in layer order (index = MoE layer index, as in a Placement)."""
        return [block.ffn for block in self.layers if isinstance(block.ffn, MoE)]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """idx, targets: int64 (B, T) -> logits (B, T, V) (None with ``fused_loss`` and targets),
        loss () = mean cross-entropy + aux losses."""
        B, T = idx.shape
        if T > self.config.seq_len:
            raise ValueError(f"sequence length {T} exceeds the model's seq_len {self.config.seq_len}")
        # The positions are 0..T-1: their embeddings are the table's first T rows, a slice, whose
        # backward writes the batch-summed gradient into those rows (no index sort and
        # segment sum of embedding_dense_backward, as the lookup of arange(T) ran).
        x = self.tok_emb(idx) + self.pos_emb.weight[:T]  # (B, T, D)
        device = idx.device.type
        if torch.is_autocast_enabled(device):
            # Under autocast the residual stream and the activations between blocks are in its
            # dtype (bf16), as Megatron-Core and torchtitan train by default; the weights stay
            # fp32 masters and every norm keeps fp32 statistics.
            x = x.to(torch.get_autocast_dtype(device))
        for block in self.layers:
            x = block(x)
        h = self.norm(x)  # (B, T, D)
        if targets is not None and self.fused_loss:
            logits = None
            loss = (self.head_loss(h, targets) if self.head_loss is not None else
                    linear_cross_entropy(h.reshape(B * T, -1), self.lm_head.weight, targets.reshape(-1)))
        else:
            logits = self.lm_head(h)  # (B, T, V)
            if targets is None:
                return logits, None
            logits_hi = logits.to(torch.promote_types(logits.dtype, torch.float32))  # no bf16 softmax
            loss = F.cross_entropy(logits_hi.reshape(B * T, -1), targets.reshape(-1))
        for moe in self.moe_layers():
            loss = loss + moe.aux_loss
        return logits, loss

    @torch.no_grad()
    def update_router_biases(self) -> None:
        """Between optimizer steps: nudge every router's selection bias toward balance."""
        for moe in self.moe_layers():
            moe.router.update_bias()
