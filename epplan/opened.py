"""``open_manifest``: a manifest file opened into its topology, placement and problem.

The one reader that turns a manifest into what it was planned on, for every command that takes
one (place --from-manifest, estimate --placement, report, export, run). A manifest records its
topology by name, content hash and source path, and its routing by the spec it was built from and
the SHA-256 of the counts.

- The topology is the one given (a file, or one already loaded), else ``known`` when its hash is
  the manifest's (compared manifests of one cluster), else the recorded path, else the recorded
  path relative to the manifest's folder; ``check_fits_topology`` checks it, once, whichever it is.
- The problem is built on first use (``OpenedManifest.problem``): the traffic rebuilt from the
  spec (or the windows' specs, averaged) and checked by hash, else the recorded per-expert loads
  spread evenly over the source ranks, with a note; the rates are the manifest's (a calibrated
  plan's from the topology's calibration files, or ``calibration``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from epplan.errors import EpplanError, ManifestError, param
from epplan.manifest import Manifest, check_fits_topology, counts_sha256, find_topology_file, load_manifest
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import Placement
from epplan.topology import Topology, load_topology
from epplan.workload.traffic import Traffic, make_traffic
from epplan.workload.windows import mean_traffic

_SEED = re.compile(r"\(seed (\d+)\)")


@dataclass
class OpenedManifest:
    """A manifest, the topology it was checked against, and (built on first use) its problem.

    ``topology`` is None only when ``open_manifest(required=False)`` found no topology file;
    ``topology_file`` is the file it came from (None for one given already loaded). ``notes`` say
    what was assumed (routing not rebuilt as planned, where the rates came from)."""

    manifest: Manifest
    topology: Topology | None
    topology_file: Path | None
    calibration: str | Path | None = None
    notes: list[str] = field(default_factory=list)
    _problem: PlacementProblem | None = field(default=None, repr=False)

    @property
    def placement(self) -> Placement:
        return self.manifest.placement

    @property
    def hash(self) -> str:
        return self.manifest.hash

    @property
    def path(self) -> Path:
        return Path(self.manifest.path)

    @property
    def problem(self) -> PlacementProblem:
        """The problem the plan was made for: its topology, model, routing and settings."""
        if self._problem is None:
            assert self.topology is not None, "no topology: opened with required=False and none found"
            traffic = _traffic(self.manifest, self.path, self.topology, self.notes)
            options = self.manifest.problem_options()
            if self.manifest.calibrated:  # the rates the plan was made on: calibration files or tables
                from epplan.cost.calibration import resolve_calibrations

                cals, rate_notes = resolve_calibrations(self.topology, self.calibration)
                options["calibration"] = cals
                self.notes += rate_notes
            self._problem = PlacementProblem(self.topology, self.manifest.config, traffic, **options)
        return self._problem


def open_manifest(path: str | Path | Manifest, topology: str | Path | Topology | None = None, *,
                  known: Topology | None = None, calibration: str | Path | None = None,
                  required: bool = True, what: str = "the topology given") -> OpenedManifest:
    """Load the manifest at ``path`` (or take one loaded) and find and check its topology (see the
    module docstring).

    topology:    the cluster's topology file, or a loaded ``Topology``; it must be the one
                 planned on. None: ``known`` or the recorded file.
    known:       a loaded topology used when its content hash and routing are the manifest's.
    calibration: a calibration file for a calibrated plan's rates (default: the topology's
                 node-type files, else the shipped tables).
    required:    False: no topology file found is not an error (``topology`` is None).
    what:        how errors name a given ``topology`` (the CLI: its flag).
    ``ManifestError`` if the manifest cannot be read, its topology is not found (``required``),
    or the topology is not the one it was planned on.
    """
    manifest = path if isinstance(path, Manifest) else load_manifest(path)
    path = Path(manifest.path)
    topo, source = _find_topology(manifest, path, topology, known, required)
    if topo is not None:
        check_fits_topology(manifest, topo, what if topology is not None else "topology")  # the one check
    return OpenedManifest(manifest, topo, source, calibration)


def manifest_seed(manifest: Manifest) -> int:
    """The seed the manifest's routing was built with (zipf's and drift's expert order)."""
    routing = manifest.doc["routing"]
    seed = routing.get("seed")
    if seed is None:  # manifests from before the seed was recorded: it is in the source text
        seed_match = _SEED.search(routing.get("source", ""))
        seed = int(seed_match.group(1)) if seed_match else 0
    return int(seed)


def _find_topology(manifest: Manifest, path: Path, topology, known: Topology | None,
                   required: bool) -> tuple[Topology | None, Path | None]:
    if isinstance(topology, Topology):
        return topology, None
    if topology is not None:
        return load_topology(topology, routing=manifest.routing), Path(topology)
    want = manifest.topology_hash
    if known is not None and want and known.content_hash == want and known.routing == manifest.routing:
        return known, None
    found = find_topology_file(manifest)
    if found is None:
        if not required:
            return None, None
        recorded = manifest.topology_source
        where = f" at {recorded}" if recorded else ""
        raise ManifestError(f"{path.name} was planned on topology {manifest.topology_name!r}{where}, which is "
                            f"not there; pass its file as {param('topology', 'FILE')}")
    return load_topology(found, routing=manifest.routing), found


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
