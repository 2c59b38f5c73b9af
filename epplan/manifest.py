"""The placement manifest: what ``epplan place`` writes and ``epplan run`` / ``report`` read.

Format ``epplan.manifest``, schema version 1, one JSON object::

    {
      "format": "epplan.manifest", "schema_version": 1, "epplan_version": "0.1.0",
      "model": {ModelConfig fields},
      "topology": {"name", "content_hash", "source", "routing", "node_names": [N]},
      "world_size": G,
      "ranks": {"node": [G node indices], "local_gpu": [G local GPU indices]},
      "problem": {"experts_per_gpu", "compute_efficiency", "achievable_tflops", "micro_batches",
                  "recompute", "optimizer_sharding", "schedule": {"overlap": bool, "num_chunks": C},
                  "dispatch": "flat" | "hierarchical", "tp": t, "expert_tp": bool},
      "routing": {"spec", "source", "counts_sha256", "notes": [...], "expert_load": [L][E],
                  "windows": [{"spec", "source", "counts_sha256"}, ...]?, "objective": "mean" | "worst"?},
      "placement": {"method", "num_experts": E,
                    "layers": [{"experts": [{"replicas": [R_e ranks],
                                             "rows": [[[r, share], ...], ...],
                                             "row_of": int | [G ints]}, ... E]}, ... L]},
      "solver": {"solver", "status", "objective_s", "bound_s", "gap", "seconds", "layers": [...]},
      "predicted": {"summary": Cost.to_dict(), "link_bytes_per_step": [K], "link_a2a_s": [L][K]?}
    }

A plan made over several routing windows (``epplan place --routing A --routing B``,
``epplan.placement.robust``) records each window and the ``objective`` it minimised over them;
its ``spec`` is then null and its counts are the windows' mean.

Splits are stored compactly: for expert e, ``rows`` holds each distinct split row once, sparse
([replica index, share] for the non-zero shares), and ``row_of`` gives each source rank's row
(a single int when every rank uses the same row, as under an even split). A split row is the
share of that source rank's assignments to e served by each of e's replicas.

``write_manifest`` writes atomically (a temporary file in the same directory, then
``os.replace``). ``load_manifest`` validates with pydantic and then checks every invariant the
runtime relies on, raising ``ManifestError`` with the first problem found: another format or
schema version, corrupted JSON, an expert without a replica, ranks out of range, a GPU holding
more experts in a layer than ``experts_per_gpu`` allows, splits not summing to 1.
``manifest_hash`` is the SHA-256 of the canonical JSON (sorted keys, no whitespace), the same
before writing and after loading.

Shape legend: L = MoE layers, G = ranks, E = experts per layer, K = links, N = nodes.
"""

from __future__ import annotations

import hashlib
import json
from typing import TYPE_CHECKING
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from epplan.errors import ConfigError, ManifestError, param
from epplan.fileio import atomic_write_text
from epplan.inputs import no_bool_numbers
from epplan.placement.types import LayerPlacement, Placement, SolverInfo, overfull_problem, replica_problem
from epplan.schedule import MAX_CHUNKS, Schedule
from epplan.workload.config import ModelConfig

if TYPE_CHECKING:  # for the annotations only (no import cycle at run time)
    from epplan.cost import Cost
    from epplan.placement.problem import PlacementProblem
    from epplan.topology import Topology


FORMAT = "epplan.manifest"
SCHEMA_VERSION = 1
_SHARE_DIGITS = 12          # shares are stored rounded to 1e-12
_SPLIT_TOL = 1e-6           # a stored split row must sum to 1 within this


# ------------------------------------------------------------------------------ the loaded value

@dataclass
class Manifest:
    """A validated manifest.

    placement:        the ``Placement`` (one ``LayerPlacement`` per MoE layer).
    config:           the ``ModelConfig`` it was planned for.
    rank_nodes:       list[str] of length G, the node name of every rank.
    rank_local_gpus:  list[int] of length G, the local GPU index of every rank.
    hash:             ``manifest_hash`` of the document.
    doc:              the whole JSON document (dict), for fields not lifted here.
    """

    placement: Placement
    config: ModelConfig
    topology_name: str
    topology_hash: str
    topology_source: str
    routing: str
    rank_nodes: list[str]
    rank_local_gpus: list[int]
    experts_per_gpu: int
    compute_efficiency: float
    achievable_tflops: float | None
    micro_batches: int
    recompute: str
    optimizer_sharding: str
    schedule: Schedule | None   # the schedule the plan was made for (None: older manifests)
    routing_spec: str | None
    solver: dict[str, Any]
    predicted: dict[str, Any]
    hash: str
    doc: dict[str, Any] = field(repr=False)
    path: str | None = None
    calibrated: bool = True  # planned on calibrated rates (False: a flat --tflops/--compute-efficiency)
    dispatch: str = "flat"   # the exchange the plan was scored for: flat | hierarchical (epplan.cost.dispatch)
    tp: int = 1              # the run settings' TP degree and expert TP (older manifests: 1, off)
    expert_tp: bool = False

    def problem_options(self) -> dict[str, Any]:
        """The ``PlacementProblem`` keywords the plan was made with (its schedule included)."""
        options = {"experts_per_gpu": self.experts_per_gpu, "compute_efficiency": self.compute_efficiency,
                   "achievable_tflops": self.achievable_tflops, "micro_batches": self.micro_batches,
                   "recompute": self.recompute, "optimizer_sharding": self.optimizer_sharding,
                   "dispatch": self.dispatch, "tp": self.tp, "expert_tp": self.expert_tp}
        if self.schedule is not None:
            options.update(overlap="on" if self.schedule.overlap else "off",
                           num_chunks=self.schedule.num_chunks if self.schedule.overlap else None)
        return options

    @property
    def world_size(self) -> int:
        return len(self.rank_nodes)

    @property
    def num_nodes(self) -> int:
        return len(dict.fromkeys(self.rank_nodes))


# ------------------------------------------------------------------------------ building, writing

def build_manifest(placement: Placement, problem: PlacementProblem, *, cost: Cost | None = None, routing_spec: str | None = None,
                   routing_seed: int | None = None, link_layers: bool = False,
                   windows: list[tuple[str, Any]] | None = None, objective: str | None = None) -> dict[str, Any]:
    """The manifest document (a JSON-ready dict) of ``placement`` on ``problem``.

    cost:         ``evaluate(placement, problem)`` (computed here if None): the predicted loads.
    routing_spec: the routing spec the traffic was built from (``zipf:1.2``, a file, ...).
    routing_seed: the seed ``make_traffic`` was given (zipf's expert order), to rebuild it.
    link_layers:  also store every layer's a2a time on every link ([L][K] floats).
    windows:      (spec, Traffic) of each routing window of a plan made over several, and the
    objective:    it minimised over them (``epplan.placement.robust``).
    """
    from epplan import __version__
    from epplan.cost import evaluate

    placement.validate(problem.experts_per_gpu)
    if cost is None:
        cost = evaluate(placement, problem)
    topo, config = problem.topology, problem.config
    counts = np.ascontiguousarray(problem.traffic.counts, dtype=np.float64)
    predicted: dict[str, Any] = {
        "summary": cost.to_dict(top_links=20),
        "link_bytes_per_step": [float(v) for v in cost.link_step_bytes],
    }
    if link_layers:
        predicted["link_a2a_s"] = (cost.a2a_bytes / cost.capacity_bytes_per_s).tolist()
    info = SolverInfo(**placement.info)
    return {
        "format": FORMAT,
        "schema_version": SCHEMA_VERSION,
        "epplan_version": __version__ if isinstance(__version__, str) else str(__version__),
        "model": config.to_dict(),
        "topology": {
            "name": topo.name,
            "content_hash": topo.content_hash,
            "source": topo.source,
            "routing": topo.routing,
            "node_names": list(topo.node_names),
        },
        "world_size": int(topo.num_gpus),
        "ranks": {"node": [int(n) for n in topo.gpu_node], "local_gpu": [int(i) for i in topo.gpu_local]},
        "problem": {
            "experts_per_gpu": int(problem.experts_per_gpu),
            "compute_efficiency": float(problem.compute_efficiency),
            "achievable_tflops": None if problem.achievable_tflops is None else float(problem.achievable_tflops),
            "micro_batches": int(problem.micro_batches),
            "recompute": problem.recompute,
            "optimizer_sharding": problem.optimizer_sharding,
            "schedule": problem.schedule.to_dict(),
            "calibrated": problem.calibration is not None,
            "dispatch": problem.dispatch,
            "tp": int(problem.tp),
            "expert_tp": bool(problem.expert_tp),
        },
        "routing": {
            "spec": routing_spec,
            "seed": routing_seed,
            "source": problem.traffic.source,
            "counts_sha256": counts_sha256(counts),
            "notes": list(problem.traffic.notes),
            "expert_load": counts.sum(axis=1).tolist(),
            **({} if windows is None else {
                "windows": [{"spec": spec, "source": t.source, "counts_sha256": counts_sha256(t.counts)}
                            for spec, t in windows],
                "objective": objective})},
        "placement": {
            "method": placement.method,
            "num_experts": int(placement.num_experts),
            "layers": [{"experts": [_expert_doc(r, s) for r, s in zip(layer.replicas, layer.split)]}
                       for layer in placement.layers],
        },
        "solver": _jsonable(info),
        "predicted": predicted,
    }


def counts_sha256(counts: np.ndarray) -> str:
    """The SHA-256 a manifest records of a traffic's counts (float64, C order)."""
    return hashlib.sha256(np.ascontiguousarray(counts, dtype=np.float64).tobytes()).hexdigest()


def write_manifest(path: str | Path, doc: dict[str, Any]) -> str:
    """Write ``doc`` to ``path`` atomically; return its ``manifest_hash``."""
    path = Path(path)
    text = json.dumps(doc, indent=1, allow_nan=False)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, text + "\n")
    except OSError as exc:
        raise ManifestError(f"{path}: cannot write the manifest: {exc.strerror or exc}") from None
    return manifest_hash(doc)


def manifest_hash(manifest: dict[str, Any] | str | Path | Manifest) -> str:
    """SHA-256 of the canonical JSON of a manifest document (dict, path or ``Manifest``)."""
    if isinstance(manifest, Manifest):
        return manifest.hash
    if isinstance(manifest, (str, Path)):
        manifest = _read_json(Path(manifest))
    text = json.dumps(manifest, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _expert_doc(replicas: np.ndarray, split: np.ndarray) -> dict[str, Any]:
    """One expert's replicas and split: each distinct rounded row once, in order of first use."""
    rounded = np.round(np.asarray(split, dtype=np.float64), _SHARE_DIGITS) + 0.0   # -0.0 -> 0.0
    if np.all(rounded == rounded[:1]):   # one row for every source (even splits, all baselines)
        distinct, row_of = rounded[:1], None
    else:
        distinct, first, inverse = np.unique(rounded, axis=0, return_index=True, return_inverse=True)
        order = np.argsort(first)                      # distinct rows by first use
        rank = np.empty_like(order)
        rank[order] = np.arange(order.size)
        distinct, row_of = distinct[order], rank[inverse.ravel()]
    rows = [[[int(j), float(row[j])] for j in np.flatnonzero(row)] for row in distinct]
    return {"replicas": [int(r) for r in replicas], "rows": rows,
            "row_of": 0 if row_of is None else row_of.tolist()}


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value


# ------------------------------------------------------------------------------ reading, checking

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        return no_bool_numbers(cls, data)


class _Topology(_Strict):
    name: str
    content_hash: str
    source: str
    routing: str
    node_names: list[str] = Field(min_length=1)


class _Ranks(_Strict):
    node: list[int]
    local_gpu: list[int]


class _Schedule(_Strict):
    overlap: bool
    num_chunks: int = Field(ge=1, le=MAX_CHUNKS)


class _Problem(_Strict):
    experts_per_gpu: int = Field(ge=1)
    compute_efficiency: float = Field(gt=0, le=1)
    achievable_tflops: float | None = None
    micro_batches: int = Field(ge=1)
    # The run settings 'epplan place' chose (absent in manifests written before it chose them).
    recompute: Literal["none", "attention", "block"] = "none"
    optimizer_sharding: Literal["none", "dense", "all"] = "none"
    schedule: _Schedule | None = None  # absent in manifests written before it was recorded
    calibrated: bool = True
    dispatch: Literal["flat", "hierarchical"] = "flat"  # absent in manifests written before it was recorded
    tp: int = Field(default=1, ge=1)   # absent in manifests written before TP: 1
    expert_tp: bool = False


class _Window(_Strict):
    spec: str
    source: str
    counts_sha256: str


class _Routing(_Strict):
    spec: str | None
    seed: int | None = None  # absent in manifests written before it was recorded
    source: str
    counts_sha256: str
    notes: list[str]
    expert_load: list[list[float]]
    windows: list[_Window] | None = None   # a plan made over several routing windows ...
    objective: Literal["mean", "worst"] | None = None   # ... and what it minimised over them


class _Expert(_Strict):
    replicas: list[int] = Field(min_length=0)
    rows: list[list[tuple[int, float]]]
    row_of: Union[int, list[int]]


class _Layer(_Strict):
    experts: list[_Expert]


class _Placement(_Strict):
    method: str
    num_experts: int = Field(ge=1)
    layers: list[_Layer] = Field(min_length=1)


class _Document(_Strict):
    format: Literal["epplan.manifest"]
    schema_version: int
    epplan_version: str
    model: dict[str, Any]
    topology: _Topology
    world_size: int = Field(ge=1)
    ranks: _Ranks
    problem: _Problem
    routing: _Routing
    placement: _Placement
    solver: dict[str, Any]
    predicted: dict[str, Any]


def load_manifest(path: str | Path) -> Manifest:
    """Read and check a manifest; ``ManifestError`` naming the file and the first problem."""
    path = Path(path)
    doc = _read_json(path)
    return manifest_from_doc(doc, source=str(path))


def manifest_from_doc(doc: Any, *, source: str = "manifest") -> Manifest:
    """Check a manifest document (already parsed JSON) and build the ``Manifest``."""
    if not isinstance(doc, dict):
        raise ManifestError(f"{source}: a manifest is a JSON object, got {type(doc).__name__}")
    if doc.get("format") != FORMAT:
        raise ManifestError(f"{source}: not an epplan manifest (format {doc.get('format')!r}, "
                            f"expected {FORMAT!r}); write one with 'epplan place'")
    version = doc.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ManifestError(f"{source}: manifest schema version {version!r}, this epplan reads version "
                            f"{SCHEMA_VERSION}; re-plan with 'epplan place' (or use the epplan that wrote it)")
    try:
        parsed = _Document.model_validate(doc)
    except ValidationError as exc:
        err = exc.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"]
        raise ManifestError(f"{source}: {where}: {msg}") from None
    try:
        config = ModelConfig(**parsed.model)
    except (TypeError, ConfigError) as exc:
        raise ManifestError(f"{source}: model: {exc}") from None
    g = parsed.world_size
    nodes = parsed.topology.node_names
    ranks = parsed.ranks
    if len(ranks.node) != g or len(ranks.local_gpu) != g:
        raise ManifestError(f"{source}: ranks: {len(ranks.node)} node and {len(ranks.local_gpu)} local GPU "
                            f"entries for world size {g}")
    bad = [r for r, n in enumerate(ranks.node) if not 0 <= n < len(nodes)]
    if bad:
        raise ManifestError(f"{source}: ranks.node[{bad[0]}] = {ranks.node[bad[0]]} is not a node index "
                            f"0..{len(nodes) - 1}")
    if min(ranks.local_gpu) < 0:
        raise ManifestError(f"{source}: ranks.local_gpu has a negative index")
    seen = set()
    for r, (n, i) in enumerate(zip(ranks.node, ranks.local_gpu)):
        if (n, i) in seen:
            raise ManifestError(f"{source}: ranks {r} and another both are GPU {i} of node {nodes[n]}")
        seen.add((n, i))
    summary = parsed.predicted.get("summary")
    planned = summary.get("num_gpus") if isinstance(summary, dict) else None
    if planned is not None and planned != g:
        raise ManifestError(f"{source}: world_size {g}, but it was planned for {planned} GPUs "
                            "(predicted.summary.num_gpus; a hand-edited manifest?); re-plan with 'epplan place'")
    placement = _placement(parsed.placement, g, config, parsed.problem.experts_per_gpu, source)
    placement.info = SolverInfo(**parsed.solver)  # as the planner wrote it (older manifests: fewer keys)
    return Manifest(
        placement=placement, config=config,
        topology_name=parsed.topology.name, topology_hash=parsed.topology.content_hash,
        topology_source=parsed.topology.source, routing=parsed.topology.routing,
        rank_nodes=[nodes[n] for n in ranks.node], rank_local_gpus=list(ranks.local_gpu),
        experts_per_gpu=parsed.problem.experts_per_gpu,
        compute_efficiency=parsed.problem.compute_efficiency,
        achievable_tflops=parsed.problem.achievable_tflops,
        micro_batches=parsed.problem.micro_batches,
        recompute=parsed.problem.recompute, optimizer_sharding=parsed.problem.optimizer_sharding,
        schedule=None if parsed.problem.schedule is None else Schedule(parsed.problem.schedule.overlap,
                                                                      parsed.problem.schedule.num_chunks),
        routing_spec=parsed.routing.spec,
        solver=dict(parsed.solver), predicted=dict(parsed.predicted),
        hash=manifest_hash(doc), doc=doc, path=source, calibrated=parsed.problem.calibrated,
        dispatch=parsed.problem.dispatch, tp=parsed.problem.tp, expert_tp=parsed.problem.expert_tp,
    )


def check_fits_topology(manifest: Manifest, topo: Topology, what: str = "--topology") -> None:
    """``ManifestError`` unless ``manifest`` was planned on ``topo``: the same content hash (which
    the manifest must record), GPUs, nodes and rank layout. ``what`` names the topology's origin."""
    where = manifest.path or "manifest"
    if not manifest.topology_hash:
        raise ManifestError(f"{where}: records no topology content hash, so it cannot be checked against a "
                            "cluster; re-plan it with 'epplan place'")
    if topo.content_hash and topo.content_hash != manifest.topology_hash:  # the one hash check
        name = Path(where).name
        raise ManifestError(
            f"{what} {topo.source or topo.name}: content hash {topo.content_hash[:12]} differs from the one "
            f"{name} was planned on ({manifest.topology_hash[:12]}): {name} was planned for topology "
            f"{manifest.topology_name!r} ({manifest.topology_source or 'no recorded file'}); pass that file "
            f"as {param('topology', 'FILE')}, or re-plan with 'epplan place'")
    ranks = [(topo.node_names[int(n)], int(i)) for n, i in zip(topo.gpu_node, topo.gpu_local)]
    mine = list(zip(manifest.rank_nodes, manifest.rank_local_gpus))
    if mine != ranks:
        raise ManifestError(
            f"{where}: {manifest.world_size} ranks on {manifest.num_nodes} node(s), but {what} "
            f"{topo.source or topo.name} has {topo.num_gpus} GPUs on {topo.num_nodes} node(s) in another "
            "layout (a hand-edited manifest?); re-plan with 'epplan place'")


def find_topology_file(manifest: Manifest) -> Path | None:
    """The topology file a manifest records (as written, or beside the manifest), if it exists."""
    recorded = manifest.topology_source
    if not recorded:
        return None
    here = Path(manifest.path).parent if manifest.path else Path(".")
    return next((p for p in (Path(recorded), here / recorded) if p.is_file()), None)


def _placement(p: _Placement, num_ranks: int, config: ModelConfig, experts_per_gpu: int, source: str) -> Placement:
    if p.num_experts != config.num_experts:
        raise ManifestError(f"{source}: placement has {p.num_experts} experts, model "
                            f"{config.name!r} has {config.num_experts}")
    if len(p.layers) != config.num_moe_layers:
        raise ManifestError(f"{source}: placement has {len(p.layers)} layers, model {config.name!r} has "
                            f"{config.num_moe_layers} MoE layers")
    layers = []
    for li, layer in enumerate(p.layers):
        where = f"{source}: layer {li}"
        if len(layer.experts) != p.num_experts:
            raise ManifestError(f"{where}: {len(layer.experts)} experts, expected {p.num_experts}")
        held = np.zeros(num_ranks, dtype=np.int64)
        replicas, splits = [], []
        for e, ex in enumerate(layer.experts):
            problem = replica_problem(ex.replicas, num_ranks)
            if problem:
                raise ManifestError(f"{where}, expert {e}: {problem}")
            reps = np.asarray(ex.replicas, dtype=np.int64)
            order = np.argsort(reps, kind="stable")
            rows = np.zeros((max(1, len(ex.rows)), reps.size))
            if not ex.rows:
                raise ManifestError(f"{where}, expert {e}: no split rows")
            for i, row in enumerate(ex.rows):
                for j, share in row:
                    if not 0 <= j < reps.size:
                        raise ManifestError(f"{where}, expert {e}: split row {i} names replica {j}, "
                                            f"it has {reps.size}")
                    if not np.isfinite(share) or share < 0:
                        raise ManifestError(f"{where}, expert {e}: split row {i} has share {share}")
                    rows[i, j] += share
                total = rows[i].sum()
                if abs(total - 1.0) > _SPLIT_TOL:
                    raise ManifestError(f"{where}, expert {e}: split row {i} sums to {total:.9g}, not 1")
            row_of = np.full(num_ranks, ex.row_of) if isinstance(ex.row_of, int) else np.asarray(ex.row_of)
            if row_of.shape != (num_ranks,):
                raise ManifestError(f"{where}, expert {e}: row_of has {row_of.size} entries, world size is {num_ranks}")
            if row_of.min() < 0 or row_of.max() >= len(ex.rows):
                raise ManifestError(f"{where}, expert {e}: row_of names a split row that does not exist")
            split = rows[row_of] / rows[row_of].sum(axis=1, keepdims=True)
            replicas.append(reps[order])
            splits.append(split[:, order])
            held[reps] += 1
        problem = overfull_problem(held, experts_per_gpu)
        if problem:
            raise ManifestError(f"{where}: {problem}")
        layers.append(LayerPlacement(replicas, splits))
    return Placement(num_ranks, p.num_experts, layers, method=p.method)


MAX_MANIFEST_BYTES = 512 << 20


def _read_json(path: Path) -> Any:
    from epplan.inputs import load_json, read_text

    text = read_text(path, "manifest", ManifestError, MAX_MANIFEST_BYTES)
    return load_json(text, f"{path}: corrupted manifest", ManifestError)
