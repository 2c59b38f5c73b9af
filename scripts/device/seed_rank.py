"""One rank of the seed model's 16-GPU plan on one GPU: peak memory, step time, checkpoint stall.

    python3 scripts/device/seed_rank.py MANIFEST --out DIR --steps N [--micro-batches M]
        [--recompute R] [--checkpoint-after K] [--json FILE]

The manifest is a 1-GPU plan of the seed model with one expert per layer (``--set num_experts=1
--set top_k=1 --set global_batch=8``): the dense parameters, the one expert per layer, the eight
sequences of 10,000 tokens per step and the run settings of one rank of
``epplan place --topology topologies/dgx-h100-2node.yaml --model seed`` (its optimizer is not
sharded at 80 GB, so one GPU holds the same share). Trains N steps through ``Trainer`` (NCCL,
one process); with ``--checkpoint-after K`` it checkpoints after step K (``dcp.async_save``), so that
step K + 1 runs while the files are written, and reports the stall.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch
import torch.distributed as dist

from epplan.train.job import load_job
from epplan.train.options import TrainOptions
from epplan.train.trainer import Trainer


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("manifest")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--micro-batches", type=int)
    p.add_argument("--recompute")
    p.add_argument("--checkpoint-after", type=int)
    p.add_argument("--json")
    p.add_argument("--cpu", action="store_true", help="a dry run of this script on the CPU (gloo)")
    a = p.parse_args()
    cuda = not a.cpu
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    device = torch.device("cuda", 0) if cuda else torch.device("cpu")
    dist.init_process_group("nccl" if cuda else "gloo", rank=0, world_size=1, device_id=device if cuda else None)
    os.makedirs(a.out, exist_ok=True)
    job = load_job(a.manifest)
    settings = dict(job.run_settings)
    if a.micro_batches:
        settings["micro_batches"] = a.micro_batches
    if a.recompute:
        settings["recompute"] = a.recompute
    opts = TrainOptions.of(manifest=a.manifest, out=a.out, steps=a.steps + 1, device=device.type, ckpt_every=10 ** 9,
                           async_checkpoints="on", keep_checkpoints=1, warmup_steps=1, **settings)
    if cuda:
        torch.cuda.set_device(0)
    t0 = time.perf_counter()
    trainer = Trainer(job, opts, 0, device)
    built_s = time.perf_counter() - t0
    after_build = torch.cuda.memory_allocated() if cuda else 0
    records, stall = [], None
    for step in range(1, a.steps + 1):
        records.append(trainer.train_step())
        r = records[-1]
        print(f"step {step}: {r['step_time_s']:.3f} s, loss {r['loss']:.4f}, "
              f"peak {r.get('gpu_peak_allocated_bytes', 0) / 1e9:.2f} GB", flush=True)
        if step == a.checkpoint_after:
            t_save = time.perf_counter()
            stall = trainer.save()
            print(f"checkpoint after step {step}: training stopped for {stall:.3f} s", flush=True)
    write_s = None
    if stall is not None:
        trainer.finish_checkpoint()
        write_s = time.perf_counter() - t_save  # staging, background write and checksums, and the steps beside it
    times = [r["step_time_s"] for r in records[1:]] or [records[0]["step_time_s"]]
    ckpt_bytes = (sum(f.stat().st_size for f in trainer.last_checkpoint.iterdir())
                  if trainer.last_checkpoint else None)
    out = {"settings": settings, "steps": len(records), "build_s": built_s,
           "allocated_after_build_bytes": after_build,
           "step_times_s": [r["step_time_s"] for r in records], "median_step_s": statistics.median(times),
           "tflops_per_gpu": statistics.median(r["tflops_per_gpu"] for r in records[1:] or records),
           "peak_allocated_bytes": torch.cuda.max_memory_allocated() if cuda else None,
           "peak_reserved_bytes": torch.cuda.max_memory_reserved() if cuda else None,
           "losses": [r["loss"] for r in records],
           "staging_alloc_s": next((r.get("checkpoint_staging_alloc_s") for r in records
                                    if "checkpoint_staging_alloc_s" in r), None),
           "checkpoint_stall_s": stall, "checkpoint_complete_after_s": write_s,
           "checkpoint_bytes": ckpt_bytes,
           "checkpoint_path": str(trainer.last_checkpoint) if trainer.last_checkpoint else None,
           "checkpoint_writer": (json.loads((trainer.last_checkpoint / "meta.json").read_text())["writer"]
                                 if trainer.last_checkpoint else None),
           "step_during_checkpoint_s": records[a.checkpoint_after]["step_time_s"]
           if a.checkpoint_after and a.checkpoint_after < len(records) else None}
    print(json.dumps(out), flush=True)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(out, fh, indent=1)
    os._exit(0)


if __name__ == "__main__":
    main()
