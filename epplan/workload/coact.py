"""``coact:SIZE:SHARE[:ALPHA]``: synthetic routing whose top-k experts fire together.

Shape legend: L = MoE layers, E = experts per layer, T = sampled tokens, k = experts per token.

Real routers co-activate experts (a token that picks one expert of a cluster tends to pick others
of it), and that decides how much hierarchical dispatch saves (``epplan.cost.dispatch``); the
public trace in ../shared has no pair counts. This source makes both counts and pair counts from
one token-level model, per layer, seeded:

- the experts are cut into co-activation groups of SIZE (the last one smaller if SIZE does not
  divide E) by a seeded random permutation, so that expert ids say nothing about groups;
- popularity: expert of popularity rank r (1-based, another seeded permutation) has weight
  1 / r**ALPHA (ALPHA = 0, the default: all alike);
- a token's first expert is drawn by popularity; each further one (distinct, k in all) comes, with
  probability SHARE, from the first expert's group (by popularity, among those not yet picked),
  otherwise from all experts not yet picked; a group with none left falls back to all experts.

SHARE = 0 is independent routing; SHARE = 1 with SIZE >= k keeps every token inside one group.
``make_traffic`` samples ``SAMPLE_TOKENS`` tokens per layer, counts them and scales to the
config's volume, so counts and pairs are exactly those of a token population. Every source rank
routes alike (as in the real trace, total-variation distance 0.014 between sources).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from epplan.errors import TrafficError

SAMPLE_TOKENS = 1 << 15   # tokens sampled per layer for counts and pairs
_CHUNK = 4096             # tokens sampled at once (a [chunk, E] weight matrix)


@dataclass(frozen=True)
class Coact:
    """The parameters of ``coact:SIZE:SHARE[:ALPHA]`` (module docstring)."""

    group_size: int
    share: float
    alpha: float = 0.0

    @property
    def spec(self) -> str:
        return f"coact:{self.group_size}:{self.share:g}" + (f":{self.alpha:g}" if self.alpha else "")


def parse_coact(spec: str) -> Coact:
    """``coact:SIZE:SHARE[:ALPHA]`` -> ``Coact``; a ``TrafficError`` saying what is wrong."""
    head, *parts = spec.split(":")
    usage = "write coact:SIZE:SHARE[:ALPHA], e.g. coact:4:0.8 or coact:8:0.7:1.0"
    if head != "coact" or len(parts) not in (2, 3):
        raise TrafficError(f"traffic spec {spec!r} not understood; {usage}")
    try:
        size, share = int(parts[0]), float(parts[1])
        alpha = float(parts[2]) if len(parts) == 3 else 0.0
    except ValueError:
        raise TrafficError(f"traffic spec {spec!r}: SIZE is an integer, SHARE and ALPHA numbers; {usage}") from None
    if size < 2:
        raise TrafficError(f"traffic spec {spec!r}: SIZE (experts per co-activation group) must be at least 2")
    if not (math.isfinite(share) and 0 <= share <= 1):
        raise TrafficError(f"traffic spec {spec!r}: SHARE (a token's further experts drawn from its "
                           "first expert's group) must be in [0, 1]")
    if not (math.isfinite(alpha) and 0 <= alpha <= 10):
        raise TrafficError(f"traffic spec {spec!r}: ALPHA (zipf popularity, 0 = none) must be in [0, 10]")
    return Coact(size, share, alpha)


def layer_model(params: Coact, num_experts: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(weight float64[E] popularity summing to 1, group_of int64[E]) of one layer."""
    by_rank = 1.0 / np.arange(1, num_experts + 1, dtype=np.float64) ** params.alpha
    weight = np.empty(num_experts)
    weight[rng.permutation(num_experts)] = by_rank / by_rank.sum()
    group_of = np.empty(num_experts, dtype=np.int64)
    group_of[rng.permutation(num_experts)] = np.arange(num_experts) // params.group_size
    return weight, group_of


def sample_tokens(params: Coact, num_experts: int, top_k: int, num_tokens: int, rng: np.random.Generator,
                  model: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """int64[T, k] distinct experts of ``num_tokens`` tokens (the first one first).

    model: (weight, group_of) of ``layer_model``; drawn from ``rng`` first when None.
    """
    if top_k > num_experts:
        raise TrafficError(f"coact: top_k={top_k} exceeds the {num_experts} experts")
    weight, group_of = layer_model(params, num_experts, rng) if model is None else model
    out = np.empty((num_tokens, top_k), dtype=np.int64)
    for start in range(0, num_tokens, _CHUNK):
        n = min(_CHUNK, num_tokens - start)
        free = np.broadcast_to(weight, (n, num_experts)).copy()         # (n, E) weight of experts not picked
        rows = np.arange(n)
        first = _draw(free, rng)
        out[start:start + n, 0] = first
        free[rows, first] = 0.0
        in_group = group_of[None, :] == group_of[first][:, None]        # (n, E)
        for slot in range(1, top_k):
            grouped = free * in_group
            use_group = (rng.random(n) < params.share) & (grouped.sum(axis=1) > 0)
            pick = _draw(np.where(use_group[:, None], grouped, free), rng)
            out[start:start + n, slot] = pick
            free[rows, pick] = 0.0
    return out


def _draw(weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int64[n]: one index per row of weight float64[n, E] (rows with a positive sum), by weight."""
    cum = np.cumsum(weight, axis=1)
    u = rng.random(weight.shape[0]) * cum[:, -1]
    pick = (cum <= u[:, None]).sum(axis=1)
    # Guard against u landing on the last cumulative value by rounding: take the last positive entry.
    last = weight.shape[1] - 1 - np.argmax(weight[:, ::-1] > 0, axis=1)
    return np.minimum(pick, last)


def coact_statistics(params: Coact, num_layers: int, num_experts: int, top_k: int, seed: int = 0,
                     num_tokens: int = SAMPLE_TOKENS) -> tuple[np.ndarray, np.ndarray]:
    """(share float64[L, E] of assignments per expert, pairs float64[L, E, E] per token, upper
    triangle) of ``num_tokens`` sampled tokens per layer; layer l draws from ``layer_rng(seed, l)``."""
    share = np.zeros((num_layers, num_experts))
    pairs = np.zeros((num_layers, num_experts, num_experts))
    for layer in range(num_layers):
        tokens = sample_tokens(params, num_experts, top_k, num_tokens, layer_rng(seed, layer))
        share[layer] = np.bincount(tokens.ravel(), minlength=num_experts)
        keys = [np.minimum(tokens[:, a], tokens[:, b]) * num_experts + np.maximum(tokens[:, a], tokens[:, b])
                for a in range(top_k) for b in range(a + 1, top_k)]
        if keys:
            pairs[layer] = np.bincount(np.concatenate(keys), minlength=num_experts ** 2).reshape(
                num_experts, num_experts)
    return share / (num_tokens * top_k), pairs / num_tokens


def layer_rng(seed: int, layer: int) -> np.random.Generator:
    """The generator of layer ``layer``'s model and tokens (its own stream of ``seed``)."""
    return np.random.default_rng([int(seed), int(layer)])
