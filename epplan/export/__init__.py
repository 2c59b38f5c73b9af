"""A placement in the layouts other frameworks consume: EPLB's maps, vLLM's and SGLang's expert
locations, Megatron-Core's expert order.

Shape legend: L = MoE layers, G = ranks (EP size), E = logical (routed) experts,
P = physical experts = G * S, S = physical slots per GPU, R = most replicas of any expert.

EPLB (DeepSeek's ``eplb.rebalance_experts``) and the serving frameworks that adopted it describe a
layer by ``phy2log`` int64[L, P]: physical expert p, which lives on GPU p // S, is a replica of
logical expert phy2log[l, p]; ``log2phy`` int64[L, E, R] lists each logical expert's physical
ids (-1 padded); ``logcnt`` int64[L, E] counts them. vLLM's ``EplbState`` holds the same three as
``physical_to_logical_map``, ``logical_to_physical_map``, ``logical_replica_count``; SGLang's
``--init-expert-location`` takes ``physical_to_logical_map`` over every decoder layer.

What the layout cannot say, and how the export fills it:

- every GPU has the same S slots: a rank that holds fewer experts than the fullest rank gets
  extra replicas (of the expert whose load per replica is highest among those it lacks);
- no per-source split: vLLM spreads an expert's tokens evenly over its replicas; SGLang's static
  dispatch sends a rank's tokens to the replica on that rank if there is one, else to one replica
  chosen so that each replica serves as many ranks as any other (SGLang draws that choice with a
  seeded shuffle; here it goes in rank order). ``dispatch_placement`` builds the ``Placement`` that
  results, so the one cost function scores the exported plan beside the original.

Megatron-Core places each expert exactly once, E / G consecutive experts per rank (global expert
q on rank q // (E / G)); a plan fits it when it has no replicas and E / G experts on every rank,
and ``megatron_expert_order`` gives the permutation to apply to the checkpoint's experts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epplan.errors import param, PlacementError
from epplan.placement.types import LayerPlacement, Placement

DISPATCH = ("even", "local_first")


@dataclass
class PhysicalLayout:
    """phy2log: int64[L, P]; slots: S; padded: (layer, rank, expert) slots the export added."""

    phy2log: np.ndarray
    slots: int
    padded: list[tuple[int, int, int]]

    @property
    def num_physical(self) -> int:
        return int(self.phy2log.shape[1])


def physical_layout(placement: Placement, expert_load: np.ndarray | None = None) -> PhysicalLayout:
    """The placement as ``phy2log`` with S = the most experts any rank holds in any layer.

    expert_load: float64[L, E] expected assignments per expert (chooses what fills a short rank's
    free slots: the expert with the most load per replica that the rank lacks); None = uniform.
    """
    num_ranks, num_experts = placement.num_ranks, placement.num_experts
    held = [layer.experts_on_rank(num_ranks) for layer in placement.layers]
    slots = max(len(h) for layer_held in held for h in layer_held)
    load = (np.ones((placement.num_layers, num_experts)) if expert_load is None
            else np.asarray(expert_load, dtype=np.float64))
    assert load.shape == (placement.num_layers, num_experts)
    phy2log = np.empty((placement.num_layers, num_ranks * slots), dtype=np.int64)
    padded = []
    for li, layer_held in enumerate(held):
        count = np.array([len(r) for r in placement.layers[li].replicas], dtype=np.float64)
        for g, experts in enumerate(layer_held):
            experts = list(experts)
            while len(experts) < slots:
                per_replica = load[li] / count
                per_replica[experts] = -np.inf
                e = int(np.argmax(per_replica))  # ties: the lowest expert index
                experts.append(e)
                count[e] += 1
                padded.append((li, g, e))
            phy2log[li, g * slots:(g + 1) * slots] = experts
    return PhysicalLayout(phy2log, slots, padded)


def eplb_maps(phy2log: np.ndarray, num_experts: int) -> tuple[np.ndarray, np.ndarray]:
    """(log2phy int64[L, E, R] with -1 padding, logcnt int64[L, E]) of ``phy2log`` int64[L, P]."""
    num_layers, num_physical = phy2log.shape
    logcnt = np.zeros((num_layers, num_experts), dtype=np.int64)
    for li in range(num_layers):
        logcnt[li] = np.bincount(phy2log[li], minlength=num_experts)
    if np.any(logcnt == 0):
        li, e = np.argwhere(logcnt == 0)[0]
        raise PlacementError(f"layer {li}: logical expert {e} has no physical replica")
    log2phy = np.full((num_layers, num_experts, int(logcnt.max())), -1, dtype=np.int64)
    for li in range(num_layers):
        fill = np.zeros(num_experts, dtype=np.int64)
        for p in range(num_physical):  # ascending physical ids, as EPLB lists them
            e = phy2log[li, p]
            log2phy[li, e, fill[e]] = p
            fill[e] += 1
    return log2phy, logcnt


def dispatch_placement(phy2log: np.ndarray, num_ranks: int, num_experts: int, dispatch: str = "even",
                       method: str = "exported") -> Placement:
    """The ``Placement`` a framework runs for ``phy2log``: which ranks hold each expert, and how
    each source rank's tokens reach them under ``dispatch`` (see the module docstring)."""
    if dispatch not in DISPATCH:
        raise PlacementError(f"dispatch {dispatch!r} unknown; use one of {', '.join(DISPATCH)}")
    num_layers, num_physical = phy2log.shape
    assert num_physical % num_ranks == 0
    slots = num_physical // num_ranks
    layers = []
    for li in range(num_layers):
        replicas, split = [], []
        for e in range(num_experts):
            ranks = np.unique(np.flatnonzero(phy2log[li] == e) // slots)  # a rank with two copies: one
            if ranks.size == 0:
                raise PlacementError(f"layer {li}: logical expert {e} has no physical replica")
            share = np.full((num_ranks, ranks.size), 1.0 / ranks.size)
            if dispatch == "local_first":
                share[:] = 0.0
                is_local = np.isin(np.arange(num_ranks), ranks)
                share[is_local, np.searchsorted(ranks, np.flatnonzero(is_local))] = 1.0
                served = np.zeros(ranks.size, dtype=np.int64)
                served[:] = 1  # each replica already serves its own rank
                for s in np.flatnonzero(~is_local):
                    r = int(np.argmin(served))  # the replica serving the fewest ranks so far
                    share[s, r] = 1.0
                    served[r] += 1
            replicas.append(ranks.astype(np.int64))
            split.append(share)
        layers.append(LayerPlacement(replicas, split))
    return Placement(num_ranks=num_ranks, num_experts=num_experts, layers=layers, method=method,
                     info={"solver": None, "status": "exported", "dispatch": dispatch})


def megatron_expert_order(placement: Placement) -> np.ndarray:
    """int64[L, E]: Megatron-Core's global expert q (on rank q // (E / G)) is logical expert
    order[l, q]. Raises ``PlacementError`` where Megatron cannot run the plan as it is."""
    num_ranks, num_experts = placement.num_ranks, placement.num_experts
    if num_experts % num_ranks:
        raise PlacementError(f"Megatron-Core needs num_experts divisible by the expert-parallel size: "
                             f"{num_experts} experts on {num_ranks} ranks")
    per_rank = num_experts // num_ranks
    order = np.empty((placement.num_layers, num_experts), dtype=np.int64)
    for li, layer in enumerate(placement.layers):
        replicated = [e for e, r in enumerate(layer.replicas) if len(r) > 1]
        if replicated:
            e = replicated[0]
            raise PlacementError(
                f"layer {li}: expert {e} has replicas on ranks {layer.replicas[e].tolist()}; Megatron-Core "
                f"places each expert once: plan with {param('experts_per_gpu', per_rank)} on at most {num_experts} "
                "GPUs, or export for vllm/sglang")
        for g, experts in enumerate(layer.experts_on_rank(num_ranks)):
            if len(experts) != per_rank:
                raise PlacementError(f"layer {li}: rank {g} holds {len(experts)} experts; Megatron-Core "
                                     f"gives every rank {per_rank} ({num_experts} / {num_ranks})")
            order[li, g * per_rank:(g + 1) * per_rank] = experts
    return order
