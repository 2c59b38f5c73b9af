"""Baseline placements the planner is measured against: pure functions of a ``PlacementProblem``.

- ``contiguous``: Megatron-Core's expert-parallel layout.
- ``eplb``: DeepSeek's Expert Parallelism Load Balancer policy (replicate the heaviest, then
  hierarchical balanced packing), written from its published description.
- ``random_placement``: a seeded random feasible placement.

All return the shared ``Placement`` with tokens split evenly over an expert's replicas (every
source rank the same), honour ``experts_per_gpu``, give every expert at least one replica, and
with G >= E and the default of one expert per GPU fill every GPU with exactly one. ``eplb``
fills every slot ``experts_per_gpu`` allows (its redundant experts); the others the fewest that fit.

Shape legend: L = MoE layers, G = ranks (GPUs), E = experts per layer, N = nodes,
S = slots per GPU (``problem.slots_per_gpu``; eplb: see there), P = physical experts, G * S.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from epplan.placement.problem import PlacementProblem
from epplan.placement.types import LayerPlacement, Placement


def contiguous(problem: PlacementProblem) -> Placement:
    """Experts in order over the ranks, the same in every layer.

    G >= E: rank g holds expert g mod E, so expert e sits on ranks e, e + E, e + 2E, ... (the
    free GPUs hold replicas round-robin). E > G: rank g holds the g-th of G consecutive blocks
    of experts, as even as possible (sizes differ by at most one).
    """
    num_gpus, num_experts = problem.num_gpus, problem.num_experts
    if num_gpus >= num_experts:
        replicas = [np.arange(e, num_gpus, num_experts) for e in range(num_experts)]
    else:
        blocks = np.array_split(np.arange(num_experts), num_gpus)
        e2g = np.concatenate([np.full(len(b), g) for g, b in enumerate(blocks)])
        replicas = [np.array([e2g[e]]) for e in range(num_experts)]
    layer = _even_layer(replicas, num_gpus)
    return Placement(num_gpus, num_experts, [layer] * problem.num_layers, method="contiguous")


def eplb(problem: PlacementProblem) -> Placement:
    """DeepSeek EPLB's policy, per layer, on the traffic's expert loads.

    Hierarchical when the experts pack evenly over nodes of equal size (E divisible by the
    number of nodes N): (1) pack experts to nodes, E / N each, balancing load (each expert is its
    own group: our models have no group-limited routing); (2) within each node, give each of its
    G/N * S slots beyond one per expert to the expert with the highest load per replica;
    (3) pack the node's replicas onto its GPUs, S each, balancing load. Otherwise (e.g. more
    nodes than experts) EPLB's global policy: replicate over all G * S slots, then pack onto all
    GPUs. A GPU never holds two replicas of one expert. Tokens are split evenly over replicas.
    S here is ``experts_per_gpu`` (EPLB's redundant experts fill every slot the planner may use),
    capped at the experts a GPU can choose from; with the default of 1 that is one expert per GPU.
    """
    num_gpus, num_experts = problem.num_gpus, problem.num_experts
    node_of = np.asarray(problem.topology.gpu_node)
    nodes = [np.flatnonzero(node_of == n) for n in range(problem.topology.num_nodes)]
    sizes = {len(n) for n in nodes}
    is_hier = (len(nodes) > 1 and len(sizes) == 1 and num_experts % len(nodes) == 0)
    # EPLB's redundant experts: every slot the user allows (the planner's budget too), but no more
    # than the distinct experts a GPU can draw from (its node's, or all of them).
    slots = min(problem.experts_per_gpu, num_experts // len(nodes) if is_hier else num_experts)
    layers = []
    for load in problem.expert_load:                                      # [E] per layer
        if is_hier:
            replicas: list[list[int]] = [[] for _ in range(num_experts)]
            node_experts = _balanced_packing(load, np.arange(num_experts), len(nodes))
            for ranks, experts in zip(nodes, node_experts):
                counts = _replicate_heaviest(load[experts], len(ranks) * slots, len(ranks))
                _pack_to_gpus(load[experts], counts, ranks, slots, experts, replicas)
        else:
            replicas = [[] for _ in range(num_experts)]
            counts = _replicate_heaviest(load, num_gpus * slots, num_gpus)
            _pack_to_gpus(load, counts, np.arange(num_gpus), slots, np.arange(num_experts), replicas)
        layers.append(_even_layer([np.array(sorted(r)) for r in replicas], num_gpus))
    return Placement(num_gpus, num_experts, layers, method="eplb")


def random_placement(problem: PlacementProblem, seed: int = 0, *, even_split: bool = True) -> Placement:
    """A seeded random feasible placement: per layer, every expert on a random GPU, the other
    slots (G * S - E of them) filled with random experts, no GPU holding one expert twice.
    ``even_split=False`` also splits each source's tokens over the replicas at random."""
    rng = np.random.default_rng(seed)
    num_gpus, num_experts, slots = problem.num_gpus, problem.num_experts, problem.slots_per_gpu
    layers = []
    for _ in range(problem.num_layers):
        count = np.ones(num_experts, dtype=np.int64)
        for _ in range(num_gpus * slots - num_experts):
            count[rng.choice(np.flatnonzero(count < num_gpus))] += 1
        # Deal the replicas, grouped by expert, round-robin over a random order of the GPUs:
        # replica i goes to GPU order[i mod G], so no GPU gets an expert twice (count <= G) and
        # every GPU gets exactly S.
        experts = np.repeat(np.arange(num_experts), count)[_grouped_shuffle(count, rng)]
        order = rng.permutation(num_gpus)
        gpus = order[np.arange(experts.size) % num_gpus]
        replicas = [np.sort(gpus[experts == e]) for e in range(num_experts)]
        if even_split:
            layers.append(_even_layer(replicas, num_gpus))
        else:
            split = [rng.dirichlet(np.ones(r.size), size=num_gpus) for r in replicas]
            layers.append(LayerPlacement(replicas, split))
    method = f"random(seed={seed})" + ("" if even_split else ", random split")
    return Placement(num_gpus, num_experts, layers, method=method)


BASELINES: dict[str, Callable[[PlacementProblem], Placement]] = {
    "contiguous": contiguous,
    "eplb": eplb,
    "random": random_placement,
}


# ---------------------------------------------------------------------------------------------

def _even_layer(replicas: list[np.ndarray], num_gpus: int) -> LayerPlacement:
    replicas = [np.asarray(r, dtype=np.int64) for r in replicas]
    return LayerPlacement(replicas, [np.full((num_gpus, r.size), 1.0 / r.size) for r in replicas])


def _grouped_shuffle(count: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices into np.repeat(arange(E), count) visiting the experts' groups in random order."""
    starts = np.concatenate([[0], np.cumsum(count)[:-1]])
    return np.concatenate([starts[e] + np.arange(count[e]) for e in rng.permutation(count.size)])


def _replicate_heaviest(load: np.ndarray, num_slots: int, max_replicas: int) -> np.ndarray:
    """int64[E] replicas per expert: one each, then each further slot to the expert with the
    highest load per replica among those with fewer than ``max_replicas`` (ties: lowest index)."""
    num_experts = load.size
    assert num_experts <= num_slots <= num_experts * max_replicas, (num_experts, num_slots, max_replicas)
    count = np.ones(num_experts, dtype=np.int64)
    for _ in range(num_slots - num_experts):
        per_replica = np.where(count < max_replicas, load / count, -np.inf)
        count[int(np.argmax(per_replica))] += 1
    return count


def _balanced_packing(weight: np.ndarray, items: np.ndarray, num_packs: int) -> list[np.ndarray]:
    """Split ``items`` (with ``weight[i]``) into ``num_packs`` packs of equal size: heaviest
    first, each to the lightest pack that still has room. Returns the packs' items, sorted."""
    per_pack = items.size // num_packs
    assert per_pack * num_packs == items.size
    packs: list[list[int]] = [[] for _ in range(num_packs)]
    pack_load = np.zeros(num_packs)
    for i in sorted(items, key=lambda i: (-weight[i], i)):
        room = [p for p in range(num_packs) if len(packs[p]) < per_pack]
        p = min(room, key=lambda p: (pack_load[p], p))
        packs[p].append(int(i))
        pack_load[p] += weight[i]
    return [np.array(sorted(p), dtype=np.int64) for p in packs]


def _pack_to_gpus(load: np.ndarray, count: np.ndarray, ranks: np.ndarray, slots: int,
                  experts: np.ndarray, replicas: list[list[int]]) -> None:
    """Place ``count[i]`` replicas of local expert i (global id ``experts[i]``, load
    ``load[i] / count[i]`` each) on ``ranks``, ``slots`` per rank, balancing load, never two of
    one expert on a rank: heaviest replica first to the lightest rank with room that lacks it.
    Falls back to dealing round-robin if the greedy corners itself (possible only when an
    expert's replicas nearly fill the ranks). Appends the chosen ranks to ``replicas``."""
    num_ranks = ranks.size
    assert count.sum() == num_ranks * slots and count.max() <= num_ranks
    items = sorted(((load[i] / count[i], i) for i in range(count.size) for _ in range(count[i])),
                   key=lambda x: (-x[0], x[1]))
    filled = np.zeros(num_ranks, dtype=np.int64)
    rank_load = np.zeros(num_ranks)
    holds = np.zeros((num_ranks, count.size), dtype=bool)
    chosen: list[tuple[int, int]] = []
    for w, i in items:
        ok = np.flatnonzero((filled < slots) & ~holds[:, i])
        if ok.size == 0:
            chosen = _round_robin(count, num_ranks)
            break
        p = int(ok[np.argmin(rank_load[ok])])
        filled[p] += 1
        rank_load[p] += w
        holds[p, i] = True
        chosen.append((i, p))
    for i, p in chosen:
        replicas[int(experts[i])].append(int(ranks[p]))


def _round_robin(count: np.ndarray, num_ranks: int) -> list[tuple[int, int]]:
    """Replica k of the list grouped by expert goes to rank k mod num_ranks."""
    experts = np.repeat(np.arange(count.size), count)
    return [(int(e), k % num_ranks) for k, e in enumerate(experts)]
