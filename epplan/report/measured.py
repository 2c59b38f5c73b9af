"""The measured half of a report: a run's recorded all-to-all bytes beside the prediction.

Shape legend: L = MoE layers, G = ranks (S = source, T = destination), E = experts, K = links,
N = step records.

What the runtime records (``epplan.train.metrics``, format ``epplan.metrics`` v1): per step and MoE
layer, ``dispatch_bytes[l][s][t]`` and ``combine_bytes[l][s][t]``, the bytes rank s sent to rank
t in the *forward* dispatch and combine, each row being d_model * the activation's element size
(the diagonal: rows a rank keeps). Backward repeats both with dispatch and combine swapped.

How the comparison is made apples to apples:

- Direction and passes. The runtime's forward dispatch matrix D is what the cost function calls
  b F (s -> t) and its forward combine matrix C is b F^T; backward sends the same again, and a
  block recompute the forward's once more (its statistics are not recorded twice). So the
  measured ``dispatch`` component of a link is p loads(D) and ``combine`` is p loads(C), p the
  cost model's passes for the run's recompute (2, 3 under block), the exact counterparts of
  ``epplan.report.predicted``'s components, through the same path fractions
  (``Topology.link_loads``; the diagonal is ignored there).
- Run settings. The prediction and the replay are the plan's problem with the run's settings
  where its start record gives them (``epplan.runfiles.RUN_SETTINGS``, and its dispatch): a run
  with ``--recompute block`` over a plan made without is scored with block recompute, and said so.
- Bytes per assignment. The runtime's b is measured (forward dispatch bytes, diagonal included,
  over token-assignments, per layer); the cost function's is d_model * the model dtype's size.
  They differ when activations travel in another dtype than the weights (fp32 activations of a
  bf16 model). The prediction shown beside the measurement is converted to the runtime's b (a
  unit conversion, reported as ``bytes_scale``), so that the ratio measures routing and volume.
- Replay. The cost function scored on the run's own routing statistics (``routing_stats.json``:
  per source rank and expert, summed over the steps) with the runtime's b reproduces the measured
  bytes exactly when every (source, expert) count splits over the expert's replicas in whole
  assignments (one replica per expert, or even splits that divide), up to float32 storage in
  ``Cost``. With fractional splits the runtime rounds per forward call, and they agree to within
  a row per (source, expert, micro-batch).
- Hierarchical runs (the start record's ``dispatch``). Rows are one per (token, node) across
  nodes and one per (token, GPU) inside them, so b is the recorded ``row_bytes`` (d_model * the
  exchange dtype's size), the prediction is the cost function under hierarchical dispatch (the
  manifest's plan re-scored so if it was made for flat), and the replay puts the run's measured
  ``node_rows`` and ``gpu_rows`` (routing statistics v2) on the links through
  ``epplan.cost.dispatch.hierarchical_link_loads``: exact, rounding or not, because those are
  the rows the runtime sent.
- Expert TP (``--expert-tp``, a run setting of its start record). The step
  records' ``expert_tp_bytes`` are the forward gathers and reduce-scatters inside each TP group;
  measured per sending GPU, times ``tensor_parallel.expert_tp_passes`` (backward, recompute), they
  stand beside ``tensor_parallel.expert_tp_traffic`` of the predicted rows each GPU serves and of
  the replay's (the run's own routing), in the runtime's bytes per row: equal to the replay when
  the splits are whole, as the all-to-all's are.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from epplan.cost import Cost, evaluate
from epplan.cost.dispatch import hierarchical_link_loads, hierarchical_traffic
from epplan.cost.linkmap import link_map
from epplan.errors import EpplanError, param
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import Placement
from epplan.topology import Topology
from epplan.report.predicted import ReportError, component_bytes
from epplan.runfiles import (METRICS_FILE, METRICS_FORMAT, METRICS_VERSION, ROUTING_STATS_FILE, RUN_SETTINGS,
                             read_metrics_lines)
from epplan.workload.routing_stats import RoutingStats, read_routing_stats
from epplan.workload.tensor_parallel import expert_tp_passes, expert_tp_traffic
from epplan.workload.traffic import Traffic

_STEP_KEYS = ("step", "step_time_s", "tokens_per_expert")
_MATRIX_KEYS = ("dispatch_bytes", "combine_bytes")  # on every step, or every few (many ranks)


@dataclass
class RunMetrics:
    """What a run directory holds, reduced to what the report needs.

    steps: int64[N] step numbers of the step records that carry all-to-all bytes (every step, or
        every few steps in runs of many ranks: ``epplan.train.metrics.matrix_every``).
    step_time_s: float64[M] of every step record used (M >= N).
    dispatch_bytes, combine_bytes: int64[N, L, S, T] forward bytes per step.
    assignments: int64[N, L] token-assignments routed (after capacity drops), same steps.
    routing: the run's routing statistics, if its file was found.
    """

    run_dir: Path
    manifest_hash: str
    steps: np.ndarray
    step_time_s: np.ndarray
    dispatch_bytes: np.ndarray
    combine_bytes: np.ndarray
    assignments: np.ndarray
    tokens_per_step: int | None
    device: str | None
    routing: RoutingStats | None
    is_finished: bool
    notes: list[str] = field(default_factory=list)
    dispatch: str = "flat"  # how the run exchanged rows (its start record; flat before it was recorded)
    settings: dict[str, Any] = field(default_factory=dict)  # RUN_SETTINGS its start record gives
    row_bytes: int | None = None  # one row's wire bytes as the step records give it (None: not recorded)
    # --expert-tp: int64[N, L, S, T] forward bytes inside the TP groups, the same steps (None for
    # runs without it)
    expert_tp_bytes: np.ndarray | None = None
    # rank 0's allocator high-water mark over the steps, GB (GPU runs since peak_memory_gb was recorded)
    peak_memory_gb: float | None = None

    @property
    def num_steps(self) -> int:
        return int(self.steps.size)

    @property
    def bytes_per_assignment(self) -> float:
        """The runtime's wire bytes of one row (d_model * element size): recorded, or (flat
        runs before it was recorded) the forward dispatch bytes over token-assignments."""
        if self.row_bytes:
            return float(self.row_bytes)
        total = self.assignments.sum()
        return float(self.dispatch_bytes.sum() / total) if total and self.dispatch == "flat" else math.nan

    def typical_step_time_s(self) -> float:
        """Median step time, leaving out the first step (allocator and kernel warm-up)."""
        times = self.step_time_s[1:] if self.step_time_s.size > 1 else self.step_time_s
        return float(np.median(times))


def read_run(run_dir: str | Path, *, manifest_hash: str, num_layers: int, num_ranks: int) -> RunMetrics:
    """Read and check ``RUN_DIR/metrics.jsonl`` (and its routing statistics) for a manifest.

    Raises ``ReportError`` (one line) for a missing or truncated file, another format or
    version, a run of another manifest, or records whose shapes do not fit the manifest.
    """
    run_dir = Path(run_dir)
    path = run_dir / METRICS_FILE
    if not run_dir.is_dir():
        raise ReportError(f"{param('metrics', run_dir)}: not a directory; pass the directory 'epplan run' wrote")
    if not path.is_file():
        raise ReportError(f"{param('metrics', run_dir)}: no {METRICS_FILE} in it; pass the directory 'epplan run' wrote")
    records = read_metrics_lines(path, ReportError)
    if not records or records[0][1].get("kind") != "start":
        raise ReportError(f"{path}: does not begin with a 'start' record; not a metrics file of 'epplan run'")
    start = records[0][1]
    if start.get("format") != METRICS_FORMAT or start.get("version") != METRICS_VERSION:
        raise ReportError(f"{path}: format {start.get('format')!r} version {start.get('version')!r}; "
                          f"this epplan reads {METRICS_FORMAT!r} version {METRICS_VERSION}")

    # Which records belong to this manifest: a resume with another manifest, or a move of the
    # experts by --replan-every, starts a new segment.
    notes: list[str] = []
    hashes: list[str] = []
    is_ours = False
    steps: list[tuple[int, dict]] = []
    finished = False
    dispatches = set()
    current: dict[str, Any] = {}  # the run settings of the segment (its start record's)
    settings: dict[str, Any] = {}  # those of the last segment of this manifest
    for line_no, rec in records:
        kind = rec.get("kind")
        if kind == "start":
            current = {k: rec[k] for k in RUN_SETTINGS if k in rec}
        if kind == "start" or (kind == "replan" and rec.get("moved")):  # a live move switches manifests too
            hashes.append(str(rec.get("manifest_hash")))
            is_ours = rec.get("manifest_hash") == manifest_hash
            if is_ours:
                dispatches.add(rec.get("dispatch", "flat"))
                settings = current
        elif kind == "step" and is_ours:
            steps.append((line_no, rec))
        elif kind == "end":
            finished = True
    if manifest_hash not in hashes:
        raise ReportError(
            f"{path}: recorded by a run of manifest {_short(hashes[0])}, not of this manifest "
            f"({_short(manifest_hash)}); pass the manifest that run used")
    if len(set(hashes)) > 1:
        notes.append(f"the run switched manifests ({', '.join(_short(h) for h in dict.fromkeys(hashes))}); "
                     f"only the {len(steps)} steps run under this one are compared")
    if not steps:
        raise ReportError(f"{path}: no step records of this manifest yet; let the run finish a step")
    if not finished:
        notes.append(f"{METRICS_FILE} has no 'end' record: the run is still going or stopped early")
    if len(dispatches) > 1 or not dispatches <= {"flat", "hierarchical"}:
        raise ReportError(f"{path}: the run's start records give dispatch {sorted(map(str, dispatches))}; "
                          "a report compares the steps of one dispatch (flat or hierarchical): "
                          "pass a run directory of one")
    dispatch = dispatches.pop() if dispatches else "flat"
    row_bytes = next((rec["row_bytes"] for _, rec in steps if "row_bytes" in rec), None)
    if row_bytes is not None and (isinstance(row_bytes, bool) or not isinstance(row_bytes, int)
                                  or not 0 < row_bytes < 2**40):
        raise ReportError(f"{path}: row_bytes is {row_bytes!r}; a row's bytes are a positive integer")

    shape = (num_layers, num_ranks, num_ranks)
    arrays = {k: [] for k in ("dispatch_bytes", "combine_bytes", "tokens_per_expert", "expert_tp_bytes")}
    numbers, times, peaks = [], [], []
    for line_no, rec in steps:
        where = f"{path}:{line_no}"
        has = [k for k in _MATRIX_KEYS if k in rec]
        missing = [k for k in _STEP_KEYS if k not in rec] + ([k for k in _MATRIX_KEYS if k not in rec]
                                                            if has else [])
        if missing:
            raise ReportError(f"{where}: step record lacks {', '.join(missing)}; not written by this epplan's run")
        if not isinstance(rec["step"], int) or isinstance(rec["step"], bool) or not 1 <= rec["step"] < 2**62:
            raise ReportError(f"{where}: step is {rec['step']!r}; a step record's step is a positive integer")
        seconds = rec["step_time_s"]
        if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 < seconds < 1e7:
            raise ReportError(f"{where}: step_time_s is {seconds!r}; a step's time is a positive number of seconds")
        times.append(float(seconds))
        peak = rec.get("peak_memory_gb")
        if peak is not None:
            if not isinstance(peak, (int, float)) or isinstance(peak, bool) or not 0 <= peak < 1e6:
                raise ReportError(f"{where}: peak_memory_gb is {peak!r}; a peak is a number of GB")
            peaks.append(float(peak))
        if not has:  # a step of a many-rank run that did not record the matrices
            continue
        for key in _MATRIX_KEYS + (("expert_tp_bytes",) if "expert_tp_bytes" in rec else ()):
            arrays[key].append(_int_array(rec[key], shape, f"{where}: {key}",
                                          "[layers][source ranks][destination ranks]"))
        tpe = _int_array(rec["tokens_per_expert"], None, f"{where}: tokens_per_expert", "[layers][experts]")
        if tpe.ndim != 2 or tpe.shape[0] != num_layers:
            raise ReportError(f"{where}: tokens_per_expert has shape {list(tpe.shape)}, the manifest's model "
                              f"has {num_layers} MoE layers")
        arrays["tokens_per_expert"].append(tpe.sum(axis=1))
        numbers.append(int(rec["step"]))
    if not numbers:
        raise ReportError(f"{path}: no step of this manifest recorded all-to-all bytes yet; runs of many "
                          "ranks record them every few steps and at the last: let the run go on")
    if len(numbers) < len(steps):
        notes.append(f"all-to-all bytes were recorded on {len(numbers)} of the {len(steps)} steps "
                     "(every few steps in runs of many ranks): measured is their mean")

    etp = None
    if arrays["expert_tp_bytes"]:
        if len(arrays["expert_tp_bytes"]) == len(numbers):
            etp = np.stack(arrays["expert_tp_bytes"])
        else:
            notes.append("the run's expert TP bytes are not on every step that recorded all-to-all bytes "
                         "(it ran with and without --expert-tp): they are not compared")
    routing = _read_routing(run_dir, records, manifest_hash, num_layers, num_ranks, notes)
    tokens = start.get("tokens_per_step")
    return RunMetrics(
        run_dir=run_dir, manifest_hash=manifest_hash, steps=np.array(numbers, dtype=np.int64),
        step_time_s=np.array(times), dispatch_bytes=np.stack(arrays["dispatch_bytes"]),
        combine_bytes=np.stack(arrays["combine_bytes"]), assignments=np.stack(arrays["tokens_per_expert"]),
        tokens_per_step=int(tokens) if isinstance(tokens, (int, float)) else None,
        device=start.get("device"), routing=routing, is_finished=finished, notes=notes,
        dispatch=dispatch, row_bytes=row_bytes, settings=settings, expert_tp_bytes=etp,
        peak_memory_gb=max(peaks) if peaks else None)


def _int_array(value, shape: tuple[int, ...] | None, where: str, layout: str) -> np.ndarray:
    from epplan.inputs import has_bool

    if has_bool(value):
        raise ReportError(f"{where} holds true/false; expected integers {layout}")
    try:
        arr = np.asarray(value)
    except ValueError:
        raise ReportError(f"{where} is ragged; expected {layout}") from None
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "f" and np.all(arr == np.round(arr))):
        raise ReportError(f"{where} must hold integers, got {arr.dtype}")
    if shape is not None and arr.shape != shape:
        raise ReportError(f"{where} has shape {list(arr.shape)}, the manifest needs {list(shape)} {layout}")
    if arr.size and (arr.min() < 0 or arr.max() >= 2**62):
        bad = arr.min() if arr.min() < 0 else arr.max()
        raise ReportError(f"{where} holds {bad}; byte and token counts are non-negative and below 2**62")
    return arr.astype(np.int64)


def _read_routing(run_dir: Path, records: list[tuple[int, dict]], manifest_hash: str,
                  num_layers: int, num_ranks: int, notes: list[str]) -> RoutingStats | None:
    """The run's routing statistics, RUN_DIR/routing_stats.json; None (with a note) if there is none."""
    # The file in --metrics itself: the path an 'end' record names is where the run wrote it, which
    # may be another copy of the run (or another run) once the directory has been moved.
    path = run_dir / ROUTING_STATS_FILE if (run_dir / ROUTING_STATS_FILE).is_file() else None
    if path is None:
        notes.append(f"no {ROUTING_STATS_FILE} in {run_dir}: no replay of the run's own routing")
        return None
    try:
        stats = read_routing_stats(path)
    except EpplanError as exc:
        raise ReportError(f"{param('metrics', run_dir)}: {exc}") from None
    if stats.manifest_hash is not None and stats.manifest_hash != manifest_hash:
        raise ReportError(f"{path}: recorded by a run of manifest {_short(stats.manifest_hash)}, not of this "
                          f"manifest ({_short(manifest_hash)}); pass the manifest that run used")
    if stats.counts.shape[:2] != (num_layers, num_ranks):
        raise ReportError(f"{path}: counts for {stats.counts.shape[0]} layers x {stats.counts.shape[1]} ranks, "
                          f"the manifest has {num_layers} x {num_ranks}")
    return stats


def _short(digest: str | None) -> str:
    return str(digest)[:12]


# --------------------------------------------------------------------------------- comparison

@dataclass
class MeasuredComparison:
    """Measured against predicted, per link (components 'dispatch' and 'combine', both passes,
    bytes per step; see the module docstring).

    measured:  component -> float64[K], mean over the step records used.
    predicted: component -> float64[K], the cost function's, times ``bytes_scale``.
    replayed:  component -> float64[K] from the run's routing statistics, or None.
    bytes_scale: runtime bytes per assignment / the cost model's.
    replay_pair_error_bytes: max |replayed - measured| over (layer, source, destination) of the
        forward dispatch, per step; None without a replay.
    """

    layer: int | None
    measured: dict[str, np.ndarray]
    predicted: dict[str, np.ndarray]
    replayed: dict[str, np.ndarray] | None
    runtime_bytes_per_assignment: float
    model_bytes_per_assignment: float
    bytes_scale: float
    measured_step_time_s: float
    predicted_step_time_s: float
    replayed_step_time_s: float | None
    replay_steps: int
    replay_pair_error_bytes: float | None
    notes: list[str]
    expert_tp: "ExpertTpComparison | None" = None
    # rank 0's memory: the model's prediction for its GPU and the run's allocator peak, GB
    predicted_memory_gb: float | None = None
    measured_peak_memory_gb: float | None = None

    @property
    def measured_total(self) -> np.ndarray:
        return self.measured["dispatch"] + self.measured["combine"]

    @property
    def predicted_total(self) -> np.ndarray:
        return self.predicted["dispatch"] + self.predicted["combine"]

    @property
    def replayed_total(self) -> np.ndarray | None:
        return None if self.replayed is None else self.replayed["dispatch"] + self.replayed["combine"]

    def ratio(self) -> np.ndarray:
        """float64[K] measured / predicted (NaN where nothing was predicted)."""
        pred = self.predicted_total
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(pred > 0, self.measured_total / pred, np.nan)


@dataclass
class ExpertTpComparison:
    """``--expert-tp``'s exchanges inside the TP groups, bytes per step each GPU sends, all passes
    (``passes``: forward, backward and a block recompute): float64[G] each; ``replayed`` None
    without the run's routing statistics."""

    measured: np.ndarray
    predicted: np.ndarray
    replayed: np.ndarray | None
    passes: int

    def to_dict(self) -> dict:
        return {"passes": self.passes, "measured_bytes": self.measured.tolist(),
                "predicted_bytes": self.predicted.tolist(),
                "replayed_bytes": None if self.replayed is None else self.replayed.tolist()}


def expert_tp_sent(served: np.ndarray, tp: int, recompute: str, row_bytes: float,
                   layers: list[int]) -> np.ndarray:
    """float64[G] bytes per step each GPU sends inside its TP group under ``--expert-tp``, of
    ``layers`` (``tensor_parallel.expert_tp_traffic``); served: [L, G] rows each GPU receives."""
    served = np.asarray(served, dtype=np.float64)
    src, _, sent = expert_tp_traffic(served[layers], tp, recompute, row_bytes)
    return np.bincount(src, sent, minlength=served.shape[1])


def measured_link_bytes(topology: Topology, dispatch: np.ndarray, combine: np.ndarray,
                        layer: int | None = None, passes: float = 2.0) -> dict[str, np.ndarray]:
    """Component -> float64[K] wire bytes per step of the forward matrices ``dispatch`` and
    ``combine`` (float[L, S, T] per step), run ``passes`` times (forward and backward: 2; 3 under
    block recompute, whose recompute sends the forward's rows again), through ``Topology.link_loads``."""
    layers = range(dispatch.shape[0]) if layer is None else [layer]
    d = sum(np.asarray(dispatch[li], dtype=np.float64) for li in layers)
    c = sum(np.asarray(combine[li], dtype=np.float64) for li in layers)
    # Loads are linear: summing the layers' matrices first is the same as summing their loads.
    return {"dispatch": passes * topology.link_loads(d), "combine": passes * topology.link_loads(c)}


def replay_cost(placement: Placement, problem: PlacementProblem, routing: RoutingStats) -> Cost:
    """The cost function on the run's own routing: ``problem`` (the plan's, every setting kept:
    rates, recompute, optimizer sharding, overlap, TP) with the run's per-step counts as its
    traffic (the statistics / steps, not rescaled to the model's volume: the run may have used
    another batch)."""
    pairs = (routing.pairs.astype(np.float64) / routing.steps
             if problem.dispatch == "hierarchical" and routing.pairs is not None else None)
    traffic = Traffic(routing.per_step(), source=f"run routing statistics ({routing.steps} steps)", pairs=pairs)
    return evaluate(placement, dataclasses.replace(problem, traffic=traffic))


def hierarchical_replay(topology: Topology, routing: RoutingStats, row_bytes: float,
                        layers: list[int], passes: float = 2.0) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
    """The measured rows of a hierarchical run on the links: component -> float64[K] bytes per
    step (``passes`` as for ``measured_link_bytes``), and per layer the forward dispatch's float64[S, T] bytes summed over the
    statistics' steps (integers, exact in float64 below 2**53).

    routing.node_rows is by the run's node order (``routing.nodes``); the link map numbers nodes
    as the topology does, so the columns are put in the topology's order first. The rows of the
    layers are added before they go on the links, as ``measured_link_bytes`` adds the matrices.
    """
    order = [int(topology.gpu_node[ranks[0]]) for _, ranks in routing.nodes]  # run node -> topology node
    node_rows = np.zeros(routing.node_rows.shape[:2] + (int(topology.gpu_node.max()) + 1,))
    node_rows[:, :, order] = routing.node_rows  # [L, G, N], summed over the steps
    fwd, bwd = hierarchical_link_loads(link_map(topology), node_rows[layers].sum(axis=0),
                                       routing.gpu_rows[layers].sum(axis=0), row_bytes)
    pairs = []
    for li in layers:
        network, intra = hierarchical_traffic(node_rows[li], routing.gpu_rows[li], topology.gpu_node,
                                              topology.gpu_local)
        pairs.append(row_bytes * (network + intra))
    return {"dispatch": passes * fwd / routing.steps, "combine": passes * bwd / routing.steps}, pairs


def compare_measured(cost: Cost, placement: Placement, problem: PlacementProblem, run: RunMetrics,
                     layer: int | None = None) -> MeasuredComparison:
    """Measured per-link bytes beside the prediction and the replay of the run's routing."""
    topo = problem.topology
    notes = list(run.notes)
    if run.dispatch != problem.dispatch:
        notes.append(f"the plan was scored for {problem.dispatch} dispatch, the run used {run.dispatch}: "
                     f"predicted is the plan re-scored for {run.dispatch}")
        problem = dataclasses.replace(problem, dispatch=run.dispatch)
        cost = evaluate(placement, problem)
    changed = {k: v for k, v in run.settings.items() if getattr(problem, k) != v}
    if changed:
        notes.append("the run's settings differ from the plan's ("
                     + ", ".join(f"{k} {v} where the plan has {getattr(problem, k)}" for k, v in changed.items())
                     + "): predicted and replayed are the plan re-scored with the run's")
        problem = dataclasses.replace(problem, **changed)
        cost = evaluate(placement, problem)
    passes = float(cost.a2a_passes)  # the run's exchanges per layer and step, as the cost model counts them
    model_b = float(problem.bytes_per_assignment)
    run_b = run.bytes_per_assignment
    scale = run_b / model_b if math.isfinite(run_b) and run_b > 0 else 1.0
    if not math.isclose(scale, 1.0):
        dtype = problem.config.dtype
        notes.append(f"the runtime sends {run_b:,.0f} bytes per token-assignment, the cost model assumes "
                     f"{model_b:,.0f} (d_model x {dtype}): predictions are converted (x{scale:.4g})")
    if run.tokens_per_step and run.tokens_per_step != problem.config.tokens_per_step:
        notes.append(f"the run trained {run.tokens_per_step:,} tokens per step, the manifest's model "
                     f"{problem.config.tokens_per_step:,}: expect ratios near "
                     f"{run.tokens_per_step / problem.config.tokens_per_step:.4g}")

    # Loads of the integer sums over the steps, then per step: the replay below sums the same way.
    measured = {k: v / run.num_steps for k, v in measured_link_bytes(
        topo, run.dispatch_bytes.sum(axis=0), run.combine_bytes.sum(axis=0), layer, passes).items()}
    predicted = {k: scale * v for k, v in component_bytes(cost, layer).items() if k in ("dispatch", "combine")}

    replayed, replay_s, pair_err, replay_steps, rc = None, None, None, 0, None
    if run.routing is not None:
        routing = run.routing
        is_window = run.steps <= routing.steps  # the steps the statistics were summed over
        replay_steps = int(is_window.sum())
        if replay_steps != routing.steps:
            notes.append(f"the routing statistics cover {routing.steps} steps, the metrics hold "
                         f"{replay_steps} of them: the replay will not match exactly")
        is_hierarchical = run.dispatch == "hierarchical"
        if is_hierarchical and (routing.node_rows is None or routing.gpu_rows is None or routing.nodes is None):
            notes.append(f"{ROUTING_STATS_FILE} has no node_rows/gpu_rows (written before version 2): "
                         "no replay of the hierarchical run's rows")
            replay_steps = 0
        if replay_steps:
            rc = replay_cost(placement, problem, routing)
            replayed = {k: scale * v for k, v in component_bytes(rc, layer).items()
                        if k in ("dispatch", "combine")}
            replay_s = rc.step_time_s
            # Pair level, before any path fractions: b_run * F against the recorded matrices.
            window = run.dispatch_bytes[is_window].mean(axis=0)  # [L, S, T]
            counts = routing.per_step()
            layers = list(range(cost.num_layers)) if layer is None else [layer]
            if is_hierarchical:  # the measured rows themselves; the diagonal never leaves a GPU
                replayed, pairs = hierarchical_replay(topo, routing, run_b, layers, passes)
                total = run.dispatch_bytes[is_window].sum(axis=0)  # [L, S, T] integers
                off = ~np.eye(total.shape[1], dtype=bool)
                pair_err = max(float(np.abs(pairs[i] - total[li])[off].max()) for i, li in enumerate(layers)) \
                    / routing.steps
            else:
                pair_err = max(float(np.abs(run_b * placement.layers[li].flows(counts[li]) - window[li]).max())
                               for li in layers)
    etp = None
    if run.expert_tp_bytes is not None and problem.expert_tp:  # the run's TP degree and recompute
        layers = list(range(cost.num_layers)) if layer is None else [layer]
        etp_passes = expert_tp_passes(problem.recompute)
        off = ~np.eye(run.expert_tp_bytes.shape[-1], dtype=bool)
        sent = (run.expert_tp_bytes[:, layers] * off).sum(axis=(0, 1, 3)) / run.num_steps   # forward, [G]
        etp = ExpertTpComparison(
            measured=etp_passes * sent.astype(np.float64),
            predicted=expert_tp_sent(cost.expert_assignments, problem.tp, problem.recompute, run_b, layers),
            replayed=(None if rc is None else
                      expert_tp_sent(rc.expert_assignments, problem.tp, problem.recompute, run_b, layers)),
            passes=etp_passes)
    return MeasuredComparison(
        layer=layer, measured=measured, predicted=predicted, replayed=replayed,
        runtime_bytes_per_assignment=run_b, model_bytes_per_assignment=model_b, bytes_scale=scale,
        measured_step_time_s=run.typical_step_time_s(), predicted_step_time_s=cost.step_time_s,
        replayed_step_time_s=replay_s, replay_steps=replay_steps, replay_pair_error_bytes=pair_err,
        notes=notes, expert_tp=etp, predicted_memory_gb=float(cost.memory_bytes[0]) / 1e9,
        measured_peak_memory_gb=run.peak_memory_gb)
