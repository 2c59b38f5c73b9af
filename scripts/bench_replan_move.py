"""Seconds of a live expert move (``epplan.train.replan.move_experts``) against its bytes, on CPU
processes with gloo: the fixed part (process groups, Python) and the per-byte part, next to
``plan_migration``'s prediction for the topology the manifest names.

    python scripts/bench_replan_move.py [--ranks 4] [--d-ff 256 1024 4096] [--repeats 3]

Each size: a ``tiny``-shaped model (d_model 256, 8 experts, 2 MoE layers, fp32) trained one step,
then moved from one expert per rank to a placement that replicates experts 0 and 1 of each layer
on every rank and back, ``--repeats`` times; prints the median seconds of a move each way with
its bytes (rank 0's clock; the move is collective).

Measured 2026-12-02, 4 gloo processes on the 2-core shared development machine (load about 14),
``--d-ff 256 1024 4096 --repeats 3``: 12 replicas moved, bytes sent equal to plan_migration's to
the byte (18.9, 75.5, 302 MB), in 0.057, 0.38 and 1.25 s (about 240 MB/s through gloo and the
copies); the move back, which only drops replicas, 0.009-0.12 s. plan_migration predicts 21-336 us
for the same bytes on one NVSwitch H100 node: on CPU the measured cost is what counts.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from epplan.placement.types import LayerPlacement, Placement
from epplan.runtime.testing import run_distributed
from epplan.workload.config import PRESETS


def _placement(num_ranks: int, reps: list[list[int]]) -> Placement:
    return Placement(num_ranks, len(reps), [LayerPlacement([np.array(r) for r in reps],
                                                           [np.full((num_ranks, len(r)), 1 / len(r)) for r in reps])
                                            for _ in range(2)], method="bench")


TOPOLOGY = """\
name: bench-box
node_types:
  box:
    gpus: {gpus}
    gpu: {{model: H100-SXM5-80GB, memory_gb: 80, bf16_tflops: 989, hbm_gbps: 3350}}
    fabric: {{kind: nvswitch, gbps: 450}}
nodes:
  - {{name: n0, type: box}}
"""


def _measure(rank: int, world_size: int, d_ff: int, repeats: int, out: str) -> None:
    from epplan.cost.migration import plan_migration
    from epplan.placement.problem import PlacementProblem
    from epplan.topology import load_topology
    from epplan.train.job import Job, Node
    from epplan.train.options import TrainOptions
    from epplan.train.replan import move_experts
    from epplan.train.trainer import Trainer
    from epplan.workload import make_traffic

    config = PRESETS["tiny"].replace(d_model=256, d_ff=d_ff, num_experts=8, num_heads=4, head_dim=64,
                                     num_kv_heads=4, dtype="fp32")
    one_each = _placement(world_size, [[e % world_size] for e in range(8)])
    hot = _placement(world_size, [list(range(world_size)) if e < 2 else [e % world_size] for e in range(8)])
    job = Job(config, one_each, "bench", (Node("n0", tuple(range(world_size))),))
    trainer = Trainer(job, TrainOptions.of(manifest="m.json", out=out, steps=1), rank, torch.device("cpu"))
    trainer.train_step()
    topology = Path(out) / "box.yaml"
    if rank == 0:
        topology.write_text(TOPOLOGY.format(gpus=world_size))
    torch.distributed.barrier()
    problem = PlacementProblem(load_topology(topology), config, make_traffic("uniform", config, world_size),
                               experts_per_gpu=8)
    migrations = {name: plan_migration(old, new, problem)
                  for name, (old, new) in (("spread", (one_each, hot)), ("back", (hot, one_each)))}
    times: dict[str, list[float]] = {"spread": [], "back": []}
    nbytes = {}
    for _ in range(repeats):
        for name, new in (("spread", hot), ("back", one_each)):
            torch.distributed.barrier()
            start = time.perf_counter()
            nbytes[name] = move_experts(trainer.model, trainer.optimizer, new, migrations[name].moves)
            times[name].append(time.perf_counter() - start)
    if rank == 0:
        print(json.dumps({
            "ranks": world_size, "d_ff": d_ff, "replicas_moved": {k: len(m.moves) for k, m in migrations.items()},
            "bytes": nbytes, "predicted_bytes": {k: m.bytes_moved for k, m in migrations.items()},
            "median_s": {k: round(statistics.median(v), 4) for k, v in times.items()},
            "predicted_s_h100_nvswitch": {k: m.seconds for k, m in migrations.items()}}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ranks", type=int, default=4)
    parser.add_argument("--d-ff", type=int, nargs="+", default=[256, 1024, 4096])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    for d_ff in args.d_ff:
        with tempfile.TemporaryDirectory() as out:
            run_distributed(_measure, args.ranks, d_ff, args.repeats, out)


if __name__ == "__main__":
    main()
