"""The options of a training run, and their round trip through a worker's command line.

``epplan run`` parses the user's flags into ``TrainOptions``, checks them, and hands them to every
worker as ordinary ``--flag value`` arguments (``to_argv``), so that the torchrun command line it
runs, or prints with ``--print-launch``, is one a user can read and edit. The worker parses them
back with ``from_argv``. Launch options (nodes, rendezvous, restarts) are torchrun's, not these.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from epplan.schedule import DEFAULT_OVERLAP_CTAS

if TYPE_CHECKING:  # for the annotations only (this module imports neither torch nor the planner)
    from epplan.schedule import Schedule
    from epplan.workload.config import ModelConfig

DEVICES = ("cpu", "cuda")
ASYNC_CHECKPOINTS = ("auto", "on", "off")  # auto: on GPUs
# What a resumed run checks against its checkpoint; --allow-change KEY accepts a difference.
RESUME_KEYS = ("seed", "data", "global_batch", "micro_batches", "model")


@dataclass(frozen=True)
class TrainOptions:
    """One run. ``None`` means "derive from the model or the device" (``warmup``, ``peak_lr``, ...)."""

    manifest: str
    out: str
    steps: int = 100  # total optimizer steps; a resumed run continues up to this step
    device: str = "cpu"  # cpu (gloo) or cuda (nccl, one GPU per process)
    data: Optional[str] = None  # byte-level text file or directory, or a token .bin; None: synthetic
    seed: int = 0
    global_batch: Optional[int] = None  # sequences per optimizer step; None: the model's
    micro_batches: int = 1  # gradient-accumulation steps per optimizer step
    lr: Optional[float] = None  # peak learning rate; None: min(0.01, 1 / d_model)
    min_lr_ratio: float = 0.1  # cosine decays to lr * this at the last step
    warmup_steps: Optional[int] = None  # linear warm-up; None: 5 % of steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm limit; 0 disables clipping
    capacity_factor: Optional[float] = None  # None: dropless routing
    recompute: str = "none"  # none|attention|block: activations recomputed in backward
    optimizer_sharding: str = "none"  # none|dense|all: AdamW state sharded (ZeRO-1; train.optim)
    tp: int = 1  # tensor-parallel degree: groups of tp consecutive ranks inside a node (runtime/tensor_parallel.py)
    expert_tp: bool = False  # the expert GEMMs split their hidden dimension over each TP group (runtime/expert_tensor_parallel.py)
    overridden: Optional[str] = None  # run settings given as flags over the manifest's, comma-separated
    overlap: str = "auto"  # on|off: the runtime's chunked exchange overlapped with the expert GEMMs
    num_chunks: Optional[int] = None  # chunks per MoE layer when overlapping; None: the runtime's choice
    overlap_ctas: Optional[int] = None  # CTAs of the hidden exchanges' communicator; None: the runtime's
    dispatch: Optional[str] = None  # flat|hierarchical MoE token exchange; None: the manifest's
    ckpt_every: int = 50
    async_checkpoints: str = "auto"  # on|off: write checkpoint files in the background; auto: on GPUs
    keep_checkpoints: int = 2
    resume: bool = False
    start_over: bool = False  # with no intact checkpoint, start at step 0 with the old records set aside
    allow_change: Optional[str] = None  # comma-separated RESUME_KEYS a resume may change knowingly
    peak_tflops: Optional[float] = None  # per GPU, for MFU; None: from the GPU's name
    tensorboard: Optional[str] = None  # also write the metrics as TensorBoard events here
    node_rank: int = 0  # which of the manifest's nodes this torchrun agent is
    replan_every: Optional[int] = None  # re-plan from the routing of every K steps and move experts (replan.py)
    replan_lag: Optional[int] = None  # steps between a window's end and its plan's use; None: K // 4, at least 1
    replan_time_limit: float = 30.0  # seconds for each re-plan's solve
    topology: Optional[str] = None  # the cluster's topology file, for re-planning

    def allowed_changes(self) -> tuple[str, ...]:
        return tuple(k for k in (self.allow_change or "").split(",") if k)

    def batch(self, config: ModelConfig) -> int:
        """Sequences per optimizer step: --global-batch, else the model's."""
        return config.global_batch if self.global_batch is None else self.global_batch

    def batch_per_group(self, config: ModelConfig, num_ranks: int) -> int:
        """Sequences each data-parallel group reads per optimizer step: the batch over the ranks,
        or under TP over the TP groups (a group's ranks compute the same sequences)."""
        return self.batch(config) // (num_ranks // self.tp)

    def ctas(self) -> int:
        """CTAs of the hidden exchanges' communicator: --overlap-ctas, else the runtime's default
        (``epplan.schedule.DEFAULT_OVERLAP_CTAS``, measured in docs/benchmarks.md)."""
        return DEFAULT_OVERLAP_CTAS if self.overlap_ctas is None else self.overlap_ctas

    def warmup(self) -> int:
        return self.warmup_steps if self.warmup_steps is not None else math.ceil(0.05 * self.steps)

    def peak_lr(self, d_model: int) -> float:
        # Small models take large steps; 1 / d_model gives 2.4e-4 at d_model 4096.
        return self.lr if self.lr is not None else min(0.01, 1.0 / d_model)

    def use_overlap(self, num_nodes: int, planned: Schedule | None = None) -> bool:
        """auto: as the plan's schedule says (``planned``, a ``Schedule`` the planner minimised),
        else on where the exchange leaves the node; on CPU always (so that CI runs the path).

        Measured on 4 x H200 (docs/benchmarks.md): with the exchange at cross-node speed (through
        host memory, 39 GB/s) overlap made training steps 11 % and the spec's block 21 % shorter;
        inside one NVLink node it made a training step 16 % longer, because the few-CTA
        communicator that runs hidden exchanges moves about 100 GB/s there, a quarter of NVLink.
        """
        if self.overlap != "auto":
            return self.overlap == "on"
        if self.device != "cuda":
            return True
        return planned.overlap if planned is not None else num_nodes > 1

    def chunks(self, planned: Schedule | None = None) -> int | None:
        """Chunks per MoE layer: --num-chunks, else the plan's when the run follows the plan's
        overlap (auto, on GPUs), else None (the runtime's choice, by the rule the planner uses)."""
        if self.num_chunks is not None:
            return self.num_chunks
        if self.overlap == "auto" and self.device == "cuda" and planned is not None and planned.overlap:
            return planned.num_chunks
        return None

    def to_argv(self, always: tuple[str, ...] = ("out",)) -> list[str]:
        """The worker's arguments: the manifest, then ``--flag value`` for the fields named in
        ``always`` and those that differ from their defaults."""
        argv = [self.manifest]
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name == "manifest" or (f.name not in always and value == f.default):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag)
            else:
                argv += [flag, str(value)]
        return argv

    @classmethod
    def from_argv(cls, argv: list[str]) -> "TrainOptions":
        parser = argparse.ArgumentParser(prog="python -m epplan.train.worker",
                                         description="One epplan training process (started by torchrun).")
        parser.add_argument("manifest")
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if f.name == "manifest":
                continue
            flag = "--" + f.name.replace("_", "-")
            kind = _base_type(hints[f.name])
            if kind is bool:
                parser.add_argument(flag, dest=f.name, action="store_true")
            else:
                default = dataclasses.MISSING if f.default is dataclasses.MISSING else f.default
                parser.add_argument(flag, dest=f.name, type=kind, required=default is dataclasses.MISSING,
                                    default=None if default is dataclasses.MISSING else default)
        return cls(**vars(parser.parse_args(argv)))


def _base_type(hint: object) -> type:
    """int for Optional[int], etc."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    assert isinstance(hint, type), hint
    return hint
