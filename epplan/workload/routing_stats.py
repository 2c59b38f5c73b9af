"""The routing-statistics file: what ``epplan run`` writes and ``epplan place --routing`` reads.

Shape legend: L = MoE layers, G = ranks (source GPUs), E = routed experts per layer,
N = nodes, P = E (E - 1) / 2 expert pairs.

Format ``epplan.routing-stats`` version 2, one JSON object::

    {
      "format": "epplan.routing-stats",
      "version": 2,
      "model": "seed",                      # ModelConfig.name of the run
      "num_moe_layers": L, "num_ranks": G, "num_experts": E,
      "top_k": 2,
      "steps": n,                           # optimizer steps the counts were summed over
      "tokens_per_rank_per_step": 80000.0,  # tokens each rank routed per step
      "manifest_hash": "...",               # optional: the manifest the run followed
      "dispatch": "flat",                   # optional: flat | hierarchical, how the run exchanged
      "nodes": [{"name": "n0", "ranks": [0, 1]}, ...],   # optional: ranks per node, local GPU order
      "counts": [[[E ints] x G] x L],       # token-assignments, summed over the n steps
      "pairs": [[[P ints] x G] x L],        # optional: tokens that selected both i and j (i < j)
      "node_rows": [[[N ints] x G] x L],    # optional (needs nodes): distinct (token, node) rows
      "gpu_rows": [[[G ints] x G] x L]      # optional: distinct (token, GPU) rows
    }

``counts[l][s][e]`` is how many (token, expert) assignments source rank s made to expert e in MoE
layer l, summed over the ``steps`` steps; the expected per-step traffic is ``counts / steps``.

``pairs[l][s]`` is the upper triangle (i < j) of the co-activation matrix flattened row-major:
entry (i, j) counts source s's tokens that selected both experts i and j (after capacity drops).
In memory ``RoutingStats.pairs`` is the full int64[L, G, E, E] with zeros on and below the
diagonal.

``node_rows[l][s][n]`` counts the distinct (token, node) pairs of source s's tokens: tokens with
at least one selected expert served (under the run's placement and replica splits) by a GPU of
node n, own node included. ``gpu_rows[l][s][g]`` counts distinct (token, GPU) pairs likewise.
They are measured by the runtime whichever dispatch it used, and are what hierarchical dispatch
sends: s -> its rail peer on node n carries node_rows[s][n] rows (n not s's node), the rail peer
forwards gpu_rows[s][g] rows to each other GPU g of n (``epplan.runtime.hierarchical``).
Nodes are indexed in the order of ``nodes``.

Version 1 is version 2 without ``dispatch``, ``nodes``, ``pairs``, ``node_rows``, ``gpu_rows``;
both are read. Unknown keys are an error: a new field means a new version.
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
VERSION = 2


@dataclass(frozen=True)
class RoutingStats:
    """A validated routing-statistics file.

    counts:    int64[L, G, E], token-assignments summed over ``steps`` steps.
    pairs:     int64[L, G, E, E] or None: tokens that selected both i and j, at [l, s, i, j] for
               i < j; zeros on and below the diagonal.
    node_rows: int64[L, G, N] or None: distinct (token, node) rows of each source per node.
    gpu_rows:  int64[L, G, G] or None: distinct (token, GPU) rows of each source per GPU.
    nodes:     ((name, ranks in local GPU order), ...) indexing node_rows' last axis, or None.
    dispatch:  "flat" or "hierarchical": how the run exchanged rows; None if not recorded.
    """

    model: str
    top_k: int
    steps: int
    tokens_per_rank_per_step: float
    counts: np.ndarray
    manifest_hash: str | None = None
    pairs: np.ndarray | None = None
    node_rows: np.ndarray | None = None
    gpu_rows: np.ndarray | None = None
    nodes: tuple[tuple[str, tuple[int, ...]], ...] | None = None
    dispatch: str | None = None

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


class _Node(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    ranks: list[int] = Field(min_length=1)


class _Header(BaseModel):
    """The JSON object without validating the arrays element by element (numpy does that)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    format: Literal["epplan.routing-stats"]
    version: Literal[1, 2]
    model: str
    num_moe_layers: int = Field(ge=1)
    num_ranks: int = Field(ge=1)
    num_experts: int = Field(ge=1)
    top_k: int = Field(ge=1)
    steps: int = Field(ge=1)
    tokens_per_rank_per_step: float = Field(gt=0, allow_inf_nan=False)
    manifest_hash: str | None = None
    dispatch: Literal["flat", "hierarchical"] | None = None
    nodes: list[_Node] | None = None
    counts: list[Any]
    pairs: list[Any] | None = None
    node_rows: list[Any] | None = None
    gpu_rows: list[Any] | None = None


V2_KEYS = ("dispatch", "nodes", "pairs", "node_rows", "gpu_rows")


def pairs_upper(pairs: np.ndarray) -> np.ndarray:
    """int64[..., E, E] -> int64[..., P]: the entries i < j, row-major."""
    i, j = np.triu_indices(pairs.shape[-1], k=1)
    return pairs[..., i, j]


def pairs_full(upper: np.ndarray, num_experts: int) -> np.ndarray:
    """int64[..., P] -> int64[..., E, E] with zeros on and below the diagonal."""
    out = np.zeros(upper.shape[:-1] + (num_experts, num_experts), np.int64)
    i, j = np.triu_indices(num_experts, k=1)
    out[..., i, j] = upper
    return out


def write_routing_stats(
    path: str | os.PathLike[str],
    counts: np.ndarray,
    *,
    steps: int,
    model: str,
    top_k: int,
    tokens_per_rank_per_step: float,
    manifest_hash: str | None = None,
    pairs: np.ndarray | None = None,
    node_rows: np.ndarray | None = None,
    gpu_rows: np.ndarray | None = None,
    nodes: list[tuple[str, list[int]]] | None = None,
    dispatch: str | None = None,
) -> Path:
    """Write ``counts`` (int-valued, [L, G, E], summed over ``steps`` steps) as format v2, with
    the optional arrays of the module docstring (``pairs`` as int64[L, G, E, E], its upper
    triangle kept; ``nodes`` as (name, ranks) per node).

    Atomic: the JSON goes to a temporary file in the same directory, then ``os.replace`` puts it
    at ``path``, so a reader never sees half a file. Returns the path written.
    """
    path = Path(path)
    counts = np.asarray(counts)
    if counts.ndim != 3 or 0 in counts.shape:
        raise TrafficError(f"{path.name}: counts must be a non-empty [layers, ranks, experts] array, "
                           f"got shape {counts.shape}")
    arrays = {"counts": counts}
    if pairs is not None:
        pairs = np.asarray(pairs)
        if pairs.shape != counts.shape + counts.shape[2:]:
            raise TrafficError(f"{path.name}: pairs must be [layers, ranks, experts, experts] = "
                               f"{list(counts.shape + counts.shape[2:])}, got shape {pairs.shape}")
        arrays["pairs"] = pairs_upper(pairs)
    for name, value in (("node_rows", node_rows), ("gpu_rows", gpu_rows)):
        if value is not None:
            arrays[name] = np.asarray(value)
    for name, value in arrays.items():
        if not np.all(np.isfinite(value)) or (value.size and value.min() < 0) or np.any(value != np.round(value)):
            raise TrafficError(f"{path.name}: {name} must be non-negative integers")
    if not (isinstance(steps, int) and steps >= 1):
        raise TrafficError(f"{path.name}: steps must be a positive integer, got {steps!r}")
    doc: dict[str, Any] = {
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
    if dispatch is not None:
        doc["dispatch"] = str(dispatch)
    if nodes is not None:
        doc["nodes"] = [{"name": str(name), "ranks": [int(r) for r in ranks]} for name, ranks in nodes]
    for name, value in arrays.items():
        doc[name] = value.astype(np.int64).tolist()
    try:
        header = _Header.model_validate(doc)  # the writer obeys the reader's rules
        _check_arrays(path.name, header, {k: v.astype(np.int64) for k, v in arrays.items()})
    except ValidationError as exc:
        raise TrafficError(f"{path.name}: {_first_error(exc)}") from None

    # One layer per line: a diff of two runs' files stays readable.
    head = json.dumps({k: v for k, v in doc.items() if k not in arrays})[:-1]
    parts = []
    for name in arrays:
        layers = ",\n  ".join(json.dumps(layer, separators=(",", ":")) for layer in doc[name])
        parts.append(f'"{name}": [\n  {layers}\n]')
    atomic_write_text(path, f'{head}, {", ".join(parts)}}}\n')
    return path


def read_routing_stats(path: str | os.PathLike[str]) -> RoutingStats:
    """Read and validate a routing-statistics file (version 1 or 2); any defect is a
    ``TrafficError`` naming it."""
    path = Path(path)
    name = path.name
    from epplan.inputs import MiB, load_json, read_text

    text = read_text(path, "routing statistics file", TrafficError, 1024 * MiB)
    doc = load_json(text, name, TrafficError)
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        found = doc.get("format") if isinstance(doc, dict) else type(doc).__name__
        raise TrafficError(f"{name}: format is {found!r}, expected {FORMAT!r}; "
                           "pass a routing statistics file written by 'epplan run'")
    version = doc.get("version")
    if version not in (1, 2) or isinstance(version, bool):
        raise TrafficError(f"{name}: version {version!r} of {FORMAT} is not supported; "
                           f"this epplan reads versions 1 and {VERSION}")
    if version == 1 and (extra := [k for k in V2_KEYS if k in doc]):
        raise TrafficError(f"{name}: {extra[0]} is a version 2 field but the file says version 1; "
                           "set \"version\": 2")
    try:
        header = _Header.model_validate(doc)
    except ValidationError as exc:
        raise TrafficError(f"{name}: {_first_error(exc)}") from None

    L, G, E = header.num_moe_layers, header.num_ranks, header.num_experts
    N = len(header.nodes) if header.nodes is not None else None
    arrays = {"counts": _int_array(name, "counts", header.counts, (L, G, E),
                                   "[num_moe_layers, num_ranks, num_experts]")}
    if header.pairs is not None:
        arrays["pairs"] = _int_array(name, "pairs", header.pairs, (L, G, E * (E - 1) // 2),
                                     "[num_moe_layers, num_ranks, num_experts (num_experts - 1) / 2]")
    if header.node_rows is not None:
        if N is None:
            raise TrafficError(f"{name}: node_rows needs nodes (the ranks of each node) to say "
                               "which node each column is")
        arrays["node_rows"] = _int_array(name, "node_rows", header.node_rows, (L, G, N),
                                         "[num_moe_layers, num_ranks, len(nodes)]")
    if header.gpu_rows is not None:
        arrays["gpu_rows"] = _int_array(name, "gpu_rows", header.gpu_rows, (L, G, G),
                                        "[num_moe_layers, num_ranks, num_ranks]")
    if header.top_k > header.num_experts:
        raise TrafficError(f"{name}: top_k={header.top_k} exceeds num_experts={header.num_experts}")
    _check_arrays(name, header, arrays)
    pairs = arrays.get("pairs")
    return RoutingStats(model=header.model, top_k=header.top_k, steps=header.steps,
                        tokens_per_rank_per_step=header.tokens_per_rank_per_step,
                        counts=arrays["counts"], manifest_hash=header.manifest_hash,
                        pairs=None if pairs is None else pairs_full(pairs, E),
                        node_rows=arrays.get("node_rows"), gpu_rows=arrays.get("gpu_rows"),
                        nodes=None if header.nodes is None else
                        tuple((n.name, tuple(n.ranks)) for n in header.nodes),
                        dispatch=header.dispatch)


def _check_arrays(name: str, header: _Header, arrays: dict[str, np.ndarray]) -> None:
    """What the arrays must satisfy together (shapes already checked)."""
    G = header.num_ranks
    if header.nodes is not None:
        ranks = sorted(r for node in header.nodes for r in node.ranks)
        if ranks != list(range(G)):
            raise TrafficError(f"{name}: nodes must hold every rank 0..{G - 1} exactly once, "
                               f"they hold {ranks}")
    counts = arrays["counts"]
    if "pairs" in arrays:
        full = pairs_full(arrays["pairs"], counts.shape[2])
        bound = np.minimum(counts[..., :, None], counts[..., None, :])  # [L, G, E, E]
        if np.any(full > bound):
            l, s, i, j = np.argwhere(full > bound)[0]
            raise TrafficError(f"{name}: pairs of layer {l}, rank {s}, experts ({i}, {j}) is "
                               f"{full[l, s, i, j]}, more than the counts of either expert")
    if "gpu_rows" in arrays:
        over = arrays["gpu_rows"].sum(axis=2) > counts.sum(axis=2)  # [L, G]
        if over.any():
            l, s = np.argwhere(over)[0]
            raise TrafficError(f"{name}: gpu_rows of layer {l}, rank {s} sum to more rows than "
                               "the rank's token-assignments in counts")
        if "node_rows" in arrays and header.nodes is not None:
            per_node = np.stack([arrays["gpu_rows"][..., list(n.ranks)].sum(axis=2)
                                 for n in header.nodes], axis=2)  # [L, G, N]
            bad = (arrays["node_rows"] > per_node) | (per_node > header.top_k * arrays["node_rows"])
            if bad.any():
                l, s, n = np.argwhere(bad)[0]
                raise TrafficError(f"{name}: node_rows[{l}][{s}][{n}] = {arrays['node_rows'][l, s, n]} "
                                   f"does not fit gpu_rows (its node's GPUs got {per_node[l, s, n]} "
                                   f"rows; a (token, node) row is 1 to top_k (token, GPU) rows)")


def _first_error(exc: ValidationError) -> str:
    """'field: message' of pydantic's first complaint, on one line."""
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first["loc"]) or "file"
    return f"{where}: {first['msg']}"


def _int_array(name: str, key: str, nested: list[Any], shape: tuple[int, ...], axes: str) -> np.ndarray:
    """int64 array of ``shape`` from nested lists, or a TrafficError saying what is wrong."""
    try:
        arr = np.asarray(nested)
    except ValueError:
        raise TrafficError(f"{name}: {key} is ragged; every layer needs the same number of ranks, "
                           "every rank the same number of entries") from None
    if arr.ndim != len(shape):
        raise TrafficError(f"{name}: {key} must be nested [layers][ranks][...], "
                           f"got {arr.ndim} level(s) of nesting")
    if arr.size and arr.dtype.kind not in "iu":
        raise TrafficError(f"{name}: {key} must be integers (token counts), got {arr.dtype} values")
    if _has_bool(nested):  # json true -> 1
        raise TrafficError(f"{name}: {key} holds true/false; {key} are integers (token counts)")
    if arr.size and arr.min() < 0:
        where = "][".join(str(int(i)) for i in np.argwhere(arr < 0)[0])
        raise TrafficError(f"{name}: {key}[{where}] = {arr[tuple(np.argwhere(arr < 0)[0])]} is negative")
    if arr.shape != shape:
        raise TrafficError(f"{name}: {key} has shape {arr.shape}, but the header says {axes} = {list(shape)}")
    return arr.astype(np.int64)


def _has_bool(nested: Any) -> bool:
    if isinstance(nested, list):
        return any(_has_bool(v) for v in nested)
    return isinstance(nested, bool)
