"""The routing-statistics file: what ``epplan run`` writes and ``epplan place --routing`` reads.

Shape legend: L = MoE layers, G = ranks (source GPUs), E = routed experts per layer.

Format ``epplan.routing-stats`` version 1, one JSON object::

    {
      "format": "epplan.routing-stats",
      "version": 1,
      "model": "seed",                      # ModelConfig.name of the run
      "num_moe_layers": L, "num_ranks": G, "num_experts": E,
      "top_k": 2,
      "steps": n,                           # optimizer steps the counts were summed over
      "tokens_per_rank_per_step": 80000.0,  # tokens each rank routed per step
      "manifest_hash": "...",               # optional: the manifest the run followed
      "counts": [[[E ints] x G] x L]        # token-assignments, summed over the n steps
    }

``counts[l][s][e]`` is how many (token, expert) assignments source rank s made to expert e in MoE
layer l, summed over the ``steps`` steps; the expected per-step traffic is ``counts / steps``.
Unknown keys are an error: a new field means a new version.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from epplan.errors import TrafficError
from epplan.fileio import atomic_write_text

FORMAT = "epplan.routing-stats"
VERSION = 1


@dataclass(frozen=True)
class RoutingStats:
    """A validated routing-statistics file.

    counts: int64[L, G, E], token-assignments summed over ``steps`` steps.
    """

    model: str
    top_k: int
    steps: int
    tokens_per_rank_per_step: float
    counts: np.ndarray
    manifest_hash: str | None = None

    @property
    def num_moe_layers(self) -> int:
        return int(self.counts.shape[0])

    @property
    def num_ranks(self) -> int:
        return int(self.counts.shape[1])

    @property
    def num_experts(self) -> int:
        return int(self.counts.shape[2])

    def per_step(self) -> np.ndarray:
        """float64[L, G, E]: mean token-assignments per step."""
        return self.counts.astype(np.float64) / self.steps


class _HeaderV1(BaseModel):
    """The JSON object without validating ``counts`` element by element (numpy does that)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["epplan.routing-stats"]
    version: Literal[1]
    model: str
    num_moe_layers: int = Field(ge=1)
    num_ranks: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    steps: int = Field(ge=1)
    tokens_per_rank_per_step: float = Field(gt=0, allow_inf_nan=False)
    manifest_hash: str | None = None
    counts: list[Any]


def write_routing_stats(
    path: str | os.PathLike[str],
    counts: np.ndarray,
    *,
    steps: int,
    model: str,
    top_k: int,
    tokens_per_rank_per_step: float,
    manifest_hash: str | None = None,
) -> Path:
    """Write ``counts`` (int-valued, [L, G, E], summed over ``steps`` steps) as format v1.

    Atomic: the JSON goes to a temporary file in the same directory, then ``os.replace`` puts it
    at ``path``, so a reader never sees half a file. Returns the path written.
    """
    path = Path(path)
    counts = np.asarray(counts)
    if counts.ndim != 3 or 0 in counts.shape:
        raise TrafficError(f"{path.name}: counts must be a non-empty [layers, ranks, experts] array, "
                           f"got shape {counts.shape}")
    if not np.all(np.isfinite(counts)) or counts.min() < 0 or np.any(counts != np.round(counts)):
        raise TrafficError(f"{path.name}: counts must be non-negative integers")
    if not (isinstance(steps, int) and steps >= 1):
        raise TrafficError(f"{path.name}: steps must be a positive integer, got {steps!r}")
    doc = {
        "format": FORMAT,
        "version": VERSION,
        "model": str(model),
        "num_moe_layers": int(counts.shape[0]),
        "num_ranks": int(counts.shape[1]),
        "num_experts": int(counts.shape[2]),
        "top_k": int(top_k),
        "steps": steps,
        "tokens_per_rank_per_step": float(tokens_per_rank_per_step),
    }
    if manifest_hash is not None:
        doc["manifest_hash"] = str(manifest_hash)
    doc["counts"] = counts.astype(np.int64).tolist()
    try:
        _HeaderV1.model_validate(doc)  # the writer obeys the reader's rules
    except ValidationError as exc:
        raise TrafficError(f"{path.name}: {_first_error(exc)}") from None

    # One layer per line: a diff of two runs' files stays readable.
    header = json.dumps({k: v for k, v in doc.items() if k != "counts"})[:-1]
    layers = ",\n  ".join(json.dumps(layer, separators=(",", ":")) for layer in doc["counts"])
    atomic_write_text(path, f'{header}, "counts": [\n  {layers}\n]}}\n')
    return path


def read_routing_stats(path: str | os.PathLike[str]) -> RoutingStats:
    """Read and validate a routing-statistics file; any defect is a ``TrafficError`` naming it."""
    path = Path(path)
    name = path.name
    from epplan.inputs import MiB, load_json, read_text

    text = read_text(path, "routing statistics file", TrafficError, 1024 * MiB)
    doc = load_json(text, name, TrafficError)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise TrafficError(f"{name}: format is {found!r}, expected {FORMAT!r}; "
                           "pass a routing statistics file written by 'epplan run'")
    if doc.get("version") != VERSION or isinstance(doc.get("version"), bool):
        raise TrafficError(f"{name}: version {doc.get('version')!r} of {FORMAT} is not supported; "
                           f"this epplan reads version {VERSION}")
    try:
        header = _HeaderV1.model_validate(doc)
    except ValidationError as exc:
        raise TrafficError(f"{name}: {_first_error(exc)}") from None

    counts = _counts_array(name, header.counts)
    expected = (header.num_moe_layers, header.num_ranks, header.num_experts)
    if counts.shape != expected:
        raise TrafficError(f"{name}: counts has shape {counts.shape}, but the header says "
                           f"[num_moe_layers, num_ranks, num_experts] = {list(expected)}")
    if header.top_k > header.num_experts:
        raise TrafficError(f"{name}: top_k={header.top_k} exceeds num_experts={header.num_experts}")
    return RoutingStats(model=header.model, top_k=header.top_k, steps=header.steps,
                        tokens_per_rank_per_step=header.tokens_per_rank_per_step,
                        counts=counts, manifest_hash=header.manifest_hash)


def _first_error(exc: ValidationError) -> str:
    """'field: message' of pydantic's first complaint, on one line."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "file"
    return f"{where}: {first['msg']}"


def _counts_array(name: str, nested: list[Any]) -> np.ndarray:
    """int64[L, G, E] from nested lists, or a TrafficError saying what is wrong."""
    try:
        arr = np.asarray(nested)
    except ValueError:
        raise TrafficError(f"{name}: counts is ragged; every layer needs the same number of ranks, "
                           "every rank the same number of experts") from None
    if arr.ndim != 3:
        raise TrafficError(f"{name}: counts must be nested [layers][ranks][experts], "
                           f"got {arr.ndim} level(s) of nesting")
    if arr.dtype.kind not in "iu":
        raise TrafficError(f"{name}: counts must be integers (token-assignments), got {arr.dtype} values")
    if any(isinstance(v, bool) for layer in nested for row in layer for v in row):  # json true -> 1
        raise TrafficError(f"{name}: counts holds true/false; counts are integers (token-assignments)")
    if arr.size and arr.min() < 0:
        l, s, e = np.argwhere(arr < 0)[0]
        raise TrafficError(f"{name}: counts[{l}][{s}][{e}] = {arr[l, s, e]} is negative")
    return arr.astype(np.int64)
