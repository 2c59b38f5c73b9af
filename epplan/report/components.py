"""Predicted vs measured time per component of a training step (``epplan report --metrics``).

Measured: the ``timing`` records ``epplan run`` writes (``epplan.train.timing``: CUDA events
around attention, the MoE layers, the unchunked exchanges, the LM head and loss, the optimizer,
the whole step), median over the steps after the first. Predicted: ``evaluate`` on the run's own
batch, micro-batches and schedule (from its ``start`` record), with the manifest's rates, the
slowest GPU per component:

    attention     sum over layers of ``StepParts.attention``
    moe           sum over MoE layers of the MoE dense work + the layer's MoE time (exchange and
                  expert GEMMs under the schedule)
    exchange      sum over layers of the busiest link's exchange time (runs without overlap)
    lm_head_loss  ``StepParts.lm_head_loss``;  optimizer  ``StepParts.optimizer``
    step          ``Cost.step_time_s``

A CPU run cannot be compared in time with a prediction for the topology's GPUs: the report then
says so and compares bytes only.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from epplan.cost import evaluate
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import Placement

COMPARED = ("attention", "moe", "exchange", "lm_head_loss", "optimizer", "step")


@dataclass
class ComponentComparison:
    """Seconds per step by component: ``measured`` (medians; absent components missing) and
    ``predicted`` (None where the cost model has no calibration); ``comparable`` False on CPU."""

    measured: dict[str, float]
    predicted: dict[str, float] | None
    num_steps: int
    comparable: bool
    note: str

    def to_dict(self) -> dict:
        rows = {}
        for name in COMPARED:
            m = self.measured.get(name)
            p = None if self.predicted is None else self.predicted.get(name)
            rows[name] = {"measured_s": m, "predicted_s": p,
                          "predicted_over_measured": (p / m if (m and p is not None and self.comparable)
                                                      else None)}
        return {"steps": self.num_steps, "comparable": self.comparable, "note": self.note, "components": rows}


def read_timings(run_dir: Path) -> tuple[dict, list[dict]]:
    """(the last start record, the timing records' components) of ``run_dir/metrics.jsonl``."""
    start, timings = {}, []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut short by a crash; read_run reports the file's state
        if rec.get("kind") == "start":
            start = rec
        elif rec.get("kind") == "timing" and rec.get("step", 0) > 1:
            timings.append(rec["components_s"])
    return start, timings


def compare_components(run_dir: Path, problem: PlacementProblem, placement: Placement) -> ComponentComparison | None:
    """The comparison for a run of ``placement``; None if the run recorded no timings."""
    start, timings = read_timings(Path(run_dir))
    if not timings:
        return None
    measured = {k: statistics.median(t[k] for t in timings if k in t)
                for k in COMPARED if any(k in t for t in timings)}
    gpu = problem.topology.node_type(int(problem.topology.gpu_node[0])).gpu.model
    device = start.get("device")
    if device != "cuda":
        return ComponentComparison(
            measured, None, len(timings), False,
            f"the prediction is for the topology's GPUs ({gpu}); this run was on {device or 'an unknown device'}, "
            "so its times are not compared (the per-link bytes above are)")
    run_problem = _run_problem(problem, start)
    cost = evaluate(placement, run_problem)
    parts = cost.step_parts
    if parts is None:
        predicted = {"step": cost.step_time_s}
        note = "no calibration for these GPUs: only the step time is predicted (a flat efficiency)"
    else:
        per_gpu = parts.per_gpu()
        predicted = {
            "attention": float(per_gpu["attention"].max()),
            "moe": float(parts.moe_dense.max(axis=1).sum() + cost.moe_time_s.sum()),
            "lm_head_loss": float(per_gpu["lm_head_loss"].max()),
            "optimizer": float(per_gpu["optimizer"].max()),
            "step": cost.step_time_s,
        }
        if not run_problem.schedule.overlap:
            predicted["exchange"] = float(cost.a2a_link_s.sum())
        note = (f"predicted for the run's batch ({run_problem.config.global_batch} x {run_problem.config.seq_len} "
                f"tokens), {run_problem.micro_batches} micro-batch(es), {run_problem.schedule.describe()}, "
                f"rates of {_rates(run_problem)}")
    return ComponentComparison(measured, predicted, len(timings), True, note)


def _run_problem(problem: PlacementProblem, start: dict) -> PlacementProblem:
    config, traffic = problem.config, problem.traffic
    if start.get("global_batch") and int(start["global_batch"]) != config.global_batch:
        scale = int(start["global_batch"]) / config.global_batch  # same routing pattern, more tokens
        config = config.replace(global_batch=int(start["global_batch"]))
        traffic = replace(traffic, counts=traffic.counts * scale)
    overlap = "on" if start.get("overlap") else "off"
    return replace(problem, config=config, traffic=traffic, micro_batches=int(start.get("micro_batches") or 1),
                   overlap=overlap, num_chunks=start.get("num_chunks"))


def _rates(problem: PlacementProblem) -> str:
    cals = {id(c): c for c in problem.calibration or []}
    return ", ".join(sorted({c.source or c.gpu for c in cals.values()})) or "a flat efficiency"


def ratio(a: float | None, b: float | None) -> float:
    return a / b if a is not None and b else float(np.nan)
