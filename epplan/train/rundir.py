"""One owner per run directory, and an earlier run's history never wiped.

``epplan run`` holds ``OUT/run.lock`` (``run.node1.lock``, ... on the other nodes of a multi-node
job) from before torchrun starts until its last worker has exited. The lock is an ``flock`` on the
file, so the kernel (or the NFS lock manager) drops it when the holder dies, by any signal; the
file's text names the holder (host, pid, start time), so that a second run into a busy directory
is told whose it is, and a run that takes over a lock its holder left behind says so.

Workers hold a shared lock on ``OUT/.workers.lock`` (per node) for their whole life: a launcher
that finds the run lock free still waits for an earlier run's workers to be gone before it starts
its own, so an ``epplan run`` killed by SIGKILL cannot leave workers training into the directory
of the next one.

Why not a library (``filelock``): it deletes and re-creates its lock file and does not name the
holder; the kernel's ``flock`` is all the locking there is here, the rest is reporting.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
import time
from pathlib import Path

from epplan.errors import RunDirBusy, RuntimeSetupError, param

FAILURE = "failure.json"  # a failing worker's message, which epplan run shows
WORKERS_WAIT_S = 60.0  # how long a launcher waits for an earlier run's workers to exit


def lock_name(node_rank: int) -> str:
    return "run.lock" if node_rank == 0 else f"run.node{node_rank}.lock"


def workers_lock_name(node_rank: int) -> str:
    return ".workers.lock" if node_rank == 0 else f".workers.node{node_rank}.lock"


def _holder_text() -> str:
    return json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "since": time.strftime("%Y-%m-%d %H:%M:%S %Z")})


def _describe(text: str) -> str:
    try:
        doc = json.loads(text)
        return f"pid {doc['pid']} on {doc['host']}, since {doc['since']}"
    except (ValueError, KeyError, TypeError):
        return "a holder that did not record itself"


def _open_lock(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    except OSError as exc:
        raise RuntimeSetupError(f"{param('out', path.parent)}: cannot create {path.name}: "
                                f"{exc.strerror or exc}") from None


def _try_flock(fd: int, how: int, path: Path) -> bool:
    try:
        fcntl.flock(fd, how | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as exc:
        if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            raise RuntimeSetupError(f"{param('out', path.parent)}: its filesystem does not support file locks "
                                    f"({exc.strerror}); put the run directory on one that does") from None
        raise


class RunLock:
    """The exclusive lock of one node's share of a run directory (see the module docstring)."""

    def __init__(self, out: Path, node_rank: int = 0) -> None:
        self.out, self.node_rank = Path(out), node_rank
        self.path = self.out / lock_name(node_rank)
        self.fd: int | None = None

    def acquire(self) -> str | None:
        """Take the lock or raise ``RunDirBusy``. Returns a line to show when the lock was left
        behind by a holder that is gone (it is taken over, and said so), else None."""
        fd = _open_lock(self.path)
        if not _try_flock(fd, fcntl.LOCK_EX, self.path):
            holder = _read(fd)
            os.close(fd)
            host = _host_of(holder)
            far = ("" if host in (None, socket.gethostname()) else
                   f"; if {host} is down, its lock ends when the file server notices")
            raise RunDirBusy(f"{self.out} is in use by another 'epplan run' ({_describe(holder)}); "
                             f"wait for it to end or stop it, or choose another {param('out')}{far}")
        left = _read(fd).strip()
        os.ftruncate(fd, 0)
        os.pwrite(fd, _holder_text().encode(), 0)
        os.fsync(fd)
        self.fd = fd
        if left:
            return (f"{self.path}: taking over the lock left by an earlier run ({_describe(left)}), "
                    "which no longer holds it")
        return None

    def wait_for_workers(self, timeout_s: float = WORKERS_WAIT_S) -> None:
        """Wait until no worker of an earlier run holds this node's share of the directory."""
        path = self.out / workers_lock_name(self.node_rank)
        fd = _open_lock(path)
        try:
            deadline = time.monotonic() + timeout_s
            while not _try_flock(fd, fcntl.LOCK_EX, path):
                if time.monotonic() > deadline:
                    raise RunDirBusy(f"{self.out}: training processes of an earlier run are still running "
                                     f"(they hold {path.name}) after {timeout_s:.0f} s; stop them first")
                time.sleep(0.2)
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)  # empty: released cleanly
        except OSError:
            pass
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
        self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read(fd: int) -> str:
    try:
        return os.pread(fd, 4096, 0).decode("utf-8", "replace")
    except OSError:
        return ""


def _host_of(text: str) -> str | None:
    try:
        return str(json.loads(text)["host"])
    except (ValueError, KeyError, TypeError):
        return None


_workers_fd: int | None = None


def hold_as_worker(out: Path, node_rank: int, timeout_s: float = 30.0) -> None:
    """A worker's shared lock on its node's share of ``out``, held until the process exits."""
    global _workers_fd
    if _workers_fd is not None:
        return
    path = Path(out) / workers_lock_name(node_rank)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _open_lock(path)
    deadline = time.monotonic() + timeout_s
    while not _try_flock(fd, fcntl.LOCK_SH, path):
        if time.monotonic() > deadline:
            os.close(fd)
            raise RunDirBusy(f"{out}: another launcher holds {path.name}; start one run per directory")
        time.sleep(0.1)
    _workers_fd = fd


# ------------------------------------------------------------------------------ history

HISTORY = ("metrics.jsonl", "routing_stats.json", "checkpoints")


def history(out: Path) -> list[str]:
    """The names of an earlier run's records in ``out`` (empty files and folders do not count)."""
    found = []
    for name in HISTORY:
        path = Path(out) / name
        if path.is_dir() and any(path.iterdir()) or path.is_file() and path.stat().st_size > 0:
            found.append(name)
    return found


def set_aside(out: Path) -> Path | None:
    """Move an earlier run's records into ``out/previous-N/`` (N = 1, 2, ...); returns it."""
    out = Path(out)
    names = [n for n in HISTORY if (out / n).exists()]
    if not names:
        return None
    n = 1
    while (out / f"previous-{n}").exists():
        n += 1
    aside = out / f"previous-{n}"
    aside.mkdir()
    for name in names:
        shutil.move(str(out / name), str(aside / name))
    return aside
