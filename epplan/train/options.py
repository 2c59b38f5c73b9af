"""The options of a training run, in sections, and their round trip through a worker's command line.

``epplan run`` parses the user's flags into ``TrainOptions``, checks them, and hands them to every
worker as ordinary ``--flag value`` arguments (``to_argv``), so that the torchrun command line it
runs, or prints with ``--print-launch``, is one a user can read and edit. The worker parses them
back with ``from_argv``. Launch options (nodes, rendezvous, restarts) are torchrun's, not these.

``TrainOptions`` holds what the whole run shares (manifest, out, device, node_rank, overridden)
and one frozen section per concern:

- ``batch`` (``BatchOptions``): how many steps, which sequences, how many per step;
- ``optimizer`` (``OptimizerOptions``): AdamW and its learning-rate schedule;
- ``memory`` (``MemoryOptions``): recomputed activations, sharded optimizer state;
- ``parallel`` (``ParallelOptions``): TP, expert capacity, the MoE exchange and its overlap;
- ``checkpoints`` (``CheckpointOptions``): how often, how written, what a resume may change;
- ``replan`` (``ReplanOptions``): live re-placement;
- ``output`` (``OutputOptions``): MFU's peak and TensorBoard.

``None`` in a field means "derive it"; each such default is resolved here, once, by a method of
the section that owns the field (``batch.size``, ``optimizer.warmup``, ``parallel.ctas``,
``replan.lag``, ...). Every option also has one flat name, the field's own, unique across the
sections: ``TrainOptions.of(manifest, out, **flat)``, ``replace(**flat)``, ``flat()`` and
``DEFAULTS`` speak it, and so do the worker's flags (``--replan-lag`` is ``replan.replan_lag``).
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Optional

from epplan.schedule import DEFAULT_OVERLAP_CTAS

if TYPE_CHECKING:  # for the annotations only (this module imports neither torch nor the planner)
    from epplan.schedule import Schedule
    from epplan.workload.config import ModelConfig

DEVICES = ("cpu", "cuda")
ASYNC_CHECKPOINTS = ("auto", "on", "off")  # auto: on GPUs
# What a resumed run checks against its checkpoint; --allow-change KEY accepts a difference.
RESUME_KEYS = ("seed", "data", "global_batch", "micro_batches", "model")


@dataclass(frozen=True)
class BatchOptions:
    """How long the run is and what each optimizer step reads."""

    steps: int = 100  # total optimizer steps; a resumed run continues up to this step
    seed: int = 0
    data: Optional[str] = None  # byte-level text file or directory, or a token .bin; None: synthetic
    global_batch: Optional[int] = None  # sequences per optimizer step; None: the model's
    micro_batches: int = 1  # gradient-accumulation steps per optimizer step

    def size(self, config: ModelConfig) -> int:
        """Sequences per optimizer step: --global-batch, else the model's."""
        return config.global_batch if self.global_batch is None else self.global_batch


@dataclass(frozen=True)
class OptimizerOptions:
    """AdamW and its schedule: linear warm-up to the peak, then cosine to lr * min_lr_ratio."""

    lr: Optional[float] = None  # peak learning rate; None: min(0.01, 1 / d_model)
    min_lr_ratio: float = 0.1  # cosine decays to lr * this at the last step
    warmup_steps: Optional[int] = None  # linear warm-up; None: 5 % of steps
    weight_decay: float = 0.1
    grad_clip: float = 1.0  # global gradient-norm limit; 0 disables clipping

    def warmup(self, steps: int) -> int:
        """Warm-up steps: --warmup-steps, else 5 % of the run's ``steps``."""
        return self.warmup_steps if self.warmup_steps is not None else math.ceil(0.05 * steps)

    def peak_lr(self, d_model: int) -> float:
        # Small models take large steps; 1 / d_model gives 2.4e-4 at d_model 4096.
        return self.lr if self.lr is not None else min(0.01, 1.0 / d_model)


@dataclass(frozen=True)
class MemoryOptions:
    """What the run gives up to fit in memory (the names of ``epplan.workload.memory``)."""

    recompute: str = "none"  # none|attention|block: activations recomputed in backward
    optimizer_sharding: str = "none"  # none|dense|all: AdamW state sharded (ZeRO-1; train.optim)


@dataclass(frozen=True)
class ParallelOptions:
    """How the model is split and how its MoE layers exchange tokens."""

    tp: int = 1  # tensor-parallel degree: groups of tp consecutive ranks inside a node (runtime/tensor_parallel.py)
    expert_tp: bool = False  # the expert GEMMs split their hidden dimension over each TP group (runtime/expert_tensor_parallel.py)
    capacity_factor: Optional[float] = None  # None: dropless routing
    overlap: str = "auto"  # on|off: the runtime's chunked exchange overlapped with the expert GEMMs
    num_chunks: Optional[int] = None  # chunks per MoE layer when overlapping; None: the runtime's choice
    overlap_ctas: Optional[int] = None  # CTAs of the hidden exchanges' communicator; None: the runtime's
    dispatch: Optional[str] = None  # flat|hierarchical MoE token exchange; None: the manifest's

    def exchange(self, planned: str) -> str:
        """The MoE token exchange: --dispatch, else the manifest's (``planned``)."""
        return self.dispatch or planned

    def ctas(self) -> int:
        """CTAs of the hidden exchanges' communicator: --overlap-ctas, else the runtime's default
        (``epplan.schedule.DEFAULT_OVERLAP_CTAS``, measured in docs/benchmarks.md)."""
        return DEFAULT_OVERLAP_CTAS if self.overlap_ctas is None else self.overlap_ctas

    def use_overlap(self, device: str, num_nodes: int, planned: Schedule | None = None) -> bool:
        """auto: as the plan's schedule says (``planned``, a ``Schedule`` the planner minimised),
        else on where the exchange leaves the node; on CPU always (so that CI runs the path).

        Measured on 4 x H200 (docs/benchmarks.md): with the exchange at cross-node speed (through
        host memory, 39 GB/s) overlap made training steps 11 % and the spec's block 21 % shorter;
        inside one NVLink node it made a training step 16 % longer, because the few-CTA
        communicator that runs hidden exchanges moves about 100 GB/s there, a quarter of NVLink.
        """
        if self.overlap != "auto":
            return self.overlap == "on"
        if device != "cuda":
            return True
        return planned.overlap if planned is not None else num_nodes > 1

    def chunks(self, device: str, planned: Schedule | None = None) -> int | None:
        """Chunks per MoE layer: --num-chunks, else the plan's when the run follows the plan's
        overlap (auto, on GPUs), else None (the runtime's choice, by the rule the planner uses)."""
        if self.num_chunks is not None:
            return self.num_chunks
        if self.overlap == "auto" and device == "cuda" and planned is not None and planned.overlap:
            return planned.num_chunks
        return None


@dataclass(frozen=True)
class CheckpointOptions:
    """How often checkpoints are written and kept, and how a run continues from one."""

    ckpt_every: int = 50
    async_checkpoints: str = "auto"  # on|off: write checkpoint files in the background; auto: on GPUs
    keep_checkpoints: int = 2
    resume: bool = False
    start_over: bool = False  # with no intact checkpoint, start at step 0 with the old records set aside
    allow_change: Optional[str] = None  # comma-separated RESUME_KEYS a resume may change knowingly

    def allowed_changes(self) -> tuple[str, ...]:
        return tuple(k for k in (self.allow_change or "").split(",") if k)

    def in_background(self, device: str) -> bool:
        """Whether checkpoint files are written in the background: --async-checkpoints, auto on GPUs."""
        return self.async_checkpoints == "on" or (self.async_checkpoints == "auto" and device == "cuda")


@dataclass(frozen=True)
class ReplanOptions:
    """Live re-placement (replan.py): off unless ``replan_every`` is set."""

    replan_every: Optional[int] = None  # re-plan from the routing of every K steps and move experts (replan.py)
    replan_lag: Optional[int] = None  # steps between a window's end and its plan's use; None: K // 4, at least 1
    replan_time_limit: float = 30.0  # seconds for each re-plan's solve
    topology: Optional[str] = None  # the cluster's topology file, for re-planning

    def lag(self) -> int:
        """Steps between a window's end and its plan's use: --replan-lag, else K // 4, at least 1."""
        assert self.replan_every is not None, "the lag of a run that does not re-plan"
        return self.replan_lag if self.replan_lag is not None else max(1, self.replan_every // 4)


@dataclass(frozen=True)
class OutputOptions:
    """What the metrics are measured against and where else they go."""

    peak_tflops: Optional[float] = None  # per GPU, for MFU; None: from the GPU's name (trainer.peak_tflops)
    tensorboard: Optional[str] = None  # also write the metrics as TensorBoard events here


@dataclass(frozen=True)
class TrainOptions:
    """One run: what all of it shares, then its sections (module docstring). Build one from flat
    names with ``TrainOptions.of(manifest, out, steps=7, tp=2)``."""

    manifest: str
    out: str
    device: str = "cpu"  # cpu (gloo) or cuda (nccl, one GPU per process)
    node_rank: int = 0  # which of the manifest's nodes this torchrun agent is
    overridden: Optional[str] = None  # run settings given as flags over the manifest's, comma-separated
    batch: BatchOptions = field(default_factory=BatchOptions)
    optimizer: OptimizerOptions = field(default_factory=OptimizerOptions)
    memory: MemoryOptions = field(default_factory=MemoryOptions)
    parallel: ParallelOptions = field(default_factory=ParallelOptions)
    checkpoints: CheckpointOptions = field(default_factory=CheckpointOptions)
    replan: ReplanOptions = field(default_factory=ReplanOptions)
    output: OutputOptions = field(default_factory=OutputOptions)

    @classmethod
    def of(cls, manifest: str, out: str, **flat: Any) -> TrainOptions:
        """The run with the options named by their flat names (``steps=7, tp=2``); the rest default."""
        return cls(manifest, out).replace(**flat)

    def replace(self, **flat: Any) -> TrainOptions:
        """A copy with the options named by their flat names changed, each in its section."""
        unknown = [k for k in flat if k not in OPTIONS]
        if unknown:
            raise TypeError(f"TrainOptions has no option {unknown[0]!r}; the options are {', '.join(OPTIONS)}")
        top = {k: v for k, v in flat.items() if OPTIONS[k].section is None}
        for section in {OPTIONS[k].section for k in flat} - {None}:
            top[section] = dataclasses.replace(getattr(self, section),
                                               **{k: v for k, v in flat.items() if OPTIONS[k].section == section})
        return dataclasses.replace(self, **top)

    def flat(self) -> dict[str, Any]:
        """Every option by its flat name, in the worker's order (``ARGV_ORDER``)."""
        return {k: getattr(self if o.section is None else getattr(self, o.section), k) for k, o in OPTIONS.items()}

    def batch_per_group(self, config: ModelConfig, num_ranks: int) -> int:
        """Sequences each data-parallel group reads per optimizer step: the batch over the ranks,
        or under TP over the TP groups (a group's ranks compute the same sequences)."""
        return self.batch.size(config) // (num_ranks // self.parallel.tp)

    def to_argv(self, always: tuple[str, ...] = ("out",)) -> list[str]:
        """The worker's arguments: the manifest, then ``--flag value`` for the options named in
        ``always`` and those that differ from their defaults."""
        argv = [self.manifest]
        for name, value in self.flat().items():
            if name == "manifest" or (name not in always and value == OPTIONS[name].default):
                continue
            flag = "--" + name.replace("_", "-")
            if isinstance(value, bool):
                argv.append(flag)
            else:
                argv += [flag, str(value)]
        return argv

    @classmethod
    def from_argv(cls, argv: list[str]) -> TrainOptions:
        parser = argparse.ArgumentParser(prog="python -m epplan.train.worker",
                                         description="One epplan training process (started by torchrun).")
        parser.add_argument("manifest")
        for name, option in OPTIONS.items():
            if name == "manifest":
                continue
            flag = "--" + name.replace("_", "-")
            if option.kind is bool:
                parser.add_argument(flag, dest=name, action="store_true")
            else:
                required = option.default is dataclasses.MISSING
                parser.add_argument(flag, dest=name, type=option.kind, required=required,
                                    default=None if required else option.default)
        return cls.of(**vars(parser.parse_args(argv)))


class _Option(typing.NamedTuple):
    section: Optional[str]  # the TrainOptions field that holds it; None: TrainOptions itself
    default: Any  # dataclasses.MISSING for the manifest and out
    kind: type  # int for Optional[int], etc.: what its worker flag parses


def _options() -> dict[str, _Option]:
    """Every option by its flat name, read from TrainOptions and its sections' fields."""
    found: dict[str, _Option] = {}
    hints = typing.get_type_hints(TrainOptions)
    for f in dataclasses.fields(TrainOptions):
        section = f.default_factory
        if not dataclasses.is_dataclass(section):
            found[f.name] = _Option(None, f.default, _base_type(hints[f.name]))
            continue
        section_hints = typing.get_type_hints(section)
        for g in dataclasses.fields(section):
            assert g.name not in found, f"two options named {g.name}: flat names must be unique"
            found[g.name] = _Option(f.name, g.default, _base_type(section_hints[g.name]))
    return found


def _base_type(hint: object) -> type:
    """int for Optional[int], etc."""
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    assert isinstance(hint, type), hint
    return hint


# The worker's flags in the order printed torchrun lines and sbatch scripts carry them, the
# order of the flat options before they were put in sections (tests/test_train_launch.py pins it).
ARGV_ORDER = ("manifest", "out", "steps", "device", "data", "seed", "global_batch", "micro_batches", "lr",
              "min_lr_ratio", "warmup_steps", "weight_decay", "grad_clip", "capacity_factor", "recompute",
              "optimizer_sharding", "tp", "expert_tp", "overridden", "overlap", "num_chunks", "overlap_ctas",
              "dispatch", "ckpt_every", "async_checkpoints", "keep_checkpoints", "resume", "start_over",
              "allow_change", "peak_tflops", "tensorboard", "node_rank", "replan_every", "replan_lag",
              "replan_time_limit", "topology")
_FOUND = _options()
assert sorted(ARGV_ORDER) == sorted(_FOUND), "ARGV_ORDER must name every option once"
OPTIONS: dict[str, _Option] = {name: _FOUND[name] for name in ARGV_ORDER}
# Each option's default by its flat name (the manifest and out have none).
DEFAULTS: dict[str, Any] = {k: o.default for k, o in OPTIONS.items() if o.default is not dataclasses.MISSING}
