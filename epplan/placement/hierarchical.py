"""Placement for hierarchical dispatch: experts that fire together on one node, where it pays.

Under hierarchical dispatch (``epplan.cost.dispatch``) a token crosses the network once per
destination node, so the network rows of a layer fall when co-activated experts share a node.
``improve_hierarchical(placement, problem)`` takes a plan (the planner's, made for the flat
exchange) and searches, per layer, swaps of two replica slots of different experts on different
nodes:

1. screen: the co-activation gain of every swap, from the pair counts summed over sources,
   Psym[i, j] (tokens that selected both i and j): moving i from node A to B and j from B to A
   gains  P[i, B] + P[j, A] - P[i, A] - P[j, B] - 2 Psym[i, j]  tokens whose two experts meet on
   one node, with P[e, n] = sum of Psym[e, e'] over the experts e' on n (each term weighted by
   the slots' shares with replicas); exact for the network rows of top-2 without replicas
   (summed over destination nodes), a guide otherwise;
2. score the best screened swaps exactly: the layer's time under the schedule with the link
   times of hierarchical dispatch (rows recomputed for the two nodes and two GPUs that change) and
   the GPUs' expert times; keep a swap that lowers the layer's time, or keeps it and lowers the
   network rows (most layers have one busiest NIC; rows elsewhere count for the next swap);
3. stop when no screened swap is kept, or at the deadline.

A replica slot (an expert's replica with its column of the split) is the unit: swapping slots
moves a share of each expert's assignments, so replicated experts take part (the screen then
uses each slot's share of its expert's demand, a first-order guide). Swaps keep every GPU's slot
count, so memory is unchanged, and every replica's split.
Every layer is finally re-scored by ``evaluate``: a layer is never returned worse than it came.

Certificate: the planner's link bounds count flat bytes, which hierarchical dispatch undercuts;
``hierarchical_bound`` is the one kept (cut bound / k: a row carries at most k assignments).

Shape legend: G = GPUs, N = nodes, E = experts, K = links.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from epplan.cost import evaluate, link_map
from epplan.cost.dispatch import hierarchical_link_loads, set_rows, symmetric_pairs
from epplan.cost.evaluate import served_assignments
from epplan.placement.bounds import compute_bound, cut_bound
from epplan.placement.layer import LayerData
from epplan.placement.types import LayerPlacement, Placement, SolverInfo
from epplan.workload.memory import expert_tp_rows

if TYPE_CHECKING:  # for the annotations only (no import cycle at run time)
    from epplan.placement.problem import PlacementProblem


_SCREENED = 8        # swaps scored exactly per round
_ROUNDS_PER_EXPERT = 4


def hierarchical_bound(data: LayerData, top_k: int) -> float:
    """Seconds: a lower bound on the layer's time under hierarchical dispatch. The GPUs' compute
    bound holds as it is; the cut bound counts assignments that must cross a cut, and one row
    carries at most ``top_k`` of a token's assignments across it, so it is divided by top_k."""
    return data.schedule.moe_time(cut_bound(data) / top_k, compute_bound(data))


def improve_hierarchical(placement: Placement, problem: PlacementProblem, *, deadline: float | None = None) -> Placement:
    """``placement`` with co-activated experts swapped onto common nodes where that lowers a
    layer's time under hierarchical dispatch (module docstring); ``problem.dispatch`` must be
    hierarchical. Never worse than ``placement`` under ``evaluate``, layer by layer."""
    assert problem.dispatch == "hierarchical", problem.dispatch
    before = evaluate(placement, problem)
    layers, swaps = [], 0
    for li, layer in enumerate(placement.layers):
        if deadline is not None and time.monotonic() > deadline:  # the rest as they came
            layers.append(layer)
            continue
        new, kept = _LayerSearch(problem, li, layer).run(deadline)
        layers.append(new)
        swaps += kept
    out = Placement(placement.num_ranks, placement.num_experts, layers, method=placement.method,
                    info=SolverInfo(**placement.info))
    after = evaluate(out, problem)
    worse = np.flatnonzero(after.moe_time_s > before.moe_time_s * (1 + 1e-12))
    for li in worse:  # the search's expert time is the flat-rate one; evaluate has the last word
        layers[li] = placement.layers[li]
    out.info["hierarchical"] = {
        "swaps": swaps,
        "objective_before_s": float(before.objective_s),
        "objective_s": float(evaluate(out, problem).objective_s) if worse.size else float(after.objective_s),
    }
    return out


class _LayerSearch:
    """One layer's swap search; the layer's link and GPU times as ``evaluate`` computes them."""

    def __init__(self, problem, li: int, layer: LayerPlacement) -> None:
        topo, config = problem.topology, problem.config
        self.problem, self.layer = problem, layer
        self.counts = np.asarray(problem.traffic.counts[li], dtype=np.float64)      # (G, E)
        pairs = problem.traffic.pairs
        self.sym = None if pairs is None else symmetric_pairs(pairs[li])            # (G, E, E)
        self.top_k = config.top_k
        self.tokens = self.counts.sum(axis=1) / self.top_k
        self.gpu_node = np.asarray(topo.gpu_node, dtype=np.int64)
        self.num_nodes = topo.num_nodes
        self.lm = link_map(topo)
        passes = 2.0 * problem.exchange_scale
        cap = np.asarray(topo.link_capacity, dtype=np.float64) * 1e9
        self.link_unit = passes * float(problem.bytes_per_assignment) / cap           # (K,) s per row
        self.gpu_unit = problem.expert_flops_per_assignment \
            / np.asarray(problem.gpu_flops, dtype=np.float64)                        # (G,) s per assignment
        self.is_remote = np.arange(self.num_nodes)[None, :] != self.gpu_node[:, None]  # (G, N)

    # ------------------------------------------------------------------ scoring

    def _rows(self, slot_gpu: np.ndarray, nodes, gpus, node_rows=None, gpu_rows=None):
        """node_rows (G, N) and gpu_rows (G, G) with the columns of ``nodes`` and ``gpus``
        recomputed (all of them when the tables are None) for the replica slots on
        ``slot_gpu`` (int64[S])."""
        num_gpus = self.gpu_node.size
        if node_rows is None:
            nodes, gpus = range(self.num_nodes), range(num_gpus)
            node_rows, gpu_rows = np.zeros((num_gpus, self.num_nodes)), np.zeros((num_gpus, num_gpus))
        else:
            node_rows, gpu_rows = node_rows.copy(), gpu_rows.copy()
        nodes, gpus = list(nodes), list(gpus)
        slot_node = self.gpu_node[slot_gpu]
        node_sets = [[self.blocks[k] for k in np.flatnonzero(slot_node == n)] for n in nodes]
        gpu_sets = [[self.blocks[k] for k in np.flatnonzero(slot_gpu == g)] for g in gpus]
        node_rows[:, nodes] = set_rows(self.counts, self.sym, node_sets, self.tokens, self.top_k)
        gpu_rows[:, gpus] = set_rows(self.counts, self.sym, gpu_sets, self.tokens, self.top_k)
        return node_rows, gpu_rows

    def _score(self, node_rows, gpu_rows, served) -> tuple[float, float]:
        """(layer time under the schedule, network rows)."""
        fwd, bwd = hierarchical_link_loads(self.lm, node_rows, gpu_rows, 1.0)
        a2a = float(((fwd + bwd) * self.link_unit).max(initial=0.0))
        computed = expert_tp_rows(served, self.problem.tp, self.problem.expert_tp)   # evaluate's clock
        gpu = float((computed * self.gpu_unit).max(initial=0.0))
        return self.problem.schedule.moe_time(a2a, gpu), float(node_rows[self.is_remote].sum())

    # ------------------------------------------------------------------ the search

    def run(self, deadline: float | None) -> tuple[LayerPlacement, int]:
        """(the layer after the search, the swaps kept)."""
        layer = self.layer
        if self.num_nodes < 2 or self.top_k < 2:
            return layer, 0
        # Replica slots: expert, GPU, the split block it serves (moves with it), its share.
        slot_expert = np.array([e for e, r in enumerate(layer.replicas) for _ in r], dtype=np.int64)   # (S,)
        slot_gpu = np.concatenate([np.asarray(r, dtype=np.int64) for r in layer.replicas])              # (S,)
        slot_col = np.array([i for r in layer.replicas for i in range(r.size)], dtype=np.int64)
        self.blocks = []
        for e, col in zip(slot_expert, slot_col):
            hi = np.cumsum(layer.split[e], axis=1)[:, col]
            self.blocks.append((int(e), hi - layer.split[e][:, col], hi))
        demand = self.counts.sum(axis=0)                                                 # (E,)
        slot_load = np.array([float(self.counts[:, e] @ (b[2] - b[1])) for e, b in zip(slot_expert, self.blocks)])
        slot_share = np.where(demand[slot_expert] > 0, slot_load / np.maximum(demand[slot_expert], 1e-300), 0.0)
        psym = self._pairs_total()                                                       # (E, E)
        num_experts, num_slots = psym.shape[0], slot_gpu.size
        presence = np.zeros((num_experts, self.num_nodes))                              # [e, n] share on n
        np.add.at(presence, (slot_expert, self.gpu_node[slot_gpu]), slot_share)
        on_node = psym @ presence                                                        # [e, n] = P[e, n]
        held = {(int(e), int(g)) for e, g in zip(slot_expert, slot_gpu)}
        node_rows, gpu_rows = self._rows(slot_gpu, None, None)
        served = served_assignments(layer, self.counts)
        best = self._score(node_rows, gpu_rows, served)
        swaps, tried = 0, set()
        pair_mass = psym[np.ix_(slot_expert, slot_expert)] * np.outer(slot_share, slot_share)  # (S, S)
        for _ in range(_ROUNDS_PER_EXPERT * num_slots):
            if deadline is not None and time.monotonic() > deadline:
                break
            node = self.gpu_node[slot_gpu]                                               # (S,)
            here = on_node[slot_expert, node]                                            # (S,)
            there = on_node[slot_expert][:, node]                                        # (S, S) [k, l]: e_k on n_l
            gain = (slot_share[:, None] * (there - here[:, None])
                    + slot_share[None, :] * (there.T - here[None, :]) - 2.0 * pair_mass)
            gain[(node[:, None] == node[None, :]) | (slot_expert[:, None] == slot_expert[None, :])] = -np.inf
            gain[np.tril_indices(num_slots)] = -np.inf
            order = np.argsort(gain, axis=None)[::-1]
            kept = False
            looked = 0
            for flat in order:
                k, m = np.unravel_index(flat, gain.shape)
                if not gain[k, m] > 0 or looked >= _SCREENED:
                    break
                i, j, gk, gm = int(slot_expert[k]), int(slot_expert[m]), int(slot_gpu[k]), int(slot_gpu[m])
                if (i, gm) in held or (j, gk) in held or (k, m, gk, gm) in tried:
                    continue
                tried.add((k, m, gk, gm))
                looked += 1
                trial = slot_gpu.copy()
                trial[k], trial[m] = gm, gk
                new_served = served.copy()
                new_served[gk] += slot_load[m] - slot_load[k]
                new_served[gm] += slot_load[k] - slot_load[m]
                rows = self._rows(trial, {self.gpu_node[gk], self.gpu_node[gm]}, {gk, gm}, node_rows, gpu_rows)
                score = self._score(*rows, new_served)
                faster = score[0] < best[0] * (1 - 1e-12)
                if faster or (score[0] <= best[0] * (1 + 1e-12) and score[1] < best[1] * (1 - 1e-9)):
                    best, (node_rows, gpu_rows), served, slot_gpu = score, rows, new_served, trial
                    a, b = self.gpu_node[gk], self.gpu_node[gm]
                    delta = np.zeros((num_experts, self.num_nodes))
                    delta[i, a] -= slot_share[k]
                    delta[i, b] += slot_share[k]
                    delta[j, b] -= slot_share[m]
                    delta[j, a] += slot_share[m]
                    on_node += psym[:, [i, j]] @ delta[[i, j]]
                    held -= {(i, gk), (j, gm)}
                    held |= {(i, gm), (j, gk)}
                    swaps += 1
                    kept = True
                    break
            if not kept:
                break
        if swaps == 0:
            return layer, 0
        return _layer_from_slots(layer, slot_expert, slot_col, slot_gpu), swaps

    def _pairs_total(self) -> np.ndarray:
        """float64[E, E] symmetric co-activations summed over sources (independent co-occurrence
        without pair counts, as ``cost.dispatch`` assumes)."""
        if self.sym is None:
            c = self.counts
            total = np.where(c.sum(axis=1) > 0, c.sum(axis=1), 1.0)
            p = (self.top_k - 1) * np.einsum("si,sj->ij", c / total[:, None], c)
            np.fill_diagonal(p, 0.0)
            return p
        if self.sym.shape[0] > 1 and self.sym.strides[0] == 0:
            return self.sym[0] * self.sym.shape[0]
        return self.sym.sum(axis=0)


def _layer_from_slots(layer: LayerPlacement, slot_expert: np.ndarray, slot_col: np.ndarray,
                      slot_gpu: np.ndarray) -> LayerPlacement:
    """``layer`` with replica slot k (expert slot_expert[k], split column slot_col[k]) on GPU
    slot_gpu[k]; replicas sorted, their split columns with them."""
    replicas, split = [], []
    for e in range(len(layer.replicas)):
        mine = np.flatnonzero(slot_expert == e)
        order = np.argsort(slot_gpu[mine], kind="stable")
        replicas.append(slot_gpu[mine][order].astype(np.int64))
        split.append(layer.split[e][:, slot_col[mine][order]])
    return LayerPlacement(replicas, split)
