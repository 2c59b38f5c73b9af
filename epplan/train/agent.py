"""torchrun's agent as ``epplan run`` starts it: ``python -m epplan.train.agent LOG TORCHRUN-ARGS``.

The same agent as ``python -m torch.distributed.run`` (its ``main``), with two differences:

- its own log lines and the ``ChildFailedError`` report it prints when a worker fails (about 40
  lines around the one line that says what went wrong) go to ``LOG`` in the run directory, not to
  the terminal; ``epplan run`` prints the worker's one-line message from ``failure.json``;
- it stops when the ``epplan run`` that started it dies, by any signal (``PR_SET_PDEATHSIG``;
  the workers watch for this agent the same way), so that no training outlives its launcher.

The workers' own output (progress, their messages) still reaches the terminal directly.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Ask Linux to send ``sig`` to this process when its parent exits (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    PR_SET_PDEATHSIG = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        pass


def main(argv: list[str]) -> int:
    log_path, args = argv[0], argv[1:]
    parent = int(os.environ.get("EPPLAN_LAUNCHER_PID", "0"))
    die_with_parent()
    if parent and os.getppid() != parent:  # the launcher died before the line above
        return 1
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    log = open(log_path, "a", buffering=1)
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    # torch puts its own handler (stderr) on the "torch" logger when imported: replace it.
    for name in ("torch", "torch.distributed", ""):
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
    logging.getLogger("torch").propagate = False

    try:
        torchrun.main(args)
    except ChildFailedError as exc:
        log.write(exc.format_msg() + "\n")
        return 1
    except SignalException as exc:
        log.write(f"stopped by {exc.sigval.name}\n")
        return 128 + int(exc.sigval)
    except BaseException:
        log.write(traceback.format_exc())
        return 1
    finally:
        log.flush()
    return 0


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
