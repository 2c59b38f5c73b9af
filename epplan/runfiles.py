"""The files of a run directory (``epplan run --out DIR``), and the one reader of its metrics.

Torch-free, so that ``epplan report`` and the CLI read a run without importing torch. The writer
is ``epplan.train.metrics`` (the records' keys are documented there); the routing statistics file
is ``epplan.workload.routing_stats``'s.

- ``METRICS_FILE`` (``metrics.jsonl``): format ``METRICS_FORMAT`` version ``METRICS_VERSION``,
  one JSON object per line.
- ``ROUTING_STATS_FILE`` (``routing_stats.json``): the run's routing, which ``epplan place
  --routing`` re-plans from.
- ``IN_FORCE_MANIFEST`` (``manifest.json``) and ``MANIFESTS_DIR`` (``manifests/``): with
  ``--replan-every``, the manifest in force and every one the run put in force, beside the
  routing statistics of the window each was planned on (``epplan.train.replan``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from epplan.errors import EpplanError

METRICS_FILE = "metrics.jsonl"
ROUTING_STATS_FILE = "routing_stats.json"
IN_FORCE_MANIFEST = "manifest.json"
MANIFESTS_DIR = "manifests"
METRICS_FORMAT = "epplan.metrics"
METRICS_VERSION = 1
# The run settings a manifest records and a run's start record gives (the planner's words for them).
RUN_SETTINGS = ("micro_batches", "recompute", "optimizer_sharding", "tp", "expert_tp")
_MAX_METRICS_BYTES = 16 << 30


def read_metrics_lines(path: str | os.PathLike[str],
                       error: type[EpplanError] = EpplanError) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) of every non-empty line of a metrics file; ``error`` (one line) when
    a line is not a JSON object: the file was cut short (or is not a metrics file)."""
    from epplan.inputs import read_text

    path = Path(path)
    text = read_text(path, "metrics file", error, _MAX_METRICS_BYTES)
    out = []
    lines = text.split("\n")
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except RecursionError:
            raise error(f"{path}: line {i} is nested too deeply; not a metrics file of 'epplan run'") from None
        except json.JSONDecodeError as exc:
            last = i == len(lines) or all(not rest.strip() for rest in lines[i:])
            what = "is cut short: the file is truncated" if last else "is not JSON: the file is corrupt"
            raise error(f"{path}: line {i} {what} ({exc.msg} at column {exc.colno})") from None
        if not isinstance(rec, dict):
            raise error(f"{path}: line {i} is not a JSON object; not a metrics file of 'epplan run'")
        out.append((i, rec))
    if text and not text.endswith("\n"):
        raise error(f"{path}: line {len(lines)} has no line end: the file is truncated")
    return out


def read_metrics(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The records of a metrics file, in order (``read_metrics_lines`` without line numbers)."""
    return [rec for _, rec in read_metrics_lines(path)]
