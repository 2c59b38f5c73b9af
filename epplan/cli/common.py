"""Shared pieces of the CLI: consoles and the user-error boundary."""

from __future__ import annotations

import functools
import json
import math
import sys
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console
from rich.markup import escape

from epplan.errors import EpplanError

console = Console()
err_console = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])


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
