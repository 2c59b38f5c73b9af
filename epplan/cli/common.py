"""Shared pieces of the CLI: the vocabulary of its options (one name, short flag, help text and
set of choices per concept), consoles and the user-error boundary."""

from __future__ import annotations

import copy
import functools
import json
import math
import sys
from collections.abc import Iterable
from enum import Enum
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar, get_args

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from epplan.errors import EpplanError
from epplan.placement.baselines import BASELINES
from epplan.placement.problem import DISPATCH_MODES
from epplan.placement.robust import OBJECTIVES
from epplan.placement.solve import SOLVERS
from epplan.schedule import OVERLAP_MODES
from epplan.train.options import DEVICES
from epplan.workload.memory import OPTIMIZER_SHARDING, RECOMPUTE

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

# ------------------------------------------------------------------------------ choices
# Every flag that takes one of a fixed set of values takes a ``Choice``: typer lists the values in
# --help and offers them to shell completion. The values themselves are owned by the library
# (the tuples imported above); the shared options below hand the command the plain string.


class Choice(str, Enum):
    """One of a flag's fixed values; ``str()`` and f-strings give the value itself."""

    def __str__(self) -> str:
        return str(self.value)


def choices(name: str, values: Iterable[str]) -> type[Choice]:
    """A ``Choice`` enum whose members are ``values`` (a library tuple), in that order."""
    return Choice(name, [(v, v) for v in values])  # type: ignore[return-value]


# place --placement: the planner or a baseline, in the order --compare-all shows them.
Method = choices("Method", ("ilp", "eplb", "eplb-hier", "contiguous", "random"))
assert {m.value for m in Method} == {"ilp", *BASELINES}, "a baseline is missing from Method"
Baseline = choices("Baseline", (m.value for m in Method if m.value != "ilp"))
Solver = choices("Solver", SOLVERS)
Overlap = choices("Overlap", OVERLAP_MODES)
Recompute = choices("Recompute", RECOMPUTE)
OptimizerSharding = choices("OptimizerSharding", OPTIMIZER_SHARDING)
Device = choices("Device", DEVICES)
Dispatch = choices("Dispatch", DISPATCH_MODES)
Objective = choices("Objective", OBJECTIVES)  # place: over several routing windows
PlanDispatch = choices("PlanDispatch", ("auto", *DISPATCH_MODES))  # place: auto picks the faster


def listed(values: Iterable[str]) -> dict[str, Any]:
    """``typer.Option`` keywords that list ``values`` in --help and offer them to completion, for a
    flag whose value the library checks itself (its error names what it expected)."""
    values = tuple(values)
    return {"metavar": "|".join(values),
            "autocompletion": lambda incomplete: [v for v in values if v.startswith(incomplete)]}


def complete_placement(incomplete: str) -> list[str]:
    """Shell completion of a "which plan" flag: the baselines (a manifest is typed as a path)."""
    return [b.value for b in Baseline if b.value.startswith(incomplete)]


def plain(value: Any) -> Any:
    """Typer callback: a ``Choice`` (or a list of them) as its string, so that commands and the
    library only ever see plain values."""
    if isinstance(value, list):
        return [plain(v) for v in value]
    return value.value if isinstance(value, Enum) else value


def renamed(old: str, new: str) -> Callable[[Any], Any]:
    """Typer callback of a hidden old spelling ``old`` of flag ``new``: a deprecation line on
    stderr when it is given; the value passes through (``prefer`` merges it into the new flag)."""

    def callback(value: Any) -> Any:
        if value not in (None, False, [], ()):
            err_console.print(f"warning: {old} is deprecated and goes in the next release: use {new}",
                              highlight=False, markup=False)
        return plain(value)

    return callback


def prefer(new_value: Any, old_value: Any, new: str, old: str) -> Any:
    """The value of flag ``new``, or of its old spelling ``old`` when only that was given."""
    given = old_value not in (None, False, [], ())
    if given and new_value not in (None, False, [], ()) and new_value != old_value:
        raise EpplanError(f"{new} and {old} (its old spelling) disagree: give {new} only")
    return old_value if given and new_value in (None, False, [], ()) else new_value


def in_panel(option: Any, panel: str) -> Any:
    """A shared option type shown under ``panel`` in --help (the commands with many options group
    them in panels); name, short flag, help and choices stay the shared ones."""
    base, info = get_args(option)
    info = copy.copy(info)
    info.rich_help_panel = panel
    return Annotated[base, info]


# ------------------------------------------------------------------------------ shared options
# One name, one short flag and one help text per concept, for every command that takes it.
# Switches carry metavar="" (a switch takes no value; typer would print "<bool>").



def out_option(help: str, **kwargs: Any) -> Any:
    """``-o/--out`` with this command's words for what it writes."""
    return typer.Option("--out", "-o", metavar="PATH", help=help, show_default=False, **kwargs)


JsonOption = Annotated[bool, typer.Option("--json", metavar="", help=(
    "Print JSON for scripts instead of tables (its 'format' and 'version' keys name the layout: "
    "docs/json.md)."))]
TopologyOption = Annotated[Path, typer.Option(
    "--topology", metavar="FILE", help="Cluster topology YAML file (see topologies/).", show_default=False)]
ManifestTopologyOption = Annotated[Optional[Path], typer.Option(
    "--topology", metavar="FILE", help="The topology file the manifest was planned on, where its "
    "recorded path is not there (its content hash must match).", show_default=False)]
ModelOption = Annotated[Optional[str], typer.Option(
    "--model", metavar="NAME|FILE", help="Model preset (seed, mixtral-8x7b, deepseek-v3, tiny), YAML "
    "file, or a Hugging Face MoE config.json (Mixtral, Qwen2/3-MoE, DeepSeek-V2/V3, OLMoE). Default: "
    "a manifest's model, else seed.", show_default=False)]
SetOption = Annotated[Optional[list[str]], typer.Option(
    "--set", metavar="FIELD=VALUE", help="Override a model field, e.g. --set num_experts=32 (repeatable).",
    show_default=False)]
_ROUTING_HELP = (
    "Expected routing: uniform, zipf:ALPHA, coact:SIZE:SHARE\\[:ALPHA] (synthetic correlated top-k with "
    "pair counts: experts in seeded random groups of SIZE, each further expert of a token from its first "
    "expert's group with probability SHARE, zipf:ALPHA popularity, default 0), drift:KEY=VALUE,..."
    "\\[@FIRST:LAST] (zipf that drifts over steps), TRACE.npz\\[@FIRST:LAST], the routing statistics "
    ".json that 'epplan run' writes (re-plan from real routing), an [L, E] or [L, S, E] array (.npy, "
    ".npz, .pt), or SGLang's, vLLM's or Megatron-Core's expert-load record (.pt).")
RoutingOption = Annotated[str, typer.Option("--routing", metavar="SPEC", help=_ROUTING_HELP)]
RoutingWindowsOption = Annotated[Optional[list[str]], typer.Option(
    "--routing", metavar="SPEC", show_default=False, help=_ROUTING_HELP + (
        " Several windows: repeat the flag, cut a range with @FIRST:LAST:WIDTH, or give a directory of "
        "routing statistics; the plan is made for all (--objective). \\[default: uniform]"))]
ExpertsPerGpuOption = Annotated[Optional[int], typer.Option(
    "--experts-per-gpu", help="Most experts (replicas included) per GPU per layer. Default: a "
    "manifest's, else 1.", show_default=False)]
SeedOption = Annotated[int, typer.Option(
    "--seed", help="Seed of zipf's and coact's expert order and of the random baseline.")]
MemoryGbOption = Annotated[Optional[float], typer.Option(
    "--memory-gb", help="Cap every GPU's memory at this many GB (e.g. 64, the founding spec's GPUs).",
    show_default=False)]

# The GPUs' rates, shared by estimate, place and report (``rates_for``).
CalibrationOption = Annotated[Optional[Path], typer.Option(
    "--calibration", metavar="FILE", help="Rates measured by 'epplan calibrate' on the GPUs. Default: "
    "the topology's node-type calibration files, else the tables shipped for H100 and H200.",
    show_default=False)]
EfficiencyOption = Annotated[Optional[float], typer.Option(
    "--compute-efficiency", help="What-if: every part of the step at this fraction of the datasheet "
    "bf16 TFLOP/s (no calibration).", show_default=False)]
AchievableTflopsOption = Annotated[Optional[float], typer.Option(
    "--achievable-tflops", help="What-if: every part of the step runs at this many TFLOP/s per GPU "
    "(no calibration); overrides --compute-efficiency.", show_default=False)]
OldTflopsOption = Annotated[Optional[float], typer.Option(
    "--tflops", hidden=True, callback=renamed("--tflops", "--achievable-tflops"))]
PeakTflopsOption = Annotated[Optional[float], typer.Option(
    "--peak-tflops", help="The peak TFLOP/s per GPU that MFU divides by. Default: the GPU's dense "
    "bf16 datasheet figure (H100/H200 989, A100 312); none on CPU.", show_default=False)]

# The run settings: the manifest records them, 'epplan run' follows them.
MicroBatchesOption = Annotated[Optional[int], typer.Option(
    "--micro-batches", help="Gradient-accumulation steps per optimizer step (divides activation "
    "memory). Default: a manifest's, else the cheapest run settings that fit.", show_default=False)]
RecomputeOption = Annotated[Optional[Recompute], typer.Option(
    "--recompute", callback=plain, help="Activations recomputed in backward: none, attention, or "
    "block (each block keeps only its input). Default: a manifest's, else the cheapest that fits.",
    show_default=False)]
OptimizerShardingOption = Annotated[Optional[OptimizerSharding], typer.Option(
    "--optimizer-sharding", callback=plain, help="AdamW state: none (on every rank), dense (the "
    "dense parameters' sharded over all ranks, ZeRO-1; under --tp over the ranks holding the same "
    "shards) or all (also each expert's, over the ranks holding its replicas). Default: a "
    "manifest's, else the cheapest that fits.", show_default=False)]
TpOption = Annotated[Optional[str], typer.Option(
    "--tp", metavar="N|auto", help="Tensor-parallel degree: attention, the dense MLPs and the LM head "
    "split over groups of N GPUs of a node (N divides the GPUs per node), or auto: the degree with the "
    "shortest predicted step among those that fit. Default: a manifest's, else 1.", show_default=False)]
ExpertTpOption = Annotated[Optional[bool], typer.Option(
    "--expert-tp/--no-expert-tp", help="With --tp: also split each routed expert's hidden dimension over "
    "its TP group. Its MoE exchange runs unchunked, whatever --overlap says, and place and estimate "
    "score it so (serial: the exchange, then the expert GEMMs). Default: a manifest's, else off.",
    show_default=False)]
OverlapOption = Annotated[Optional[Overlap], typer.Option(
    "--overlap", callback=plain, help="The MoE layers' schedule: on overlaps each layer's exchange "
    "with its expert GEMMs in chunks, off runs them one after the other, auto is what 'epplan run' "
    "does on GPUs (on when the run spans nodes). Default: a manifest's, else auto.", show_default=False)]
NumChunksOption = Annotated[Optional[int], typer.Option(
    "--num-chunks", help="Chunks per MoE layer when overlapping. Default: a manifest's, else the "
    "runtime's choice.", show_default=False)]
DeviceOption = Annotated[Optional[Device], typer.Option(
    "--device", callback=plain, help="cuda (NCCL, one GPU per process) or cpu (gloo). Default: cuda "
    "if a GPU is visible, else cpu.", show_default=False)]


# ------------------------------------------------------------------------------ tables
# Plain words for the solver's states and for what sets a layer's time (the JSON keeps the keys).
STATUS_WORDS = {"optimal": "optimal", "gap_met": "gap met", "gap_open": "gap open",
                "time_limit": "time limit", "baseline": "baseline"}
BINDS_WORDS = {"link": "network", "gpu": "GPU", "both": "both"}
WORDS_HELP = (
    "In the tables, 'set by' says what sets a MoE layer's time: the network (its busiest link's "
    "exchange), the GPU (the busiest GPU's expert GEMMs) or both (equal). A solve's status: optimal "
    "(proven), gap met (within --gap of the lower bound), gap open (the MILP ended, or was too large, "
    "above the gap target: the bound holds and the plan may be better than it shows), time limit "
    "(--time-limit stopped it first: the best plan found; exit code 4).")


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 node', '2 nodes' ('1 switch', '2 switches' with ``plural``)."""
    return f"{n:,} {noun if n == 1 else plural or noun + 's'}"


def time_unit(seconds: Iterable[float]) -> tuple[str, float]:
    """The unit that suits the largest of ``seconds`` (s, ms or us) and its factor from seconds,
    so that a table states the unit once, in its header."""
    top = max((abs(float(v)) for v in seconds), default=0.0)
    return ("s", 1.0) if top >= 1 else ("ms", 1e3) if top >= 1e-3 else ("us", 1e6)


def narrow_table(title: str, **kwargs: Any) -> Table:
    """A table that reads at 80 columns: a rule under the header, no vertical lines."""
    return Table(title=title, title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False, **kwargs)


# Library parameters whose flag is not their name with dashes (``EpplanError.cli_message``).
FLAGS = {"old": "--from-manifest", "set": "--set"}


def user_errors(fn: F) -> F:
    """Turn an ``EpplanError`` raised by a command into one red line on stderr and its exit code
    (1; 3 when no run settings fit in GPU memory)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EpplanError as exc:
            err_console.print(f"[bold red]error:[/] {escape(exc.cli_message(FLAGS))}", highlight=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


def parse_tp(value: str) -> int | None:
    """A given ``--tp``: a positive integer, or None for ``auto`` (choose it). Raises
    ``PlacementError``."""
    from epplan.errors import PlacementError

    if value.strip().lower() == "auto":
        return None
    try:
        tp = int(value)
    except ValueError:
        tp = 0
    if tp < 1:
        raise PlacementError(f"--tp {value!r}: give a positive integer that divides the GPUs per node, or auto")
    return tp


def check_range(flag: str, value: float | int | None, low: float, high: float, *,
                low_open: bool = False) -> None:
    """An ``EpplanError`` unless the number given for ``flag`` lies in [low, high] (``low_open``:
    (low, high]); None (not given) passes. NaN and infinities never do."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise EpplanError(f"{flag} {value}: give a finite number")
    if value < low or (low_open and value == low) or value > high:
        side = "more than" if low_open else "at least"
        raise EpplanError(f"{flag} must be {side} {low:g} and at most {high:g}, got {value:g}")


# What each command's --json prints: its "format" name and "version" (docs/json.md describes each).
# A version goes up when a key changes meaning or goes away; new keys keep the version.
JSON_FORMATS = {"place": "epplan.place", "estimate": "epplan.estimate", "export": "epplan.export",
                "topo show": "epplan.topology-summary"}
JSON_VERSION = 1


def print_json(data: dict[str, Any], command: str | None = None) -> None:
    """Plain JSON on stdout (no rich markup), for scripts: ``command``'s format name and version
    first (``data`` that names its own format, as a report or a calibration does, goes as it is)."""
    if command is not None:
        data = {"format": JSON_FORMATS[command], "version": JSON_VERSION, **data}
    assert "format" in data and "version" in data, "every --json names its format and version"
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False) + "\n")
    sys.stdout.flush()


def rates_for(topology: Any, calibration: Any, compute_efficiency: float | None,
              tflops: float | None) -> tuple[dict[str, Any], list[str]]:
    """PlacementProblem keyword arguments for the GPUs' rates, and notes saying where they came
    from: --compute-efficiency or --tflops (a what-if: one flat rate), else --calibration FILE,
    the topology's node-type calibration files, or the shipped table of the GPU model."""
    from epplan.cost.calibration import resolve_calibrations

    if compute_efficiency is not None or tflops is not None:
        what = f"{tflops:g} TFLOP/s" if tflops is not None else f"{compute_efficiency:g} x datasheet TFLOP/s"
        return ({"compute_efficiency": 0.6 if compute_efficiency is None else compute_efficiency,
                 "achievable_tflops": tflops},
                [f"rates: flat {what} for every part of the step (no calibration)"])
    cals, notes = resolve_calibrations(topology, calibration)
    return {"calibration": cals}, notes


def dispatch_notes(traffic: Any, dispatch: str) -> list[str]:
    """What hierarchical dispatch is predicted from when the routing has no pair counts."""
    if dispatch == "flat" or traffic.pairs is not None:
        return []
    return [f"routing {traffic.source} has no pair counts: hierarchical dispatch is predicted with each "
            "token's experts co-occurring independently (coact:... or a run's routing statistics have them)"]
