"""Lower bounds on a layer's time (the link and GPU parts, combined by the schedule) that hold for every feasible per-GPU placement and split.

They certify the planner's gap: ``gap = (cost - bound) / cost`` where ``bound`` is the largest of
these and the MILP's dual bound (``epplan.placement.ilp``), each valid for the true problem (one
decision per GPU, any per-source split), not only for an aggregated model.

Under ``--expert-tp`` (``LayerData.pool`` = t) a GPU's time is its TP group's rows / t: the
compute bound counts groups (below), the cut bounds hold as they are (they count link bytes
only), the trade-off bound is not used.

compute   Every assignment is served by some GPU. Expert e's r_e replicas sit on distinct GPUs
          and serve n_e together, so the busiest serves at least n_e c / r_e, with
          sum_e r_e <= S (all slots) and r_e <= G: the bound is min over integer r of
          max_e n_e c / r_e ("apportionment", exact by the greedy; for unequal GPUs with the
          fastest GPU's c, which keeps it valid), and at least the fluid W / sum_g (1 / c_g).
cut       Node B holds at most D_B = min(E, its slots) distinct experts, so at least
          U_B = (B's demand) - (its D_B largest expert demands) of its sources' assignments are
          served elsewhere. Each crosses the links leaving B once on the way out (dispatch) and
          the links entering B once on the way back (combine), 2b bytes each time: the busiest
          of B's exit links carries >= 2b U_B / (their capacity), likewise the entry links. Over
          all nodes, every remote assignment leaves one node and enters another in both
          directions, so the busiest exit link of any node carries >= 4b sum_B U_B / (all exit
          capacity). The same per GPU (its own exit links, its K largest demands).
tradeoff  The cut bound with the GPU time the plan may spend (``tradeoff_bound``). Serving an
          assignment inside a cut set B costs B's GPUs time, so the compute bound and the cut
          bound cannot both be met by a plan that keeps traffic local. For a GPU-time budget t
          (every GPU within t, as the layer's busiest GPU X is), a replica on g serves at most
          t / c_g, so B serves at most local_B(t) of its own demand: the best integer replica
          counts r_e <= |B|, sum r_e <= B's slots, of sum_e min(n_Be, r_e t / c_fastest), and at
          most t sum_{g in B} 1 / c_g in all (``local_capacity``: the greedy over the concave
          marginal gains, exact for the first part). B's sources send out(B) >= n_B - local_B(t),
          and B's GPUs, since the GPUs outside serve at most t sum_{g not in B} 1 / c_g of the
          layer's W assignments, serve in(B) >= W - that - local_B(t) for outside sources; both
          cross B's exit and entry links once each way, 2b bytes: link time >= 2b (out + in) /
          capacity, and over a partition (the nodes, the GPUs, disjoint switch sets) the average
          4b sum_B out(B) / (sum of exit capacities). This L(t) holds for every plan whose
          busiest GPU is within t, and the layer's time grows with both parts, so the optimum
          is at least min over t >= compute bound of moe_time(L(t), t). The search cuts
          [compute bound, T] into intervals [a, b] and takes moe_time(L(b), a) on each (valid
          for every X in [a, b], since L(b) holds for all X <= b) and moe_time(cut, T) past T,
          refining the interval that sets the minimum: valid at any refinement, tight as the
          intervals shrink. It sees that when every node could hold every expert, its GPUs
          still cannot serve all of its hot experts' demand in the compute bound's time.
holders   A second L(t) inside the trade-off search (``_Holders``): the receiving NIC of a GPU
          that holds a cold expert. Every byte a GPU g receives from another node (dispatch to
          its replicas, combine back to its source: the a2a is 2b (F + F^T), so in_g + out_g
          assignments) enters through g's receiving NICs (its own NIC; ``PathModel.recv_near``),
          so their entry links carry 2b (in_g + out_g) over their capacity C_g together.
          Expert e's R_e replicas sit on at most min(R_e, N) nodes, whose sources send at most
          top_e(R_e) (the min(R_e, N) largest node demands for e) to them over the node's own
          fabric; the rest, n_e - top_e(R_e), comes from other nodes, so one of e's holders has
          in_g >= l_e(R_e) = (n_e - top_e(R_e)) / R_e; and that holder's own source sends
          out_g >= o_e off its node: g's node holds e and at most D_B - 1 other experts (D_B:
          the distinct experts the node can hold), so it serves g's demand d_g locally for at
          most those, o_e = min over g of d_g - top_{D_B - 1}(d_g) - min(d_ge, the D_B-th
          largest of d_g) (the most that e and D_B - 1 others can be of d_g; at least every
          source's demand less its D_B largest). With every GPU within t, R_e >= n_e / (t x
          the fastest GPU's rate) and sum_e R_e <= the slots, so the busiest link is at least
          2b (min over such R of max_e (l_e(R_e) + o_e)) / max_g C_g (l_e falls with R_e: the
          least max is found by bisection over the values of l_e + o_e). Four one-GPU
          servers, demand 0.6 / 0.3 / 0.1 (``tests/test_planner_bounds.py``): with o_e the
          bound is the brute force's optimum, 5.37e-7 s; with every source's least sending
          alone (the coldest expert's holder keeping 0.6 of its demand local, where it can keep
          only 0.1) 4.39e-7 s. It sees what the node cuts average away: where
          compute binds, the hot experts take the replicas and a cold expert with two of them
          draws the other nodes' demand through two NICs (``scripts/bench_planner.py``
          instance 2: those NICs set the plan's busiest link).
nodes     The holders' bound with the nodes' distinct experts (``_Holders._with_nodes``). A plan
          holds e on q_e nodes with R_e replicas, q_e <= R_e <= q_e x (the most replicas of one
          expert a node can hold); the busiest receiving NIC carries Lambda assignments (x 2b /
          max_g C_g). Then (a) e's remote demand is at least rem_e(q_e) = n_e - top_e(q_e), so
          one holder has in_g >= rem_e(q_e) / R_e and Lambda >= that + o_e; (b) R_e >= n_e / (t x
          the fastest rate); (c) if q_e < N, a node without e exists, and each of its sources
          sends off it all but its demand for the at most k = min(D_B, E - 1) other experts the
          node holds: Lambda >= lack_e = min over g of d_g - (the k largest of d_g without e);
          (d) sum_e q_e <= sum_B D_B and sum_e R_e <= the slots. For any mu >= 0 the plan's own
          (q, R) then gives sum_e min over q of (R_e(q) + mu q) <= slots + mu sum_B D_B, with
          R_e(q) the least R that (a)-(c) allow on q nodes at Lambda: a level where that fails
          for some mu (a few fixed mu) is below every plan's, and failing is monotone in the
          level, so bisection from the holders' own level finds a valid one. It sees what the
          holders alone miss where nodes hold few distinct experts: with 2 GPUs a node and a
          cold expert, some node lacks a hot one (``tests/test_planner_bounds.py``: 4 x 2 GPUs,
          demand 0.6 / 0.3 / 0.1, 9.03e-8 -> 1.07e-7 s, the brute force's optimum 1.15e-7 s).
          On ``scripts/bench_planner.py``'s instances 6-10 it moves no layer's bound (measured
          2026-12-04): there the nodes hold 8 distinct experts of 16-32 and the level the
          holders reach is past every lack_e.
rails     On an ECMP rail fabric whose spine binds, the NIC links' and a fabric class's means
          together, from the sources that an expert's few replicas leave without a replica on
          their node or rail (``railbound.py``): valid at every GPU time, so the trade-off search
          takes it with the static cut bound.

Shape legend: G = GPUs, E = experts, N = nodes, S = cut sets.
"""

from __future__ import annotations

import heapq
import time
from typing import TYPE_CHECKING, Callable

import numpy as np

from epplan.placement.layer import LayerData

if TYPE_CHECKING:  # for the annotations only (no import cycle at run time)
    from epplan.topology import Topology



def compute_bound(data: LayerData) -> float:
    """Seconds: no placement serves this layer's assignments faster (see module docstring)."""
    load = data.counts.sum(axis=0)                                  # [E]
    unit = data.gpu_unit
    total = float(load.sum())
    if total <= 0:
        return 0.0
    fluid = total / float(np.sum(1.0 / unit))
    num_slots = int(data.slots.sum())
    if load.size > num_slots:
        return fluid  # not placeable; the caller raises before this matters
    # Under --expert-tp a TP group computes its rows together (each rank 1 / t of them): expert
    # e's replicas sit in r_e <= G / t distinct groups (one slot each at least), the busiest
    # group receives n_e / r_e and each of its ranks computes 1 / t of that.
    pool = data.pool
    r = apportion(load, num_slots, int(data.slots.size) // pool)
    return max(fluid, float((load / r).max()) * float(unit.min()) / pool)


def apportion(load: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """int64[E] replicas minimising max_e load_e / r_e with sum r = num_slots, 1 <= r_e <= max."""
    num_experts = load.size
    r = np.ones(num_experts, dtype=np.int64)
    heap = [(-float(load[e]), e) for e in range(num_experts) if max_replicas > 1]
    heapq.heapify(heap)
    for _ in range(num_slots - num_experts):
        while heap:
            neg, e = heapq.heappop(heap)
            if r[e] < max_replicas:
                break
        else:
            break
        r[e] += 1
        if r[e] < max_replicas:
            heapq.heappush(heap, (-float(load[e]) / r[e], e))
    return r


def cut_bound(data: LayerData) -> float:
    """Seconds: the busiest link leaving or entering a cut set (a node, the nodes under a fabric
    switch, or a GPU) is at least this busy."""
    topo = data.lm.topology
    b2 = 2.0 * data.bytes_per_assignment
    best = 0.0
    gpu_sets = [(np.array([g]),) + caps for g, caps in zip(range(topo.num_gpus), _gpu_caps(topo))] \
        if topo.num_gpus > 1 else []
    node = np.asarray(topo.gpu_node)
    node_sets = [(np.flatnonzero(np.isin(node, nodes)), exit_cap, entry_cap)
                 for nodes, exit_cap, entry_cap in cut_sets(topo)]
    for family in (node_sets, gpu_sets):
        if not family:
            continue
        unavoidable = np.zeros(len(family))
        exit_cap = np.array([f[1] for f in family])
        entry_cap = np.array([f[2] for f in family])
        for i, (members, _, _) in enumerate(family):
            demand = data.counts[members].sum(axis=0)
            held = min(data.num_experts, int(data.slots[members].sum()))
            top = np.sort(demand)[::-1][:held].sum()
            unavoidable[i] = max(0.0, float(demand.sum() - top))
        with np.errstate(divide="ignore", invalid="ignore"):
            own = np.where(exit_cap > 0, b2 * unavoidable / exit_cap, 0.0)
            own_in = np.where(entry_cap > 0, b2 * unavoidable / entry_cap, 0.0)
        best = max(best, float(own.max(initial=0.0)), float(own_in.max(initial=0.0)))
        # Over a partition (the single nodes, the single GPUs) every remote assignment leaves
        # one set and enters another, both ways.
        if family is gpu_sets or len(family) >= topo.num_nodes:
            part = slice(None) if family is gpu_sets else slice(0, topo.num_nodes)
            if exit_cap[part].sum() > 0:
                best = max(best, 2.0 * b2 * float(unavoidable[part].sum()) / float(exit_cap[part].sum()))
            if entry_cap[part].sum() > 0:
                best = max(best, 2.0 * b2 * float(unavoidable[part].sum()) / float(entry_cap[part].sum()))
    return best


_CUTS: dict[int, tuple[object, list]] = {}


def cut_sets(topo: Topology) -> list[tuple[np.ndarray, float, float]]:
    """[(nodes int64[...], exit bytes/s, entry bytes/s)]: every node alone (first, in node
    order), then the nodes under each fabric switch (a rail leaf's scalable unit, a pod's spine,
    an edge switch's servers), with the capacity of the links leaving and entering the set's
    devices: its nodes' own and the switches whose every server is in the set. Sets of all
    nodes (no cut) are left out. Cached per topology."""
    hit = _CUTS.get(id(topo.paths))
    if hit is not None and hit[0] is topo.paths:
        return hit[1]
    graph = topo.graph
    num_nodes = topo.num_nodes
    if num_nodes < 2:
        return []
    below = _servers_below(topo)
    sets = [frozenset([n]) for n in range(num_nodes)]
    seen = set(sets)
    for nodes in below.values():
        if 1 < len(nodes) < num_nodes and nodes not in seen:
            seen.add(nodes)
            sets.append(nodes)
    out = []
    for nodes in sets:
        inside = {d for d, n in graph.nodes(data="node") if n in nodes}
        inside |= {w for w, under in below.items() if under <= nodes}
        exit_cap = entry_cap = 0.0
        for idx, (u, v) in enumerate(topo.links):
            if (u in inside) != (v in inside):
                if u in inside:
                    exit_cap += topo.link_capacity[idx] * 1e9
                else:
                    entry_cap += topo.link_capacity[idx] * 1e9
        out.append((np.array(sorted(nodes), dtype=np.int64), exit_cap, entry_cap))
    _CUTS.clear()
    _CUTS[id(topo.paths)] = (topo.paths, out)
    return out


def _servers_below(topo) -> dict[str, frozenset]:
    """Fabric switch -> the nodes below it: those with a NIC on it, and those below its
    neighbours one tier down (tier = hops from the nearest NIC)."""
    graph = topo.graph
    kind = dict(graph.nodes(data="kind"))
    node_of = dict(graph.nodes(data="node"))
    fabric = [d for d, n in node_of.items() if n is None]
    if not fabric:
        return {}
    und = graph.to_undirected(as_view=True)
    tier: dict[str, int] = {}
    frontier = [w for w in fabric if any(kind[v] == "nic" for v in und.neighbors(w))]
    for w in frontier:
        tier[w] = 1
    while frontier:
        nxt = []
        for w in frontier:
            for v in und.neighbors(w):
                if node_of.get(v) is None and v not in tier:
                    tier[v] = tier[w] + 1
                    nxt.append(v)
        frontier = nxt
    below: dict[str, frozenset] = {}
    for w in sorted(tier, key=tier.get):
        nodes = {node_of[v] for v in und.neighbors(w) if kind[v] == "nic"}
        for v in und.neighbors(w):
            if v in below and tier[v] < tier[w]:
                nodes |= below[v]
        below[w] = frozenset(nodes)
    return below


def _gpu_caps(topo) -> list[tuple[float, float]]:
    """(exit, entry) bytes/s of each GPU's own links."""
    idx = {name: g for g, name in enumerate(topo.gpu_names)}
    caps = np.zeros((topo.num_gpus, 2))
    for k, (u, v) in enumerate(topo.links):
        if u in idx:
            caps[idx[u], 0] += topo.link_capacity[k] * 1e9
        if v in idx:
            caps[idx[v], 1] += topo.link_capacity[k] * 1e9
    return [tuple(c) for c in caps]


def local_capacity(demand: np.ndarray, num_gpus: np.ndarray, num_slots: np.ndarray,
                   per_replica: np.ndarray, total: np.ndarray) -> np.ndarray:
    """float64[S]: most of each set's own demand (float64[S, E]) the set can serve itself, with
    at most num_gpus[s] replicas of an expert, num_slots[s] replicas in all, each serving at most
    per_replica[s], and at most total[s] together. Greedy over the marginal gains of one more
    replica of e (per_replica while n_e is not covered, then the rest, then 0: concave), which is
    exact for sum_e min(n_e, r_e per_replica) under the count limits; ``total`` caps it."""
    cap = np.asarray(per_replica, dtype=np.float64)[:, None]
    m = np.asarray(num_gpus, dtype=np.float64)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        full = np.minimum(np.where(cap > 0, np.floor(demand / np.where(cap > 0, cap, 1.0)), 0.0), m)
    rest = np.where(full < m, demand - full * cap, 0.0)
    num_full = full.sum(axis=1)
    slots = np.asarray(num_slots, dtype=np.float64)
    rest = -np.sort(-rest, axis=1)
    cum = np.concatenate([np.zeros((rest.shape[0], 1)), np.cumsum(rest, axis=1)], axis=1)
    extra = np.clip(slots - num_full, 0, rest.shape[1]).astype(np.int64)
    served = np.where(slots <= num_full, slots * cap[:, 0],
                      num_full * cap[:, 0] + cum[np.arange(rest.shape[0]), extra])
    return np.minimum(np.minimum(served, np.asarray(total, dtype=np.float64)), demand.sum(axis=1))


class _CutFamilies:
    """The cut sets of ``cut_bound`` as arrays, for evaluating L(t) at many t."""

    def __init__(self, data: LayerData) -> None:
        topo = data.lm.topology
        node = np.asarray(topo.gpu_node)
        rate = 1.0 / data.gpu_unit
        self.total_rate = float(rate.sum())
        self.num_assignments = float(data.counts.sum())
        self.b2 = 2.0 * data.bytes_per_assignment
        families = []     # (members list, exit float64[S], entry float64[S], is_partition)
        node_sets = cut_sets(topo)
        if node_sets:
            singles = [(np.flatnonzero(node == n[0]), ex, en) for n, ex, en in node_sets if n.size == 1]
            families.append((singles, True))
            groups = [(np.flatnonzero(np.isin(node, n)), ex, en) for n, ex, en in node_sets if n.size > 1]
            if groups:
                seen = np.zeros(topo.num_nodes, dtype=np.int64)
                for n, _, _ in node_sets:
                    if n.size > 1:
                        seen[n] += 1
                families.append((groups, bool(np.all(seen == 1))))
        if topo.num_gpus > 1:
            families.append(([(np.array([g]), ex, en) for g, (ex, en) in enumerate(_gpu_caps(topo))], True))
        self.families = []
        for sets, is_partition in families:
            demand = np.stack([data.counts[m].sum(axis=0) for m, _, _ in sets])            # [S, E]
            self.families.append(dict(
                demand=demand, own=demand.sum(axis=1),
                size=np.array([m.size for m, _, _ in sets], dtype=np.float64),
                slots=np.array([data.slots[m].sum() for m, _, _ in sets], dtype=np.float64),
                fastest=np.array([rate[m].max() for m, _, _ in sets]),
                rate=np.array([rate[m].sum() for m, _, _ in sets]),
                exit=np.array([ex for _, ex, _ in sets]), entry=np.array([en for _, _, en in sets]),
                partition=is_partition))

    def link_bound(self, t: float) -> float:
        """Seconds: the busiest link's time in every plan whose busiest GPU is within t."""
        best = 0.0
        for f in self.families:
            local = local_capacity(f["demand"], f["size"], f["slots"], t * f["fastest"], t * f["rate"])
            out = np.maximum(f["own"] - local, 0.0)
            into = np.maximum(self.num_assignments - t * (self.total_rate - f["rate"]) - local, 0.0)
            for cap in (f["exit"], f["entry"]):
                has = cap > 0
                if np.any(has):
                    best = max(best, float((self.b2 * (out + into)[has] / cap[has]).max()))
                    if f["partition"] and np.all(has):
                        best = max(best, 2.0 * self.b2 * float(out.sum()) / float(cap.sum()))
        return best


class _Holders:
    """The receiving NICs of the GPUs that hold each expert, for L(t) at many t (module
    docstring, ``holders``)."""

    def __init__(self, data: LayerData) -> None:
        topo = data.lm.topology
        pm = topo.paths
        node = np.asarray(topo.gpu_node)
        num_nodes, num_gpus = topo.num_nodes, data.num_gpus
        self.usable = num_nodes > 1 and pm.recv_near.nnz > 0
        if not self.usable:
            return
        recv = pm.recv_near.tocsr()
        entry = np.asarray(recv.sign() @ data.lm.cap[pm.nic_down]).reshape(-1)      # [G] bytes/s C_g
        if np.any(entry <= 0):   # a GPU with no receiving NIC: no entry link to bound
            self.usable = False
            return
        self.unit = 2.0 * data.bytes_per_assignment / float(entry.max())           # s per assignment
        self.load = data.counts.sum(axis=0)                                         # [E] n_e
        self.rate = float((1.0 / data.gpu_unit).max())
        self.num_slots = int(data.slots.sum())
        self.num_gpus = num_gpus
        node_demand = np.zeros((num_nodes, data.num_experts))
        np.add.at(node_demand, node, data.counts)
        near = np.cumsum(-np.sort(-node_demand, axis=0), axis=0)                    # [N, E] top_e(q)
        k = np.arange(1, num_nodes + 1, dtype=np.float64)[:, None]
        # l[e, k - 1] = l_e(k) for k = 1..N; l_e(k) = 0 past N (every node can hold e)
        ell = np.maximum(self.load[None, :] - near, 0.0) / k
        ell[ell <= 1e-12 * max(float(self.load.sum()), 1e-30)] = 0.0
        self.ell = np.minimum.accumulate(ell, axis=0).T                            # [E, N]
        # out_e: the least a holder of e sends off its node (its node holds e and at most D_B - 1
        # other experts): d_g - top_{D-1}(d_g) - min(d_ge, the D-th largest d_g)
        distinct = np.array([min(data.num_experts, int(data.slots[node == b].sum())) for b in range(num_nodes)])
        ranked = -np.sort(-data.counts, axis=1)                                     # [G, E]
        d = distinct[node]                                                          # [G]
        top = np.cumsum(np.concatenate([np.zeros((num_gpus, 1)), ranked], axis=1), axis=1)   # [G, E + 1]
        rows = np.arange(num_gpus)
        kept = top[rows, d - 1][:, None] + np.minimum(data.counts, ranked[rows, d - 1][:, None])   # [G, E]
        self.out = np.maximum(data.counts.sum(axis=1)[:, None] - kept, 0.0).min(axis=0)           # [E]
        self.levels = np.unique(np.concatenate([(self.ell + self.out[:, None]).ravel(), self.out]))
        # The nodes' distinct experts (``nodes`` in the module docstring): rem[e, q - 1] = n_e -
        # top_e(q), the remote demand for e held on q nodes; lack_e = the least a source on a node
        # without e sends off it (the node holds at most k = min(D_B, E - 1) others).
        self.rem = np.maximum(self.load[:, None] - near.T, 0.0)                      # [E, N]
        self.rem[self.rem <= 1e-12 * max(float(self.load.sum()), 1e-30)] = 0.0
        self.num_nodes = num_nodes
        self.num_distinct = int(distinct.sum())
        self.per_node = int(max(min(int(np.sum(node == b)), int(data.slots[node == b].sum())) for b in range(num_nodes)))
        k = np.minimum(d, data.num_experts - 1)
        among = data.counts >= ranked[rows, np.maximum(k - 1, 0)][:, None]          # e within the k largest
        without = np.where(among, top[rows, k + 1][:, None] - data.counts, top[rows, k][:, None])   # [G, E]
        self.lack = np.maximum(data.counts.sum(axis=1)[:, None] - without, 0.0).min(axis=0)        # [E]

    def link_bound(self, t: float) -> float:
        """Seconds: the busiest link's time in every plan whose busiest GPU is within t."""
        if not self.usable:
            return 0.0
        need = self.need(t)                                                         # [E]
        if need.max() > self.num_gpus or need.sum() > self.num_slots:
            return float("inf")    # no plan has every GPU within t

        def fits(level: float) -> bool:
            floors = self.floors(level, need)
            return floors is not None and int(floors.sum()) <= self.num_slots

        lo, hi = 0, self.levels.size - 1                       # levels[hi] (the largest) fits
        while lo < hi:
            mid = (lo + hi) // 2
            if fits(float(self.levels[mid])):
                hi = mid
            else:
                lo = mid + 1
        return self.unit * self._with_nodes(float(self.levels[lo]), need)

    def counts(self, t: float) -> np.ndarray | None:
        """int64[E]: the least replicas of each expert that the holders' level at t allows
        (every GPU within t, its holders' NICs at that level), or None where no plan fits t.
        Not a bound: the counts the bound's minimum assumes, for a construction to try
        (``heuristic._counts_bound``)."""
        if not self.usable:
            return None
        need = self.need(t)
        if need.max() > self.num_gpus or need.sum() > self.num_slots:
            return None
        floors = self.floors(self.link_bound(t) / self.unit * (1 + 1e-9), need)
        return None if floors is None else np.minimum(floors, self.num_gpus)

    def floors(self, level: float, need: np.ndarray) -> np.ndarray | None:
        """int64[E]: the least replicas of each expert whose holders' NICs stay within ``level``
        (assignments: l_e(R_e) + out_e <= level) and whose GPUs within t (``need``, from
        ``need(t)``), or None where some holder's own sending alone is above it."""
        if np.any(self.out > level):
            return None
        first = (self.ell + self.out[:, None] > level).sum(axis=1) + 1
        return np.maximum(need, first)

    def need(self, t: float) -> np.ndarray:
        """int64[E]: the least replicas of each expert that keep its GPUs within t (at least 1);
        (1 - 1e-12): a replica count at a breakpoint of t is not rounded up by float error."""
        return np.maximum(1, np.ceil(self.load / (t * self.rate) * (1 - 1e-12))).astype(np.int64)

    _MUS = np.array([0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0])   # multipliers of the distinct-expert budget

    def _with_nodes(self, level: float, need: np.ndarray, rel: float = 1e-4) -> float:
        """The least level >= ``level`` (the holders' alone, below which no plan fits) that the
        nodes' distinct experts allow (module docstring, ``nodes``), to ``rel``: bisection on
        ``fits``, which a plan's own (q, R) passes at its own level, for every multiplier."""
        q = np.arange(1, self.num_nodes + 1)                                        # [N]

        def fits(lam: float) -> bool:
            slack = lam - self.out                                                  # [E]
            with np.errstate(divide="ignore", invalid="ignore"):
                # least R_e on q nodes with rem_e(q) / R_e + out_e <= lam, (1 - 1e-12): not
                # rounded up by float error
                r = np.where(slack[:, None] > 0, np.ceil(self.rem / slack[:, None] * (1 - 1e-12)),
                             np.where(self.rem > 0, np.inf, 0.0))
            r = np.maximum(np.maximum(r, q[None, :]), need[:, None])                # [E, N]
            ok = (r <= q[None, :] * self.per_node) & (r <= self.num_gpus)
            ok &= (q[None, :] == self.num_nodes) | (self.lack[:, None] <= lam)       # a node without e
            cost = np.where(ok[None], r[None] + self._MUS[:, None, None] * q[None, None, :], np.inf)   # [M, E, N]
            return bool(np.all(cost.min(axis=2).sum(axis=1) <= self.num_slots + self._MUS * self.num_distinct))

        if fits(level):
            return level
        # hi is past every lack_e and remote demand: it fits unless no plan has every GPU within t
        # (sum_e ceil(need_e / per_node) > the distinct slots), where any level is valid
        lo, hi = level, level + float(self.rem.max() + self.lack.max()) + 1.0
        while hi - lo > rel * hi:
            mid = 0.5 * (lo + hi)
            if fits(mid):
                hi = mid
            else:
                lo = mid
        return lo


def cut_link_bound(data: LayerData, t: float) -> float:
    """Seconds: L(t) of the cut sets alone (module docstring, ``tradeoff``)."""
    return max(cut_bound(data), _CutFamilies(data).link_bound(t))


def tradeoff_bound(data: LayerData, *, extra: Callable[[float], float] | None = None, max_evals: int = 40,
                   rel_width: float = 1e-3, deadline: float | None = None) -> float:
    """Seconds: min over the GPU time t of the layer's time with its links at L(t) (module
    docstring: the larger of the cuts' and the holders'), by interval refinement; at most ``max_evals`` evaluations of L, and none started
    after ``deadline`` (time.monotonic()). ``extra(t)``: another link bound valid for every plan
    whose busiest GPU is within t (``farbound.FarBound``), taken with the cuts."""
    c = compute_bound(data)
    if c <= 0:
        return 0.0
    cuts = _CutFamilies(data)
    holders = _Holders(data)
    # the NICs and the spine of an ECMP rail fabric together (``railbound.py``), at any GPU time
    from epplan.placement.railbound import rail_cover_bound

    static = max(cut_bound(data), rail_cover_bound(data))
    schedule = data.schedule

    def link(t: float) -> float:
        # Past the deadline, the cuts and holders alone (valid, cheap): ``extra`` may solve LPs.
        late = deadline is not None and time.monotonic() > deadline
        return max(static, cuts.link_bound(t), holders.link_bound(t), 0.0 if extra is None or late else extra(t))

    top = schedule.moe_time(link(c), c)       # no plan with X >= top can be faster than top
    if top <= c * (1 + rel_width):
        return top
    tail = schedule.moe_time(static, top)     # plans with X >= top
    points = list(c * (top / c) ** np.linspace(0.0, 1.0, 5))
    values = [link(t) for t in points]
    evals = len(points)
    while True:
        lows = [schedule.moe_time(values[i + 1], points[i]) for i in range(len(points) - 1)]
        i = int(np.argmin(lows))
        out_of_time = deadline is not None and time.monotonic() > deadline
        if evals >= max_evals or points[i + 1] <= points[i] * (1 + rel_width) or out_of_time:
            return float(min(min(lows), tail))
        mid = float(np.sqrt(points[i] * points[i + 1]))
        points.insert(i + 1, mid)
        values.insert(i + 1, link(mid))
        evals += 1


def lower_bound(data: LayerData) -> tuple[float, str]:
    """(seconds, which bound sets it): the layer's time under the schedule with the link time at
    the cut bound and the GPU time at the compute bound (valid: the time grows with both), or
    the trade-off bound where that is higher. Under ``--expert-tp`` (``data.pool`` > 1) the
    trade-off bound is not taken: it lets a replica on g serve at most t / c_g, where a TP
    group's ranks compute each other's rows."""
    c, k = compute_bound(data), cut_bound(data)
    schedule = data.schedule
    bound = schedule.moe_time(k, c)
    source = {"link": "cut", "gpu": "compute", "both": "cut+compute"}[schedule.binds(k, c)]
    if data.pool > 1:
        return bound, source
    traded = tradeoff_bound(data)
    if traded > bound * (1 + 1e-12):
        return traded, "tradeoff"
    return bound, source
