"""A whole report as one value: ``build_report(plan, ...) -> Report``, and its JSON form.

Every number is taken from the ``Cost`` that ``epplan.cost.evaluate`` returned (the JSON carries
that function's own ``to_dict()`` under ``cost``) or from the run's metrics; nothing is rescored
here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from epplan.errors import param
from epplan.report.compare import Comparison, PlanView, compare_plans
from epplan.report.measured import MeasuredComparison, RunMetrics, compare_measured
from epplan.report.predicted import (
    ClassRow, GpuTable, LinkTable, ReportError, check_layer, class_summary, gpu_row, gpu_table, link_row, link_table,
)

from epplan.report.components import ComponentComparison, compare_components  # noqa: E402

FORMAT = "epplan.report"
VERSION = 1


@dataclass
class Report:
    """plan's tables for ``layer`` (None: the whole step), the run beside it, other plans.

    top: rows per table (None: every link and GPU).
    """

    plan: PlanView
    layer: int | None
    top: int | None
    links: LinkTable
    classes: list[ClassRow]
    gpus: GpuTable
    measured: MeasuredComparison | None = None
    run: RunMetrics | None = None
    comparison: Comparison | None = None
    notes: list[str] = field(default_factory=list)
    components: ComponentComparison | None = None

    @property
    def shown_links(self) -> np.ndarray:
        return self.links.order[:self.top]

    @property
    def shown_gpus(self) -> np.ndarray:
        return self.gpus.order[:self.top]

    def measured_order(self) -> np.ndarray:
        """Links of the measured table: hottest measured (bytes / capacity) first."""
        assert self.measured is not None
        time_s = self.measured.measured_total / self.plan.cost.capacity_bytes_per_s
        return np.argsort(-time_s, kind="stable")[:self.top]

    def to_dict(self) -> dict[str, Any]:
        cost, problem = self.plan.cost, self.plan.problem
        topo = cost.topology
        out: dict[str, Any] = {
            "format": FORMAT, "version": VERSION,
            "plan": {"label": self.plan.label, "manifest_hash": self.plan.manifest_hash,
                     "placement": cost.placement_method, "topology": topo.name,
                     "topology_hash": topo.content_hash, "num_gpus": cost.num_gpus,
                     "model": problem.config.name, "traffic": cost.traffic_source},
            "view": {"layer": self.layer, "top": self.top,
                     "period_s": self.links.period_s,
                     "bottleneck_link": topo.link_name(self.links.bottleneck),
                     "bottleneck_time_s": self.links.bottleneck_s},
            "cost": cost.to_dict(top_links=self.top if self.top is not None else topo.num_links),
            "links": [link_row(cost, self.links, int(k)) for k in self.shown_links],
            "link_classes": [row.to_dict(cost) for row in self.classes],
            "gpus": [gpu_row(cost, self.gpus, int(g)) for g in self.shown_gpus],
            "measured": self._measured_dict() if self.measured is not None else None,
            "compare": self._compare_dict() if self.comparison is not None else None,
            "notes": list(self.notes),
        }
        return _finite(out)

    def _measured_dict(self) -> dict[str, Any]:
        m, run, cost = self.measured, self.run, self.plan.cost
        topo = cost.topology
        ratio = m.ratio()
        replayed = m.replayed_total
        rows = []
        for k in self.measured_order():
            k = int(k)
            src, dst = topo.links[k]
            row = {"index": k, "src": src, "dst": dst, "class": topo.link_class[k],
                   "capacity_gbps": float(topo.link_capacity[k]),
                   "measured_dispatch_bytes": float(m.measured["dispatch"][k]),
                   "measured_combine_bytes": float(m.measured["combine"][k]),
                   "measured_bytes": float(m.measured_total[k]),
                   "predicted_bytes": float(m.predicted_total[k]),
                   "replayed_bytes": None if replayed is None else float(replayed[k]),
                   "ratio": float(ratio[k])}
            rows.append(row)
        return {
            "run_dir": str(run.run_dir), "steps": run.num_steps, "device": run.device,
            "finished": run.is_finished, "dispatch": run.dispatch,
            "runtime_bytes_per_assignment": m.runtime_bytes_per_assignment,
            "model_bytes_per_assignment": m.model_bytes_per_assignment,
            "bytes_scale": m.bytes_scale,
            "step_time_s": {"measured_median": m.measured_step_time_s, "predicted": m.predicted_step_time_s,
                            "replayed": m.replayed_step_time_s},
            "memory_gb": {"rank": 0, "predicted": m.predicted_memory_gb,
                          "measured_peak": m.measured_peak_memory_gb},
            "totals_bytes": {"measured": float(m.measured_total.sum()),
                             "predicted": float(m.predicted_total.sum()),
                             "replayed": None if replayed is None else float(replayed.sum())},
            "replay": {"steps": m.replay_steps, "max_pair_error_bytes": m.replay_pair_error_bytes,
                       "max_link_relative_error": _max_rel(replayed, m.measured_total)},
            "links": rows,
            "expert_tp": None if m.expert_tp is None else m.expert_tp.to_dict(),
            "notes": m.notes,
            "components": None if self.components is None else self.components.to_dict(),
        }

    def _compare_dict(self) -> dict[str, Any]:
        c = self.comparison
        return {"same_topology": c.same_topology, "plans": c.totals(), "links": c.link_rows()}


def build_report(plan: PlanView, *, layer: int | None = None, top: int | None = 15,
                 run: RunMetrics | None = None, others: list[PlanView] | tuple = (),
                 notes: list[str] | None = None) -> Report:
    """Everything ``epplan report`` shows for ``plan``; ``others`` are compared beside it."""
    check_layer(plan.cost, layer)
    if top is not None and top < 1:
        raise ReportError(f"{param('top', top)}: give a positive number of rows, or {param('all')}")
    links = link_table(plan.cost, layer)
    report = Report(plan=plan, layer=layer, top=top, links=links, classes=class_summary(plan.cost, links),
                    gpus=gpu_table(plan.cost, plan.placement, layer), notes=list(notes or []))
    if run is not None:
        report.run = run
        report.measured = compare_measured(plan.cost, plan.placement, plan.problem, run, layer)
        report.components = compare_components(run.run_dir, plan.problem, plan.placement)
    if others:
        report.comparison = compare_plans([plan, *others], layer, top)
        models = {p.problem.config for p in [plan, *others]}
        if len(models) > 1:
            report.notes.append("the compared plans are of different models: "
                                + ", ".join(sorted({m.name for m in models})))
        if not report.comparison.same_topology:
            report.notes.append("the compared manifests are on different topologies: only totals compare")
    return report


def _max_rel(a: np.ndarray | None, b: np.ndarray) -> float | None:
    if a is None:
        return None
    scale = max(float(np.abs(b).max(initial=0.0)), 1.0)
    return float(np.abs(a - b).max(initial=0.0) / scale)


def _finite(value: Any) -> Any:
    """NaN and infinities -> None, so that the JSON is standard."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
