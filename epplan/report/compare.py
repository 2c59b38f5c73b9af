"""Several placements of one cluster side by side: totals, and the hottest links under each.

Shape legend: M = placements compared, K = directed links.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epplan.cost import Cost
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import Placement
from epplan.report.predicted import LinkTable, link_table


@dataclass
class PlanView:
    """One placement and its score: what a manifest (or a baseline) contributes to a report."""

    label: str
    placement: Placement
    problem: PlacementProblem
    cost: Cost
    manifest_hash: str | None = None


@dataclass
class Comparison:
    """plans[0] is the report's own manifest.

    tables: each plan's ``LinkTable`` (same ``layer``).
    links: int64[K'] the links shown, by their largest time under any plan, descending; empty
        when the plans are on different topologies (then only totals compare).
    """

    plans: list[PlanView]
    tables: list[LinkTable]
    links: np.ndarray
    same_topology: bool

    def totals(self) -> list[dict]:
        out = []
        for plan, table in zip(self.plans, self.tables):
            cost = plan.cost
            k = table.bottleneck
            row = {
                "label": plan.label, "placement": cost.placement_method, "manifest_hash": plan.manifest_hash,
                "topology": cost.topology.name, "step_time_s": cost.step_time_s,
                "objective_s": cost.objective_s,
                "link_bytes_total": float(table.total_bytes.sum()),
                "bottleneck_link": cost.topology.link_name(k), "bottleneck_class": cost.topology.link_class[k],
                "bottleneck_time_s": table.bottleneck_s,
                "mfu_spec": cost.mfu_spec, "mfu_datasheet": cost.mfu_datasheet,
                "bandwidth_utilisation": cost.bandwidth_utilisation,
                "fits_memory": cost.fits_memory,
            }
            if table.layer is not None:
                row["layer_time_s"] = float(cost.layer_time_s[table.layer])
            out.append(row)
        return out

    def link_rows(self) -> list[dict]:
        topo = self.plans[0].cost.topology
        rows = []
        for k in self.links:
            src, dst = topo.links[k]
            rows.append({"index": int(k), "src": src, "dst": dst, "class": topo.link_class[k],
                         "capacity_gbps": float(topo.link_capacity[k]),
                         "time_s": [float(t.time_s[k]) for t in self.tables],
                         "total_bytes": [float(t.total_bytes[k]) for t in self.tables]})
        return rows


def compare_plans(plans: list[PlanView], layer: int | None = None, top: int | None = 10) -> Comparison:
    """Side by side on the ``top`` links that are hottest under any plan (None: all links)."""
    assert plans
    tables = [link_table(p.cost, layer) for p in plans]
    first = plans[0].cost.topology
    same = all(_same_topology(first, p.cost.topology) for p in plans[1:])
    links = np.zeros(0, dtype=np.int64)
    if same:
        worst = np.max([t.time_s for t in tables], axis=0)  # [K]
        links = np.argsort(-worst, kind="stable")[:top]
    return Comparison(plans, tables, links, same)


def _same_topology(a, b) -> bool:
    if a.content_hash and b.content_hash:
        return a.content_hash == b.content_hash
    return a.name == b.name and a.links == b.links
