"""Lower bounds on a layer's bottleneck that hold for every feasible per-GPU placement and split.

They certify the planner's gap: ``gap = (cost - bound) / cost`` where ``bound`` is the largest of
these and the MILP's dual bound (``epplan.placement.ilp``), each valid for the true problem (one
decision per GPU, any per-source split), not only for an aggregated model.

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

Shape legend: G = GPUs, E = experts, N = nodes.
"""

from __future__ import annotations

import heapq

import numpy as np

from epplan.placement.layer import LayerData


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
    r = apportion(load, num_slots, int(data.slots.size))
    return max(fluid, float((load / r).max()) * float(unit.min()))


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
    """Seconds: the busiest link leaving or entering a node (or a GPU) is at least this busy."""
    topo = data.lm.topology
    b2 = 2.0 * data.bytes_per_assignment
    best = 0.0
    for groups, slots_of in ((_node_sets(topo), None), (_gpu_sets(topo), None)):
        exit_cap, entry_cap = _cut_capacity(topo, groups)
        unavoidable = np.zeros(len(groups))
        for i, members in enumerate(groups):
            demand = data.counts[members].sum(axis=0)
            held = min(data.num_experts, int(data.slots[members].sum()))
            top = np.sort(demand)[::-1][:held].sum()
            unavoidable[i] = max(0.0, float(demand.sum() - top))
        with np.errstate(divide="ignore", invalid="ignore"):
            own = np.where(exit_cap > 0, b2 * unavoidable / exit_cap, 0.0)
            own_in = np.where(entry_cap > 0, b2 * unavoidable / entry_cap, 0.0)
        best = max(best, float(own.max(initial=0.0)), float(own_in.max(initial=0.0)))
        if exit_cap.sum() > 0:
            best = max(best, 2.0 * b2 * float(unavoidable.sum()) / float(exit_cap.sum()))
        if entry_cap.sum() > 0:
            best = max(best, 2.0 * b2 * float(unavoidable.sum()) / float(entry_cap.sum()))
    return best


def _node_sets(topo) -> list[np.ndarray]:
    node = np.asarray(topo.gpu_node)
    return [np.flatnonzero(node == n) for n in range(topo.num_nodes)] if topo.num_nodes > 1 else []


def _gpu_sets(topo) -> list[np.ndarray]:
    return [np.array([g]) for g in range(topo.num_gpus)] if topo.num_gpus > 1 else []


def _cut_capacity(topo, groups: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Bytes/s of the links leaving and entering each group's devices (a GPU group of one: that
    GPU; a node: every device of the node)."""
    if not groups:
        return np.zeros(0), np.zeros(0)
    graph = topo.graph
    single = all(g.size == 1 for g in groups)
    owner: dict[str, int] = {}
    for i, members in enumerate(groups):
        if single:
            owner[topo.gpu_names[int(members[0])]] = i
        else:
            node = int(topo.gpu_node[members[0]])
            for d, n in graph.nodes(data="node"):
                if n == node:
                    owner[d] = i
    exit_cap = np.zeros(len(groups))
    entry_cap = np.zeros(len(groups))
    for idx, (u, v) in enumerate(topo.links):
        ou, ov = owner.get(u), owner.get(v)
        if ou is not None and ou != ov:
            exit_cap[ou] += topo.link_capacity[idx] * 1e9
        if ov is not None and ou != ov:
            entry_cap[ov] += topo.link_capacity[idx] * 1e9
    return exit_cap, entry_cap


def lower_bound(data: LayerData) -> tuple[float, str]:
    """(seconds, which bound) the best of the analytic bounds."""
    c, k = compute_bound(data), cut_bound(data)
    return (c, "compute") if c >= k else (k, "cut")
