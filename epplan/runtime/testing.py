"""Run a function in several CPU processes with a gloo process group: the distributed tests' harness.

Usable from any test suite (ours, or a user's CI checking their placement):

    def check(rank: int, world_size: int, placement): ...   # module-level, so spawn can import it
    run_distributed(check, 4, placement)

An exception in any process fails the call, with that process's traceback.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from epplan.placement.types import LayerPlacement, Placement


def _entry(rank: int, fn: Callable[..., None], world_size: int, store_path: str,
           args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # N processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size)
    try:
        fn(rank, world_size, *args)
        # No rank tears its groups down while another is still connecting one: a rank that had
        # finished closed its sockets under a peer's ``new_group`` (gloo: "connectFullMesh
        # failed ... Connection closed by peer", seen once in CI under load).
        dist.barrier()
    finally:
        dist.destroy_process_group()


# Modules the fork server imports once, so that each process starts in well under a second
# instead of re-importing torch (and torch._dynamo, which the first optimizer construction pulls
# in: seconds per process on a small CI machine).
PRELOAD = ("torch", "torch._dynamo", "torch.distributed", "epplan.runtime.expert_parallel")


def run_distributed(fn: Callable[..., None], world_size: int, *args: Any) -> None:
    """Call ``fn(rank, world_size, *args)`` in ``world_size`` new processes (gloo, FileStore).

    ``fn`` and ``args`` must be picklable (a module-level function; arrays, dataclasses).
    Processes fork from a clean fork server (never from the caller, whose thread pools may be
    running), started once per session with ``PRELOAD`` imported.
    """
    context = mp.get_context("forkserver")
    context.set_forkserver_preload(list(PRELOAD))
    with tempfile.TemporaryDirectory(prefix="epplan-dist-") as tmp:
        store_path = os.path.join(tmp, "store")  # the FileStore wants a fresh file per group
        mp.start_processes(_entry, args=(fn, world_size, store_path, args), nprocs=world_size,
                           join=True, start_method="forkserver")


def layer_placement(replicas: list[list[int]], splits: dict[int, Any], num_ranks: int) -> LayerPlacement:
    """A layer from replica rank lists, with split rows (G, replicas) given per expert where
    wanted (default: even shares from every source)."""
    reps = [np.array(r, dtype=np.int64) for r in replicas]
    split = [np.asarray(splits[e], dtype=np.float64) if e in splits
             else np.full((num_ranks, len(r)), 1.0 / len(r)) for e, r in enumerate(reps)]
    return LayerPlacement(replicas=reps, split=split)


def check_scenarios(check: Callable[..., None], rank: int, world_size: int, scenarios: list[Any]) -> None:
    """``check(rank, world_size, scenario)`` for each; a failure names the scenario (its ``name``)
    and the rank."""
    for sc in scenarios:
        try:
            check(rank, world_size, sc)
        except AssertionError as exc:
            raise AssertionError(f"scenario {sc.name!r}, rank {rank}: {exc}") from exc


def tiny_model(overrides: dict[str, Any], biases: dict[tuple[int, int], float]) -> Any:
    """The "tiny" preset (router bias rate 0.05, ``overrides`` applied) in float64, seeded 0,
    with initial router biases ``{(moe layer, expert): value}``: the distributed tests' model."""
    from epplan.runtime.model import Transformer
    from epplan.workload.config import PRESETS

    config = PRESETS["tiny"].replace(router_bias_rate=0.05, **overrides)
    torch.manual_seed(0)
    model = Transformer(config).double()
    with torch.no_grad():
        for (li, e), value in biases.items():
            model.moe_layers()[li].router.bias[e] = value
    return model


@dataclass
class Scenario:
    """One case of a distributed equivalence test: a placement, the "tiny" model's
    ``overrides`` and initial router ``biases`` (``tiny_model``), the batch slice of each rank
    and the optimizer steps to run."""

    name: str
    placement: Placement
    overrides: dict = field(default_factory=dict)
    biases: dict = field(default_factory=dict)  # (moe layer, expert) -> initial router bias
    batch_per_rank: int = 2
    seq: int = 8
    steps: int = 2


def gather_byte_matrices(stats: Any, world_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Collective: every rank's ``ExpertParallelStats`` byte rows as int64 matrices
    dispatch [S, L, T] and combine [S, L, T]; checks that what s dispatched to t, t combined
    back to s."""
    both = torch.from_numpy(np.stack([stats.dispatch_bytes, stats.combine_bytes]))  # (2, L, G)
    gathered = [torch.empty_like(both) for _ in range(world_size)]
    dist.all_gather(gathered, both)
    dispatch = torch.stack([g[0] for g in gathered])  # (s, L, t)
    combine = torch.stack([g[1] for g in gathered])  # (t, L, s)
    assert torch.equal(dispatch, combine.permute(2, 1, 0)), "combine does not mirror dispatch"
    return dispatch, combine
