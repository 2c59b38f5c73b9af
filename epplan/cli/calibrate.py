"""``epplan calibrate``: measure this GPU's rates for the cost model and write a calibration file."""

from __future__ import annotations

import math
import os
import platform
import time
from datetime import timedelta
from pathlib import Path
from typing import Annotated, Optional

import typer

from epplan.cli import app
from epplan.cli.common import DeviceOption, JsonOption, SetOption, console, out_option, print_json, user_errors
from epplan.cli.estimate import parse_overrides
from epplan.cost.calibration import Calibration, save_calibration
from epplan.errors import ConfigError
from epplan.workload import load_model_config


@app.command("calibrate", epilog=(
    "Examples:\n\n"
    "  epplan calibrate --out h200.json\n\n"
    "  epplan calibrate --model seed --model mixtral-8x7b --out h200.json\n\n"
    "  torchrun --nproc-per-node 8 -m epplan calibrate --out h200x8.json   (adds the collectives)\n\n"
    "Then: epplan estimate --calibration h200.json ..., or name the file in a topology's node type "
    "(calibration: h200.json)."))
@user_errors
def calibrate(
    out: Annotated[Path, out_option("Calibration file to write (JSON).")],
    model: Annotated[Optional[list[str]], typer.Option(
        metavar="NAME|FILE", help="Model preset or YAML whose shapes to measure (repeatable). Default: seed.",
        show_default=False)] = None,
    set_: SetOption = None,
    device: DeviceOption = None,
    tokens: Annotated[int, typer.Option(help="Tokens per timed call of the per-token parts.")] = 32768,
    experts: Annotated[int, typer.Option(help="Local experts in each grouped-GEMM timing.")] = 8,
    iters: Annotated[int, typer.Option(help="Timed runs per measurement (the median is kept).")] = 5,
    sustain: Annotated[float, typer.Option(
        metavar="SECONDS", help="On a GPU, seconds of back-to-back GEMMs before each measurement, so "
        "that parts are timed at the clock a training step holds (a card at its power limit), not "
        "a cool card's; before the LM head, that long of its model's own block. 0 turns it off.")] = 1.0,
    rows: Annotated[Optional[str], typer.Option(
        help="Rows per expert to time, comma-separated. Default: 128,256,...,16384.",
        show_default=False)] = None,
    json: JsonOption = False,
) -> None:
    """Measure this GPU's rates for the cost model and write a calibration file.

    Time the parts of a training step on this machine's GPU with epplan's own code: expert
    GEMMs over the rows per expert a plan produces, attention with the kernel 'epplan run' uses,
    the memory-bound parts (norms, casts, loss, routing, optimizer) and, under torchrun with
    several GPUs, all-to-all and all-reduce. 'estimate', 'place' and 'report' read the file
    with --calibration FILE."""
    import torch
    import torch.distributed as dist

    from epplan.runtime.calibrate import ROWS_PER_EXPERT, calibrate as measure

    configs = [load_model_config(m, parse_overrides(set_ or [])) for m in (model or ["seed"])]
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no GPU is visible to torch on this machine; run calibrate "
                          "on the GPU machine, or pass --device cpu")
    for name, value in (("--tokens", tokens), ("--experts", experts), ("--iters", iters)):
        if value < 1:
            raise ConfigError(f"{name} must be at least 1, got {value}")
    if not (sustain >= 0 and math.isfinite(sustain)):
        raise ConfigError(f"--sustain must be 0 or a positive number of seconds, got {sustain}")
    try:
        row_list = tuple(int(v) for v in rows.split(",")) if rows else ROWS_PER_EXPERT
    except ValueError:
        raise ConfigError(f"--rows {rows!r}: give positive integers separated by commas") from None
    if any(r < 1 for r in row_list):
        raise ConfigError(f"--rows {rows!r}: every value must be at least 1")

    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    dev = torch.device("cuda", local_rank) if device == "cuda" else torch.device("cpu")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    started_here = not dist.is_initialized()
    if started_here:
        backend = "nccl" if dev.type == "cuda" else "gloo"
        if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) > 1:  # under torchrun
            dist.init_process_group(backend, timeout=timedelta(minutes=5))
        else:
            dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    try:
        tables = measure(configs, dev, tokens=tokens, num_local=experts, iters=iters, rows=row_list,
                         sustain_s=sustain if dev.type == "cuda" else 0.0)
        is_main = dist.get_rank() == 0
        world = dist.get_world_size()
    finally:
        if started_here:
            dist.destroy_process_group()
    if not is_main:
        return
    gpu = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    software = {"torch": torch.__version__, "cuda": str(torch.version.cuda),
                "cudnn": str(torch.backends.cudnn.version()) if dev.type == "cuda" else "-"}
    cal = Calibration(
        gpu=gpu, software=software,
        provenance=(f"epplan calibrate on {gpu} x{world}, {time.strftime('%Y-%m-%d', time.gmtime())}, "
                    f"torch {torch.__version__}, models {', '.join(c.name for c in configs)}"
                    + (f", each part after {sustain:g} s of sustained GEMMs (the LM head of its model's block)"
                       if dev.type == "cuda" and sustain > 0
                       else "")),
        source=str(out), **tables)
    save_calibration(cal, out)
    if json:
        print_json(cal.to_dict())
        return
    console.print(f"wrote {out}: {gpu}, torch {torch.__version__}", highlight=False)
    for row in cal.gemm:
        console.print(f"  gemm {row['k']} x {row['n']}: {row['tflops']:.3g} TFLOP/s", highlight=False)
    for row in cal.expert:
        pts = ", ".join(f"{int(m)}: {t:.3g}" for m, t in row["points"])
        console.print(f"  experts {row['d_model']} x {row['d_ff']} {row['activation']} ({row['path']}), "
                      f"rows per expert: TFLOP/s  {pts}", highlight=False)
    for row in cal.attention:
        console.print(f"  attention T={row['seq_len']} H={row['num_heads']} ({row['backend']}): "
                      f"{row['tflops']:.3g} TFLOP/s", highlight=False)
    for row in cal.attention_block:
        console.print(f"  attention half d={row['d_model']} T={row['seq_len']} H={row['num_heads']} "
                      f"Hkv={row['num_kv_heads']}: {row['tflops']:.3g} TFLOP/s", highlight=False)
    console.print("  memory-bound, GB/s: " + ", ".join(f"{k} {v:.3g}" for k, v in cal.memory.items()),
                  highlight=False)
    for row in cal.moe_local:
        console.print(f"  moe_local d={row['d_model']} E={row['num_experts']} k={row['top_k']}: "
                      f"{row['gbps']:.3g} GB/s, {row.get('fixed_seconds', 0.0) * 1e3:.3g} ms a call", highlight=False)
    for row in cal.lm_head:
        console.print(f"  LM head + loss d={row['d_model']} V={row['vocab_size']}: {row['tflops']:.3g} TFLOP/s",
                      highlight=False)
    for row in cal.optimizer_fixed:
        console.print(f"  step's fixed cost, {row['num_tensors']} parameter tensors: "
                      f"{row['seconds'] * 1e3:.3g} ms ({row['before_sync_seconds'] * 1e3:.3g} ms to its host sync)",
                      highlight=False)
