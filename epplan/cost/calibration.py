"""Measured rates of one GPU and its software: what ``epplan calibrate`` writes and the cost model reads.

A calibration file (JSON, format ``epplan.calibration`` version 1) holds, for one GPU model:

- ``gemm``: bf16 training rate of a linear layer (forward + both backward GEMMs), TFLOP/s,
  per weight shape [k, n] (the model's attention projections and LM head), at many tokens;
- ``expert``: training rate of the runtime's grouped expert MLP (``expert_mlp``: up, activation,
  down, forward + backward, the activation's memory traffic included), TFLOP/s, per expert shape
  (d_model, d_ff, activation) as points [rows per expert, TFLOP/s];
- ``attention``: training rate of the fused attention kernel ``epplan run`` uses, TFLOP/s, per
  (seq_len, num_heads, head_dim), with the kernel's name; FLOPs as ``epplan.workload.flops``
  counts them (causal: half the square);
- ``memory``: effective bytes/s of the step's memory-bound parts, each over the byte count
  ``epplan.cost.step`` defines for it (norm, cast, loss, moe_local, optimizer, embedding);
- ``attention_block`` (optional): training rate, TFLOP/s, of a block's whole attention half as
  ``epplan run`` runs it (norm, projections, SDPA, the head layouts, key/value repeats for grouped
  heads, on the fp32 residual stream under bf16 autocast with fp32 weights), per model shape
  (d_model, seq_len, num_heads, num_kv_heads, head_dim); FLOPs: the projections' and the scores';
- ``moe_local`` (optional): ``memory``'s moe_local rate, GB/s, measured at each model's own
  (d_model, num_experts, top_k), with the layer's fixed cost per call (``fixed_seconds``,
  optional: files before 2026-12-05 have none, read as 0);
- ``lm_head`` (optional): training rate, TFLOP/s, of the LM head and its loss as ``epplan run``
  runs them (``epplan.runtime.loss``: chunks, the gradient made in the forward, the bf16 copy of
  the fp32 weight kept, its fp32 gradient written), one micro-batch of ``tokens``, per
  (d_model, vocab_size); FLOPs: the head's;
- ``optimizer_fixed`` (optional): seconds per step of the trainer's work after the backward that
  bytes do not capture (launches, the statistics' all-gather, the gradient norm's host sync),
  measured on a model's parameter tensors at tiny sizes, per number of parameter tensors, with
  its part up to the gradient norm's host sync (``before_sync_seconds``, optional);
- ``collectives`` (several GPUs): algorithm bandwidth, GB/s, of ``all_to_all`` and ``all_reduce``
  per group size, as points [bytes per rank, GB/s].

Lookups interpolate linearly in log(rows) / log(bytes) between measured points and hold the end
values outside them; a shape that was not measured takes the nearest measured shape (log
distance) and the result says so in ``Calibration.notes``.

Shipped tables (``epplan/cost/tables/*.json``) are calibration files with a ``provenance``: the
measurement they come from. ``shipped_for(gpu_model)`` finds one by GPU name.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from epplan.errors import CalibrationError

FORMAT = "epplan.calibration"
VERSION = 1
_TABLES = "tables"


@dataclass
class Calibration:
    """One GPU's measured rates; see the module docstring for every table."""

    gpu: str
    provenance: str
    software: dict[str, str]
    gemm: list[dict[str, Any]]
    expert: list[dict[str, Any]]
    attention: list[dict[str, Any]]
    memory: dict[str, float]
    collectives: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    attention_block: list[dict[str, Any]] = field(default_factory=list)
    moe_local: list[dict[str, Any]] = field(default_factory=list)
    lm_head: list[dict[str, Any]] = field(default_factory=list)
    optimizer_fixed: list[dict[str, Any]] = field(default_factory=list)
    source: str = ""  # the file it was read from, or "shipped:NAME"
    notes: list[str] = field(default_factory=list, compare=False)

    # ------------------------------------------------------------------------- lookups
    def gemm_flops(self, k: int, n: int) -> float:
        """FLOP/s of a (tokens, k) @ (k, n) linear layer, forward + backward."""
        row = self._nearest(self.gemm, "gemm", {"k": k, "n": n})
        return row["tflops"] * 1e12

    def expert_flops(self, d_model: int, d_ff: int, activation: str, rows_per_expert: float,
                     path: str = "unchunked") -> float:
        """FLOP/s of the grouped expert MLP at ``rows_per_expert`` rows per expert, training;
        path "unchunked" (``expert_mlp``) or "chunked" (the overlap path, chunk by chunk)."""
        rows = [r for r in self.expert if r.get("path", "unchunked") == path] or self.expert
        same_act = [r for r in rows if r["activation"] == activation] or rows
        row = self._nearest(same_act, "expert", {"d_model": d_model, "d_ff": d_ff})
        return _interp_log(row["points"], rows_per_expert) * 1e12

    def expert_flops_at(self, d_model: int, d_ff: int, activation: str, rows_per_expert: np.ndarray,
                        path: str = "unchunked") -> np.ndarray:
        """``expert_flops`` at every entry of ``rows_per_expert`` (an array of any shape) at once:
        the same table row and interpolation (``_interp_log``'s, through ``np.interp`` in log x).
        ``step_parts`` asks at every layer and GPU (16 x 1,024 lookups for a 1,024-GPU plan)."""
        rows = [r for r in self.expert if r.get("path", "unchunked") == path] or self.expert
        same_act = [r for r in rows if r["activation"] == activation] or rows
        row = self._nearest(same_act, "expert", {"d_model": d_model, "d_ff": d_ff})
        pts = sorted((float(a), float(b)) for a, b in row["points"])
        xs, ys = np.log([p[0] for p in pts]), np.array([p[1] for p in pts])
        return np.interp(np.log(np.asarray(rows_per_expert, dtype=np.float64)), xs, ys) * 1e12

    def attention_flops(self, seq_len: int, num_heads: int, head_dim: int) -> float:
        row = self._nearest(self.attention, "attention",
                            {"seq_len": seq_len, "num_heads": num_heads, "head_dim": head_dim})
        return row["tflops"] * 1e12

    def attention_block_flops(self, d_model: int, seq_len: int, num_heads: int, num_kv_heads: int,
                              head_dim: int) -> float | None:
        """FLOP/s of the whole attention half measured at exactly this shape, or None."""
        want = {"d_model": d_model, "seq_len": seq_len, "num_heads": num_heads,
                "num_kv_heads": num_kv_heads, "head_dim": head_dim}
        row = next((r for r in self.attention_block if all(r[k] == v for k, v in want.items())), None)
        return None if row is None else row["tflops"] * 1e12

    def _moe_local_row(self, d_model: int, num_experts: int, top_k: int) -> dict[str, Any] | None:
        want = {"d_model": d_model, "num_experts": num_experts, "top_k": top_k}
        return next((r for r in self.moe_local if all(r[k] == v for k, v in want.items())), None)

    def moe_local_rate(self, d_model: int, num_experts: int, top_k: int) -> float:
        """Bytes/s of the MoE layer's routing work: measured at this shape, else ``memory``'s."""
        row = self._moe_local_row(d_model, num_experts, top_k)
        return self.memory_rate("moe_local") if row is None else row["gbps"] * 1e9

    def moe_local_seconds(self, d_model: int, num_experts: int, top_k: int, nbytes: float) -> float:
        """Seconds of one call of the MoE layer's routing work over ``nbytes``
        (``epplan.cost.step.moe_local_bytes``): the shape's fixed cost (0 where none was
        measured) and the bytes at its rate."""
        row = self._moe_local_row(d_model, num_experts, top_k)
        fixed = 0.0 if row is None else float(row.get("fixed_seconds", 0.0))
        return fixed + nbytes / self.moe_local_rate(d_model, num_experts, top_k)

    def lm_head_flops(self, d_model: int, vocab_size: int) -> float | None:
        """FLOP/s of the chunked LM head and loss measured at exactly this shape, or None."""
        row = next((r for r in self.lm_head if r["d_model"] == d_model and r["vocab_size"] == vocab_size), None)
        return None if row is None else row["tflops"] * 1e12

    def optimizer_fixed_seconds(self, num_tensors: int) -> float:
        """Seconds per step of the work after the backward that bytes do not capture, for a model
        of ``num_tensors`` parameter tensors (interpolated between measured models; 0 if none)."""
        if not self.optimizer_fixed:
            return 0.0
        return _interp_log([[r["num_tensors"], r["seconds"]] for r in self.optimizer_fixed], max(num_tensors, 1))

    def optimizer_before_sync_seconds(self, num_tensors: int) -> float:
        """The part of ``optimizer_fixed_seconds`` up to the gradient norm's host sync (0 where a
        file has none: calibrations before 2026-12-03 timed only the whole)."""
        rows = [[r["num_tensors"], r["before_sync_seconds"]] for r in self.optimizer_fixed
                if r.get("before_sync_seconds") is not None]
        return _interp_log(rows, max(num_tensors, 1)) if rows else 0.0

    def memory_rate(self, op: str) -> float:
        """Effective bytes/s of memory-bound op ``op`` (over ``epplan.cost.step``'s byte count)."""
        if op not in self.memory:
            raise CalibrationError(f"calibration {self.source or self.gpu}: no memory rate for {op!r}; "
                                   f"run 'epplan calibrate' again with this version of epplan")
        return self.memory[op] * 1e9

    def collective_rate(self, op: str, group_size: int, nbytes: float) -> float | None:
        """Bytes/s (algorithm bandwidth) of ``op`` over ``group_size`` ranks, or None if not measured."""
        rows = [r for r in self.collectives.get(op, []) if r["group_size"] == group_size]
        return _interp_log(rows[0]["points"], nbytes) * 1e9 if rows else None

    def _nearest(self, rows: list[dict[str, Any]], table: str, want: dict[str, float]) -> dict[str, Any]:
        if not rows:
            raise CalibrationError(f"calibration {self.source or self.gpu} has no {table!r} table")
        def distance(row: dict[str, Any]) -> float:
            return sum(abs(math.log(row[k] / v)) for k, v in want.items())
        best = min(rows, key=distance)
        if distance(best) > 0:
            note = (f"calibration {self.source or self.gpu}: {table} shape {want} not measured; "
                    f"used the nearest, {({k: best[k] for k in want})}")
            if note not in self.notes:
                self.notes.append(note)
        return best

    # ------------------------------------------------------------------------- files
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "gpu": self.gpu, "provenance": self.provenance,
                "software": self.software, "gemm": self.gemm, "expert": self.expert,
                "attention": self.attention, "memory": self.memory, "collectives": self.collectives,
                "attention_block": self.attention_block, "moe_local": self.moe_local,
                "lm_head": self.lm_head, "optimizer_fixed": self.optimizer_fixed}

    @classmethod
    def from_dict(cls, data: Any, source: str) -> "Calibration":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CalibrationError(f"{source}: not an epplan calibration file (format {FORMAT!r} "
                                   "expected); write one with 'epplan calibrate'")
        if data.get("version") != VERSION:
            raise CalibrationError(f"{source}: calibration version {data.get('version')!r}, this epplan "
                                   f"reads version {VERSION}; run 'epplan calibrate' again")
        try:
            cal = cls(gpu=str(data["gpu"]), provenance=str(data.get("provenance", "")),
                      software=dict(data.get("software", {})), gemm=list(data["gemm"]),
                      expert=list(data["expert"]), attention=list(data["attention"]),
                      memory={str(k): float(v) for k, v in data["memory"].items()},
                      collectives=dict(data.get("collectives", {})),
                      attention_block=list(data.get("attention_block", [])),
                      moe_local=list(data.get("moe_local", [])), lm_head=list(data.get("lm_head", [])),
                      optimizer_fixed=list(data.get("optimizer_fixed", [])), source=source)
            for row in cal.gemm:
                _positive(row, ("k", "n", "tflops"), source, "gemm")
            for row in cal.expert:
                _positive(row, ("d_model", "d_ff"), source, "expert")
                _points(row["points"], source, "expert")
                str(row["activation"])
            for row in cal.attention:
                _positive(row, ("seq_len", "num_heads", "head_dim", "tflops"), source, "attention")
            for row in cal.attention_block:
                _positive(row, ("d_model", "seq_len", "num_heads", "num_kv_heads", "head_dim", "tflops"),
                          source, "attention_block")
            for row in cal.moe_local:
                _positive(row, ("d_model", "num_experts", "top_k", "gbps"), source, "moe_local")
                if "fixed_seconds" in row and not 0 <= float(row["fixed_seconds"]) < math.inf:
                    raise CalibrationError(f"{source}: moe_local entry {row}: fixed_seconds must be a "
                                           "finite number of seconds, 0 or more")
            for row in cal.lm_head:
                _positive(row, ("d_model", "vocab_size", "tokens", "tflops"), source, "lm_head")
            for row in cal.optimizer_fixed:
                _positive(row, ("num_tensors", "seconds"), source, "optimizer_fixed")
                if "before_sync_seconds" in row and not 0 <= float(row["before_sync_seconds"]) <= float(row["seconds"]):
                    raise CalibrationError(f"{source}: optimizer_fixed entry {row}: before_sync_seconds "
                                           "must be between 0 and seconds")
            for op, rows in cal.collectives.items():
                for row in rows:
                    _positive(row, ("group_size",), source, op)
                    _points(row["points"], source, op)
            if any(not v > 0 for v in cal.memory.values()):
                raise CalibrationError(f"{source}: memory rates must be positive GB/s")
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"{source}: malformed calibration ({type(exc).__name__}: {exc}); "
                                   "write it again with 'epplan calibrate'") from None
        return cal


def load_calibration(path: str | Path) -> Calibration:
    """Read a calibration file; ``CalibrationError`` (naming the file) if it cannot be used."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CalibrationError(f"calibration file {path} does not exist; write it with "
                               "'epplan calibrate --out FILE' on the GPU machine") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise CalibrationError(f"{path}: cannot read it as JSON ({exc})") from None
    return Calibration.from_dict(data, str(path))


def save_calibration(cal: Calibration, path: str | Path) -> None:
    from epplan.fileio import atomic_write_text

    atomic_write_text(Path(path), json.dumps(cal.to_dict(), indent=1) + "\n")


def shipped_tables() -> dict[str, Calibration]:
    """The tables in the package, by file stem (e.g. 'h200')."""
    out = {}
    for entry in resources.files("epplan.cost").joinpath(_TABLES).iterdir():
        if entry.name.endswith(".json"):
            out[entry.name[:-5]] = Calibration.from_dict(json.loads(entry.read_text()),
                                                         f"shipped:{entry.name[:-5]}")
    return out


def shipped_for(gpu_model: str) -> Calibration | None:
    """The shipped table whose name appears in ``gpu_model`` ('H200-SXM5-141GB' -> h200), or None."""
    name = gpu_model.lower()
    for stem, cal in sorted(shipped_tables().items(), key=lambda kv: -len(kv[0])):
        if stem in name:
            return cal
    return None


def _interp_log(points: list[list[float]], x: float) -> float:
    """Piecewise-linear in log(x) through points [[x, y], ...] (sorted here), constant outside."""
    pts = sorted((float(a), float(b)) for a, b in points)
    if x <= pts[0][0]:
        return pts[0][1]
    if x >= pts[-1][0]:
        return pts[-1][1]
    for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
        if x0 <= x <= x1:
            t = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
            return y0 + t * (y1 - y0)
    raise AssertionError("unreachable")


def _positive(row: dict[str, Any], keys: tuple[str, ...], source: str, table: str) -> None:
    for k in keys:
        if not float(row[k]) > 0:
            raise CalibrationError(f"{source}: {table} entry {row}: {k} must be positive")


def _points(points: Any, source: str, table: str) -> None:
    if not points or any(len(p) != 2 or not (float(p[0]) > 0 and float(p[1]) > 0) for p in points):
        raise CalibrationError(f"{source}: {table} points must be non-empty [x > 0, y > 0] pairs")


def resolve_calibrations(topology: Any, path: str | Path | None = None) -> tuple[list[Calibration] | None, list[str]]:
    """One calibration per GPU of ``topology`` and notes saying where each came from.

    ``path`` (``--calibration FILE``) applies to every GPU. Otherwise each node type's
    ``calibration`` file (relative to the topology file), else the shipped table of its GPU
    model. If some GPU has neither, returns None (the flat efficiency) and a note naming it.
    """
    if path is not None:
        cal = load_calibration(path)
        return [cal] * topology.num_gpus, [f"rates: calibration {path} ({cal.gpu})"]
    base = Path(topology.source).parent if getattr(topology, "source", "") else Path(".")
    by_type: dict[str, Calibration | None] = {}
    notes: list[str] = []
    out: list[Calibration] = []
    for node in topology.gpu_node:
        name = topology.node_types[node]
        if name not in by_type:
            ntype = topology.node_type(node)
            if ntype.calibration:
                file = Path(ntype.calibration)
                cal = load_calibration(file if file.is_absolute() else base / file)
                notes.append(f"rates of node type {name!r}: calibration {cal.source} ({cal.gpu})")
            else:
                cal = shipped_for(ntype.gpu.model)
                if cal is not None:
                    notes.append(f"rates of node type {name!r}: shipped {cal.gpu} table "
                                 "(run 'epplan calibrate' for this machine's own)")
            by_type[name] = cal
        if by_type[name] is None:
            model = topology.node_type(node).gpu.model
            return None, [f"no calibration for GPU {model!r} (node type {name!r}): a flat efficiency "
                          "of its datasheet TFLOP/s is used; run 'epplan calibrate' on it and pass "
                          "--calibration FILE"]
        out.append(by_type[name])
    return out, notes
