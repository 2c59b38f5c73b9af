"""The placement value shared by the planner, the baselines, the cost function, the manifest and
the runtime.

Shape legend: G = number of ranks (GPUs), E = experts per MoE layer, R_e = replicas of expert e.

A ``LayerPlacement`` says, for one MoE layer, which ranks hold a replica of each expert and, per
source rank, how that rank's token-assignments to the expert are split over the replicas. The
runtime follows the split exactly; the cost function scores it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, TypedDict

import numpy as np

from epplan.errors import param, PlacementError


@dataclass
class LayerPlacement:
    """One MoE layer.

    replicas[e]: int64[R_e], sorted distinct ranks holding a replica of expert e (R_e >= 1).
    split[e]:    float64[G, R_e], split[e][s, r] = share of source s's assignments to expert e
                 that go to replica replicas[e][r]; every row sums to 1.
    """

    replicas: list[np.ndarray]
    split: list[np.ndarray]

    @property
    def num_experts(self) -> int:
        return len(self.replicas)

    def experts_on_rank(self, num_ranks: int) -> list[list[int]]:
        """rank -> experts it holds a replica of, ascending."""
        held: list[list[int]] = [[] for _ in range(num_ranks)]
        for e, ranks in enumerate(self.replicas):
            for g in ranks:
                held[int(g)].append(e)
        return held

    def flows(self, counts: np.ndarray) -> np.ndarray:
        """Token-assignments from each source to each destination rank.

        counts: float64[G, E] assignments per source rank and expert.
        Returns float64[G, G]: [s, t] = assignments that s sends to t (t == s stays local).
        """
        num_ranks = counts.shape[0]
        out = np.zeros((num_ranks, num_ranks))
        for e, ranks in enumerate(self.replicas):
            # (G, 1) * (G, R_e) -> assignments of each source to each replica of e
            np.add.at(out, (slice(None), ranks), counts[:, e:e + 1] * self.split[e])
        return out


class SolverInfo(TypedDict, total=False):
    """``Placement.info``: what the planner says of its plan (``solve``'s summary), the manifest's
    ``solver`` record. A baseline's is ``{"solver": None, "status": "baseline", "seconds": 0.0}``;
    a hand-made placement's is empty. Seconds of the plan are its MoE layers' time, summed."""

    solver: str | None              # the MILP solver: highs | cbc
    status: str                     # optimal | gap_met | gap_open | time_limit (worst layer's) | baseline
    objective_s: float
    bound_s: float
    gap: float                      # the worst layer's relative gap
    total_gap: float                # (objective - bound) / objective, all layers
    gap_target: float
    time_limit_s: float | None
    seconds: float                  # wall seconds of the solve
    layers: list[dict[str, Any]]    # per layer, ``dataclasses.asdict`` of ``solve.LayerInfo``
    # hierarchical dispatch (``solve.plan_hierarchical``, ``hierarchical.improve_hierarchical``)
    dispatch: str
    flat_plan: dict[str, Any]       # the flat plan it started from: status, objective_s, bound_s, gap
    coact_swaps: dict[str, int | None]
    hierarchical: dict[str, Any]    # swaps, objective_before_s, objective_s
    # several routing windows and/or a plan in force (``robust.solve_robust``)
    objective: str                  # mean | worst
    num_windows: int
    window_objective_s: list[float]
    migration: dict[str, Any]       # moves, bytes_moved, seconds, max_move_bytes, move_weight
    # a baseline re-split by the split LP (``solve.resplit``)
    resplit_cut_short: int          # layers whose split LP the time limit stopped or left unrun


@dataclass
class Placement:
    """A whole model's placement: one ``LayerPlacement`` per MoE layer."""

    num_ranks: int
    num_experts: int
    layers: list[LayerPlacement]
    method: str = "manual"
    info: SolverInfo = field(default_factory=lambda: SolverInfo())

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def validate(self, experts_per_gpu: int = 1) -> None:
        """Raise ``PlacementError`` naming the first broken invariant."""
        if len(self.layers) == 0:
            raise PlacementError("placement has no layers")
        for li, layer in enumerate(self.layers):
            if _is_valid(layer, self.num_ranks, self.num_experts, experts_per_gpu):
                continue
            # Something is wrong: find the first broken invariant, expert by expert.
            if layer.num_experts != self.num_experts or len(layer.split) != self.num_experts:
                raise PlacementError(
                    f"layer {li}: {layer.num_experts} experts placed, expected {self.num_experts}")
            per_rank = np.zeros(self.num_ranks, dtype=np.int64)
            for e, (ranks, split) in enumerate(zip(layer.replicas, layer.split)):
                ranks = np.asarray(ranks)
                problem = replica_problem(ranks, self.num_ranks)
                if problem:
                    raise PlacementError(f"layer {li}, expert {e}: {problem}")
                if np.any(np.diff(ranks) < 0):
                    raise PlacementError(
                        f"layer {li}, expert {e}: replica ranks must be sorted and distinct: {ranks.tolist()}")
                if split.shape != (self.num_ranks, ranks.size):
                    raise PlacementError(
                        f"layer {li}, expert {e}: split has shape {split.shape}, "
                        f"expected ({self.num_ranks}, {ranks.size})")
                if not np.all(np.isfinite(split)) or split.min() < -1e-9:
                    raise PlacementError(f"layer {li}, expert {e}: split has negative or non-finite shares")
                bad = np.flatnonzero(np.abs(split.sum(axis=1) - 1.0) > 1e-6)
                if bad.size:
                    raise PlacementError(
                        f"layer {li}, expert {e}: split of source rank {int(bad[0])} sums to "
                        f"{split[bad[0]].sum():.6f}, not 1")
                per_rank[ranks] += 1
            problem = overfull_problem(per_rank, experts_per_gpu)
            if problem:
                raise PlacementError(f"layer {li}: {problem}")


# The invariants a placement keeps, checked here for planned placements (``Placement.validate``)
# and for manifests read back (``epplan.manifest``), with the same words.

def replica_problem(ranks: Sequence[int] | np.ndarray, num_ranks: int) -> str | None:
    """What is wrong with one expert's replica ranks (int[R]; Python ints of any size too, as a
    manifest gives them), or None: at least one replica, every rank in 0..num_ranks-1, no rank
    twice."""
    ranks = [int(r) for r in ranks]
    if not ranks:
        return "has no replica"
    bad = [r for r in ranks if not 0 <= r < num_ranks]
    if bad:
        return f"replica rank {bad[0]} out of range 0..{num_ranks - 1}"
    if len(set(ranks)) != len(ranks):
        twice = next(r for r in ranks if ranks.count(r) > 1)
        return f"replica ranks must be sorted and distinct: rank {twice} holds two replicas of it"
    return None


def overfull_problem(per_rank: np.ndarray, experts_per_gpu: int) -> str | None:
    """The first rank holding more than ``experts_per_gpu`` experts (per_rank: int[G], experts
    each rank holds in one layer), or None."""
    over = np.flatnonzero(per_rank > experts_per_gpu)
    if not over.size:
        return None
    g = int(over[0])
    return (f"rank {g} holds {int(per_rank[g])} experts, more than experts_per_gpu = {experts_per_gpu} "
            f"(plan with {param('experts_per_gpu', int(per_rank[g]))} to allow it)")


def _is_valid(layer: LayerPlacement, num_ranks: int, num_experts: int, experts_per_gpu: int) -> bool:
    """``Placement.validate``'s checks of one layer, all experts at once (True: nothing to report)."""
    if layer.num_experts != num_experts or len(layer.split) != num_experts or num_experts == 0:
        return False
    sizes = np.array([len(r) for r in layer.replicas], dtype=np.int64)
    if sizes.min() < 1 or any(s.shape != (num_ranks, n) for s, n in zip(layer.split, sizes)):
        return False
    ranks = np.concatenate([np.asarray(r) for r in layer.replicas])        # (N,)
    if ranks.min() < 0 or ranks.max() >= num_ranks:
        return False
    starts = np.cumsum(sizes) - sizes
    is_first = np.zeros(ranks.size, dtype=bool)
    is_first[starts] = True
    if np.any(np.diff(ranks)[~is_first[1:]] <= 0):     # sorted and distinct within each expert
        return False
    split = np.hstack(layer.split)                                          # (G, N)
    if not np.all(np.isfinite(split)) or split.min() < -1e-9:
        return False
    if np.any(np.abs(np.add.reduceat(split, starts, axis=1) - 1.0) > 1e-6):
        return False
    return bool(np.bincount(ranks, minlength=num_ranks).max() <= experts_per_gpu)
