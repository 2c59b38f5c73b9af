"""What a training run takes from its manifest, and how launched processes map onto it.

The manifest decides which rank lives on which node and GPU. torchrun numbers processes its own
way (with c10d rendezvous, nodes are ordered by host name and process id, not by ``--node-rank``),
so a worker does not trust torchrun's ``RANK``: its rank is the manifest rank of
(this agent's ``--node-rank``, ``LOCAL_RANK``). ``rank_of`` does that mapping and refuses a
launch that does not fit the manifest, before any process group exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epplan.errors import ManifestError, RuntimeSetupError, param
from epplan.placement.types import Placement
from epplan.runfiles import RUN_SETTINGS
from epplan.train.options import TrainOptions
from epplan.workload.config import ModelConfig


@dataclass(frozen=True)
class Node:
    """One node of the manifest: its name and its ranks in local-GPU order (rank of GPU i)."""

    name: str
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class Job:
    """The model, the placement, the manifest hash, the node layout and the run settings that
    the manifest recorded (``epplan.runfiles.RUN_SETTINGS``; manifests before TP record no ``tp``)
    of one run."""

    config: ModelConfig
    placement: Placement
    manifest_hash: str
    nodes: tuple[Node, ...]
    run_settings: dict[str, Any] = field(default_factory=dict)
    schedule: object = None   # epplan.schedule.Schedule the plan was made for (None: not recorded)
    dispatch: str = "flat"    # the exchange the plan was scored for: flat | hierarchical

    @property
    def num_ranks(self) -> int:
        return self.placement.num_ranks

    def describe_nodes(self) -> str:
        """'2 nodes (n0: 1 GPU, n1: 1 GPU)'."""
        parts = ", ".join(f"{n.name}: {len(n.ranks)} GPU{'s' * (len(n.ranks) != 1)}" for n in self.nodes)
        return f"{len(self.nodes)} node{'s' * (len(self.nodes) != 1)} ({parts})"

    def rank_of(self, node_rank: int, local_rank: int, local_world_size: int, world_size: int) -> int:
        """The manifest rank of local process ``local_rank`` on node ``node_rank``.

        Raises ``RuntimeSetupError`` if the launch (world size, processes on this node, node
        index) differs from the manifest.
        """
        how = ("launch through 'epplan run', or copy the command that "
               "'epplan run --print-launch torchrun' prints")
        if world_size != self.num_ranks:
            raise RuntimeSetupError(
                f"{world_size} processes were launched but the manifest places experts on "
                f"{self.num_ranks} ranks on {self.describe_nodes()}; {how}")
        if not 0 <= node_rank < len(self.nodes):
            raise RuntimeSetupError(
                f"{param('node_rank', node_rank)} is out of range: the manifest has {self.describe_nodes()}")
        node = self.nodes[node_rank]
        if local_world_size != len(node.ranks):
            raise RuntimeSetupError(
                f"node {node_rank} ({node.name}) has {len(node.ranks)} GPUs in the manifest but "
                f"{local_world_size} processes were started on it; {how}")
        return node.ranks[local_rank]


def load_job(path: str | Path) -> Job:
    """Read a placement manifest into a ``Job``; ``ManifestError`` if it cannot be used."""
    from epplan.manifest import load_manifest  # the planner's module; imported late, it is large

    manifest = load_manifest(path)
    return job_from_manifest(manifest)


def job_from_manifest(manifest: object) -> Job:
    """A ``Job`` from a loaded ``epplan.manifest.Manifest``."""
    nodes: dict[str, dict[int, int]] = {}
    for rank, (node, gpu) in enumerate(zip(manifest.rank_nodes, manifest.rank_local_gpus)):
        nodes.setdefault(str(node), {})[int(gpu)] = rank
    layout = []
    for name, by_gpu in nodes.items():
        if sorted(by_gpu) != list(range(len(by_gpu))):
            raise ManifestError(f"node {name}: local GPU indices {sorted(by_gpu)} are not 0..{len(by_gpu) - 1}")
        layout.append(Node(name, tuple(by_gpu[g] for g in range(len(by_gpu)))))
    settings = {k: getattr(manifest, k) for k in RUN_SETTINGS if hasattr(manifest, k)}
    return Job(manifest.config, manifest.placement, manifest.hash, tuple(layout), settings,
               getattr(manifest, "schedule", None), getattr(manifest, "dispatch", "flat"))


def check_tp(job: Job, opts: TrainOptions) -> None:
    """Raise ``RuntimeSetupError`` unless the run's TP degree (``opts.parallel.tp``) splits every
    node's ranks into TP groups of consecutive ranks and the run uses what TP is tested with."""
    t = opts.parallel.tp
    if t < 1:
        raise RuntimeSetupError(f"{param('tp', t)}: use 1 (no tensor parallelism) or a divisor of the GPUs per node")
    if opts.parallel.expert_tp:
        if t == 1:
            raise RuntimeSetupError(f"{param('expert_tp')} splits the experts over each TP group, and {param('tp')} is 1; "
                                    f"give {param('tp', 'N')} (N > 1) or leave {param('expert_tp')} off")
        if job.config.d_ff % t:
            raise RuntimeSetupError(f"{param('expert_tp')}: the experts' hidden size {job.config.d_ff} does not split over "
                                    f"{param('tp', t)}; use a {param('tp')} that divides {job.config.d_ff}, or leave "
                                    f"{param('expert_tp')} off")
        if opts.parallel.exchange(job.dispatch) == "hierarchical":
            raise RuntimeSetupError(f"{param('expert_tp')} with {param('dispatch', 'hierarchical')}: not supported "
                                    "(the two-stage exchange would need the TP group's gather on its second "
                                    f"stage); use {param('dispatch', 'flat')} or leave {param('expert_tp')} off")
        if opts.replan.replan_every:
            raise RuntimeSetupError(f"{param('replan_every')} with {param('expert_tp')}: not supported (a live move "
                                    "would carry hidden slices of experts); leave one of them off")
    if t == 1:
        return
    for node in job.nodes:
        ranks = list(node.ranks)
        groups = [ranks[i:i + t] for i in range(0, len(ranks), t)]
        if len(ranks) % t or any(g != list(range(g[0], g[0] + t)) or g[0] % t for g in groups):
            raise RuntimeSetupError(f"{param('tp', t)}: node {node.name}'s ranks {ranks} do not form groups of {t} "
                                    f"consecutive ranks; use a {param('tp')} that divides its {len(ranks)} GPUs")


def check_batch_split(job: Job, opts: TrainOptions, global_batch: int) -> None:
    """Raise ``RuntimeSetupError`` unless ``global_batch`` sequences split evenly over the run's
    data-parallel groups (ranks, or TP groups under --tp) and its micro-batches."""
    D = job.num_ranks // opts.parallel.tp
    if global_batch % (D * opts.batch.micro_batches):
        groups = f"{D} ranks" if opts.parallel.tp == 1 else f"{D} data-parallel groups ({param('tp', opts.parallel.tp)})"
        raise RuntimeSetupError(
            f"global batch {global_batch} does not split into {groups} x {opts.batch.micro_batches} "
            f"micro-batches; set {param('global_batch')} to a multiple of {D * opts.batch.micro_batches}")
