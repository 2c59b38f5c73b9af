"""Lower bounds on a layer's time (the link and GPU parts, combined by the schedule) that hold for every feasible per-GPU placement and split.

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


def cut_sets(topo) -> list[tuple[np.ndarray, float, float]]:
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


def lower_bound(data: LayerData) -> tuple[float, str]:
    """(seconds, which bound sets it): the layer's time under the schedule with the link time at
    the cut bound and the GPU time at the compute bound (valid: the time grows with both)."""
    c, k = compute_bound(data), cut_bound(data)
    schedule = data.schedule
    bound = schedule.moe_time(k, c)
    return bound, {"link": "cut", "gpu": "compute", "both": "cut+compute"}[schedule.binds(k, c)]
