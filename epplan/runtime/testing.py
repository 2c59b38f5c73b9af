"""Run a function in several CPU processes with a gloo process group: the distributed tests' harness.

Usable from any test suite (ours, or a user's CI checking their placement):

    def check(rank: int, world_size: int, placement): ...   # module-level, so spawn can import it
    run_distributed(check, 4, placement)

An exception in any process fails the call, with that process's traceback.
"""

from __future__ import annotations

import os
import tempfile
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, fn: Callable[..., None], world_size: int, store_path: str,
           args: tuple[Any, ...]) -> None:
    torch.set_num_threads(1)  # N processes share the machine's cores
    dist.init_process_group("gloo", init_method=f"file://{store_path}", rank=rank,
                            world_size=world_size)
    try:
        fn(rank, world_size, *args)
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
