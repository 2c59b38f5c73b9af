"""A drifting synthetic routing source: zipf shares whose expert order rotates and whose exponent
changes with the training step, seeded. For tests and benchmarks beside the real trace.

Shape legend: L = MoE layers, E = routed experts per layer, T = steps of a window.

Spec ``drift:KEY=VALUE,...`` (every key optional)::

    alpha=1.2      zipf exponent at step 0 (shares proportional to 1 / rank**alpha)
    alpha_end=A    ... changing linearly to A at step ``steps`` (then staying there)
    steps=5000     the step at which ``alpha_end`` is reached (needs alpha_end)
    rotate=500     every ``rotate`` steps the popularity ranks move one expert along a fixed,
                   seeded cyclic order of the experts (per layer), smoothly: between two whole
                   rotations the shares are the linear blend of the two. 0: no rotation.

e.g. ``drift:alpha=1.2,rotate=500`` or ``drift:alpha=1.0,alpha_end=1.6,steps=5000``. The seed
(``--seed``) draws each layer's cyclic order, as it draws zipf's expert order. A window
``@FIRST:LAST`` averages the shares of steps FIRST..LAST inclusive (default: step 0); every
source rank routes alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from epplan.errors import TrafficError

PREFIX = "drift:"
MAX_STEP = 10**9
_KEYS = ("alpha", "alpha_end", "steps", "rotate")


@dataclass(frozen=True)
class Drift:
    """A parsed ``drift:`` spec (module docstring)."""

    alpha: float = 1.2
    alpha_end: float | None = None
    steps: int = 0
    rotate: int = 0

    def describe(self) -> str:
        parts = [f"alpha={self.alpha:g}"]
        if self.alpha_end is not None:
            parts += [f"alpha_end={self.alpha_end:g}", f"steps={self.steps}"]
        if self.rotate:
            parts.append(f"rotate={self.rotate}")
        return PREFIX + ",".join(parts)

    def alpha_at(self, step: np.ndarray) -> np.ndarray:
        """float64[T] the exponent at each step."""
        step = np.asarray(step, dtype=np.float64)
        if self.alpha_end is None:
            return np.full(step.shape, self.alpha)
        f = np.clip(step / self.steps, 0.0, 1.0)
        return self.alpha + f * (self.alpha_end - self.alpha)

    def shares(self, num_layers: int, num_experts: int, first: int, last: int,
               seed: int = 0) -> np.ndarray:
        """float64[L, E]: the mean over steps first..last (inclusive) of each layer's shares."""
        assert 0 <= first <= last
        rng = np.random.default_rng(seed)
        order = np.stack([rng.permutation(num_experts) for _ in range(num_layers)])   # [L, E]
        steps = np.arange(first, last + 1, dtype=np.float64)                          # [T]
        ranks = np.arange(1, num_experts + 1, dtype=np.float64)
        by_rank = ranks[None, :] ** -self.alpha_at(steps)[:, None]                    # [T, E]
        by_rank /= by_rank.sum(axis=1, keepdims=True)
        shift = steps / self.rotate if self.rotate else np.zeros_like(steps)
        whole = np.floor(shift).astype(np.int64)
        frac = shift - whole
        out = np.zeros((num_layers, num_experts))
        # Popularity rank r sits on expert order[(r + k) % E] after k whole rotations.
        pos = np.arange(num_experts)
        for k in np.unique(whole):
            sel = whole == k
            for extra, weight in ((0, 1.0 - frac[sel]), (1, frac[sel])):
                mass = (weight[:, None] * by_rank[sel]).sum(axis=0)                    # [E] by rank
                slots = (pos + k + extra) % num_experts
                np.add.at(out, (np.arange(num_layers)[:, None], order[:, slots]), mass[None, :])
        return out / steps.size


def parse_drift(spec: str) -> Drift:
    """``drift:KEY=VALUE,...`` -> ``Drift``; ``TrafficError`` naming what is wrong."""
    assert spec.startswith(PREFIX)
    body = spec[len(PREFIX):].strip()
    values: dict[str, str] = {}
    for item in filter(None, (p.strip() for p in body.split(","))):
        key, eq, value = item.partition("=")
        key = key.strip()
        if not eq or key not in _KEYS:
            raise TrafficError(f"routing {spec!r}: {item!r} not understood; write "
                               f"drift:KEY=VALUE,... with keys {', '.join(_KEYS)}, "
                               "e.g. drift:alpha=1.2,rotate=500")
        if key in values:
            raise TrafficError(f"routing {spec!r}: {key} given twice")
        values[key] = value.strip()

    def number(key: str, kind: type, low: float) -> float | int | None:
        if key not in values:
            return None
        try:
            v = kind(values[key])
        except ValueError:
            raise TrafficError(f"routing {spec!r}: {key}={values[key]!r} is not "
                               f"{'an integer' if kind is int else 'a number'}") from None
        if not (math.isfinite(v) and low <= v <= (MAX_STEP if kind is int else 100.0)):
            raise TrafficError(f"routing {spec!r}: {key}={values[key]} must be at least {low:g} and "
                               f"at most {MAX_STEP if kind is int else 100:g}")
        return v

    alpha = number("alpha", float, 1e-6)
    alpha_end = number("alpha_end", float, 1e-6)
    steps = number("steps", int, 1)
    rotate = number("rotate", int, 0)
    if (alpha_end is None) != (steps is None):
        raise TrafficError(f"routing {spec!r}: alpha_end and steps go together (the exponent "
                           "reaches alpha_end at step steps), e.g. drift:alpha=1.0,alpha_end=1.6,steps=5000")
    return Drift(alpha=1.2 if alpha is None else float(alpha), alpha_end=alpha_end,
                 steps=0 if steps is None else int(steps), rotate=0 if rotate is None else int(rotate))
