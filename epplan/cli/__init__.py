"""The ``epplan`` command line: thin commands over the library.

Each command group lives in its own module and registers itself on ``app``. Library code raises
``EpplanError``; ``epplan.cli.common.user_errors`` prints its message and exits 1 with no
traceback.
"""

from __future__ import annotations

import typer

app = typer.Typer(
    name="epplan",
    help="Plan and run topology-aware expert parallelism for Mixture-of-Experts training.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _register() -> None:
    # Imported for their side effect of adding commands to ``app``.
    from epplan.cli import topo  # noqa: F401
    from epplan.cli import estimate  # noqa: F401
    from epplan.cli import report  # noqa: F401
    from epplan.cli import run  # noqa: F401
    from epplan.cli import place  # noqa: F401
    from epplan.cli import export  # noqa: F401
    from epplan.cli import calibrate  # noqa: F401


_register()


def main() -> None:
    """Console-script entry point."""
    app()
