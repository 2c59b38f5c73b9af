"""How a plan ages: its predicted time on routing windows other than the one it was made for
(``epplan report PLAN --routing ...``).

Every window is scored by ``epplan.cost.evaluate`` on the manifest's problem with that window's
traffic, the plan's splits unchanged (the runtime follows them whatever the routing does).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from epplan.cost import evaluate
from epplan.report.compare import PlanView
from epplan.workload.traffic import Traffic


def score_windows(plan: PlanView, windows: list[tuple[str, Traffic]]) -> dict[str, Any]:
    """The plan's MoE time (``objective_s``) and step time on each (spec, traffic) window, beside
    its time on the routing it was planned for."""
    planned = plan.cost
    rows = []
    for spec, traffic in windows:
        cost = evaluate(plan.placement, dataclasses.replace(plan.problem, traffic=traffic))
        worst = int(cost.moe_time_s.argmax())
        rows.append({
            "spec": spec, "source": traffic.source,
            "objective_s": cost.objective_s, "step_time_s": cost.step_time_s,
            "vs_planned": cost.objective_s / planned.objective_s - 1.0 if planned.objective_s > 0 else 0.0,
            "worst_layer": worst, "worst_layer_binds": cost.binds[worst],
            "notes": list(traffic.notes),
        })
    return {"format": "epplan.report-windows", "version": 1,
            "manifest": plan.label, "manifest_hash": plan.manifest_hash,
            "planned": {"source": plan.problem.traffic.source, "objective_s": planned.objective_s,
                        "step_time_s": planned.step_time_s},
            "windows": rows}
