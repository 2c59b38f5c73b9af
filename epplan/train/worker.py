"""One training process, as torchrun starts it: ``python -m torch.distributed.run ... -m
epplan.train.worker MANIFEST --out DIR [options]`` (``epplan run`` builds that command line).

Reads torchrun's environment (``LOCAL_RANK``, ``LOCAL_WORLD_SIZE``, ``WORLD_SIZE``,
``TORCHELASTIC_RESTART_COUNT``, ``MASTER_ADDR``/``MASTER_PORT``), maps itself onto the manifest,
checks the launch against it before any process group exists, then trains.

After a restart (``TORCHELASTIC_RESTART_COUNT`` > 0) the run always continues from the newest
checkpoint. A user error or a diverged loss is printed as one line and recorded in
``OUT/failure.json``, which ``epplan run`` shows after torchrun exits; a restart that finds a
divergence recorded by the same torchrun job stops at once instead of diverging again.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
import traceback
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record

from epplan.errors import EpplanError, OutOfGPUMemory, RuntimeSetupError, param
from epplan.fileio import atomic_write_text
from epplan.train import checkpoint
from epplan.train.job import load_job
from epplan.train.options import TrainOptions
from epplan.train.replan import job_in_force
from epplan.train.rundir import FAILURE, hold_as_worker
from epplan.train.trainer import Trainer, TrainingDiverged



def _env_int(name: str) -> int:
    try:
        return int(os.environ[name])
    except (KeyError, ValueError):
        raise RuntimeSetupError(f"${name} is not set: start this module through torchrun "
                                "(epplan run does)") from None


def _process_group_store(rank: int, attempt: int) -> dist.Store:
    """The store for ``init_process_group``: torchrun's, under a prefix of its own per attempt.

    torchrun's agent keeps one store across restarts, so without the prefix a restarted process
    can read the address a dead process published in the previous attempt and fail to connect.
    Also refuses a second process with the same manifest rank (two agents given the same
    --node-rank), which would otherwise hang in process-group set-up.
    """
    is_agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=not is_agent_store and rank == 0, timeout=timedelta(minutes=10))
    store = dist.PrefixStore(f"epplan/attempt_{attempt}", store)
    if store.add(f"claim/rank{rank}", 1) > 1:
        raise RuntimeSetupError(f"two processes claim rank {rank}: every node's 'epplan run' needs its "
                                f"own {param('node_rank')} (0 .. nodes - 1)")
    return store


def _device(kind: str, local_rank: int) -> torch.device:
    if kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeSetupError(f"{param('device', 'cuda')} but no CUDA GPU is visible; use {param('device', 'cpu')}")
    if local_rank >= torch.cuda.device_count():
        raise RuntimeSetupError(f"local rank {local_rank} has no GPU: {torch.cuda.device_count()} visible")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def _write_failure(out: Path, kind: str, message: str, rank: int, attempt: int) -> bool:
    """Record the failure for 'epplan run' to show; False if it could not be written."""
    doc = {"kind": kind, "message": message, "rank": rank, "attempt": attempt,
           "run_id": os.environ.get("TORCHELASTIC_RUN_ID")}
    try:
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(out / FAILURE, json.dumps(doc))
        return True
    except OSError:
        return False


def _watch_parent() -> None:
    """End this process when torchrun's agent dies (its parent changes): a killed agent, as when
    'epplan run' is killed by SIGKILL, must not leave workers training on."""
    parent = os.getppid()

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="epplan-parent-watch", daemon=True).start()


def _log_crash(out: Path, rank: int) -> str:
    """The traceback of an unexpected exception, into OUT/logs/; returns where it went."""
    text = traceback.format_exc()
    path = out / "logs" / f"worker.rank{rank if rank >= 0 else 'unknown'}.log"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as fh:
            fh.write(text)
        return str(path)
    except OSError:
        sys.stderr.write(text)
        return "the output above"


def _out_of_memory_message(job, opts: TrainOptions, rank: int, exc: BaseException) -> str:
    config = job.config
    per_gpu = opts.batch_per_group(config, job.num_ranks) // opts.batch.micro_batches
    detail = str(exc).split(". See documentation")[0].split("If reserved")[0].strip()
    return (f"rank {rank} ran out of GPU memory ({detail}) with {per_gpu} sequences of "
            f"{config.seq_len} tokens per GPU per micro-batch: raise {param('micro_batches')}, lower "
            f"{param('global_batch')}, or pass {param('recompute', 'block')} ('epplan estimate --topology T "
            f"--placement {opts.manifest} --micro-batches N' prints the memory per GPU)")


def read_failure(out: Path) -> dict | None:
    try:
        return json.loads((out / FAILURE).read_text())
    except (OSError, json.JSONDecodeError):
        return None


@record
def main(argv: list[str] | None = None) -> int:
    opts = TrainOptions.from_argv(sys.argv[1:] if argv is None else argv)
    out = Path(opts.out)
    attempt = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    launched = os.environ.get("EPPLAN_LAUNCHED") == "1"  # 'epplan run' shows failure.json itself
    rank = -1
    try:
        try:
            failure = read_failure(out)
            if (attempt > 0 and failure and failure["kind"] in ("diverged", "out_of_memory", "error")
                    and failure["run_id"] == os.environ.get("TORCHELASTIC_RUN_ID")):
                # Restarting would fail, diverge or run out of memory again.
                raise {"diverged": TrainingDiverged, "out_of_memory": OutOfGPUMemory}.get(
                    failure["kind"], EpplanError)(failure["message"])
            job = load_job(opts.manifest)
            local_rank = _env_int("LOCAL_RANK")
            rank = job.rank_of(opts.node_rank, local_rank, _env_int("LOCAL_WORLD_SIZE"), _env_int("WORLD_SIZE"))
            hold_as_worker(out, opts.node_rank)
            if attempt == 0 and not opts.checkpoints.resume and not launched:
                checkpoint.refuse_fresh_start(out / "checkpoints", opts.out)
            device = _device(opts.device, local_rank)
            os.environ["RANK"] = str(rank)  # the manifest's rank, not torchrun's
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                    store=_process_group_store(rank, attempt), rank=rank,
                                    world_size=job.num_ranks, device_id=device if device.type == "cuda" else None)
            if opts.replan.replan_every and (opts.checkpoints.resume or attempt > 0):  # the manifest in force, if the run moved
                job, in_force = job_in_force(job, out, rank)
                opts = opts.replace(manifest=in_force or opts.manifest)
            try:
                Trainer(job, opts, rank, device).run(resume=opts.checkpoints.resume or attempt > 0, attempt=attempt)
            except torch.OutOfMemoryError as exc:
                raise OutOfGPUMemory(_out_of_memory_message(job, opts, rank, exc)) from None
            # Only after success: with a peer dead mid-collective, tearing NCCL down can block, and a
            # process that never exits keeps torchrun from restarting the group.
            dist.destroy_process_group()
        except OSError as exc:  # a full disk, a vanished file system
            if exc.errno is None or isinstance(exc, (ConnectionError, TimeoutError)):
                raise
            where = f" ({exc.filename})" if exc.filename else ""
            raise EpplanError(f"rank {rank}: cannot write or read the run's files{where}: "
                              f"{exc.strerror or exc}; free space on, or fix, {out}") from None
    except EpplanError as exc:
        kind = ("diverged" if isinstance(exc, TrainingDiverged) else
                "out_of_memory" if isinstance(exc, OutOfGPUMemory) else "error")
        if kind != "diverged" or rank <= 0:  # a divergence is the same on every rank: say it once
            message = exc.cli_message()  # shown by 'epplan run': the library's parameters as its flags
            written = _write_failure(out, kind, message, rank, attempt)
            if not (launched and written):
                print(f"epplan worker (rank {rank if rank >= 0 else '?'}): error: {message}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # a defect of epplan or of the cluster: one line, the traceback in the log
        where = _log_crash(out, rank)
        message = (f"rank {rank if rank >= 0 else '?'} failed: {type(exc).__name__}: {exc} "
                   f"(traceback in {where})")
        if not (launched and _write_failure(out, "crash", message, rank, attempt)):
            print(f"epplan worker: error: {message}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    _watch_parent()
    try:
        code = main()  # @record has written torchrun's error file for an exception
    except SystemExit as exc:  # argparse
        code = exc.code if isinstance(exc.code, int) else 1
    except BaseException:
        traceback.print_exc()
        code = 1
    # NOTE: exit without interpreter finalization: unloading torch takes seconds per process,
    # and after a failure NCCL's destructors can block on a dead peer. Files are closed and synced.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
