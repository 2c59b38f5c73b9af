"""Constructive placements: good starting points for the split LP and the MILP.

``local_first`` builds a placement in three steps, then the split LP (``splits.py``) finds its
best splits:

1. how many replicas each expert gets, per node.
   - One slot per GPU: the counts are the compute-optimal apportionment (``bounds.apportion``:
     the busiest replica is as light as possible), spread over nodes in proportion to each
     node's own demand for the expert (largest remainder), so most tokens find a replica on
     their own node.
   - Several slots per GPU: the h heaviest experts go on every node, with enough replicas there
     that each serves at most half a GPU's fluid share of the node's demand; the other ("cold")
     experts share the remaining slots, apportioned so that each cold replica carries a similar
     remote load, and are spread over nodes heaviest first onto the least-loaded node. h is
     chosen by scanning an estimate of the layer's time (fluid compute vs. the busiest NIC).
2. which GPU of a node holds each replica: a greedy two-dimensional makespan over estimated
   compute and NIC time, nodes starting at different GPUs (rails), then pairwise swaps while
   they lower the busier GPU (a Gale-Ryser placement first if the greedy corners itself).
3. the split LP.

With one slot per GPU on a cluster with a network, ``local_candidates`` also builds a second
placement whose replica counts weigh each replica's NIC (a cold expert's lone replica serves its
whole remote demand through one NIC) against compute under the schedule (``_counts_network``);
and a third whose counts are the trade-off bound's own at its minimum (``_counts_bound``: the
least replicas the holders' NIC level allows each expert at that GPU time, dealt one per node
first); the planner splits all and keeps the best. Measured 2026-12-06 (scripts/bench_planner.py,
this 2-core machine): the third is the best of the three on instance 6's layer 8 (0.018958 s
against 0.021459 and 0.023722), 9's layer 0 (0.002600 s against 0.003292 and 0.003340; 0.002396
with its replicas stepped over the nodes, below) and 10's layer 0 (0.004456 s against 0.004629
and 0.005482); its split LP takes 5-10 s at 512-1,024 GPUs.

With several slots per GPU the bound's counts are the second construction: on the 2:1
eight-node fabric with two experts a GPU (seed, d_ff 2048, zipf 1.2) they split to 0.009185 s
a layer against the multi-slot one's 0.010364 s, and the planner's worst gap there in 60 s went
25.98 -> 18.82 % (measured 2026-12-08, docs/planner.md); on instance 8's layer 0 (eight a GPU)
it is the worse, 1.488680 s against 1.037231 s.

With one slot per GPU the planner also splits each construction with its nodes' experts
exchanged (``node_swapped``: a replica of the expert or node that sets the estimated busiest NIC
traded for another node's, counts and slots kept), where time allows: on instance 6 its 24
layers' worst gap 9.91 -> 6.17 %, on 7 8.46 -> 5.92 % (measured 2026-12-07, docs/planner.md);
on 9 and 10 no change.

Shape legend: G = GPUs, E = experts, N = nodes.
"""

from __future__ import annotations

import heapq
import time

import numpy as np

from epplan.placement.bounds import apportion
from epplan.placement.layer import LayerData

_HOT_SHARE = 0.5   # most of a GPU's fluid share one replica of a hot expert is sized to serve


def local_first(data: LayerData) -> list[np.ndarray]:
    """replicas[e]: sorted ranks holding expert e (every expert >= 1, every GPU >= 1 where
    possible, at most ``data.slots[g]`` per GPU, never two of one expert on a GPU)."""
    return local_candidates(data)[0]


def local_candidates(data: LayerData) -> list[list[np.ndarray]]:
    """Constructions to split and compare: ``local_first``'s, and on a cluster with a network
    the one with the trade-off bound's counts (``_counts_bound``, where they can be dealt) and,
    with one slot per GPU, the one whose replica counts also spread each expert's remote serving
    over the NICs (``_counts_network``)."""
    node_of = data.lm.gpu_node
    nodes = [np.flatnonzero(node_of == n) for n in range(int(node_of.max()) + 1)]
    demand = np.stack([data.counts[m].sum(axis=0) for m in nodes])          # [N, E]
    one_slot = bool(np.all(data.slots <= 1))
    first = _counts_one_slot if one_slot else _counts_multi_slot
    out = [_to_gpus(data, nodes, demand, first(data, nodes, demand))]
    if data.lm.has_network and len(nodes) > 1:
        for build in (_counts_network, _counts_bound) if one_slot else (_counts_bound,):
            m = build(data, nodes, demand)
            if m is not None:
                out.append(_to_gpus(data, nodes, demand, m))
    return out


def _counts_one_slot(data: LayerData, nodes: list[np.ndarray], demand: np.ndarray) -> np.ndarray:
    """int64[N, E] replicas per node: apportionment counts, spread by node demand."""
    num_gpus = data.num_gpus
    load = demand.sum(axis=0)
    r = apportion(load, int(data.slots.sum()), num_gpus)
    cap = np.array([int(data.slots[m].sum()) for m in nodes])
    size = np.array([m.size for m in nodes])
    share = np.where(load > 0, demand / np.where(load > 0, load, 1.0), (cap / cap.sum())[:, None])
    target = share * r[None, :]                                            # [N, E]
    return _largest_remainder(target, r, cap, size)


def _counts_network(data: LayerData, nodes: list[np.ndarray], demand: np.ndarray) -> np.ndarray | None:
    """int64[N, E] replicas per node (one slot per GPU) chosen for the NICs as well as compute.

    The compute-optimal counts (``apportion``) give a cold expert one replica, whose GPU then
    serves the expert's whole remote demand through one NIC. Here each further slot goes to the
    expert whose extra replica shortens the layer's estimated time most (the schedule applied
    to the busiest NIC and the busiest GPU), a replica of e estimated at compute c * load_e / r_e
    and NIC time u * (R + remote_e / r_e): remote_e = the demand of the nodes without a replica
    of e (replicas spread one per node first), R = the remote demand a source sends per GPU.
    Replicas are then spread over nodes, one per node first, the rest by demand.
    """
    num_nodes, num_experts = demand.shape
    num_gpus = data.num_gpus
    slots = int(data.slots.sum())
    if slots < num_experts:
        return None
    nic = float(np.median(nic_unit(data)))
    comp = float(np.mean(data.gpu_unit))
    if nic <= 0:
        return None
    load = demand.sum(axis=0)
    schedule = data.schedule
    size = np.array([m.size for m in nodes])
    r = np.ones(num_experts, dtype=np.int64)

    def estimate(r: np.ndarray) -> tuple[float, float]:
        """(layer time under the schedule, a smooth tie-break) of replica counts r."""
        covered = np.minimum(r, num_nodes) / num_nodes          # share of sources with e on their node
        remote = load * (1.0 - covered)
        nic_s = nic * (remote.sum() / num_gpus + remote / r)   # [E] a replica's GPU's NIC
        comp_s = comp * load / r                               # [E] its GEMMs
        return (schedule.moe_time(float(nic_s.max()), float(comp_s.max())),
                float(np.sum(nic_s ** 2 + comp_s ** 2)))

    for _ in range(slots - num_experts):
        best = None
        for e in np.flatnonzero(r < num_gpus):
            r[e] += 1
            key = estimate(r)
            r[e] -= 1
            if best is None or key < best[0]:
                best = (key, e)
        r[best[1]] += 1
    cap = np.array([int(data.slots[m].sum()) for m in nodes])
    share = np.where(load > 0, demand / np.where(load > 0, load, 1.0), (cap / cap.sum())[:, None])
    # One replica per node first (what the estimate assumes), the rest by the nodes' demand.
    first = np.minimum(r, num_nodes)
    target = share * (r - first)[None, :] + first[None, :] / num_nodes
    return _largest_remainder(target, r, cap, size)


def _counts_bound(data: LayerData, nodes: list[np.ndarray], demand: np.ndarray) -> np.ndarray | None:
    """int64[N, E] replicas per node (every slot filled): the counts at the trade-off bound's
    minimum. The GPU time t is the one where the layer's time with its links at the holders'
    L(t) (``bounds._Holders``) is least (a grid of t from the compute bound up); each expert
    gets the least replicas that level allows (``_Holders.counts``), the slots left over go to
    the experts with the most demand per replica, the slots short are taken from those with
    the most replicas above their compute need. Replicas are dealt one per node first."""
    from epplan.placement.bounds import _Holders, compute_bound

    num_nodes, num_experts = demand.shape
    slots = int(data.slots.sum())
    c = compute_bound(data)
    holders = _Holders(data)
    if slots < num_experts or c <= 0 or not holders.usable:
        return None
    t = _bound_time(data, holders, c)
    r = holders.counts(t)
    if r is None:
        return None
    load = demand.sum(axis=0)
    need = holders.need(t)
    while r.sum() > slots:
        r[int(np.argmax(np.where(r > 1, r - need, -np.inf)))] -= 1
    while r.sum() < slots:
        r[int(np.argmax(np.where(r < data.num_gpus, load / r, -np.inf)))] += 1
    # Deal: each replica (hottest expert first) to the node with the fewest of that expert, then
    # the most free slots, then the one nearest the expert's next stop in turn: an expert's r
    # replicas step num_nodes / r nodes apart from where the previous expert's deal ended, so
    # that every run of neighbouring nodes (a scalable unit, a leaf) holds its share of them.
    # Dealt to consecutive nodes instead, a cold expert's replicas sat in one or two of
    # instance 9's four units, and the demand of the others crossed the 2:1 core: 9's layer 0
    # 0.002600 s consecutive, 0.002396 s stepped (measured 2026-12-06, docs/planner.md).
    free = np.array([int(data.slots[m].sum()) for m in nodes])
    size = np.array([m.size for m in nodes])
    m = np.zeros((num_nodes, num_experts), dtype=np.int64)
    turn = 0
    for e in np.argsort(-load, kind="stable"):
        step, stop = num_nodes / float(r[e]), float(turn)
        for _ in range(int(r[e])):
            ok = np.flatnonzero((free > 0) & (m[:, e] < size))
            if ok.size == 0:
                break
            n = int(ok[np.lexsort(((ok - int(round(stop))) % num_nodes, -free[ok], m[ok, e]))[0]])
            m[n, e] += 1
            free[n] -= 1
            stop += step
            turn += 1
    # a replica with no node left for it (every node with a free slot holds e on all its GPUs)
    return m if m.sum() == slots and np.all(m.sum(axis=0) >= 1) else None


def _bound_time(data: LayerData, holders, c: float) -> float:
    """Seconds: the GPU time t (25 points in [c, 1.6 c]) where the layer's time with its links at
    the holders' L(t) (``bounds._Holders``) is least: the level the bound's minimum assumes."""
    grid = c * np.linspace(1.0, 1.6, 25)
    times = [data.schedule.moe_time(holders.link_bound(float(t)), float(t)) for t in grid]
    return float(grid[int(np.argmin(times))])


def node_swapped(data: LayerData, replicas: list[np.ndarray], max_moves: int = 200,
                 until: float | None = None, gpu_time: float | None = None) -> list[np.ndarray] | None:
    """A construction's replicas with its nodes' experts exchanged (``_swap_nodes``) and dealt onto
    GPUs again (``_to_gpus``), or None where no exchange lowers the estimate (one slot per GPU,
    with a network: the placements ``local_candidates`` builds there). ``gpu_time``: the GPU time
    (seconds) whose replica capacity the estimate counts; by default the one where the holders'
    L(t) gives the least layer time (``_bound_time``)."""
    from epplan.placement.bounds import _Holders, compute_bound

    node_of = data.lm.gpu_node
    nodes = [np.flatnonzero(node_of == n) for n in range(int(node_of.max()) + 1)]
    if not data.lm.has_network or len(nodes) < 2 or not np.all(data.slots <= 1):
        return None
    demand = np.stack([data.counts[m].sum(axis=0) for m in nodes])          # [N, E]
    m = np.zeros(demand.shape, dtype=np.int64)
    for e, ranks in enumerate(replicas):
        np.add.at(m[:, e], node_of[ranks], 1)
    if gpu_time is None:
        c = compute_bound(data)
        holders = _Holders(data)
        t = _bound_time(data, holders, c) if holders.usable and c > 0 else c
    else:
        t = gpu_time
    size = np.array([r.size for r in nodes])
    swapped = _swap_nodes(m, demand, size, t * float((1.0 / data.gpu_unit).max()), max_moves, until)
    return None if np.array_equal(swapped, m) else _to_gpus(data, nodes, demand, swapped)


def _swap_nodes(m: np.ndarray, demand: np.ndarray, size: np.ndarray, per_replica: float,
                max_moves: int, until: float | None = None) -> np.ndarray:
    """int64[N, E] replicas per node: ``m`` with one replica of each of two experts exchanged
    between two nodes at a time, while that lowers the busiest estimated NIC (then the sum of
    squares); no exchange started after ``until`` (time.monotonic()). The estimate of a GPU of
    node B that holds e, in assignments: its share of what B sends off its node, (n_B - local_B)
    / |B|, plus e's remote demand per replica, (n_e - local_e) / r_e, where B's r_Be replicas of
    e serve min(n_Be, r_Be x per_replica) of B's own demand (the holders' bound's two terms,
    ``bounds._Holders``, with the plan's own nodes). Each exchange moves a replica out of the
    node B or of the expert e that sets the estimate (any expert of B, or e from any node that
    holds it) and one of the receiving node's back: every node keeps its slots, every expert its
    replica count (the GPU time).

    Why: the constructions deal each expert on its own, so a node's slots go to cold experts that
    leave its GPUs sending most of their demand off it, next to a warm expert's lone holder that
    receives its whole remote demand. Measured on ``scripts/bench_planner.py`` instance 6's 24
    layers (2026-12-07, split LP of each construction; docs/planner.md): the best of the three
    constructions 2.93-10.41 % from the layer's bound, with exchanges of (B, e) only after each
    0.81-10.23 % (layer 0 9.03 -> 3.46 %, 15 10.41 -> 2.13 %); out of any expert of B or e from any
    node too, layer 19 8.09 -> 4.79 %, 16 5.06 -> 2.55 %; instance 7 10.62 -> 8.61 %. On 9 and 10
    (64 and 128 nodes, the 3-tier core and the superpod fabric bind too) it did not help (11.69 ->
    11.75 %, 4.29 -> 4.56 %): the planner keeps the constructions and splits these after them."""
    m = m.copy()
    load, own = demand.sum(axis=0), demand.sum(axis=1)

    def estimate(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        local = np.minimum(demand, m * per_replica)                          # [N, E]
        num = np.maximum(m.sum(axis=0), 1)
        return local, num, (load - local.sum(axis=0)) / num, (own - local.sum(axis=1)) / size

    def best_from(x: int, e: int, local, num, rin, out):
        """(top, sum of squares, m) of the best exchange moving a replica of e off node x."""
        # e goes x -> y, f comes y -> x: y holds f, y has room for e, x for f
        ok = (m > 0) & (m[:, e] < size)[:, None] & (m[x] < size[x])[None, :]    # [N, E] (y, f)
        ok[x, :] = False
        ok[:, e] = False
        ys, fs = np.nonzero(ok)                                              # [K]
        if ys.size == 0:
            return None
        k = np.arange(ys.size)
        d_xe = min(demand[x, e], (m[x, e] - 1) * per_replica) - local[x, e]
        d_ye = np.minimum(demand[ys, e], (m[ys, e] + 1) * per_replica) - local[ys, e]
        d_yf = np.minimum(demand[ys, fs], (m[ys, fs] - 1) * per_replica) - local[ys, fs]
        d_xf = np.minimum(demand[x, fs], (m[x, fs] + 1) * per_replica) - local[x, fs]
        rin_k = np.repeat(rin[None, :], ys.size, axis=0)                     # [K, E]
        rin_k[:, e] = rin[e] - (d_xe + d_ye) / num[e]
        rin_k[k, fs] = rin[fs] - (d_yf + d_xf) / num[fs]
        out_k = np.repeat(out[None, :], ys.size, axis=0)                     # [K, N]
        out_k[:, x] = out[x] - (d_xe + d_xf) / size[x]
        out_k[k, ys] = out[ys] - (d_ye + d_yf) / size[ys]
        m_k = np.repeat(m[None], ys.size, axis=0)                            # [K, N, E]
        m_k[:, x, e] -= 1
        m_k[k, ys, e] += 1
        m_k[k, ys, fs] -= 1
        m_k[k, x, fs] += 1
        held = m_k > 0
        level_k = rin_k[:, None, :] + out_k[:, :, None]                      # [K, N, E]
        top = np.where(held, level_k, -np.inf).reshape(ys.size, -1).max(axis=1)
        sq = np.sum(np.where(held, level_k, 0.0).reshape(ys.size, -1) ** 2, axis=1)
        j = int(np.lexsort((sq, top))[0])
        return float(top[j]), float(sq[j]), m_k[j].copy()

    for _ in range(max_moves):
        if until is not None and time.monotonic() > until:
            break
        local, num, rin, out = estimate(m)
        level = np.where(m > 0, rin[None, :] + out[:, None], -np.inf)
        cur = (float(level.max()), float(np.sum(np.where(m > 0, level, 0.0) ** 2)))
        b, e = np.unravel_index(int(np.argmax(level)), level.shape)
        sources = [(b, e)] + [(b, int(f)) for f in np.flatnonzero(m[b]) if f != e] \
            + [(int(x), e) for x in np.flatnonzero(m[:, e]) if x != b]
        best = None
        for x, f in sources:
            found = best_from(x, f, local, num, rin, out)
            if found is not None and found[:2] < cur and (best is None or found[:2] < best[:2]):
                best = found
        if best is None:
            break
        m = best[2]
    return m


def _counts_multi_slot(data: LayerData, nodes: list[np.ndarray], demand: np.ndarray) -> np.ndarray:
    """int64[N, E] replicas per node with several slots per GPU.

    The h heaviest experts go on every node, with as many replicas there as the node's own
    demand needs at the fluid compute rate; the other ("cold") experts share the remaining slots,
    apportioned so that each cold replica carries a similar remote load, one per node where
    possible. h is chosen by scanning an estimate of the layer's time: max(fluid compute,
    the busiest GPU's NIC = its share of what its node sends remotely + what it serves remotely).
    """
    num_nodes, num_experts = demand.shape
    cap = np.array([int(data.slots[m].sum()) for m in nodes])
    size = np.array([m.size for m in nodes])
    load = demand.sum(axis=0)
    order = np.argsort(-load, kind="stable")
    num_gpus = data.num_gpus
    per_gpu = max(load.sum() / num_gpus, 1e-30)
    # Replicas node n gives its hot expert e: enough that each serves at most half a GPU's
    # fluid share of the node's demand for e, since every slot is filled and the GPU holding
    # a replica also serves its other experts (at a full share the LP could not balance them).
    need = np.minimum(size[:, None], np.maximum(1, np.ceil(demand / (_HOT_SHARE * per_gpu) - 1e-9))
                      ).astype(np.int64)
    nic = float(np.median(nic_unit(data))) or 0.0
    comp = float(np.mean(data.gpu_unit))
    best = None
    for h in range(0, num_experts + 1):
        hot, cold = order[:h], order[h:]
        cold_slots = cap - need[:, hot].sum(axis=1)
        if np.any(cold_slots < 0):
            break
        if cold_slots.sum() < cold.size:
            continue
        if cold.size:
            r = apportion(load[cold], int(cold_slots.sum()), num_nodes * int(size.max()))
            remote = load[cold] * np.clip(1.0 - r / num_nodes, 0.0, 1.0)
            sent = remote.sum() / num_gpus
            item = float((remote / r).max())
        else:
            sent, item = 0.0, 0.0
        network = nic * (sent + max(sent, item))
        estimate = (max(comp * per_gpu, network), network)   # ties: the idler network
        if best is None or estimate < best[0]:
            best = (estimate, h, r if cold.size else None, cold_slots)
    _, h, r, cold_slots = best
    hot, cold = order[:h], order[h:]
    m = np.zeros((num_nodes, num_experts), dtype=np.int64)
    m[:, hot] = need[:, hot]
    if cold.size:
        # Spread the cold replicas over nodes, heaviest first, each to the node whose estimated
        # load (own demand for its hot experts + cold replicas so far, per GPU) is lowest among
        # those with a free cold slot and without this expert (while r <= N).
        base = demand[:, hot].sum(axis=1) / size
        node_load = base.astype(np.float64).copy()
        free = cold_slots.copy()
        items = [(load[cold[i]] / r[i], i) for i in range(cold.size) for _ in range(int(r[i]))]
        items.sort(key=lambda it: (-it[0], it[1]))
        for w, i in items:
            e = cold[i]
            ok = np.flatnonzero((free > 0) & (m[:, e] < np.ceil(r[i] / num_nodes)))
            if ok.size == 0:
                ok = np.flatnonzero((free > 0) & (m[:, e] < size))
            if ok.size == 0:
                continue
            n = int(ok[np.lexsort((-demand[ok, e], node_load[ok]))[0]])
            m[n, e] += 1
            free[n] -= 1
            node_load[n] += w / size[n]
    # Leftover slots (rounding): more replicas of the node's heaviest experts per replica.
    free = cap - m.sum(axis=1)
    for n in range(num_nodes):
        while free[n] > 0:
            per_rep = np.where(m[n] < size[n], demand[n] / np.maximum(m[n], 1), -1.0)
            e = int(np.argmax(per_rep))
            if per_rep[e] < 0:
                break
            m[n, e] += 1
            free[n] -= 1
    return m


def _largest_remainder(target: np.ndarray, total: np.ndarray, cap: np.ndarray, upper: np.ndarray) -> np.ndarray:
    """int64[N, E] close to ``target`` with column sums ``total``, row sums <= cap, and
    m <= upper (int64[N, E], or int64[N] per node)."""
    num_nodes, num_experts = target.shape
    upper = np.broadcast_to(upper if upper.ndim == 2 else upper[:, None], target.shape)
    m = np.zeros((num_nodes, num_experts), dtype=np.int64)
    left = total.astype(np.int64).copy()
    free = cap.astype(np.int64).copy()
    heap = [(-float(target[n, e]), n, e) for n in range(num_nodes) for e in range(num_experts)]
    heapq.heapify(heap)
    while heap and left.sum() > 0:
        neg, n, e = heapq.heappop(heap)
        if left[e] == 0 or free[n] == 0 or m[n, e] >= upper[n, e]:
            continue
        m[n, e] += 1
        left[e] -= 1
        free[n] -= 1
        heapq.heappush(heap, (neg + 1.0, n, e))
    for e in np.flatnonzero(left > 0):  # anything the heap could not place: wherever there is room
        for n in np.argsort(-free, kind="stable"):
            while left[e] > 0 and free[n] > 0 and m[n, e] < upper[n, e]:
                m[n, e] += 1
                left[e] -= 1
                free[n] -= 1
    return m


def _to_gpus(data: LayerData, nodes: list[np.ndarray], demand: np.ndarray, m: np.ndarray) -> list[np.ndarray]:
    """Deal each node's replicas onto its GPUs (module docstring, step 2).

    Each replica is an item with an estimated compute time (its node's own demand for the
    expert, shared by the node's replicas, plus its share of the expert's remote demand) and an
    estimated NIC time (that remote share). Items go, largest first, to the GPU where the larger
    of the two running totals grows least: a greedy two-dimensional makespan.
    """
    load = demand.sum(axis=0)                                            # [E]
    total_r = np.maximum(m.sum(axis=0), 1)
    local = np.where(m > 0, demand, 0.0).sum(axis=0)                     # served on own node
    remote_share = np.maximum(load - local, 0.0) / total_r               # per replica
    unit_nic = nic_unit(data)                                           # [G] s per assignment
    held: list[list[int]] = [[] for _ in range(data.num_experts)]
    for n, ranks in enumerate(nodes):
        k = ranks.size
        ranks = ranks[np.roll(np.arange(k), -(n % k))]   # node n starts at its n-th GPU (rail)
        slots = data.slots[ranks].astype(np.int64)
        used = np.zeros(k, dtype=np.int64)
        comp = np.zeros(k)
        nic = np.zeros(k)
        holds = np.zeros((k, data.num_experts), dtype=bool)
        items = []
        for e in np.flatnonzero(m[n]):
            own = demand[n, e] / m[n, e]
            for _ in range(int(m[n, e])):
                items.append((own + remote_share[e], remote_share[e], int(e)))
        unit_c = data.gpu_unit[ranks]
        unit_n = unit_nic[ranks]
        items.sort(key=lambda it: (-max(it[0] * unit_c.max(), it[1] * unit_n.max()), it[2]))
        gpu_of = np.full(len(items), -1)
        for idx, (c_load, r_load, e) in enumerate(items):
            ok = np.flatnonzero((used < slots) & ~holds[:, e])
            if ok.size == 0:
                continue  # cannot happen when m[n, e] <= k and sum_e m[n, e] <= sum slots
            score = np.maximum(comp[ok] + c_load * unit_c[ok], nic[ok] + r_load * unit_n[ok])
            i = int(ok[np.lexsort((used[ok], score))[0]])
            used[i] += 1
            comp[i] += c_load * unit_c[i]
            nic[i] += r_load * unit_n[i]
            holds[i, e] = True
            gpu_of[idx] = i
        if np.any(gpu_of < 0):
            # The greedy cornered itself: place by Gale-Ryser instead, then balance by swaps.
            gpu_of, holds = _gale_ryser(items, slots)
        _swap_search(items, gpu_of, unit_c, unit_n, holds)
        for (_, _, e), i in zip(items, gpu_of):
            held[e].append(int(ranks[i]))
    out = [np.array(sorted(h), dtype=np.int64) for h in held]
    assert all(r.size for r in out), "an expert without a replica"
    return out


def _gale_ryser(items: list[tuple[float, float, int]], slots: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Place replicas on GPUs, none twice on a GPU: experts with the most replicas first, each
    onto the GPUs with the most free slots. Succeeds whenever any such placement exists."""
    k = slots.size
    ex = np.array([it[2] for it in items])
    experts, counts = np.unique(ex, return_counts=True)
    free = slots.astype(np.int64).copy()
    holds = np.zeros((k, int(ex.max()) + 1), dtype=bool)
    gpu_of = np.full(len(items), -1)
    for e, m in sorted(zip(experts, counts), key=lambda t: -t[1]):
        gpus = np.argsort(-free, kind="stable")[:m]
        assert np.all(free[gpus] > 0), "more replicas than a node's slots"
        free[gpus] -= 1
        holds[gpus, e] = True
        gpu_of[np.flatnonzero(ex == e)] = gpus
    return gpu_of, holds


def _swap_search(items: list[tuple[float, float, int]], gpu_of: np.ndarray, unit_c: np.ndarray,
                 unit_n: np.ndarray, holds: np.ndarray, max_moves: int = 2000) -> None:
    """Improve a dealing in place by swapping two GPUs' items while that lowers the larger of
    the two GPUs' max(compute, NIC) estimates; every GPU keeps its number of items."""
    c = np.array([it[0] for it in items])
    r = np.array([it[1] for it in items])
    ex = np.array([it[2] for it in items])
    k = unit_c.size
    for _ in range(max_moves):
        comp = np.bincount(gpu_of, weights=c, minlength=k) * unit_c
        nic = np.bincount(gpu_of, weights=r, minlength=k) * unit_n
        score = np.maximum(comp, nic)
        a = int(np.argmax(score))
        mine = np.flatnonzero(gpu_of == a)
        other = np.flatnonzero(gpu_of != a)
        if mine.size == 0 or other.size == 0:
            return
        b = gpu_of[other]                                            # [O]
        # Swap mine[i] (to b) with other[j] (to a): new totals of a and b.
        dc = c[other][None, :] - c[mine][:, None]                    # [M, O] change at a
        dr = r[other][None, :] - r[mine][:, None]
        new_a = np.maximum(comp[a] + dc * unit_c[a], nic[a] + dr * unit_n[a])
        new_b = np.maximum(comp[b][None, :] - dc * unit_c[b][None, :], nic[b][None, :] - dr * unit_n[b][None, :])
        worst = np.maximum(new_a, new_b)
        # No duplicates: a must not already hold other[j]'s expert, b not mine[i]'s.
        bad = holds[a][ex[other]][None, :] | holds[b[None, :], ex[mine][:, None]]
        bad |= ex[other][None, :] == ex[mine][:, None]
        worst = np.where(bad, np.inf, worst)
        i, j = np.unravel_index(int(np.argmin(worst)), worst.shape)
        if not worst[i, j] < score[a] * (1 - 1e-9):
            return
        x, y = mine[i], other[j]
        bb = gpu_of[y]
        holds[a, ex[x]], holds[bb, ex[y]] = False, False
        holds[a, ex[y]], holds[bb, ex[x]] = True, True
        gpu_of[x], gpu_of[y] = bb, a


def nic_unit(data: LayerData) -> np.ndarray:
    """float64[G] seconds per assignment on each GPU's own NIC uplink (0 without a network):
    2b / capacity, the same unit the links are timed in."""
    pm = data.lm.pm
    out = np.zeros(data.num_gpus)
    if not data.lm.has_network:
        return out
    for g in range(data.num_gpus):
        nics = data.lm.map.near_nic[g][data.lm.map.near_nic[g] >= 0]
        if nics.size:
            out[g] = 2.0 * data.bytes_per_assignment / data.lm.cap[pm.nic_up[nics]].min()
    return out
