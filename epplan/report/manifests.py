"""From manifest files to scored plans: the report's one reader of manifests and topologies.

A manifest records its topology by name, content hash and source path, and its routing by the
spec it was built from and the SHA-256 of the counts. ``open_manifest`` finds the topology
(``--topology``, else the recorded path, else the recorded path relative to the manifest's
folder), checks the hash, rebuilds the traffic from the spec and checks that hash too, then scores
the placement with ``epplan.cost.evaluate`` — the same function that wrote the manifest's
prediction, which is compared with the re-scored one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from epplan.cost.calibration import resolve_calibrations
from epplan.cost import evaluate
from epplan.errors import EpplanError
from epplan.manifest import Manifest, check_fits_topology, counts_sha256, find_topology_file, load_manifest
from epplan.placement.baselines import BASELINES, baseline
from epplan.placement.problem import PlacementProblem
from epplan.report.compare import PlanView
from epplan.report.predicted import ReportError
from epplan.topology import Topology, load_topology
from epplan.workload.traffic import Traffic, make_traffic
from epplan.workload.windows import mean_traffic

_SEED = re.compile(r"\(seed (\d+)\)")


@dataclass
class OpenedManifest:
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


def open_manifest(path: str | Path, topology_file: str | Path | None = None,
                  known: Topology | None = None, calibration: str | Path | None = None) -> OpenedManifest:
    """Load, check and score the manifest at ``path``.

    ``known``: an already loaded topology used when its content hash is the manifest's (for
    compared manifests of the same cluster). ``calibration``: a calibration file for the rates
    (default: the topology's node-type files, else the shipped tables; a manifest planned on a
    flat --tflops or --compute-efficiency keeps it).
    """
    path = Path(path)
    manifest = load_manifest(path)
    notes: list[str] = []
    topo = _topology(manifest, path, topology_file, known)
    traffic = _traffic(manifest, path, topo, notes)
    options = manifest.problem_options()
    if manifest.calibrated:  # the rates the plan was made on: the topology's calibration files or tables
        cals, rate_notes = resolve_calibrations(topo, calibration)
        options["calibration"] = cals
        notes += rate_notes
    problem = PlacementProblem(topo, manifest.config, traffic, **options)
    cost = evaluate(manifest.placement, problem)
    stored = manifest.predicted.get("link_bytes_per_step")
    if isinstance(stored, list) and len(stored) == topo.num_links:
        stored = np.asarray(stored, dtype=np.float64)
        scale = max(float(np.abs(stored).max(initial=0.0)), 1.0)
        diff = float(np.abs(stored - cost.link_step_bytes).max()) / scale
        if diff > 1e-6:
            notes.append(f"{path.name}'s stored prediction differs from this epplan's cost function by up to "
                         f"{diff:.2%} of the busiest link's bytes; the tables show the re-scored numbers")
    plan = PlanView(path.name, manifest.placement, problem, cost, manifest.hash)
    return OpenedManifest(manifest, plan, notes)


def plan_for(spec: str, base: OpenedManifest) -> PlanView:
    """A plan to compare with ``base``: another manifest file (on the same topology file as
    ``base``, or on one found at its recorded path), or a baseline placement (contiguous, eplb,
    random) on ``base``'s problem."""
    if spec in BASELINES and not Path(spec).exists():
        placement = baseline(spec, base.plan.problem)
        return PlanView(spec, placement, base.plan.problem, evaluate(placement, base.plan.problem), None)
    path = Path(spec)
    if not path.exists():
        raise ReportError(f"--compare {spec}: no such manifest; give a manifest file or one of "
                          f"{', '.join(BASELINES)}")
    return open_manifest(path, known=base.topology).plan


def _topology(manifest: Manifest, path: Path, topology_file, known: Topology | None) -> Topology:
    topo = _find_topology(manifest, path, topology_file, known)
    check_fits_topology(manifest, topo, "--topology" if topology_file is not None else "topology")
    return topo


def _find_topology(manifest: Manifest, path: Path, topology_file, known: Topology | None) -> Topology:
    want = manifest.topology_hash
    name = manifest.topology_name
    if topology_file is not None:
        return load_topology(topology_file, routing=manifest.routing)  # checked by check_fits_topology
    if known is not None and want and known.content_hash == want and known.routing == manifest.routing:
        return known
    recorded = manifest.topology_source
    found = find_topology_file(manifest)
    if found is None:
        where = f" at {recorded}" if recorded else ""
        raise ReportError(f"{path.name} was planned on topology {name!r}{where}, which is not there; "
                          "pass its file with --topology FILE")
    return load_topology(found, routing=manifest.routing)  # checked by check_fits_topology


def _traffic(manifest: Manifest, path: Path, topo: Topology, notes: list[str]) -> Traffic:
    """The expected routing the plan was made for, rebuilt from its spec (or its windows' specs,
    averaged) and checked by hash."""
    routing = manifest.doc["routing"]
    spec = routing.get("spec")
    want = routing.get("counts_sha256")
    seed = manifest_seed(manifest)
    windows = routing.get("windows")
    if not spec and windows:
        rebuilt = [_rebuild(w["spec"], manifest, path, topo, seed, w["counts_sha256"]) for w in windows]
        if all(t is not None for t in rebuilt):
            traffic = mean_traffic(rebuilt)
            if not want or counts_sha256(traffic.counts) == want:
                return traffic
        spec = f"{len(windows)} windows"
    if spec and not windows:
        traffic = _rebuild(spec, manifest, path, topo, seed, want)
        if traffic is not None:
            return traffic
    if spec:
        notes.append(f"routing {spec!r} of {path.name} could not be rebuilt as planned (file missing or "
                     "changed): using its recorded per-expert loads, spread evenly over the source ranks")
    else:
        notes.append(f"{path.name} records no routing spec: using its recorded per-expert loads, "
                     "spread evenly over the source ranks")
    load = np.asarray(routing["expert_load"], dtype=np.float64)  # [L, E]
    counts = np.broadcast_to(load[:, None, :] / topo.num_gpus,
                             (load.shape[0], topo.num_gpus, load.shape[1])).copy()
    return Traffic(counts, source=f"{routing.get('source', '?')} (per-expert loads only)")


def manifest_seed(manifest: Manifest) -> int:
    """The seed the manifest's routing was built with (zipf's and drift's expert order)."""
    routing = manifest.doc["routing"]
    seed = routing.get("seed")
    if seed is None:  # manifests from before the seed was recorded: it is in the source text
        seed_match = _SEED.search(routing.get("source", ""))
        seed = int(seed_match.group(1)) if seed_match else 0
    return int(seed)


def _rebuild(spec: str, manifest: Manifest, path: Path, topo: Topology, seed: int,
             want: str | None) -> Traffic | None:
    """``spec``'s traffic as planned (its counts' hash ``want``), trying a file next to the
    manifest too; None if it cannot be rebuilt so."""
    candidates = [spec]
    if not spec.startswith(("uniform", "zipf", "drift:", "coact")):  # a file: also try it next to the manifest
        candidates.append(str(path.parent / spec))
    for candidate in candidates:
        try:
            traffic = make_traffic(candidate, manifest.config, topo.num_gpus, seed=seed)
        except EpplanError:
            continue
        if not want or counts_sha256(traffic.counts) == want:
            return traffic
    return None
