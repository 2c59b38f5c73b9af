"""Placement for hierarchical dispatch: experts that fire together on one node, where it pays.

Under hierarchical dispatch (``epplan.cost.dispatch``) a token crosses the network once per
destination node, so the network rows of a layer fall when co-activated experts share a node.
``improve_hierarchical(placement, problem)`` takes a plan (the planner's, made for the flat
exchange) and searches, per layer, swaps of two single-replica experts on different nodes:

1. screen: the co-activation gain of every swap, from the pair counts summed over sources,
   Psym[i, j] (tokens that selected both i and j): moving i from node A to B and j from B to A
   gains  P[i, B] + P[j, A] - P[i, A] - P[j, B] - 2 Psym[i, j]  tokens whose two experts meet on
   one node, with P[e, n] = sum of Psym[e, e'] over the experts e' on n; exact for the network
   rows of top-2 (summed over destination nodes), a guide for larger k;
2. score the best screened swaps exactly: the layer's time under the schedule with the link
   times of hierarchical dispatch (rows recomputed for the two nodes and two GPUs that change) and
   the GPUs' expert times; keep a swap that lowers the layer's time, or keeps it and lowers the
   network rows (most layers have one busiest NIC; rows elsewhere count for the next swap);
3. stop when no screened swap is kept, or at the deadline.

Replicated experts stay where the planner put them (their rows depend on the split, and the
planner placed them for compute); swaps keep every GPU's slot count, so memory is unchanged.
Every layer is finally re-scored by ``evaluate``: a layer is never returned worse than it came.

Certificate: the planner's link bounds count flat bytes, which hierarchical dispatch undercuts;
``hierarchical_bound`` is the one kept (cut bound / k: a row carries at most k assignments).

Shape legend: G = GPUs, N = nodes, E = experts, K = links.
"""

from __future__ import annotations

import time

import numpy as np

from epplan.cost import evaluate, link_map
from epplan.cost.dispatch import hierarchical_link_loads, layer_blocks, set_rows, symmetric_pairs
from epplan.cost.evaluate import served_assignments
from epplan.placement.bounds import compute_bound, cut_bound
from epplan.placement.layer import LayerData
from epplan.placement.types import LayerPlacement, Placement
from epplan.workload.flops import (EXCHANGES_PER_LAYER_PER_STEP, TRAINING_FLOPS_FACTOR,
                                   recompute_exchanges_per_layer, recompute_flops_per_token)

_SCREENED = 8        # swaps scored exactly per round
_ROUNDS_PER_EXPERT = 4


def hierarchical_bound(data: LayerData, top_k: int) -> float:
    """Seconds: a lower bound on the layer's time under hierarchical dispatch. The GPUs' compute
    bound holds as it is; the cut bound counts assignments that must cross a cut, and one row
    carries at most ``top_k`` of a token's assignments across it, so it is divided by top_k."""
    return data.schedule.moe_time(cut_bound(data) / top_k, compute_bound(data))


def improve_hierarchical(placement: Placement, problem, *, deadline: float | None = None) -> Placement:
    """``placement`` with co-activated experts swapped onto common nodes where that lowers a
    layer's time under hierarchical dispatch (module docstring); ``problem.dispatch`` must be
    hierarchical. Never worse than ``placement`` under ``evaluate``, layer by layer."""
    assert problem.dispatch == "hierarchical", problem.dispatch
    before = evaluate(placement, problem)
    layers, swaps = [], 0
    for li, layer in enumerate(placement.layers):
        new, kept = _LayerSearch(problem, li, layer).run(deadline)
        layers.append(new)
        swaps += kept
    out = Placement(placement.num_ranks, placement.num_experts, layers, method=placement.method,
                    info=dict(placement.info))
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
        topo, config, costs = problem.topology, problem.config, problem.costs
        self.problem, self.layer = problem, layer
        self.counts = np.asarray(problem.traffic.counts[li], dtype=np.float64)      # (G, E)
        pairs = problem.traffic.pairs
        self.sym = None if pairs is None else symmetric_pairs(pairs[li])            # (G, E, E)
        self.top_k = config.top_k
        self.tokens = self.counts.sum(axis=1) / self.top_k
        self.gpu_node = np.asarray(topo.gpu_node, dtype=np.int64)
        self.num_nodes = topo.num_nodes
        self.lm = link_map(topo)
        passes = 2.0 * (EXCHANGES_PER_LAYER_PER_STEP + recompute_exchanges_per_layer(problem.recompute)) \
            / EXCHANGES_PER_LAYER_PER_STEP
        cap = np.asarray(topo.link_capacity, dtype=np.float64) * 1e9
        self.link_unit = passes * float(problem.bytes_per_assignment) / cap           # (K,) s per row
        again = recompute_flops_per_token(costs, config, problem.recompute)
        self.gpu_unit = (costs.flops_per_assignment * TRAINING_FLOPS_FACTOR + again["per_assignment"]) \
            / np.asarray(problem.gpu_flops, dtype=np.float64)                        # (G,) s per assignment
        self.is_remote = np.arange(self.num_nodes)[None, :] != self.gpu_node[:, None]  # (G, N)

    # ------------------------------------------------------------------ scoring

    def _rows(self, gpu_of: np.ndarray, nodes, gpus, node_rows=None, gpu_rows=None):
        """node_rows (G, N) and gpu_rows (G, G) with the columns of ``nodes`` and ``gpus``
        recomputed (all of them when the tables are None) for the single-replica experts on
        ``gpu_of`` (int64[E], -1 for replicated experts, whose blocks are fixed)."""
        num_gpus = self.gpu_node.size
        if node_rows is None:
            nodes, gpus = range(self.num_nodes), range(num_gpus)
            node_rows, gpu_rows = np.zeros((num_gpus, self.num_nodes)), np.zeros((num_gpus, num_gpus))
        else:
            node_rows, gpu_rows = node_rows.copy(), gpu_rows.copy()
        nodes, gpus = list(nodes), list(gpus)
        whole = (np.zeros(num_gpus), np.ones(num_gpus))
        node_of = np.where(gpu_of >= 0, self.gpu_node[np.maximum(gpu_of, 0)], -1)
        node_sets = [self.fixed_node[n] + [(int(e), *whole) for e in np.flatnonzero(node_of == n)] for n in nodes]
        gpu_sets = [self.fixed_gpu[g] + [(int(e), *whole) for e in np.flatnonzero(gpu_of == g)] for g in gpus]
        node_rows[:, nodes] = set_rows(self.counts, self.sym, node_sets, self.tokens, self.top_k)
        gpu_rows[:, gpus] = set_rows(self.counts, self.sym, gpu_sets, self.tokens, self.top_k)
        return node_rows, gpu_rows

    def _score(self, node_rows, gpu_rows, served) -> tuple[float, float]:
        """(layer time under the schedule, network rows)."""
        fwd, bwd = hierarchical_link_loads(self.lm, node_rows, gpu_rows, 1.0)
        a2a = float(((fwd + bwd) * self.link_unit).max(initial=0.0))
        gpu = float((served * self.gpu_unit).max(initial=0.0))
        return self.problem.schedule.moe_time(a2a, gpu), float(node_rows[self.is_remote].sum())

    # ------------------------------------------------------------------ the search

    def run(self, deadline: float | None) -> tuple[LayerPlacement, int]:
        """(the layer after the search, the swaps kept)."""
        layer = LayerPlacement([r.copy() for r in self.layer.replicas], [s.copy() for s in self.layer.split])
        single = np.array([r.size == 1 for r in layer.replicas])
        if single.sum() < 2 or self.num_nodes < 2 or self.top_k < 2:
            return self.layer, 0
        fixed = LayerPlacement([r if not one else r[:0] for r, one in zip(layer.replicas, single)],
                               [s if not one else s[:, :0] for s, one in zip(layer.split, single)])
        self.fixed_gpu, self.fixed_node = layer_blocks(fixed, self.gpu_node)
        load = self.counts.sum(axis=0)                                               # (E,)
        psym = (self._pairs_total())                                                 # (E, E)
        gpu_of = np.array([int(r[0]) if r.size == 1 else -1 for r in layer.replicas])
        node_of = np.where(gpu_of >= 0, self.gpu_node[np.maximum(gpu_of, 0)], -1)
        on_node = np.zeros((psym.shape[0], self.num_nodes))                         # [e, n] = P[e, n]
        for n in range(self.num_nodes):
            on_node[:, n] = psym[:, (node_of == n) & single].sum(axis=1)
        node_rows, gpu_rows = self._rows(gpu_of, None, None)
        served = served_assignments(layer, self.counts)
        best = self._score(node_rows, gpu_rows, served)
        swaps, tried = 0, set()
        cand = np.flatnonzero(single)
        for _ in range(_ROUNDS_PER_EXPERT * cand.size):
            if deadline is not None and time.monotonic() > deadline:
                break
            ni, nj = node_of[cand][:, None], node_of[cand][None, :]
            gain = (on_node[cand[:, None], nj] + on_node[cand[None, :], ni]
                    - on_node[cand, node_of[cand]][:, None] - on_node[cand, node_of[cand]][None, :]
                    - 2.0 * psym[np.ix_(cand, cand)])
            gain[ni == nj] = -np.inf
            gain = np.triu(gain, 1) + np.tril(np.full_like(gain, -np.inf))
            order = np.argsort(gain, axis=None)[::-1]
            kept = False
            looked = 0
            for flat in order:
                a, b = np.unravel_index(flat, gain.shape)
                if not gain[a, b] > 0 or looked >= _SCREENED:
                    break
                i, j = int(cand[a]), int(cand[b])
                key = (i, j, int(gpu_of[i]), int(gpu_of[j]))
                if key in tried:
                    continue
                tried.add(key)
                looked += 1
                gi, gj = int(gpu_of[i]), int(gpu_of[j])
                trial = gpu_of.copy()
                trial[i], trial[j] = gj, gi
                new_served = served.copy()
                new_served[gi] += load[j] - load[i]
                new_served[gj] += load[i] - load[j]
                rows = self._rows(trial, {node_of[i], node_of[j]}, {gi, gj}, node_rows, gpu_rows)
                score = self._score(*rows, new_served)
                faster = score[0] < best[0] * (1 - 1e-12)
                if faster or (score[0] <= best[0] * (1 + 1e-12) and score[1] < best[1] * (1 - 1e-9)):
                    best, (node_rows, gpu_rows), served, gpu_of = score, rows, new_served, trial
                    ai, aj = node_of[i], node_of[j]
                    on_node[:, ai] += psym[:, j] - psym[:, i]
                    on_node[:, aj] += psym[:, i] - psym[:, j]
                    node_of[i], node_of[j] = aj, ai
                    swaps += 1
                    kept = True
                    break
            if not kept:
                break
        for e in np.flatnonzero(single):
            layer.replicas[e] = np.array([gpu_of[e]], dtype=np.int64)
        return layer, swaps

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
