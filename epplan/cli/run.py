"""``epplan run``: train a manifest's model with its placement, through torchrun."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape

from epplan.cli import app
from epplan.cli.common import (DeviceOption, Dispatch, MicroBatchesOption, NumChunksOption,
                               OptimizerShardingOption, OverlapOption, PeakTflopsOption, RecomputeOption,
                               choices, console, count, err_console, in_panel, listed, out_option, plain,
                               user_errors)
from epplan.errors import RuntimeSetupError
from epplan.runfiles import RUN_SETTINGS
from epplan.schedule import DEFAULT_OVERLAP_CTAS
from epplan.train.options import ASYNC_CHECKPOINTS, DEFAULTS, RESUME_KEYS, TrainOptions
from epplan.workload.memory import OPTIMIZER_SHARDING, RECOMPUTE

Switch = choices("Switch", ASYNC_CHECKPOINTS)
PrintLaunch = choices("PrintLaunch", ("torchrun", "slurm"))

TRAINING = "Training"
CHECKPOINTS = "Checkpoints and restarts"
REPLAN = "Live re-placement"
LAUNCH = "Launch (torchrun)"
# What a run setting is when neither the flag nor the manifest gives it (manifests before it):
# the run's own default.
RUN_SETTING_DEFAULTS = {name: DEFAULTS[name] for name in RUN_SETTINGS}


@app.command("run", no_args_is_help=True, epilog=(
    "Examples:\n\n"
    "  epplan run manifest.json --out runs/a --steps 50 --device cpu\n\n"
    "  epplan run manifest.json --out runs/a --steps 100 --resume\n\n"
    "  epplan run manifest.json --out runs/a --print-launch slurm > job.sbatch"))
@user_errors
def run(
    manifest: Annotated[Path, typer.Argument(metavar="MANIFEST", help="Placement manifest written by 'epplan place'.", show_default=False)],
    out: Annotated[Path, out_option("Run directory: checkpoints/, metrics.jsonl, routing_stats.json. "
                                    "Shared by all nodes.")],
    steps: Annotated[int, typer.Option(help="Total optimizer steps (a resumed run continues up to this step).",
                                       rich_help_panel=TRAINING)] = 100,
    device: in_panel(DeviceOption, TRAINING) = None,
    topology: Annotated[Optional[Path], typer.Option(
        help="Topology file to check the manifest against before any worker starts. Default: the file the "
             "manifest records, where it exists.", show_default=False, rich_help_panel=LAUNCH)] = None,
    data: Annotated[Optional[Path], typer.Option(
        help="Text file or directory read as byte tokens, or a pre-tokenised .bin (nanoGPT uint16, "
             "Megatron .bin + .idx, or DTYPE:PATH.bin), memory-mapped, a shard per rank. "
             "Default: seeded synthetic sequences whose loss visibly falls.", show_default=False,
        rich_help_panel=TRAINING)] = None,
    tensorboard: Annotated[Optional[Path], typer.Option(
        metavar="DIR", help="Also write the metrics as TensorBoard events to DIR (needs the tensorboard "
        "package: pip install 'epplan\\[tensorboard]').", show_default=False, rich_help_panel=TRAINING)] = None,
    seed: Annotated[int, typer.Option(help="Seed of the initial weights and the synthetic data.",
                                      rich_help_panel=TRAINING)] = 0,
    global_batch: Annotated[Optional[int], typer.Option(
        help="Sequences per optimizer step. Default: the model's global_batch.", show_default=False,
        rich_help_panel=TRAINING)] = None,
    micro_batches: in_panel(MicroBatchesOption, TRAINING) = None,
    recompute: in_panel(RecomputeOption, TRAINING) = None,
    optimizer_sharding: in_panel(OptimizerShardingOption, TRAINING) = None,
    tp: Annotated[Optional[int], typer.Option(
        "--tp", metavar="N", help="Tensor-parallel degree: attention, the dense MLPs and the LM head split over "
        "groups of N consecutive GPUs of a node (sequence parallel between them); N divides the GPUs per "
        "node. Experts stay expert-parallel over all GPUs. Default: the manifest's, else 1.",
        show_default=False, rich_help_panel=TRAINING)] = None,
    expert_tp: Annotated[Optional[bool], typer.Option(
        "--expert-tp/--no-expert-tp", help="With --tp: also split each routed expert's hidden dimension over "
        "its TP group (each GPU computes its slice for the rows the whole group received). "
        "Default: the manifest's, else off.", show_default=False, rich_help_panel=TRAINING)] = None,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate (AdamW). Default: min(0.01, 1/d_model).",
                                                show_default=False, rich_help_panel=TRAINING)] = None,
    min_lr_ratio: Annotated[float, typer.Option(help="Cosine decay ends at lr x this.",
                                                rich_help_panel=TRAINING)] = 0.1,
    warmup_steps: Annotated[Optional[int], typer.Option(help="Linear warm-up steps. Default: 5% of --steps.",
                                                        show_default=False, rich_help_panel=TRAINING)] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay (matrices only).",
                                                rich_help_panel=TRAINING)] = 0.1,
    grad_clip: Annotated[float, typer.Option(help="Clip the global gradient norm to this; 0: no clipping.",
                                             rich_help_panel=TRAINING)] = 1.0,
    capacity_factor: Annotated[Optional[float], typer.Option(
        help="Expert capacity factor (drops over-capacity assignments). Default: dropless.",
        show_default=False, rich_help_panel=TRAINING)] = None,
    activation_checkpointing: Annotated[bool, typer.Option(
        "--activation-checkpointing", help="Same as --recompute attention.", hidden=True,
        rich_help_panel=TRAINING)] = False,
    overlap: in_panel(OverlapOption, TRAINING) = None,
    num_chunks: in_panel(NumChunksOption, TRAINING) = None,
    overlap_ctas: Annotated[Optional[int], typer.Option(
        help="When overlapping: CTAs of the NCCL communicator that carries the hidden exchanges, and SMs "
             "the expert GEMMs leave free for it. "
             f"Default: {DEFAULT_OVERLAP_CTAS} (docs/benchmarks.md).", show_default=False,
        rich_help_panel=TRAINING)] = None,
    dispatch: Annotated[Optional[Dispatch], typer.Option(
        "--dispatch", callback=plain, rich_help_panel=TRAINING,
        help="How MoE layers exchange tokens: flat (one row per token and expert) or hierarchical (one row "
             "per token and destination node across the network, to the GPU of the same local index, then "
             "over NVLink to the experts' GPUs; combine reduces on the node first). Default: the manifest's.",
        show_default=False)] = None,
    peak_tflops: in_panel(PeakTflopsOption, TRAINING) = None,
    replan_every: Annotated[Optional[int], typer.Option(
        metavar="K", help="Re-plan the experts from the routing of every K steps, beside rank 0 while training "
        "goes on, and move them (weights and AdamW state) when the predicted gain over the next K steps "
        "exceeds the move's cost. Needs the topology file. Metrics: a 'replan' record each; the manifest "
        "in force: OUT/manifest.json (--resume continues on it).", show_default=False,
        rich_help_panel=REPLAN)] = None,
    replan_lag: Annotated[Optional[int], typer.Option(
        help="Steps between a window's end and the use of its plan (training waits only if the solve takes "
             "longer). Default: K/4, at least 1.", show_default=False, rich_help_panel=REPLAN)] = None,
    replan_time_limit: Annotated[float, typer.Option(help="Seconds for each re-plan's solve.",
                                                     rich_help_panel=REPLAN)] = 30.0,
    ckpt_every: Annotated[int, typer.Option(help="Checkpoint every K steps (and at the end).",
                                            rich_help_panel=CHECKPOINTS)] = 50,
    async_checkpoints: Annotated[Switch, typer.Option(
        callback=plain, help="on: training stops only to copy the state to host memory; the files are written in the "
             "background. off: training waits for the files. auto: on with GPUs.",
        rich_help_panel=CHECKPOINTS)] = Switch.auto,
    keep_checkpoints: Annotated[int, typer.Option(help="Newest checkpoints to keep; 0 keeps all.",
                                                  rich_help_panel=CHECKPOINTS)] = 2,
    resume: Annotated[bool, typer.Option(
        "--resume", metavar="", help="Continue from the newest intact checkpoint in --out (from step 0 if --out holds no "
                         "earlier run). A manifest with another placement moves the experts. A damaged "
                         "checkpoint is skipped with a line saying why; with none intact, refuses unless "
                         "--start-over.", rich_help_panel=CHECKPOINTS)] = False,
    start_over: Annotated[bool, typer.Option(
        "--start-over", metavar="", help="Where --out holds an earlier run with no intact checkpoint (or, without "
                             "--resume, any earlier run): start at step 0, moving its metrics, routing "
                             "statistics and checkpoints to --out/previous-N/.",
        rich_help_panel=CHECKPOINTS)] = False,
    allow_change: Annotated[Optional[list[str]], typer.Option(
        "--allow-change", **listed(RESUME_KEYS), help="Let --resume continue although KEY differs from the "
                                               "checkpoint's (repeat for several). Metrics record it.",
        show_default=False, rich_help_panel=CHECKPOINTS)] = None,
    max_restarts: Annotated[int, typer.Option(
        help="torchrun restarts after a worker dies; each continues from the newest checkpoint.",
        rich_help_panel=CHECKPOINTS)] = 0,
    nnodes: Annotated[int, typer.Option(help="Nodes in the job; must equal the manifest's.",
                                        rich_help_panel=LAUNCH)] = 1,
    node_rank: Annotated[Optional[int], typer.Option(
        envvar="SLURM_NODEID", help="This node's index in the manifest (multi-node).", show_default=False,
        rich_help_panel=LAUNCH)] = None,
    rdzv_endpoint: Annotated[Optional[str], typer.Option(
        help="HOST:PORT of the c10d rendezvous, on node 0 (multi-node).", show_default=False,
        rich_help_panel=LAUNCH)] = None,
    rdzv_id: Annotated[Optional[str], typer.Option(help="Rendezvous id. Default: from the manifest hash.",
                                                   show_default=False, rich_help_panel=LAUNCH)] = None,
    rdzv_backend: Annotated[str, typer.Option(help="torchrun rendezvous backend.", rich_help_panel=LAUNCH)] = "c10d",
    rdzv_conf: Annotated[Optional[str], typer.Option(help="torchrun --rdzv-conf key=value,...",
                                                     show_default=False, rich_help_panel=LAUNCH)] = None,
    print_launch: Annotated[Optional[PrintLaunch], typer.Option(
        callback=plain, help="Print instead of running: 'torchrun' (one command line per node) or 'slurm' (an sbatch script).",
        show_default=False, rich_help_panel=LAUNCH)] = None,
) -> None:
    """Train the manifest's model with its expert placement, through torchrun.

    One process per GPU that the manifest gives this node: NCCL on GPUs, gloo on the CPU.

    Writes checkpoints, metrics.jsonl (loss, throughput, MFU, routing, all-to-all bytes per step) and routing_stats.json, which 'epplan place --routing' reads to re-plan.
    """
    # Imported here: torch takes seconds to import, and the other commands never need it.
    import torch

    from epplan.train import launch
    from epplan.opened import open_manifest
    from epplan.train.job import job_from_manifest
    from epplan.train.worker import read_failure

    if device is None:
        device = "cuda" if print_launch or torch.cuda.is_available() else "cpu"
    opened = open_manifest(manifest, topology, required=False, what="--topology")
    planned, topology = opened.manifest, opened.topology_file
    if topology is None:
        err_console.print(f"note: {planned.topology_source or 'the topology file'} (recorded in {manifest}) is "
                          "not here: the manifest is checked on its own; pass --topology FILE to check it "
                          "against the cluster", highlight=False, markup=False)
    job = job_from_manifest(planned)
    if replan_every is not None:
        if not 1 <= replan_every <= 1 << 30:
            raise RuntimeSetupError(f"--replan-every {replan_every}: give a number of steps, at least 1")
        if replan_lag is not None and not 1 <= replan_lag <= replan_every:
            raise RuntimeSetupError(f"--replan-lag {replan_lag}: give 1 .. --replan-every ({replan_every}) steps")
        if not 0 < replan_time_limit <= 86400:
            raise RuntimeSetupError(f"--replan-time-limit must be > 0 seconds and at most a day, got {replan_time_limit:g}")
        if topology is None:
            raise RuntimeSetupError(f"--replan-every plans on the cluster's topology, and the file {manifest} "
                                    f"records ({planned.topology_source or 'none'}) is not here: pass --topology FILE")
    if activation_checkpointing:
        if recompute not in (None, "attention"):
            raise RuntimeSetupError(f"--activation-checkpointing means --recompute attention, not {recompute!r}")
        recompute = "attention"
    settings, overridden = run_settings(job, {"micro_batches": micro_batches, "recompute": recompute,
                                              "optimizer_sharding": optimizer_sharding, "tp": tp,
                                              "expert_tp": expert_tp})
    if settings["recompute"] not in RECOMPUTE:
        raise RuntimeSetupError(f"--recompute {settings['recompute']!r}: use {', '.join(RECOMPUTE)}")
    if settings["optimizer_sharding"] not in OPTIMIZER_SHARDING:
        raise RuntimeSetupError(f"--optimizer-sharding {settings['optimizer_sharding']!r}: use "
                                f"{', '.join(OPTIMIZER_SHARDING)}")
    opts = TrainOptions.of(
        manifest=str(manifest), out=str(out), steps=steps, device=device,
        data=None if data is None else str(data), seed=seed, global_batch=global_batch,
        micro_batches=settings["micro_batches"], recompute=settings["recompute"],
        optimizer_sharding=settings["optimizer_sharding"], tp=settings["tp"], expert_tp=settings["expert_tp"],
        overridden=",".join(overridden) or None, lr=lr, min_lr_ratio=min_lr_ratio, warmup_steps=warmup_steps,
        weight_decay=weight_decay, grad_clip=grad_clip, capacity_factor=capacity_factor,
        overlap=overlap or DEFAULTS["overlap"], num_chunks=num_chunks, dispatch=dispatch,
        overlap_ctas=overlap_ctas, ckpt_every=ckpt_every, async_checkpoints=async_checkpoints,
        keep_checkpoints=keep_checkpoints, resume=resume, start_over=start_over,
        allow_change=",".join(allow_change) if allow_change else None, peak_tflops=peak_tflops, node_rank=node_rank or 0,
        tensorboard=None if tensorboard is None else str(tensorboard), replan_every=replan_every,
        replan_lag=replan_lag, replan_time_limit=replan_time_limit,
        topology=str(Path(topology).resolve()) if replan_every is not None else None)
    if opts.parallel.exchange(job.dispatch) == "hierarchical" and len({len(n.ranks) for n in job.nodes}) > 1:
        raise RuntimeSetupError(f"--dispatch hierarchical needs the same number of GPUs on every node "
                                f"(a token reaches another node through the GPU of its local index); the "
                                f"manifest has {job.describe_nodes()}; use --dispatch flat")
    if tensorboard is not None:
        from epplan.train.tensorboard import check_available

        check_available()
    launch_opts = launch.LaunchOptions(nnodes=nnodes, node_rank=node_rank, rdzv_endpoint=rdzv_endpoint,
                                       rdzv_id=rdzv_id, rdzv_backend=rdzv_backend, rdzv_conf=rdzv_conf,
                                       max_restarts=max_restarts)
    launch.check(job, opts, launch_opts, for_print=print_launch is not None)
    if print_launch == "torchrun":
        typer.echo(launch.print_torchrun(job, opts, launch_opts), nl=False)
        return
    if print_launch == "slurm":
        typer.echo(launch.sbatch_script(job, opts, launch_opts), nl=False)
        return

    console.print(f"epplan run: {escape(job.config.name)} on {escape(job.describe_nodes())}, {device}, "
                  f"{'resuming' if resume else 'from step 0'} -> {escape(str(out))}; "
                  f"{count(settings['micro_batches'], 'micro-batch', 'micro-batches')}, recompute {settings['recompute']}, "
                  f"optimizer sharding {settings['optimizer_sharding']}"
                  + (f", tp {settings['tp']}" if settings["tp"] > 1 else "")
                  + (" with expert tp" if settings["expert_tp"] else "")
                  + (f" (flags over the manifest's: {', '.join(overridden)})" if overridden else ""),
                  highlight=False)
    code = launch.run(job, opts, launch_opts,
                      notify=lambda line: console.print(line, highlight=False, markup=False))
    if code != 0:
        failure = read_failure(out)
        log = launch.agent_log(out, launch_opts.node_rank or 0)
        reason = (failure["message"] if failure else
                  f"torchrun exited with code {code}; its log is {log}, the workers' output is above")
        err_console.print(f"[bold red]error:[/] {escape(reason)}", highlight=False)
        raise typer.Exit(1)
    _summary(out)


def run_settings(job, given: dict) -> tuple[dict, list[str]]:
    """The run settings a run uses: each flag ``given`` (None: not given) over the manifest's
    (``job.run_settings``), else ``RUN_SETTING_DEFAULTS``; and the names of the flags that
    override a different value of the manifest's."""
    recorded = {k: job.run_settings.get(k, default) for k, default in RUN_SETTING_DEFAULTS.items()}
    settings = {k: recorded[k] if v is None else v for k, v in given.items()}
    return settings, [k for k, v in given.items() if v is not None and v != recorded[k]]


def _summary(out: Path) -> None:
    from epplan.errors import EpplanError
    from epplan.runfiles import METRICS_FILE, read_metrics

    try:
        records = read_metrics(out / METRICS_FILE)
    except (OSError, ValueError, EpplanError):
        return  # a node other than node 0 (rank 0 writes the metrics) or no metrics at all
    steps = [r for r in records if r["kind"] == "step"]
    end = next((r for r in reversed(records) if r["kind"] == "end"), None)
    if not steps or end is None:
        return
    console.print(f"done: step {end['step']}, loss {steps[0]['loss']:.4f} -> {steps[-1]['loss']:.4f}; "
                  f"checkpoint {end['checkpoint']}; metrics {out / METRICS_FILE}; "
                  f"routing statistics {end['routing_stats']}", highlight=False, soft_wrap=True, markup=False)
