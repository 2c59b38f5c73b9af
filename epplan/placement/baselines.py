"""Baseline placements the planner is measured against: pure functions of a ``PlacementProblem``.

- ``contiguous``: Megatron-Core's expert-parallel layout.
- ``eplb``: DeepSeek's Expert Parallelism Load Balancer as DeepSeek and the serving frameworks
  call it (``epplan.placement.eplb``): the model's expert groups, hierarchical when they divide
  over the nodes, global otherwise (every model without group-limited routing).
- ``eplb-hier``: EPLB's hierarchical policy with every expert its own group (replicas confined
  to one node), the variant epplan compared against before.
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

from epplan.errors import PlacementError
from epplan.placement.eplb import is_hierarchical, rebalance_experts
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
    """DeepSeek EPLB as DeepSeek, vLLM and SGLang call it (``epplan.placement.eplb``), per layer,
    on the traffic's expert loads: the model's expert groups (``num_expert_groups``; one group
    without group-limited routing), hierarchical when they divide over the nodes, global otherwise."""
    return _eplb(problem, max(1, problem.config.num_expert_groups), "eplb")


def eplb_hierarchical(problem: PlacementProblem) -> Placement:
    """EPLB's hierarchical policy with every expert its own group: each expert's replicas stay on
    the one node its group was packed to (global when the experts do not divide over the nodes)."""
    return _eplb(problem, problem.num_experts, "eplb-hier")


def _eplb(problem: PlacementProblem, num_groups: int, method: str) -> Placement:
    """EPLB's placement as a ``Placement``: GPU g holds physical slots g * S .. (g + 1) * S - 1
    of ``phy2log``; replicas of one expert that EPLB packs onto one GPU are one replica there
    with their shares added. Tokens split evenly over an expert's physical replicas, as the
    serving frameworks route them. S, EPLB's physical experts per GPU, is ``experts_per_gpu``
    (its redundant experts fill every slot the planner may use too), capped at the distinct
    experts a GPU can draw from (its node's under the hierarchical policy, all otherwise).
    Nodes of unequal size cannot take the hierarchical policy: they get the global one.
    """
    num_gpus, num_experts = problem.num_gpus, problem.num_experts
    node_of = np.asarray(problem.topology.gpu_node)
    num_nodes = problem.topology.num_nodes
    sizes = np.bincount(node_of, minlength=num_nodes)
    if np.any(sizes != sizes[0]) or np.any(np.diff(node_of) < 0):
        num_nodes = 1                      # EPLB needs equal nodes with node-major ranks
    hier = is_hierarchical(num_groups, num_nodes) and num_nodes > 1
    if not hier:
        num_groups, num_nodes = 1, 1
    per_gpu = min(problem.experts_per_gpu, num_experts // num_nodes if hier else num_experts)
    per_gpu = max(per_gpu, -(-num_experts // num_gpus))
    phy2log, _, logcnt = rebalance_experts(problem.expert_load, num_gpus * per_gpu, num_groups,
                                           num_nodes, num_gpus)
    gpu_of_slot = np.arange(num_gpus * per_gpu) // per_gpu
    layers = []
    for li in range(problem.num_layers):
        replicas, split = [], []
        order = np.argsort(phy2log[li], kind="stable")          # physical slots by logical expert
        bounds = np.searchsorted(phy2log[li][order], np.arange(num_experts + 1))
        for e in range(num_experts):
            gpus, multiplicity = np.unique(gpu_of_slot[order[bounds[e]:bounds[e + 1]]], return_counts=True)
            replicas.append(gpus.astype(np.int64))
            split.append(np.tile(multiplicity / logcnt[li, e], (num_gpus, 1)))
        layers.append(LayerPlacement(replicas, split))
    return Placement(num_gpus, num_experts, layers, method=method)


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
    "eplb-hier": eplb_hierarchical,
    "random": random_placement,
}




def baseline(name: str, problem: PlacementProblem, seed: int = 0) -> Placement:
    """The baseline called ``name`` (a key of ``BASELINES``) on ``problem``; ``seed`` is the random
    baseline's. The one way every command and the planner build a baseline."""
    if name not in BASELINES:
        raise PlacementError(f"unknown baseline {name!r}; the baselines are {', '.join(BASELINES)}")
    return random_placement(problem, seed) if name == "random" else BASELINES[name](problem)


# ---------------------------------------------------------------------------------------------

def _even_layer(replicas: list[np.ndarray], num_gpus: int) -> LayerPlacement:
    replicas = [np.asarray(r, dtype=np.int64) for r in replicas]
    return LayerPlacement(replicas, [np.full((num_gpus, r.size), 1.0 / r.size) for r in replicas])


def _grouped_shuffle(count: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Indices into np.repeat(arange(E), count) visiting the experts' groups in random order."""
    starts = np.concatenate([[0], np.cumsum(count)[:-1]])
    return np.concatenate([starts[e] + np.arange(count[e]) for e in rng.permutation(count.size)])


