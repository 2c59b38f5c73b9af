"""``epplan estimate``: step time, MFU and memory of a placement, without GPUs."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Annotated, Any, Optional

import numpy as np
import typer
from rich.markup import escape
import yaml
from rich.table import Table

from epplan.cli import app
from epplan.cli.common import (AchievableTflopsOption, CalibrationOption, Dispatch, EfficiencyOption, ExpertsPerGpuOption,
                               JsonOption, MemoryGbOption, MicroBatchesOption, ModelOption, NumChunksOption,
                               OldTflopsOption, OptimizerShardingOption, OverlapOption, PeakTflopsOption, RecomputeOption,
                               RoutingOption, SeedOption, SetOption, TopologyOption, ExpertTpOption, TpOption, check_range,
                               complete_placement, console, dispatch_notes, plain, prefer, print_json, rates_for,
                               parse_tp, renamed, user_errors, BINDS_WORDS, WORDS_HELP)
from epplan.cost import BANDWIDTH_TARGET, MFU_TARGET, SPEC_PEAK_TFLOPS, Cost, evaluate
from epplan.opened import open_manifest
from epplan.cost.fit import Fit, choose_run_settings
from epplan.errors import ConfigError, DoesNotFit, PlacementError
from epplan.placement.baselines import BASELINES, baseline
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import Placement
from epplan.topology import load_topology
from epplan.workload import load_model_config, make_traffic

_GB = 1e9


@app.command("estimate", epilog=WORDS_HELP)
@user_errors
def estimate(
    topology: TopologyOption,
    model: ModelOption = None,
    routing: RoutingOption = "uniform",
    placement: Annotated[str, typer.Option(
        metavar="NAME|FILE", autocompletion=complete_placement,
        help="A baseline (eplb, eplb-hier, contiguous, random) or a manifest .json that 'epplan "
             "place' wrote.")] = "contiguous",
    experts_per_gpu: ExpertsPerGpuOption = None,
    set_: SetOption = None,
    calibration: CalibrationOption = None,
    compute_efficiency: EfficiencyOption = None,
    achievable_tflops: AchievableTflopsOption = None,
    tflops: OldTflopsOption = None,
    micro_batches: MicroBatchesOption = None,
    recompute: RecomputeOption = None,
    optimizer_sharding: OptimizerShardingOption = None,
    tp: TpOption = None,
    expert_tp: ExpertTpOption = None,
    memory_gb: MemoryGbOption = None,
    overlap: OverlapOption = None,
    num_chunks: NumChunksOption = None,
    dispatch: Annotated[Optional[Dispatch], typer.Option(
        callback=plain,
        help="The runtime's exchange: flat (one row per token and expert) or hierarchical (one row per "
             "token and destination node over the network, forwarded inside the node). Default: the "
             "--placement manifest's, else flat.", show_default=False)] = None,
    peak_tflops: PeakTflopsOption = None,
    seed: SeedOption = 0,
    per_layer: Annotated[bool, typer.Option("--per-layer", metavar="", help="Also print the per-layer table.")] = False,
    layers: Annotated[bool, typer.Option("--layers", hidden=True, callback=renamed("--layers", "--per-layer"))] = False,
    json: JsonOption = False,
) -> None:
    """Estimate a training step's time, memory and MFU without GPUs.

    Estimate a training step: compute, all-to-all and gradient-sync time, the bottleneck link,
    memory per GPU and MFU, under the cheapest run settings (micro-batches, recompute, optimizer
    sharding; the TP degree with --tp auto) that fit every GPU's memory. Exits 3 if none fits."""
    check_range("--experts-per-gpu", experts_per_gpu, 1, 4096)
    check_range("--compute-efficiency", compute_efficiency, 0, 1, low_open=True)
    tflops = prefer(achievable_tflops, tflops, "--achievable-tflops", "--tflops")
    layers = per_layer or layers
    check_range("--achievable-tflops", tflops, 0, 1e6, low_open=True)
    check_range("--peak-tflops", peak_tflops, 0, 1e6, low_open=True)
    check_range("--micro-batches", micro_batches, 1, 1 << 20)
    check_range("--seed", seed, 0, 2**32 - 1)
    check_range("--memory-gb", memory_gb, 0, 1e5, low_open=True)
    topo = cap_memory(load_topology(topology), memory_gb)
    tp_degree = 1 if tp is None else parse_tp(tp)
    # A manifest: planned on this topology (checked here), its model and run settings the defaults.
    manifest = open_manifest(Path(placement), topo, what="--topology").manifest if placement.endswith(".json") else None
    if manifest is None:
        config = load_model_config(model or "seed", parse_overrides(set_ or []))
    else:  # the model the plan was made for, unless the user names one (which must agree)
        config = manifest.config
        if model is not None or set_:
            named = load_model_config(config if model is None else model, parse_overrides(set_ or []))
            if named != config:
                raise PlacementError(
                    f"--placement {placement} was planned for model {config.name!r} "
                    f"({config.num_layers} layers, {config.num_experts} experts, d_model {config.d_model}), "
                    f"not for the --model/--set given ({named.name!r}); drop them to estimate the plan, "
                    "or plan again with 'epplan place'")
        experts_per_gpu = manifest.experts_per_gpu if experts_per_gpu is None else experts_per_gpu
        micro_batches = manifest.micro_batches if micro_batches is None else micro_batches
        recompute = manifest.recompute if recompute is None else recompute
        optimizer_sharding = manifest.optimizer_sharding if optimizer_sharding is None else optimizer_sharding
        tp_degree = manifest.tp if tp is None else tp_degree
        expert_tp = manifest.expert_tp if expert_tp is None else expert_tp
        planned = manifest.problem_options()
        dispatch = planned["dispatch"] if dispatch is None else dispatch
        if overlap is None and "overlap" in planned:
            overlap = planned["overlap"]
            num_chunks = planned["num_chunks"] if num_chunks is None else num_chunks
    traffic = make_traffic(routing, config, topo.num_gpus, seed=seed)
    experts_per_gpu = 1 if experts_per_gpu is None else experts_per_gpu
    rates, rate_notes = rates_for(topo, calibration, compute_efficiency, tflops)
    problem = PlacementProblem(topo, config, traffic, experts_per_gpu=experts_per_gpu,
                               overlap=overlap or "auto", num_chunks=num_chunks, **rates,
                               dispatch=dispatch or "flat")
    plan = _placement(placement, problem, seed) if manifest is None else manifest.placement
    fit = choose_run_settings(plan, problem, micro_batches=micro_batches, recompute=recompute,
                              optimizer_sharding=optimizer_sharding, tp=tp_degree, expert_tp=bool(expert_tp))
    cost = fit.cost
    problem = dataclasses.replace(problem, **dataclasses.asdict(fit.settings))
    if json:
        data = cost.to_dict()
        data["model"] = config.name
        data["notes"] = traffic.notes + rate_notes
        data["run_settings"] = {**dataclasses.asdict(fit.settings), "fits": fit.fits}
        if peak_tflops is not None:
            data["mfu"].update(peak_tflops=peak_tflops, at_peak_tflops=mfu_at(cost, peak_tflops))
        print_json(data, "estimate")
    else:
        _print(cost, problem, show_layers=layers, notes=rate_notes, peak_tflops=peak_tflops)
        print_run_settings(fit)
    if not fit.fits:  # the settings the user fixed, or the closest: say what would fit
        fixed = None not in (micro_batches, recompute, optimizer_sharding, tp_degree)
        raise DoesNotFit(_memory_message(cost, problem) if fixed else fit.refusal)


def cap_memory(topo, memory_gb: float | None):
    """``topo`` with every GPU's memory capped at ``memory_gb`` (None: as the topology says)."""
    if memory_gb is None:
        return topo
    if not memory_gb > 0:
        raise PlacementError(f"--memory-gb must be > 0, got {memory_gb:g}")
    topo.gpu_memory_gb = np.minimum(topo.gpu_memory_gb, memory_gb)  # shadows the cached property
    return topo


def print_run_settings(fit: Fit, *, written: bool = False) -> None:
    """One line: the run settings and whether they fit; ``written``: a manifest records them."""
    s, cost = fit.settings, fit.cost
    worst = float(cost.memory_bytes.max()) / _GB
    cap = float(cost.memory_capacity_bytes[int(np.argmax(cost.memory_bytes))]) / _GB
    style = "green" if fit.fits else "bold red"
    console.print(f"run settings: [{style}]{s.describe()}[/] ({worst:.1f} of {cap:.1f} GB on the fullest GPU; "
                  + ("'epplan run' takes them from the manifest)" if written else
                     "'epplan place' records them in the manifest it writes)"), highlight=False)


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['num_experts=32', 'dtype=fp32'] -> {'num_experts': 32, 'dtype': 'fp32'} (YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        name, eq, text = item.partition("=")
        if not eq or not name.strip():
            raise ConfigError(f"--set {item!r}: write FIELD=VALUE, e.g. --set num_experts=32")
        try:
            value = yaml.safe_load(text) if text.strip() else text
        except yaml.YAMLError:
            value = text
        out[name.strip()] = value
    return out


def _placement(spec: str, problem: PlacementProblem, seed: int) -> Placement:
    if spec in BASELINES:
        return baseline(spec, problem, seed)
    raise PlacementError(f"--placement {spec!r}: use {', '.join(BASELINES)} or a manifest .json file")


# ------------------------------------------------------------------------------ output

def mfu_at(cost: Cost, peak_tflops: float) -> float:
    """MFU against ``peak_tflops`` per GPU (``Cost.mfu_spec`` is against the spec's 400)."""
    return cost.mfu_spec * SPEC_PEAK_TFLOPS / peak_tflops


def _print(cost: Cost, problem: PlacementProblem, show_layers: bool, notes: list[str] = (),
           peak_tflops: float | None = None) -> None:
    topo, config = problem.topology, problem.config
    d = cost.to_dict()
    step = d["step"]
    console.print(
        f"[bold]{escape(config.name)}[/] on [bold]{escape(topo.name)}[/] ({topo.num_gpus} GPUs), placement "
        f"[bold]{escape(cost.placement_method)}[/], routing {escape(cost.traffic_source)}, "
        f"{config.tokens_per_step:,} tokens per step, {problem.dispatch} dispatch", highlight=False)
    for note in [*problem.traffic.notes, *notes, *_calibration_notes(problem),
                 *dispatch_notes(problem.traffic, problem.dispatch)]:
        console.print(f"  [dim]note: {escape(note)}[/]", highlight=False)

    t = Table(title="time per training step", title_justify="left")
    t.add_column("component")
    t.add_column("seconds", justify="right")
    t.add_column("how", style="dim")
    rows = [
        ("MoE layers", step["moe_layers_s"], f"sum over layers: dense + a2a and experts {cost.schedule.describe()}"),
        ("  attention / router compute", step["dense_compute_s"], "slowest GPU, fwd + bwd"),
        ("  expert compute", step["expert_compute_s"], "busiest GPU per layer, summed"),
        ("  all-to-all", step["a2a_s"], "busiest link per layer: dispatch + combine, fwd + bwd"),
        ("  a2a and experts (the objective)", step["objective_s"], cost.schedule.describe()),
        ("dense layers + LM head", step["other_compute_s"], "slowest GPU"),
        ("expert gradient sync", step["expert_sync_s"], "rings over each expert's replicas"),
        ("dense gradient sync", step["dense_sync_s"], f"ring over all {topo.num_gpus} ranks" if cost.tp == 1 else
         f"rings over the {topo.num_gpus // cost.tp}-rank data-parallel groups; norms, routers over all"),
        ("  both, exposed", step["exposed_sync_s"], "after the backward pass, dense then experts (as 'run' does)"),
        ("optimizer weight all-gather", cost.optimizer_sync_s,
         f"--optimizer-sharding {problem.optimizer_sharding}: ZeRO's broadcasts after the step"),
        ("tensor-parallel collectives", cost.tp_s,
         f"--tp {cost.tp}: sequence parallelism's all-gathers and reduce-scatters" if cost.tp > 1 else "--tp 1: none"),
        ("[bold]step time[/]", step["step_time_s"], f"nothing overlapped: {step['serial_step_time_s']:.4g} s"),
    ]
    for name, seconds, how in rows:
        t.add_row(name, f"{seconds:.4g}", how)
    console.print(t)

    c = Table(title="communication: busiest link per component over the step", title_justify="left")
    for col, justify in (("component", "left"), ("GB on it", "right"), ("seconds", "right"),
                         ("link", "left"), ("class", "left")):
        c.add_column(col, justify=justify)
    cap = cost.capacity_bytes_per_s
    parts = [
        ("dispatch fwd", cost.dispatch_fwd_bytes.sum(axis=0, dtype=np.float64)),
        ("combine fwd", cost.combine_fwd_bytes.sum(axis=0, dtype=np.float64)),
        ("dispatch bwd", cost.combine_fwd_bytes.sum(axis=0, dtype=np.float64)),
        ("combine bwd", cost.dispatch_fwd_bytes.sum(axis=0, dtype=np.float64)),
        ("expert grad sync", cost.expert_sync_bytes.astype(np.float64)),
        ("dense grad sync", cost.dense_sync_bytes.astype(np.float64)),
        ("optimizer all-gather", cost.optimizer_sync_bytes.astype(np.float64)),
        ("tensor parallel", np.zeros_like(cap) if cost.tp_bytes is None else cost.tp_bytes.astype(np.float64)),
        ("everything", cost.link_step_bytes),
    ]
    for name, loads in parts:
        k = int(np.argmax(loads / cap))
        if loads[k] <= 0:
            c.add_row(name, "0", "0", "-", "-")
            continue
        label = cost.link_label(k)
        c.add_row(name, f"{loads[k] / _GB:.4g}", f"{loads[k] / cap[k]:.4g}", escape(label["name"]), label["class"])
    console.print(c)

    if show_layers:
        lt = Table(title="per MoE layer", title_justify="left")
        for col in ("layer", "MoE s", "set by", "a2a s", "a2a link", "GEMM s", "busiest GPU"):
            lt.add_column(col, justify="right" if col.endswith(" s") or col == "layer" else "left")
        for row in d["layers"]:
            lt.add_row(str(row["layer"]), f"{row['moe_time_s']:.4g}", BINDS_WORDS[row["binds"]], f"{row['a2a_s']:.4g}",
                       escape(row["a2a_link"]), f"{row['expert_s']:.4g}", escape(row["expert_gpu"]))
        console.print(lt)

    m = d["memory"]
    w = m["worst_gpu_bytes"]
    mt = Table(title=f"memory of the fullest GPU ({escape(m['worst_gpu'])}), GB", title_justify="left")
    for col in ("weights", "grads", "optimizer", "activations", "total", "capacity"):
        mt.add_column(col, justify="right")
    style = "green" if m["fits"] else "bold red"
    mt.add_row(*(f"{w[k] / _GB:.1f}" for k in ("weights", "grads", "optimizer", "activations")),
               f"[{style}]{w['total'] / _GB:.1f}[/]", f"{w['capacity'] / _GB:.1f}")
    console.print(mt)

    bw = d["bandwidth"]
    s = Table(title="against the targets", title_justify="left", show_header=False)
    s.add_column()
    s.add_column(justify="right")
    s.add_column(style="dim")
    s.add_row("MFU, datasheet peak", _pct(cost.mfu_datasheet, MFU_TARGET),
              f"{float(np.mean(topo.gpu_tflops)):.0f} TFLOP/s per GPU (dense bf16); target {MFU_TARGET:.0%}")
    if peak_tflops is not None:
        s.add_row(f"MFU, {peak_tflops:g} TFLOP/s peak", _pct(mfu_at(cost, peak_tflops), MFU_TARGET),
                  f"--peak-tflops {peak_tflops:g}"
                  + (" (the founding spec's usable H100 rate)" if peak_tflops == SPEC_PEAK_TFLOPS else ""))
    link = bw["busiest_link"]
    s.add_row("bandwidth utilisation, busiest link", _pct(cost.bandwidth_utilisation, BANDWIDTH_TARGET),
              f"{link['name']} ({link['class']}, {link['capacity_gbps']:g} GB/s); target {BANDWIDTH_TARGET:.0%}")
    console.print(s)


def _calibration_notes(problem: PlacementProblem) -> list[str]:
    seen = {id(c): c for c in problem.calibration or []}
    return [n for c in seen.values() for n in c.notes]


def _pct(value: float, target: float) -> str:
    style = "green" if value >= target else "yellow"
    return f"[{style}]{value:.1%}[/]"


def _memory_message(cost: Cost, problem: PlacementProblem) -> str:
    g = cost.worst_memory_gpu
    name = problem.topology.gpu_names[g]
    # Every gradient is held once there are more micro-batches than one: the static part.
    static = 2 * cost.weight_bytes[g] + cost.optimizer_bytes[g]
    act, cap = cost.memory_bytes[g] - static, cost.memory_capacity_bytes[g]
    over = int(np.sum(cost.memory_bytes > cost.memory_capacity_bytes))
    msg = (f"does not fit in GPU memory: {name} needs {cost.memory_bytes[g] / _GB:.1f} GB (weights "
           f"{cost.weight_bytes[g] / _GB:.1f}, grads {cost.grad_bytes[g] / _GB:.1f}, optimizer "
           f"{cost.optimizer_bytes[g] / _GB:.1f}, activations {cost.activation_bytes[g] / _GB:.1f}) "
           f"but has {cap / _GB:.1f} GB; "
           f"{over} of {cost.num_gpus} GPUs are over. ")
    if static >= cap:
        return msg + ("Parameters, their gradients and the optimizer states alone exceed it: use more "
                      "GPUs, or a smaller model (fewer or smaller experts, e.g. --set num_experts=N)")
    # Activations scale with 1 / micro_batches; a micro-batch holds at least one sequence per rank.
    need = math.ceil(act * problem.micro_batches / (cap - static))
    per_rank = problem.config.global_batch / problem.num_gpus
    if need <= per_rank:
        return msg + f"Try --micro-batches {need} (activations / {need}), or more GPUs"
    return msg + (f"Even one sequence per rank at a time ({per_rank:g} per rank) does not fit: "
                  "use more GPUs, shorter sequences (--set seq_len=N) or a smaller model")

