"""Starting a run through torchrun (``torch.distributed.run``): checks, command lines, sbatch.

One torchrun agent per node starts one worker per GPU that the manifest gives that node. A single
node uses ``--standalone`` (a local rendezvous on a free port); several nodes use a c10d
rendezvous at ``--rdzv-endpoint``, and each node's ``epplan run`` names its manifest node with
``--node-rank``. ``--max-restarts`` is torchrun's: when a worker dies, torchrun restarts the whole
group, which continues from the newest checkpoint.
"""

from __future__ import annotations

import math
import os
import shlex
import signal
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from epplan.errors import Interrupted, RuntimeSetupError, param
from epplan.train import checkpoint
from epplan.train.data import check_data_path
from epplan.train.job import Job, check_batch_split, check_tp
from epplan.train.options import RESUME_KEYS, TrainOptions
from epplan.train.rundir import FAILURE, RunLock, history, set_aside

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
    num_nodes = len(job.nodes)
    if launch.nnodes != num_nodes:
        hint = ("" if num_nodes == 1 else
                f"; on each node run 'epplan run' with {param('nnodes', num_nodes)} {param('node_rank', 'I')} "
                f"{param('rdzv_endpoint', 'HOST:PORT')}, or print the commands with "
                f"{param('print_launch', 'torchrun|slurm')}")
        raise RuntimeSetupError(f"{param('nnodes', launch.nnodes)}, but the manifest spans {job.describe_nodes()}{hint}")
    if num_nodes > 1 and not for_print:
        if launch.node_rank is None or launch.rdzv_endpoint is None:
            raise RuntimeSetupError(f"the manifest spans {job.describe_nodes()}: give this node's "
                                    f"{param('node_rank')} (0 .. nodes - 1) and the {param('rdzv_endpoint', 'HOST:PORT')} of node 0")
    if launch.node_rank is not None and not 0 <= launch.node_rank < num_nodes:
        raise RuntimeSetupError(f"{param('node_rank', launch.node_rank)} is out of range: the manifest has "
                                f"{job.describe_nodes()}")
    check_numbers(opts, launch)
    out = Path(opts.out)
    if out.exists() and not out.is_dir():
        raise RuntimeSetupError(f"{param('out', out)} is a file; name a directory (it is created if missing)")
    check_tp(job, opts)
    check_batch_split(job, opts, opts.batch.size(job.config))
    if opts.batch.data is not None:
        check_data_path(opts.batch.data, job.config.vocab_size)
    if for_print:
        return
    if opts.device == "cuda":
        gpus = len(job.nodes[launch.node_rank or 0].ranks)
        if torch.cuda.device_count() < gpus:
            raise RuntimeSetupError(f"the manifest puts {gpus} ranks on this node but "
                                    f"{torch.cuda.device_count()} CUDA GPUs are visible; use {param('device', 'cpu')} "
                                    "to run on the CPU, or a manifest for this machine")


MAX_STEPS = 10**9
MAX_CHUNKS = 256  # chunks per MoE layer; the runtime's own choice is at most 16


def check_numbers(opts: TrainOptions, launch: LaunchOptions) -> None:
    """Every number of a run in its range, where ``epplan run`` parses it (not in the workers)."""
    ranges = {  # name: (lowest, highest, lowest allowed itself)
        "steps": (1, MAX_STEPS, True), "ckpt_every": (1, MAX_STEPS, True), "micro_batches": (1, 2**20, True),
        "num_chunks": (1, MAX_CHUNKS, True), "overlap_ctas": (1, 1024, True), "global_batch": (1, 1 << 20, True),
        "warmup_steps": (0, MAX_STEPS, True), "keep_checkpoints": (0, 10**6, True), "seed": (0, 2**63 - 1, True),
        "lr": (0.0, 1e9, False), "min_lr_ratio": (0.0, 1.0, True), "weight_decay": (0.0, 1e3, True),
        "grad_clip": (0.0, 1e12, True), "capacity_factor": (0.0, 1e6, False), "peak_tflops": (0.0, 1e6, False),
        "node_rank": (0, 10**6, True),
    }
    values = opts.flat()
    for name, (low, high, low_ok) in ranges.items():
        value = values[name]
        if value is None:
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise RuntimeSetupError(f"{param(name, value)}: give a finite number")
        if value < low or (value == low and not low_ok):
            hint = "; 0 turns clipping off" if name == "grad_clip" else ""
            raise RuntimeSetupError(f"{param(name)} must be {'at least' if low_ok else 'more than'} {low:g}, "
                                    f"got {value}{hint}")
        if value > high:
            raise RuntimeSetupError(f"{param(name, value)} is too large: at most {high:g}")
    if not 0 <= launch.max_restarts <= 1000:
        raise RuntimeSetupError(f"{param('max_restarts', launch.max_restarts)} is out of range: give 0 .. 1000")
    unknown = [k for k in opts.checkpoints.allowed_changes() if k not in RESUME_KEYS]
    if unknown:
        raise RuntimeSetupError(f"{param('allow_change', unknown[0])}: not a resume check; use one of {', '.join(RESUME_KEYS)}")
    if opts.checkpoints.allowed_changes() and not opts.checkpoints.resume:
        raise RuntimeSetupError(f"{param('allow_change')} only applies with {param('resume')}")


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
    return argv + opts.replace(node_rank=node_rank).to_argv(always)


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
    command = ["epplan", "run", *opts.replace(resume=True, node_rank=0).to_argv(),
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


# Signals that stop 'epplan run' and, through it, torchrun and its workers. SIGKILL cannot be
# caught: the agent then gets SIGTERM from the kernel (agent.die_with_parent) and the workers see
# their agent gone (worker._watch_parent).
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT)
AGENT_GRACE_S = 45.0  # torchrun gives its workers 30 s after SIGTERM before SIGKILL
LOGS = "logs"


def agent_log(out: Path, node_rank: int) -> Path:
    return Path(out) / LOGS / f"torchrun.node{node_rank}.log"


def run(job: Job, opts: TrainOptions, launch: LaunchOptions, notify: Callable[[str], None] = print) -> int:
    """Start torchrun for this node and wait; returns its exit code.

    Holds the run directory's lock (``rundir.RunLock``) from before the directory is inspected
    until the last worker has exited; raises ``rundir.RunDirBusy`` if another run holds it and
    ``Interrupted`` if a signal stopped the run. ``notify`` shows one-line notes.
    """
    out, node_rank = Path(opts.out), launch.node_rank or 0
    out.mkdir(parents=True, exist_ok=True)
    lock = RunLock(out, node_rank)
    note = lock.acquire()
    try:
        if note:
            notify(note)
        lock.wait_for_workers()
        if node_rank == 0:
            prepare_out(opts)
        log = agent_log(out, node_rank)
        log.parent.mkdir(exist_ok=True)
        argv = torchrun_argv(job, opts, launch, node_rank)
        argv[1:3] = ["-m", "epplan.train.agent", str(log)]
        env = dict(os.environ)
        nproc = len(job.nodes[node_rank].ranks)
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
        env.setdefault("PYTHONUNBUFFERED", "1")
        env["EPPLAN_LAUNCHER_PID"] = str(os.getpid())
        env["EPPLAN_LAUNCHED"] = "1"
        code, stopped_by = _run_agent(argv, env)
        lock.wait_for_workers()
    finally:
        lock.release()
    if stopped_by is not None:
        raise Interrupted(f"stopped by {stopped_by.name}: torchrun and its workers were stopped; continue "
                          f"from the newest checkpoint with 'epplan run ... --out {out} --resume'")
    return code


def _run_agent(argv: list[str], env: dict[str, str]) -> tuple[int, signal.Signals | None]:
    """Run the agent in a session of its own (a terminal's Ctrl-C reaches 'epplan run' only, which
    stops the agent); any stop signal is passed on as SIGTERM, then SIGKILL after a grace period."""
    process = subprocess.Popen(argv, env=env, start_new_session=True)
    stopped: list[signal.Signals] = []

    def forward(signum: int, frame: object) -> None:
        stopped.append(signal.Signals(signum))
        try:
            process.send_signal(signal.SIGTERM)
        except OSError:
            pass

    previous = {}
    for sig in STOP_SIGNALS:
        try:
            previous[sig] = signal.signal(sig, forward)
        except ValueError:  # not the main thread: the default handling stays
            break
    try:
        while True:
            try:
                code = process.wait(timeout=AGENT_GRACE_S if stopped else None)
                break
            except subprocess.TimeoutExpired:
                process.kill()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return code, (stopped[0] if stopped else None)


def prepare_out(opts: TrainOptions) -> None:
    """Under the run lock, before any worker starts: a fresh run must not mix with, or wipe, an
    earlier run's records (``--start-over`` sets them aside in ``OUT/previous-N/`` instead)."""
    out = Path(opts.out)
    if opts.checkpoints.resume:
        (out / FAILURE).unlink(missing_ok=True)
        return  # the workers verify the checkpoints; with none intact they refuse or start over
    found = checkpoint.latest(out / "checkpoints")
    if opts.checkpoints.start_over:
        aside = set_aside(out)
        if aside is not None:
            print(f"epplan run: the earlier run's records are set aside in {aside}", flush=True)
        return
    (out / FAILURE).unlink(missing_ok=True)
    if found is not None:
        raise checkpoint.CheckpointError(
            f"{out} already holds checkpoints (newest: step {found.step}); pass {param('resume')} to continue from it, "
            f"{param('start_over')} to start at step 0 with the earlier records set aside, or choose another "
            f"{param('out')}")
    old = history(out)
    if old:
        raise checkpoint.CheckpointError(
            f"{out} holds an earlier run's {', '.join(old)} and no complete checkpoint; pass {param('start_over')} to "
            f"start at step 0 with those set aside in OUT/previous-N, or choose another {param('out')}")
