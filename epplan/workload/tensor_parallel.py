"""What tensor parallelism (``epplan run --tp t``) changes per rank, for the cost and memory models.

Shape legend: t = TP degree, n = tokens of one rank (its sequence shard), N = t n tokens of its
TP group, d = d_model, V = vocab, G = ranks.

The layout is ``epplan.runtime.tensor_parallel``'s (read its docstring): the ranks form a (dp, tp)
mesh, rank = dp * t + tp, a TP group is t consecutive ranks inside a node; every rank of a group
reads the group's sequences and keeps its sequence shard of the residual stream. Sharded over the
group (DTensor ``Shard``, torch's chunk sizes: ``shard_size``): attention's wq, wkv (output
features) and wo (input features), the dense MLPs' w1, w3 (hidden columns) and w2 (hidden rows),
and the LM head (vocab rows). Replicated: the embeddings, every norm, the MoE layers' router and
shared experts (they see only the rank's own tokens) and, unless ``expert_tp``, the routed
experts. Each rank routes its own n tokens, so the MoE layers' traffic and the assignments a
rank serves are those of a run without TP on the same G ranks.

Sequence parallelism's collectives, per step, over each TP group (``sp_collectives``): an
all-gather before every colwise linear (wq, wkv, the dense MLP, the LM head: DTensor
redistributes Shard(1) -> Replicate for each of them, so wq and wkv gather separately) and a
reduce-scatter after every rowwise one (wo, the dense MLP's w2); backward swaps them. The LM
head's loss is vocab-parallel and chunked (``runtime.loss.vocab_parallel_chunk_loss``): the
final norm's output is all-gathered (its gradient reduce-scattered back) and each chunk
all-gathers two statistics per token (log-sum-exp and target logit, in at least fp32); the
logits are never gathered. Backward all-gathers the first block's input gradient (its forward
only cut the shard). A recomputed attention or block runs its forward collectives once more.
Every gathered or scattered activation travels in the compute dtype: under bf16 autocast the
residual stream, the norms' outputs and the linear layers' outputs are bf16
(``runtime.model``).

With ``expert_tp`` (``epplan.runtime.expert_tensor_parallel``) a TP group holds the union of the
experts the placement gives its ranks and each rank 1 / t of every one (w1, w3 columns, w2 rows):
``expert_tp_held``. The Q_g rows rank g receives in dispatch go to every other rank of its group
and each rank computes its hidden slice of the group's rows, the partial outputs of rank h's rows
go back to h; both are all-to-alls with uneven splits, so g sends h Q_g + Q_h rows per pass,
forward and backward (and once more under block recompute): ``expert_tp_traffic``. A slice's
gradient is summed over the groups that hold the expert (``expert_tp_rings``). The runtime
runs this exchange unchunked (no overlap).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epplan.errors import param, PlacementError
from epplan.workload.config import ModelConfig


def shard_size(n: int, t: int, i: int) -> int:
    """Elements of rank ``i``'s shard of a dimension of ``n`` over ``t`` ranks (DTensor ``Shard``:
    chunks of ceil(n / t), the last ones shorter or empty)."""
    chunk = -(-n // t)
    return max(0, min(n, chunk * (i + 1)) - chunk * i)


def tp_degrees(config: ModelConfig, gpus_per_node: list[int]) -> list[int]:
    """The TP degrees ``epplan run`` accepts for ``config`` on nodes of ``gpus_per_node`` GPUs:
    divisors of every node's GPU count that split the attention and key/value heads."""
    smallest = min(gpus_per_node)
    return [t for t in range(1, smallest + 1)
            if all(n % t == 0 for n in gpus_per_node) and config.num_heads % t == 0
            and config.num_kv_heads % t == 0]


def check_tp(config: ModelConfig, gpus_per_node: list[int], tp: int, expert_tp: bool) -> None:
    """Raise ``PlacementError`` unless ``tp`` (and ``expert_tp``) is a layout ``epplan run`` takes."""
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise PlacementError(f"{param('tp')} must be a positive integer or auto, got {tp!r}")
    if tp == 1:
        if expert_tp:
            raise PlacementError(f"{param('expert_tp')} shards the experts over a TP group; give {param('tp', 2)} or more with it")
        return
    odd = sorted({n for n in gpus_per_node if n % tp})
    if odd:
        raise PlacementError(f"{param('tp', tp)}: TP groups stay inside a node, and nodes of {odd[0]} GPUs do not split "
                             f"into groups of {tp}; use a {param('tp')} that divides the GPUs per node "
                             f"({', '.join(map(str, tp_degrees(config, gpus_per_node)))})")
    for what, n in (("attention heads", config.num_heads), ("key/value heads", config.num_kv_heads)):
        if n % tp:
            raise PlacementError(f"{param('tp', tp)}: the model's {n} {what} do not split over {tp} ranks; "
                                 f"use a {param('tp')} that divides {n}")
    if expert_tp and config.d_ff % tp:
        raise PlacementError(f"{param('expert_tp')} with {param('tp', tp)}: the experts' hidden size {config.d_ff} does not "
                             f"split over {tp} ranks")


def tp_sharded_dim(name: str) -> int | None:
    """The dimension of dense parameter ``name`` (``workload.memory.dense_parameter_shapes``) that
    TP shards, or None for a replicated one."""
    last = name.rsplit(".", 1)[-1]
    if ".attn.wq." in name or ".attn.wkv." in name:
        return 0  # nn.Linear (out, in): colwise
    if ".attn.wo." in name:
        return 1  # rowwise
    if name == "lm_head.weight":
        return 0  # vocab rows
    if ".ffn." in name and ".ffn.shared." not in name and ".ffn.router." not in name and last in ("w1", "w3"):
        return 1  # (D, F) over F
    if ".ffn." in name and ".ffn.shared." not in name and last == "w2":
        return 0  # (F, D) over F
    return None


@dataclass(frozen=True)
class Collective:
    """One kind of TP collective of a step: ``count`` of them, each over a tensor of
    ``bytes_per_token`` bytes per token of the TP group (its whole, gathered size)."""

    what: str
    kind: str            # all_gather | reduce_scatter
    count: int           # per step (per micro-batch, all layers)
    bytes_per_token: float


def sp_collectives(config: ModelConfig, recompute: str, tp: int) -> list[Collective]:
    """Sequence parallelism's all-gathers and reduce-scatters of one micro-batch at TP degree
    ``tp`` (see the module docstring), each with its count and bytes per group token; multiply by
    the group's tokens."""
    c, d = config, config.d_model
    hi = lo = c.dtype_bytes                     # norm outputs, linear outputs and their gradients
    layers, dense = c.num_layers, c.num_dense_layers
    att_again = layers if recompute in ("attention", "block") else 0
    mlp_again = dense if recompute == "block" else 0
    out = [
        Collective("attention input (wq, wkv), forward", "all_gather", 2 * (layers + att_again), hi * d),
        Collective("attention output (wo), forward", "reduce_scatter", layers + att_again, lo * d),
        Collective("attention input gradient, backward", "reduce_scatter", 2 * layers, hi * d),
        Collective("attention output gradient, backward", "all_gather", layers, lo * d),
        Collective("first block input gradient, backward", "all_gather", 1, hi * d),
        Collective("LM head input, forward", "all_gather", 1, hi * d),
        Collective("LM head input gradient, backward", "reduce_scatter", 1, hi * d),
        Collective("loss statistics, forward", "all_gather", 1, 2 * max(4, c.dtype_bytes) * tp),  # fp32 or wider, each rank's, of every token
    ]
    if dense:
        out += [Collective("dense MLP input, forward", "all_gather", dense + mlp_again, hi * d),
                Collective("dense MLP output, forward", "reduce_scatter", dense + mlp_again, lo * d),
                Collective("dense MLP input gradient, backward", "reduce_scatter", dense, hi * d),
                Collective("dense MLP output gradient, backward", "all_gather", dense, lo * d)]
    return out


def expert_tp_passes(recompute: str) -> int:
    """Times per step each of ``--expert-tp``'s two exchanges crosses a pair of ranks: forward
    and backward (each exchange's backward is the other's pattern), and once more when the block
    is recomputed."""
    return 3 if recompute == "block" else 2


def expert_tp_traffic(served: np.ndarray, tp: int, recompute: str, row_bytes: float
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``--expert-tp``'s bytes per step between ranks of a TP group, as sparse (src, dst, bytes):
    g -> h (h != g in g's group) carries passes * (Q_g + Q_h) rows, all MoE layers summed.
    served: float64[L, G] rows (assignments) each rank receives per step."""
    rows = np.asarray(served, dtype=np.float64).sum(axis=0)                 # [G]
    num_gpus = rows.size
    g = np.repeat(np.arange(num_gpus), tp)
    h = (g // tp) * tp + np.tile(np.arange(tp), num_gpus)
    keep = g != h
    g, h = g[keep], h[keep]
    return g, h, expert_tp_passes(recompute) * (rows[g] + rows[h]) * row_bytes


def expert_tp_group_experts(replicas: list[list], num_gpus: int, tp: int) -> np.ndarray:
    """int64[L, G] experts each rank's TP group holds per MoE layer: the union of those the
    placement gives its ranks. replicas: [L][E] ranks."""
    out = np.zeros((len(replicas), num_gpus), dtype=np.int64)
    for li, layer in enumerate(replicas):
        union = np.zeros(num_gpus // tp, dtype=np.int64)
        for ranks in layer:
            union[np.unique(np.asarray(ranks, dtype=np.int64) // tp)] += 1
        out[li] = np.repeat(union, tp)
    return out


def expert_tp_held(replicas: list[list], num_gpus: int, tp: int) -> np.ndarray:
    """float64[G] experts' worth of weights each rank holds under ``--expert-tp``, MoE layers
    summed: 1 / t of each of its group's experts."""
    return expert_tp_group_experts(replicas, num_gpus, tp).sum(axis=0) / tp


def expert_tp_rings(replicas: list[list], tp: int) -> list[np.ndarray]:
    """The gradient all-reduces of ``--expert-tp``: for every expert and slice j, over TP rank j
    of each group holding the expert (``runtime.expert_tensor_parallel.shard_sets``), each of
    1 / t of the expert's parameters. replicas: [L][E] ranks."""
    rings = []
    for layer in replicas:
        for ranks in layer:
            groups = np.unique(np.asarray(ranks, dtype=np.int64) // tp)
            if groups.size > 1:
                rings += [groups * tp + j for j in range(tp)]
    return rings
