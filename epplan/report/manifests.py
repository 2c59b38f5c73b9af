"""From manifest files to scored plans: the report's plans.

``open_plan`` opens a manifest (``epplan.opened.open_manifest``: its topology found and checked,
its routing rebuilt) and scores the placement with ``epplan.cost.evaluate`` — the same function
that wrote the manifest's prediction, which is compared with the re-scored one.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from epplan.cost import evaluate
from epplan.manifest import Manifest
from epplan.opened import open_manifest
from epplan.placement.baselines import BASELINES, baseline
from epplan.report.compare import PlanView
from epplan.errors import param
from epplan.report.predicted import ReportError
from epplan.topology import Topology


@dataclass
class OpenedPlan:
    """A manifest, its topology and its scored plan; ``notes`` are for the report's header."""

    manifest: Manifest
    plan: PlanView
    notes: list[str] = field(default_factory=list)

    @property
    def hash(self) -> str:
        return self.manifest.hash

    @property
    def topology(self) -> Topology:
        return self.plan.problem.topology


def open_plan(path: str | Path, topology_file: str | Path | None = None,
              known: Topology | None = None, calibration: str | Path | None = None) -> OpenedPlan:
    """Open, check and score the manifest at ``path``.

    ``known``: an already loaded topology used when its content hash is the manifest's (for
    compared manifests of the same cluster). ``calibration``: a calibration file for the rates
    (default: the topology's node-type files, else the shipped tables; a manifest planned on a
    flat --tflops or --compute-efficiency keeps it).
    """
    path = Path(path)
    opened = open_manifest(path, topology_file, known=known, calibration=calibration, what="--topology")
    manifest, problem = opened.manifest, opened.problem
    cost = evaluate(manifest.placement, problem)
    notes = opened.notes
    stored = manifest.predicted.get("link_bytes_per_step")
    if isinstance(stored, list) and len(stored) == problem.topology.num_links:
        stored = np.asarray(stored, dtype=np.float64)
        scale = max(float(np.abs(stored).max(initial=0.0)), 1.0)
        diff = float(np.abs(stored - cost.link_step_bytes).max()) / scale
        if diff > 1e-6:
            notes.append(f"{path.name}'s stored prediction differs from this epplan's cost function by up to "
                         f"{diff:.2%} of the busiest link's bytes; the tables show the re-scored numbers")
    plan = PlanView(path.name, manifest.placement, problem, cost, manifest.hash)
    return OpenedPlan(manifest, plan, notes)


def plan_for(spec: str, base: OpenedPlan) -> PlanView:
    """A plan to compare with ``base``: another manifest file (on the same topology file as
    ``base``, or on one found at its recorded path), or a baseline placement (contiguous, eplb,
    random) on ``base``'s problem."""
    if spec in BASELINES and not Path(spec).exists():
        placement = baseline(spec, base.plan.problem)
        return PlanView(spec, placement, base.plan.problem, evaluate(placement, base.plan.problem), None)
    path = Path(spec)
    if not path.exists():
        raise ReportError(f"{param('compare', spec)}: no such manifest; give a manifest file or one of "
                          f"{', '.join(BASELINES)}")
    return open_plan(path, known=base.topology).plan
