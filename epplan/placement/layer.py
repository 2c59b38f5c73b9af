"""One MoE layer as the planner sees it: demand, unit costs, source groups, the pair -> link map.

Everything the planner optimises is in seconds per token-assignment:

- a link: one assignment from s served on t puts 2b bytes on each link of the path s -> t and
  2b on each link of t -> s (dispatch + combine, forward + backward: the a2a matrix is
  2b (F + F^T)); link time = bytes / capacity; under block recompute b is scaled by
  ``problem.exchange_scale`` (1.5: the recompute dispatches and combines again);
- a GPU: one assignment served costs ``problem.expert_flops_per_assignment`` (forward and
  backward, plus the forward again under recompute) / achievable FLOP/s; under ``--expert-tp``
  every rank of a TP group computes 1 / t of the group's assignments
  (``workload.memory.expert_tp_rows``, as ``evaluate`` charges them), so a GPU's time is its
  group's rows / t. The exchange of those rows inside the group is a step term of ``evaluate``
  (``tp_s``, all layers on the node's links together), not part of a layer's time here.

A layer's time combines the busiest link's time A and the busiest GPU's time X as the runtime's
schedule does (``epplan.schedule``): A + X serial, A / C + max(A (C - 1) / C, X) overlapped in C
chunks; ``evaluate`` reports the same.

Source groups. Above ``SINGLE_SOURCE_COLUMNS``, sources of one node whose rows counts[s, :] are
proportional (every source under uniform or Zipf routing; the replicated sources of a trace)
share one split per expert, so their flows are w_s times the group's, with w_s the source's share
of the group's demand. That is a restriction, not a symmetry: each source's combine comes back
through its own NIC, so a split per source can let the source of a GPU whose NIC binds keep its
demand on the node while its node-mates send theirs (``scripts/bench_planner.py`` instance 9,
layer 0, the bound-count construction, measured 2026-12-07: 0.002396 s shared, 0.002346 s per
source, -2.1 %; the per-source LP took 96-179 s against 6 s, so the planner keeps the groups and,
where the network binds, re-splits its plan once with each group split by replica class,
``replica_class_groups``, which reaches the same 0.002346 s in 24 s there).
Link loads are then linear in the group -> GPU flows Y[a, t] with the coefficient rows

    coef[(a, t)] = sum_{s in a, s != t} w_s (incidence(s -> t) + incidence(t -> s)) * 2b / cap

(a source's traffic to itself is local and free). This is exact for such splits; where rows are
not proportional and grouping is forced for size, ``LayerData.exact`` is False and the planner's
numbers are re-scored by ``evaluate``.

Shape legend: G = GPUs, E = experts, A = source groups, K = kept links.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np
import scipy.sparse as sp

from epplan.placement.linkmodel import LinkModel, link_model
from epplan.schedule import Schedule
from epplan.workload.memory import expert_tp_rows

if TYPE_CHECKING:  # problem.py imports nothing of the planner; the planner's modules import it
    from epplan.placement.problem import PlacementProblem

# Rows whose normalised patterns differ by less than this are treated as proportional.
_PATTERN_TOL = 1e-9


@dataclass
class LayerData:
    """One layer's inputs to the planner.

    counts:    float64[G, E] assignments per source rank and expert.
    link_unit: float64[K] seconds a kept link needs per assignment-unit of incidence (2b / cap).
    gpu_unit:  float64[G] seconds GPU g needs per assignment it computes.
    pool:      ranks per TP group that compute each other's rows (``--expert-tp``: the TP
               degree; else 1).
    slots:     int64[G] experts GPU g may hold in this layer.
    group_of:  int64[G] source group of each rank; weight: float64[G] its share of the group.
    """

    counts: np.ndarray
    lm: LinkModel
    link_unit: np.ndarray
    gpu_unit: np.ndarray
    slots: np.ndarray
    group_of: np.ndarray
    weight: np.ndarray
    bytes_per_assignment: float
    schedule: Schedule
    exact: bool = True
    pool: int = 1
    _coef: sp.csr_matrix | None = field(default=None, repr=False)

    @property
    def num_gpus(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_groups(self) -> int:
        return int(self.group_of.max()) + 1

    @property
    def group_counts(self) -> np.ndarray:
        """float64[A, E] demand of each source group."""
        out = np.zeros((self.num_groups, self.num_experts))
        np.add.at(out, self.group_of, self.counts)
        return out

    def pooled_rows(self, gpus: np.ndarray) -> np.ndarray:
        """int64[n, pool] the GPUs whose time rows served on each of ``gpus`` (int[n]) count
        on: the GPU itself, or under ``--expert-tp`` every rank of its TP group (1 / pool each,
        ``workload.memory.expert_tp_rows``)."""
        gpus = np.asarray(gpus, dtype=np.int64)
        return (gpus - gpus % self.pool)[:, None] + np.arange(self.pool)[None, :]

    def coef(self) -> sp.csr_matrix:
        """float64[A * G, K]: seconds on each kept link per assignment group a serves on GPU t
        (row a * G + t)."""
        if self._coef is None:
            self._coef = _group_coef(self.lm, self.group_of, self.weight) @ sp.diags(self.link_unit)
            self._coef = self._coef.tocsr()
        return self._coef

    def link_times(self, flows: np.ndarray) -> np.ndarray:
        """float64[L] seconds on every link of flows[s, t] (assignments)."""
        traffic = flows + flows.T
        return self.lm.topology.link_loads(traffic) * 2.0 * self.bytes_per_assignment / self.lm.cap

    def time_of(self, flows: np.ndarray, link: np.ndarray | None = None) -> tuple[float, float, float]:
        """(layer time under the schedule, max link time, max GPU time) of flows[s, t]
        (assignments), all links; ``link``: their ``link_times`` where the caller has them."""
        link = self.link_times(flows) if link is None else link
        gpu = expert_tp_rows(flows.sum(axis=0), self.pool, self.pool > 1) * self.gpu_unit
        lmax, gmax = float(link.max(initial=0.0)), float(gpu.max(initial=0.0))
        return self.schedule.moe_time(lmax, gmax), lmax, gmax


# Source x replica columns of the split LP up to which every source gets its own split.
SINGLE_SOURCE_COLUMNS = 100_000


def layer_data(problem: PlacementProblem, counts: np.ndarray, *, max_groups: int | None = None) -> LayerData:
    """The ``LayerData`` of one layer's counts float64[G, E] on ``problem``.

    Every source is its own group while G x (all slots) <= ``SINGLE_SOURCE_COLUMNS`` (the split
    LP is then exact over all per-source splits); above, sources of a node with proportional
    rows share a split. ``max_groups``: merge each node's sources into one group when that
    would still give more groups than this (the planner's own numbers are then approximate;
    ``evaluate`` is exact either way).
    """
    topo = problem.topology
    lm = link_model(topo)
    b = float(problem.bytes_per_assignment)
    b *= problem.exchange_scale   # the recompute's exchanges, as bytes of the four a layer has
    link_unit = 2.0 * b / lm.cap[lm.kept]
    flops = problem.expert_flops_per_assignment
    gpu_unit = flops / np.asarray(problem.gpu_flops, dtype=np.float64)
    slots = gpu_slots(problem)
    if topo.num_gpus * int(slots.sum()) <= SINGLE_SOURCE_COLUMNS:
        group_of, weight, exact = np.arange(topo.num_gpus), np.ones(topo.num_gpus), True
    else:
        group_of, weight, exact = source_groups(counts, np.asarray(topo.gpu_node), max_groups=max_groups)
    return LayerData(counts=np.asarray(counts, dtype=np.float64), lm=lm, link_unit=link_unit,
                     gpu_unit=gpu_unit, slots=slots, group_of=group_of,
                     weight=weight, bytes_per_assignment=b, schedule=problem.schedule, exact=exact,
                     pool=problem.tp if problem.expert_tp else 1)


def gpu_slots(problem: PlacementProblem) -> np.ndarray:
    """int64[G] experts each GPU may hold per layer: ``experts_per_gpu``, and no more than its
    memory holds the expert weights of (model dtype, all MoE layers alike)."""
    topo, costs, config = problem.topology, problem.costs, problem.config
    per_expert = costs.params_per_expert * config.dtype_bytes * config.num_moe_layers
    by_memory = np.floor(np.asarray(topo.gpu_memory_gb, dtype=np.float64) * 1e9 / per_expert)
    return np.minimum(problem.experts_per_gpu, by_memory).astype(np.int64)


def source_groups(counts: np.ndarray, gpu_node: np.ndarray, *,
                  max_groups: int | None = None) -> tuple[np.ndarray, np.ndarray, bool]:
    """(group_of int64[G], weight float64[G], exact): sources of a node with proportional rows
    share a group; weight = the source's share of its group's demand."""
    num_gpus = counts.shape[0]
    totals = counts.sum(axis=1)
    pattern = counts / np.where(totals > 0, totals, 1.0)[:, None]
    key_of: dict[tuple, int] = {}
    group_of = np.empty(num_gpus, dtype=np.int64)
    for s in range(num_gpus):
        key = (int(gpu_node[s]),) + tuple(np.round(pattern[s] / _PATTERN_TOL).astype(np.int64))
        group_of[s] = key_of.setdefault(key, len(key_of))
    exact = True
    if max_groups is not None and len(key_of) > max_groups:
        _, group_of = np.unique(gpu_node, return_inverse=True)
        exact = False
    return group_of, _shares(totals, group_of), exact


def _shares(totals: np.ndarray, group_of: np.ndarray) -> np.ndarray:
    """float64[G] each source's share of its group's demand (equal shares in a group with none)."""
    group_total = np.bincount(group_of, weights=totals)
    size = np.bincount(group_of)
    return np.where(group_total[group_of] > 0, totals / np.where(group_total > 0, group_total, 1)[group_of],
                    1.0 / size[group_of])


def replica_class_groups(data: LayerData, replicas: list[np.ndarray], *, top: int | None = None) -> LayerData | None:
    """``data`` with each source group split by how widely its GPUs' own experts are replicated
    under ``replicas``, or None where that splits no group (every source its own group already,
    groups forced for size, or one class per group).

    A GPU's class is the octave of its coldest expert's replica count against the mean,
    max(0, ceil(log2(R_e / mean R))), -1 for a GPU holding none. Why: a cold expert's few
    holders take its dispatch from every node, so their own sources do best keeping their
    demand near while the hot experts' holders send theirs out; a shared split makes them all
    send alike. The subgroups of a proportional group are proportional, so the split stays
    exact. Measured on ``scripts/bench_planner.py`` instance 9's layer 0 (the bound-count
    construction, 2026-12-07): 64 node groups 0.002396 s (4.9 s LP), these 246 groups
    0.002346 s (24 s), a group per source 0.002346 s (145-154 s); in the per-source optimum
    the holders of octaves 0-1 send 1,486-1,489 of their 5,000 assignments off the node,
    those of octaves 2-3 2,563-2,660 (the shared split: 1,556-1,624 from each).

    ``top``: octaves above it merged into it (top=1: two classes of held GPUs, an expert with
    at most the mean replicas or more). On instance 10's layer 0 (the bound-count
    construction): 507 groups 30.1 s, top=1 256 groups 25.5 s, both 0.004350 s (node groups
    0.004410 s, 15.7 s).
    """
    if not data.exact or data.num_groups >= data.num_gpus:
        return None
    sizes = np.array([len(r) for r in replicas], dtype=np.float64)
    mean = sizes.sum() / max(1, sizes.size)
    coldest = np.full(data.num_gpus, np.inf)
    for e, ranks in enumerate(replicas):
        ranks = np.asarray(ranks, dtype=np.int64)
        coldest[ranks] = np.minimum(coldest[ranks], sizes[e])
    held = np.isfinite(coldest)
    octave = np.full(data.num_gpus, -1, dtype=np.int64)
    octave[held] = np.maximum(0, np.ceil(np.log2(coldest[held] / mean) - 1e-12)).astype(np.int64)
    if top is not None:
        octave = np.minimum(octave, top)
    _, group_of = np.unique(data.group_of * (octave.max() + 2) + octave + 1, return_inverse=True)
    group_of = group_of.astype(np.int64)
    if int(group_of.max()) + 1 == data.num_groups:
        return None
    return replace(data, group_of=group_of, weight=_shares(data.counts.sum(axis=1), group_of), _coef=None)


_INC_CACHE: dict[int, tuple[object, sp.csr_matrix]] = {}


def pair_incidence_sym(lm: LinkModel) -> sp.csr_matrix:
    """float64[G * G, K]: row s * G + t = incidence(s -> t) + incidence(t -> s) (zero for s == t)."""
    hit = _INC_CACHE.get(id(lm))
    if hit is not None and hit[0] is lm:
        return hit[1]
    g = lm.num_gpus
    src, dst = np.divmod(np.arange(g * g), g)
    off = src != dst
    inc = lm.pair_incidence(src[off], dst[off]) + lm.pair_incidence(dst[off], src[off])
    rows = np.flatnonzero(off)
    expand = sp.csr_matrix((np.ones(rows.size), (rows, np.arange(rows.size))), shape=(g * g, rows.size))
    full = (expand @ inc).tocsr()
    _INC_CACHE.clear()
    _INC_CACHE[id(lm)] = (lm, full)
    return full


def _group_coef(lm: LinkModel, group_of: np.ndarray, weight: np.ndarray) -> sp.csr_matrix:
    """float64[A * G, K]: sum over s in a of w_s * (incidence(s -> t) + incidence(t -> s))."""
    g = lm.num_gpus
    num_groups = int(group_of.max()) + 1
    inc = pair_incidence_sym(lm)
    s, t = np.divmod(np.arange(g * g), g)
    agg = sp.csr_matrix((weight[s], (group_of[s] * g + t, np.arange(g * g))), shape=(num_groups * g, g * g))
    return agg @ inc
