"""The ``epplan`` command line: thin commands over the library.

Each command group lives in its own module and registers itself on ``app``. Library code raises
``EpplanError``; ``epplan.cli.common.user_errors`` prints its message and exits 1 with no
traceback.
"""

from __future__ import annotations

import os
import time


def _process_started() -> float:
    """``time.monotonic()`` when this process started, so that the interpreter's start-up and
    the imports before this module count too (0.1 s idle, more under load): the start time in
    /proc/self/stat (clock ticks since boot, 10 ms steps) against ``CLOCK_BOOTTIME``. Now where
    there is no /proc (not Linux) or the process is older than 30 s."""
    now = time.monotonic()
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()   # the name, in parentheses, may hold spaces
        age = time.clock_gettime(time.CLOCK_BOOTTIME) - int(fields[19]) / os.sysconf("SC_CLK_TCK")
    except (OSError, AttributeError, ValueError, IndexError):
        return now
    # Older than a start-up can be: a long-lived process (a notebook) that imports the CLI late.
    return now - age if 0.0 <= age <= 30.0 else now


_IMPORTED = _process_started()   # before the imports below: on an idle 2-core machine they take 3 s

import contextlib
import re
from collections.abc import Iterator
from typing import Annotated, Any

import typer
import typer.core
from rich.markup import escape

try:  # typer >= 0.23 carries its own copy of click
    from typer._click.exceptions import BadParameter, UsageError
except ImportError:  # pragma: no cover
    from click.exceptions import BadParameter, UsageError

import epplan
from epplan.cli.common import err_console



class _Group(typer.core.TyperGroup):
    """The command tree, with typer's usage errors (an unknown flag, a value not among a flag's
    choices) printed as one line and exit code 1, like every other bad input."""

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except UsageError as exc:
        where = f" (see '{exc.ctx.command_path} --help')" if exc.ctx is not None else ""
        message = exc.format_message()
        if isinstance(exc, BadParameter) and exc.param is not None and exc.param.opts:  # a value
            message = f"{max(exc.param.opts, key=len)} {_choice_message(exc.message)}"
        err_console.print(f"[bold red]error:[/] {escape(message)}{where}", highlight=False)
        raise typer.Exit(1) from None


def _choice_message(message: str) -> str:
    """typer's "Value error, 'x' is not one of 'a', 'b'." as "'x': use a or b"."""
    found = re.fullmatch(r"(?:Value error, )?('.*') is not one of (.*?)\.?", message)
    if found is None:
        return message.replace("Value error, ", "")
    values = [v.strip("'") for v in found.group(2).split(", ")]
    listed = " or ".join(values) if len(values) == 2 else "one of " + ", ".join(values)
    return f"{found.group(1)}: use {listed}"


app = typer.Typer(
    name="epplan",
    cls=_Group,
    help="Plan and run topology-aware expert parallelism for Mixture-of-Experts training.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    epilog="Exit codes: 0 done; 1 bad input (the message says what and how to fix it); 3 no run settings fit in GPU memory (place, estimate); 4 the "
           "time limit ended the solve before the gap target was met (place; the manifest is written).",
)


def _switch_type(self: typer.core.TyperOption, ctx: object) -> str | None:
    # typer (0.2x) prints "<bool>" beside every switch, --help included; a switch takes no value.
    return "" if self.is_flag and not self.count else _option_type(self, ctx)


_option_type = getattr(typer.core.TyperOption, "display_type_rich", None)
if _option_type is not None:  # older typer prints nothing beside a switch
    typer.core.TyperOption.display_type_rich = _switch_type  # type: ignore[method-assign]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"epplan {epplan.__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Print epplan's version and exit.")] = False) -> None:
    """Plan and run topology-aware expert parallelism for Mixture-of-Experts training."""


_started: float | None = None


def command_started() -> float:
    """``time.monotonic()`` when this command started: under ``main`` (the ``epplan`` script,
    ``python -m epplan``) when its process started, so that a wall such as ``place
    --time-limit`` counts the interpreter's start and the imports the user waits for; else now
    (``CliRunner``, a second command in one process)."""
    global _started
    started, _started = _started, None
    return time.monotonic() if started is None else started


def _register() -> None:
    # Imported for their side effect of adding commands to ``app``.
    from epplan.cli import topo  # noqa: F401
    from epplan.cli import place  # noqa: F401
    from epplan.cli import estimate  # noqa: F401
    from epplan.cli import report  # noqa: F401
    from epplan.cli import run  # noqa: F401
    from epplan.cli import export  # noqa: F401
    from epplan.cli import calibrate  # noqa: F401


_register()


def main() -> None:
    """Console-script entry point."""
    global _started
    _started = _IMPORTED
    app()
