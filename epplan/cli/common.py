"""Shared pieces of the CLI: consoles and the user-error boundary."""

from __future__ import annotations

import functools
import json
import math
import sys
from pathlib import Path
from typing import Annotated, Any, Callable, Optional, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from epplan.errors import EpplanError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

# The GPUs' rates, shared by estimate, place and report (``rates_for``).
CalibrationOption = Annotated[Optional[Path], typer.Option(
    help="Rates measured by 'epplan calibrate' on the GPUs. Default: the topology's node-type "
         "calibration files, else the tables shipped for H100 and H200.", show_default=False)]
EfficiencyOption = Annotated[Optional[float], typer.Option(
    help="What-if: every part of the step at this fraction of the datasheet bf16 TFLOP/s "
         "(no calibration).", show_default=False)]
TflopsOption = Annotated[Optional[float], typer.Option(
    help="What-if: every part of the step at this TFLOP/s per GPU; overrides --compute-efficiency.",
    show_default=False)]


def user_errors(fn: F) -> F:
    """Turn an ``EpplanError`` raised by a command into one red line on stderr and its exit code
    (1; 3 when no run settings fit in GPU memory)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EpplanError as exc:
            err_console.print(f"[bold red]error:[/] {escape(str(exc))}", highlight=False)
            raise typer.Exit(exc.exit_code) from None

    return wrapper  # type: ignore[return-value]


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


def print_json(data: Any) -> None:
    """Plain JSON on stdout (no rich markup), for scripts."""
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
