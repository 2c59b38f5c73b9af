"""Expert tensor parallelism (``--expert-tp``): the expert GEMMs split their hidden dimension
over a TP group.

Shape legend:
    D = d_model, F = expert hidden (d_ff), t = TP degree, G = ranks, E = experts of a layer,
    E_grp = experts the TP group holds, Q = rows this rank received in dispatch,
    Q_tot = rows the whole TP group received.

The layout is Megatron-Core's expert tensor parallelism (ETP) over the placement's ranks.
Dispatch and combine are unchanged: every rank routes its own sequence shard and sends each
assignment to the rank the placement names, over all G ranks. A TP group of t consecutive ranks
(the "tp" dimension of ``tensor_parallel.tensor_parallel_mesh``) holds the union of the experts
the placement gives its ranks, E_grp of them, and TP rank j keeps hidden slice
``j * F / t : (j + 1) * F / t`` of every one:

    w1, w3   (E_grp, D, F / t)   columns of the single-device (D, F)
    w2       (E_grp, F / t, D)   rows of the single-device (F, D)

Between dispatch and combine, inside the TP group:

    rows received (Q, D) --all-gather--> (Q_tot, D) --hidden slice of each expert--> partial (Q_tot, D)
    --reduce-scatter--> this rank's rows (Q, D), summed over the t slices

so that each rank computes 1 / t of the expert FLOPs of the whole group's rows (the group's
experts are load-balanced among its ranks whatever the placement gave each). With the placement
Megatron uses (an expert on all t ranks of a group, each source sending to the rank of its own TP
index), this is exactly its ETP; any other placement works the same way.

Why the two collectives are written here and not DTensor's: the t ranks receive uneven numbers of
rows, which ``all_gather_into_tensor`` / ``reduce_scatter_tensor`` (DTensor's redistribute) do not
take without padding every rank to the largest. Both are ``all_to_all`` with uneven splits instead
(the differentiable exchange of ``expert_parallel.py``, on NCCL and gloo): the gather sends this
rank's Q rows to each of the t ranks, the reduce-scatter sends each rank the partial results of
its rows and sums the t parts that arrive (in TP-rank order, the same on every rank). Backward is
the same exchanges with the splits swapped, which autograd derives.

Gradients: a shard's gradient holds the whole group's rows for that slice; the shards of one
expert and one slice (TP rank j of every group holding the expert) are summed over their groups
(``shard_sets``) and divided by the data-parallel degree, as replicas are without ETP.
Checkpoints store each expert unsharded by its logical id: the shard is a DTensor view over the TP
group (``logical_view``), and DCP reshards (``epplan.train.checkpoint``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Shard

from epplan.errors import param, RuntimeSetupError
from epplan.placement.types import LayerPlacement

# The dimension of the hidden size F in each expert weight, from the end: (..., D, F) or (..., F, D).
HIDDEN_DIM = {"w1": -1, "w3": -1, "w2": -2}


@dataclass(frozen=True)
class ExpertTP:
    """This rank's TP group as expert tensor parallelism sees it."""

    mesh: DeviceMesh  # the 1-D "tp" mesh of this rank's group
    ranks: tuple[int, ...]  # the group's ranks (of the expert-parallel group), TP order
    rank: int  # this rank's TP index j

    @property
    def size(self) -> int:
        return len(self.ranks)

    @property
    def group(self) -> dist.ProcessGroup:
        return self.mesh.get_group()

    @classmethod
    def of(cls, tp_mesh: DeviceMesh) -> "ExpertTP":
        ranks = tuple(int(r) for r in tp_mesh.mesh.reshape(-1).tolist())
        return cls(tp_mesh, ranks, tp_mesh.get_local_rank())

    def check(self, num_ranks: int, hidden: int, dispatch: str) -> None:
        """Raise ``RuntimeSetupError`` unless the groups are t consecutive ranks that the hidden
        size splits over, under flat dispatch."""
        t = self.size
        if num_ranks % t or list(self.ranks) != list(range(self.ranks[0], self.ranks[0] + t)) or self.ranks[0] % t:
            raise RuntimeSetupError(f"{param('expert_tp')}: the TP group {list(self.ranks)} is not {t} consecutive ranks "
                                    f"of the {num_ranks}")
        if hidden % t:
            raise RuntimeSetupError(f"{param('expert_tp')}: the experts' hidden size {hidden} does not split over "
                                    f"{param('tp', t)}; use a {param('tp')} that divides {hidden}, or run without "
                                    f"{param('expert_tp')}")
        if dispatch != "flat":
            raise RuntimeSetupError(f"{param('expert_tp')} with {param('dispatch', dispatch)}: not supported (the "
                                    "two-stage exchange would need the group's gather on its second stage); "
                                    f"use {param('dispatch', 'flat')}")

    def group_of(self, rank: int) -> int:
        return rank // self.size

    def hidden_slice(self, hidden: int) -> slice:
        part = hidden // self.size
        return slice(self.rank * part, (self.rank + 1) * part)


def group_experts(layer: LayerPlacement, num_ranks: int, etp: ExpertTP) -> list[int]:
    """The experts that ``layer`` places on any rank of this rank's TP group, ascending (E_grp)."""
    held = layer.experts_on_rank(num_ranks)
    return sorted({e for r in etp.ranks for e in held[r]})


def shard_sets(layer: LayerPlacement, t: int) -> list[tuple[int, tuple[int, ...]]]:
    """Every (expert, ranks) whose shards hold the same slice of that expert in different TP
    groups: TP rank j of each group holding it, for each j; the same list on every rank."""
    out = []
    for e, ranks in enumerate(layer.replicas):
        groups = sorted({int(r) // t for r in ranks})
        out += [(e, tuple(g * t + j for g in groups)) for j in range(t)]
    return out


def owners(layer: LayerPlacement, etp: ExpertTP) -> list[int]:
    """Per expert, the rank that owns this rank's slice of it (in checkpoints, the gradient norm,
    gathered state): TP index j of the group of the expert's lowest replica."""
    return [etp.group_of(int(ranks[0])) * etp.size + etp.rank for ranks in layer.replicas]


def shard(name: str, full: torch.Tensor, etp: ExpertTP) -> torch.Tensor:
    """This rank's slice of ``full``, weight ``name`` of one expert, (D, F) or (F, D), or of
    several stacked, (E, D, F) or (E, F, D): a view."""
    dim = HIDDEN_DIM[name]
    return full.narrow(dim, etp.hidden_slice(full.shape[dim]).start, full.shape[dim] // etp.size)


def logical_view(name: str, local: torch.Tensor, etp: ExpertTP) -> DTensor:
    """One expert slot's slice ``local`` (D, F / t) or (F / t, D) of weight ``name`` (or of its
    AdamW moment) as the DTensor of the whole (D, F) / (F, D) over the TP group, sharing
    ``local``'s storage: what checkpoints save and load in place."""
    dim = local.dim() + HIDDEN_DIM[name]
    shape = list(local.shape)
    shape[dim] *= etp.size
    full_stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(local, etp.mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                              stride=full_stride)


def gather_counts(recv_counts: torch.Tensor, etp: ExpertTP) -> torch.Tensor:
    """Collective over the TP group: recv_counts int64 (G, E) of this rank -> (t, G, E), every
    group rank's (rows from each source for each expert)."""
    parts = [torch.empty_like(recv_counts) for _ in range(etp.size)]
    dist.all_gather(parts, recv_counts.contiguous(), group=etp.group)
    return torch.stack(parts)


def group_rows_by_expert(group_recv: np.ndarray, experts: list[int], device: torch.device
                         ) -> tuple[torch.Tensor, list[int]]:
    """group_recv: int64 (t, G, E) host counts; the gathered rows arrive as (TP rank, source,
    expert) blocks. Returns int64 (Q_tot,): for each position in (expert, TP rank, source) order
    the row's index in arrival order, and the rows of each of ``experts`` (E_grp ints)."""
    blocks = group_recv[:, :, experts]  # (t, G, E_grp)
    t, G, E_grp = blocks.shape
    sizes = torch.as_tensor(blocks.reshape(-1), device=device)
    block = torch.repeat_interleave(torch.arange(t * G * E_grp, device=device), sizes,
                                    output_size=int(blocks.sum()))  # (Q_tot,) block of each row
    # block = (j * G + s) * E_grp + e  ->  key (e, j, s)
    key = (block % E_grp) * (t * G) + block // E_grp
    return torch.argsort(key, stable=True), blocks.sum(axis=(0, 1)).tolist()


def group_expert_mlp(recv_x: torch.Tensor, group_recv: np.ndarray, experts: list[int],
                     weights: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None], activation: str,
                     impl: str, etp: ExpertTP) -> torch.Tensor:
    """Collective over the TP group: the experts' output for the rows this rank received.

    recv_x: (Q, D) in (source, expert) order, as dispatch delivers them; group_recv: int64
    (t, G, E) host counts of every group rank (``gather_counts``); experts: the group's E_grp
    experts, whose slices ``weights`` hold ((E_grp, D, F / t), (E_grp, F / t, D), w3 or None).
    Returns (Q, D), summed over the t hidden slices.
    """
    from epplan.runtime.expert_parallel import all_to_all  # that module builds on this one
    from epplan.runtime.experts import expert_mlp

    t, me = etp.size, etp.rank
    num_rows = group_recv.sum(axis=(1, 2)).tolist()  # (t,) Q of each group rank
    mine = num_rows[me]
    # all-gather: my rows to each group rank -> (Q_tot, D) as (TP rank, source, expert) blocks
    gathered = all_to_all(recv_x.repeat(t, 1), num_rows, [mine] * t, etp.group)
    by_expert, num_per_expert = group_rows_by_expert(group_recv, experts, recv_x.device)
    y = expert_mlp(gathered[by_expert], num_per_expert, *weights, activation, impl)  # (Q_tot, D) partial
    inverse = torch.empty_like(by_expert)
    inverse[by_expert] = torch.arange(by_expert.numel(), device=by_expert.device)
    # reduce-scatter: each group rank's rows back to it, the t partial sums added here
    parts = all_to_all(y[inverse], [mine] * t, num_rows, etp.group)  # (t * Q, D)
    return parts.view(t, mine, recv_x.shape[1]).sum(dim=0)
