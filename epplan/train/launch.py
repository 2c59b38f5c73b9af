"""Starting a run through torchrun (``torch.distributed.run``): checks, command lines, sbatch.

One torchrun agent per node starts one worker per GPU that the manifest gives that node. A single
node uses ``--standalone`` (a local rendezvous on a free port); several nodes use a c10d
rendezvous at ``--rdzv-endpoint``, and each node's ``epplan run`` names its manifest node with
``--node-rank``. ``--max-restarts`` is torchrun's: when a worker dies, torchrun restarts the whole
group, which continues from the newest checkpoint.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from epplan.errors import RuntimeSetupError
from epplan.train import checkpoint
from epplan.train.data import check_data_path
from epplan.train.job import Job
from epplan.train.options import TrainOptions

DEFAULT_RDZV_PORT = 29500


@dataclass(frozen=True)
class LaunchOptions:
    """torchrun's side of a launch."""

    nnodes: int = 1
    node_rank: int | None = None  # required with nnodes > 1
    rdzv_endpoint: str | None = None  # HOST:PORT of the c10d rendezvous (multi-node)
    rdzv_id: str | None = None  # default: derived from the manifest hash
    rdzv_backend: str = "c10d"
    rdzv_conf: str | None = None
    max_restarts: int = 0

    def run_id(self, job: Job) -> str:
        return self.rdzv_id or f"epplan-{job.manifest_hash[:12]}"


def check(job: Job, opts: TrainOptions, launch: LaunchOptions, *, for_print: bool = False) -> None:
    """Everything that can be checked before starting torchrun; ``RuntimeSetupError`` otherwise."""
    G, num_nodes = job.num_ranks, len(job.nodes)
    if launch.nnodes != num_nodes:
        hint = ("" if num_nodes == 1 else
                f"; on each node run 'epplan run' with --nnodes {num_nodes} --node-rank I "
                "--rdzv-endpoint HOST:PORT, or print the commands with --print-launch torchrun|slurm")
        raise RuntimeSetupError(f"--nnodes {launch.nnodes}, but the manifest spans {job.describe_nodes()}{hint}")
    if num_nodes > 1 and not for_print:
        if launch.node_rank is None or launch.rdzv_endpoint is None:
            raise RuntimeSetupError(f"the manifest spans {job.describe_nodes()}: give this node's "
                                    "--node-rank (0 .. nodes - 1) and the --rdzv-endpoint HOST:PORT of node 0")
    if launch.node_rank is not None and not 0 <= launch.node_rank < num_nodes:
        raise RuntimeSetupError(f"--node-rank {launch.node_rank} is out of range: the manifest has "
                                f"{job.describe_nodes()}")
    for name in ("steps", "ckpt_every", "micro_batches", "num_chunks", "overlap_ctas"):
        value = getattr(opts, name)
        if value is not None and value < 1:
            raise RuntimeSetupError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    global_batch = opts.global_batch or job.config.global_batch
    if global_batch % (G * opts.micro_batches):
        raise RuntimeSetupError(
            f"global batch {global_batch} does not split into {G} ranks x {opts.micro_batches} "
            f"micro-batches; set --global-batch to a multiple of {G * opts.micro_batches}")
    if opts.data is not None:
        check_data_path(opts.data, job.config.vocab_size)
    if for_print:
        return
    if opts.device == "cuda":
        gpus = len(job.nodes[launch.node_rank or 0].ranks)
        if torch.cuda.device_count() < gpus:
            raise RuntimeSetupError(f"the manifest puts {gpus} ranks on this node but "
                                    f"{torch.cuda.device_count()} CUDA GPUs are visible; use --device cpu "
                                    "to run on the CPU, or a manifest for this machine")
    if not opts.resume:
        checkpoint.refuse_fresh_start(Path(opts.out) / "checkpoints", opts.out)


def torchrun_argv(job: Job, opts: TrainOptions, launch: LaunchOptions, node_rank: int,
                  python: str = sys.executable) -> list[str]:
    """The command that starts node ``node_rank``'s agent and workers."""
    argv = [python, "-m", "torch.distributed.run", "--nnodes", str(launch.nnodes),
            "--nproc-per-node", str(len(job.nodes[node_rank].ranks))]
    if launch.nnodes == 1 and launch.rdzv_endpoint is None:
        argv.append("--standalone")
    else:
        endpoint = launch.rdzv_endpoint or f"{job.nodes[0].name}:{DEFAULT_RDZV_PORT}"
        argv += ["--rdzv-backend", launch.rdzv_backend, "--rdzv-endpoint", endpoint,
                 "--rdzv-id", launch.run_id(job)]
        if launch.rdzv_conf:
            argv += ["--rdzv-conf", launch.rdzv_conf]
    argv += ["--max-restarts", str(launch.max_restarts), "-m", "epplan.train.worker"]
    always = ("out", "node_rank") if launch.nnodes > 1 else ("out",)
    return argv + replace(opts, node_rank=node_rank).to_argv(always)


def print_torchrun(job: Job, opts: TrainOptions, launch: LaunchOptions) -> str:
    """One commented command per node, as a shell script."""
    lines = ["#!/usr/bin/env bash",
             f"# epplan run: {job.describe_nodes()}, manifest {opts.manifest} ({job.manifest_hash[:12]}).",
             "# Run line i on the node that the manifest calls node i."]
    if launch.nnodes > 1 and launch.rdzv_endpoint is None:
        lines.append(f"# The rendezvous is at node 0, {job.nodes[0].name}:{DEFAULT_RDZV_PORT}; pass "
                     "--rdzv-endpoint HOST:PORT if that is not its address.")
    for i, node in enumerate(job.nodes):
        lines.append(f"# node {i}: {node.name}, ranks {node.ranks[0]}..{node.ranks[-1]}")
        lines.append(shlex.join(torchrun_argv(job, opts, launch, i, python="python")))
    return "\n".join(lines) + "\n"


def sbatch_script(job: Job, opts: TrainOptions, launch: LaunchOptions) -> str:
    """A SLURM batch script: one task per node, each running 'epplan run' for its node.

    The script resumes (``--resume``), so a requeued job continues from its newest checkpoint.
    """
    gpus = [len(n.ranks) for n in job.nodes]
    # epplan run takes the worker's flags; --node-rank comes from $SLURM_NODEID in each task.
    command = ["epplan", "run", *replace(opts, resume=True, node_rank=0).to_argv(),
               "--nnodes", str(len(job.nodes)), "--max-restarts", str(launch.max_restarts)]
    rdzv = shlex.join(["--rdzv-id", launch.run_id(job)]) if launch.rdzv_id else '--rdzv-id "$SLURM_JOB_ID"'
    lines = [
        "#!/bin/bash",
        f"# epplan run: {job.describe_nodes()}, manifest {opts.manifest} ({job.manifest_hash[:12]}).",
        "# Allocation node i (SLURM_NODEID) runs the manifest's node i.",
        f"#SBATCH --job-name=epplan-{job.manifest_hash[:8]}",
        f"#SBATCH --nodes={len(job.nodes)}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={max(gpus)}",
        "#SBATCH --exclusive",
    ]
    if len(set(gpus)) > 1:
        lines.append(f"# nodes differ in GPUs ({', '.join(map(str, gpus))}): each uses what the manifest gives it")
    lines += [
        "set -euo pipefail",
        'RDZV_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f"srun --kill-on-bad-exit=1 {shlex.join(command)} \\",
        f'    --rdzv-endpoint "$RDZV_HOST:{DEFAULT_RDZV_PORT}" {rdzv}',
    ]
    return "\n".join(lines) + "\n"


def run(job: Job, opts: TrainOptions, launch: LaunchOptions) -> int:
    """Start torchrun for this node and wait; returns its exit code."""
    argv = torchrun_argv(job, opts, launch, launch.node_rank or 0)
    env = dict(os.environ)
    nproc = len(job.nodes[launch.node_rank or 0].ranks)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    env.setdefault("PYTHONUNBUFFERED", "1")
    process = subprocess.Popen(argv, env=env)
    try:
        return process.wait()
    except KeyboardInterrupt:  # the workers got the same SIGINT; let torchrun shut them down
        return process.wait()
