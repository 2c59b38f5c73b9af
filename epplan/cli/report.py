"""``epplan report``: a manifest's per-link loads, predicted and measured, with plots."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from epplan.cli import app
from epplan.cli.common import (CalibrationOption, JsonOption, ManifestTopologyOption, complete_placement, console,
                               err_console, in_panel, print_json, user_errors)
from epplan.report import PlanView, ReportError, build_report, read_run
from epplan.report.aging import score_windows
from epplan.opened import manifest_seed
from epplan.report.manifests import open_plan, plan_for
from epplan.report.plot import plotted_series, write_plot
from epplan.report.render import print_rich, to_csv, to_markdown
from epplan.workload.traffic import make_traffic
from epplan.workload.windows import window_specs

OUTPUT = "Output"
_DEFAULT_TOP = 15


@app.command("report", no_args_is_help=True, epilog=(
    "Examples:\n\n"
    "  epplan report plan.json\n\n"
    "  epplan report plan.json --metrics runs/a --top 10 --plot links.png\n\n"
    "  epplan report plan.json --compare eplb --compare contiguous --markdown\n\n"
    "  epplan report plan.json --layer 3 --all --csv > layer3.csv"))
@user_errors
def report(
    manifest: Annotated[Path, typer.Argument(metavar="MANIFEST", help="Placement manifest written by 'epplan place'.",
                                             show_default=False)],
    topology: ManifestTopologyOption = None,
    metrics: Annotated[Optional[Path], typer.Option(
        "--metrics", metavar="RUN_DIR", help="A run directory of this manifest ('epplan run --out'): "
        "measured all-to-all bytes per link beside the prediction.", show_default=False)] = None,
    calibration: CalibrationOption = None,
    compare: Annotated[Optional[list[str]], typer.Option(
        "--compare", metavar="NAME|FILE", autocompletion=complete_placement, help="Another manifest of the same cluster, or a baseline "
        "(contiguous, eplb, random) on this manifest's problem, side by side (repeatable).",
        show_default=False)] = None,
    routing: Annotated[Optional[list[str]], typer.Option(
        metavar="SPEC", help="Score the plan on these routing windows instead (as 'epplan place --routing' reads "
             "them: repeat, cut a range with @FIRST:LAST:WIDTH, or a directory of routing "
             "statistics), to see how it ages: its MoE and step time on each, against the routing "
             "it was planned for.", show_default=False)] = None,
    layer: Annotated[Optional[int], typer.Option(
        help="One MoE layer's all-to-all instead of the whole step.", show_default=False)] = None,
    top: Annotated[Optional[int], typer.Option(
        help=f"Rows per table, hottest first [default: {_DEFAULT_TOP}].", show_default=False,
        rich_help_panel=OUTPUT)] = None,
    all_: Annotated[bool, typer.Option("--all", metavar="", help="Every link and GPU.", rich_help_panel=OUTPUT)] = False,
    json_: in_panel(JsonOption, OUTPUT) = False,
    csv_: Annotated[bool, typer.Option("--csv", metavar="", help="The per-link table as CSV.",
                                       rich_help_panel=OUTPUT)] = False,
    markdown: Annotated[bool, typer.Option("--markdown", metavar="", help="Markdown tables, for docs.",
                                           rich_help_panel=OUTPUT)] = False,
    plot: Annotated[Optional[Path], typer.Option(
        metavar="FILE.png", help="Also draw a GPU x GPU traffic heatmap and the hottest links' "
        "utilisation (bottleneck marked).", show_default=False, rich_help_panel=OUTPUT)] = None,
) -> None:
    """A plan's per-link loads, predicted and measured, with plots.

    Per-link load tables of a placement manifest: every link's predicted bytes per step by
    component (dispatch, combine, expert and dense gradient all-reduce), its time and utilisation,
    hottest first; a per link-class summary; per GPU compute and memory; with --metrics the run's
    measured bytes beside the prediction, and its time per component (attention, MoE layers,
    exchange, LM head and loss, optimizer) beside the predicted; with --compare other placements side by side."""
    formats = [name for name, on in (("--json", json_), ("--csv", csv_), ("--markdown", markdown)) if on]
    if len(formats) > 1:
        raise ReportError(f"{' and '.join(formats)}: choose one output format")
    if all_ and top is not None:
        raise ReportError("--top and --all: give one (--all shows every row)")
    rows = None if all_ else (top if top is not None else _DEFAULT_TOP)

    opened = open_plan(manifest, topology, calibration=calibration)
    plan = opened.plan
    if routing:
        if compare or metrics is not None or plot is not None or csv_ or markdown or layer is not None:
            raise ReportError("--routing scores the plan on routing windows on its own; leave out "
                              "--compare, --metrics, --plot, --csv, --markdown and --layer")
        specs = window_specs(routing)
        seed = manifest_seed(opened.manifest)
        windows = [(spec, make_traffic(spec, plan.problem.config, plan.problem.num_gpus, seed=seed))
                   for spec in specs]
        aged = score_windows(plan, windows)
        if json_:
            print_json(aged)
        else:
            _print_aging(aged, opened.notes)
        return
    others: list[PlanView] = []
    for spec in compare or []:
        others.append(plan_for(spec, opened))
    run = None
    if metrics is not None:
        run = read_run(metrics, manifest_hash=opened.hash, num_layers=plan.problem.num_layers,
                       num_ranks=plan.problem.num_gpus)
    result = build_report(plan, layer=layer, top=rows, run=run, others=others, notes=opened.notes)

    if json_:
        print_json(result.to_dict())
    elif csv_:
        sys.stdout.write(to_csv(result))
    elif markdown:
        sys.stdout.write(to_markdown(result))
    else:
        print_rich(result, console)
    if plot is not None:
        for line in plotted_series(result)[2]:
            err_console.print(f"note: {line}", highlight=False, markup=False)
        path = write_plot(result, plot)
        (err_console if formats else console).print(f"wrote {path}", highlight=False)


def _print_aging(aged: dict, notes: list[str]) -> None:
    from rich.markup import escape
    from rich.table import Table

    from epplan.cli.place import _t

    planned = aged["planned"]
    console.print(f"[bold]{escape(aged['manifest'])}[/], planned for {escape(planned['source'])}: "
                  f"MoE layers {_t(planned['objective_s'])}, step {_t(planned['step_time_s'])}", highlight=False)
    for note in notes:
        console.print(f"  [dim]note: {escape(note)}[/]", highlight=False)
    t = Table(title="the plan on each routing window", title_justify="left")
    for col in ("window", "routing", "a2a+experts", "vs planned", "step", "worst layer"):
        t.add_column(col, justify="left" if col in ("routing", "worst layer") else "right",
                     overflow="fold")
    for i, row in enumerate(aged["windows"]):
        t.add_row(str(i), escape(row["source"]), _t(row["objective_s"]), f"{row['vs_planned']:+.1%}",
                  _t(row["step_time_s"]), f"{row['worst_layer']} ({row['worst_layer_binds']})")
    console.print(t)
