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
_REJECTION_ROUNDS = 8     # then the tokens still drawing take the dense renormalised draw


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
    Drawing by weight among the experts not yet picked is done by rejection: draw by weight from
    all (or from the group), redraw the tokens whose draw was already picked; the accepted draw
    has exactly the renormalised distribution, in O(T k log E) instead of O(T k E). Tokens still
    drawing after a few rounds draw from the renormalised weights directly.
    """
    if top_k > num_experts:
        raise TrafficError(f"coact: top_k={top_k} exceeds the {num_experts} experts")
    weight, group_of = layer_model(params, num_experts, rng) if model is None else model
    # Experts sorted by group: one cumulative weight serves draws from all and from one group.
    order = np.argsort(group_of, kind="stable")                          # (E,) expert at each position
    cum = np.cumsum(weight[order])
    cum /= cum[-1]
    group_sizes = np.bincount(group_of)
    group_end = np.cumsum(group_sizes)                                   # (groups,) positions
    lo_pos = group_end - group_sizes
    lo_cum = np.where(lo_pos > 0, cum[np.maximum(lo_pos - 1, 0)], 0.0)   # (groups,) cum before group
    hi_cum = cum[group_end - 1]
    members = np.full((group_sizes.size, int(group_sizes.max())), -1, dtype=np.int64)  # (groups, SIZE)
    for g in range(group_sizes.size):
        members[g, :group_sizes[g]] = order[lo_pos[g]:group_end[g]]

    def draw(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
        u = lo + rng.random(lo.size) * (hi - lo)
        return order[np.minimum(np.searchsorted(cum, u, side="right"), num_experts - 1)]

    out = np.empty((num_tokens, top_k), dtype=np.int64)
    out[:, 0] = draw(np.zeros(num_tokens), np.ones(num_tokens))
    group = group_of[out[:, 0]]
    in_group = np.ones(num_tokens, dtype=np.int64)                      # picked experts of the group
    for slot in range(1, top_k):
        use_group = (rng.random(num_tokens) < params.share) & (in_group < group_sizes[group])
        lo = np.where(use_group, lo_cum[group], 0.0)
        hi = np.where(use_group, hi_cum[group], 1.0)
        pick = np.full(num_tokens, -1, dtype=np.int64)
        todo = np.arange(num_tokens)
        for _ in range(_REJECTION_ROUNDS):
            cand = draw(lo[todo], hi[todo])
            is_new = ~(out[todo, :slot] == cand[:, None]).any(axis=1)
            pick[todo[is_new]] = cand[is_new]
            todo = todo[~is_new]
        if todo.size:  # the few whose free experts weigh little: renormalised weights, densely
            pick[todo] = _dense_draw(todo, use_group, group, out[:, :slot], members, weight, rng)
        out[:, slot] = pick
        in_group += group_of[pick] == group
    return out


def _dense_draw(todo: np.ndarray, use_group: np.ndarray, group: np.ndarray, picked: np.ndarray,
                members: np.ndarray, weight: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """int64[n]: for tokens ``todo``, one expert by weight among those not in ``picked`` (int64[T,
    slot]), from the token's group's ``members`` where ``use_group``, else from all experts."""
    out = np.empty(todo.size, dtype=np.int64)
    for from_group in (True, False):
        rows = todo[use_group[todo] == from_group]
        if rows.size == 0:
            continue
        cand = members[group[rows]] if from_group else np.broadcast_to(np.arange(weight.size), (rows.size, weight.size))
        w = np.where(cand >= 0, weight[np.maximum(cand, 0)], 0.0)                    # (n, C)
        w = w * ~(cand[:, :, None] == picked[rows][:, None, :]).any(axis=2)
        cum = np.cumsum(w, axis=1)
        u = rng.random(rows.size) * cum[:, -1]
        last = w.shape[1] - 1 - np.argmax(w[:, ::-1] > 0, axis=1)
        at = np.minimum((cum <= u[:, None]).sum(axis=1), last)
        out[use_group[todo] == from_group] = cand[np.arange(rows.size), at]
    return out


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
