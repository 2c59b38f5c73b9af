"""``epplan topo show|validate|gen``."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.markup import escape
from rich.table import Table

from epplan.cli import app
from epplan.cli.common import (JsonOption, choices, console, count, err_console, listed, out_option, plain, prefer,
                               print_json, renamed, user_errors)
from epplan.errors import TopologyError
from epplan.fileio import atomic_write_text
from epplan.topology import load_topology
from epplan.topology.generate import FABRICS, OLD_FABRICS, generate
from epplan.topology.importers import import_topology
from epplan.topology.library import NODE_TYPES
from epplan.topology.schema import ROUTINGS
from epplan.topology.units import plausibility_warnings
from epplan.topology.summary import summarize

topo_app = typer.Typer(help="Inspect, check and generate cluster topology files.", no_args_is_help=True)
app.add_typer(topo_app, name="topo")

PathRouting = choices("PathRouting", ROUTINGS)
# How traffic between GPUs of two nodes takes the fabric: the topology file's `routing:` key. The
# CLI calls it --path-routing, because --routing is the token routing everywhere else.
_PATH_ROUTING_HELP = ("How traffic between GPUs of two nodes takes the fabric: ecmp (through the "
                      "sender's own NIC, equal-cost fabric paths sharing it evenly) or rail_aligned "
                      "(NCCL PXN: over NVLink to the GPU whose NIC is on the destination's rail first); "
                      "a topology file's 'routing'.")
OldRoutingOption = Annotated[Optional[PathRouting], typer.Option(
    "--routing", hidden=True, callback=renamed("--routing", "--path-routing"))]


def _fabric(value: str) -> str:
    """--fabric's value; its old spellings (rail, three-tier) with a deprecation line."""
    if value in OLD_FABRICS:
        err_console.print(f"warning: --fabric {value} is deprecated and goes in the next release: use "
                          f"--fabric {OLD_FABRICS[value]}", highlight=False, markup=False)
        return OLD_FABRICS[value]
    return value  # generate() checks it


TopologyFile = Annotated[Path, typer.Argument(help="Topology YAML file (see topologies/).", show_default=False)]


@topo_app.command("show")
@user_errors
def show(
    file: TopologyFile,
    path_routing: Annotated[Optional[PathRouting], typer.Option(
        callback=plain, help=_PATH_ROUTING_HELP + " Default: the file's.", show_default=False)] = None,
    routing: OldRoutingOption = None,
    json: JsonOption = False,
) -> None:
    """Summarise a cluster: nodes, GPUs, link classes, bisection and injection bandwidth."""
    path_routing = prefer(path_routing, routing, "--path-routing", "--routing")
    topo = load_topology(file, routing=path_routing)
    info = summarize(topo)
    if json:
        print_json(info, "topo show")
        return
    head = Table(title=f"[bold]{escape(info['name'])}[/] — {escape(info['description'] or '')}", show_header=False)
    head.add_column(style="cyan")
    head.add_column()
    head.add_row("nodes", escape(f"{info['nodes']}  ({', '.join(f'{n} x {t}' for t, n in info['node_types'].items())})"))
    head.add_row("GPUs", escape(f"{info['gpus']}  ({', '.join(info['gpu_models'])}; {info['gpu_memory_gb_total']:,.0f} GB in all)"))
    head.add_row("fabric / routing", f"{info['fabric']} / {info['routing']}")
    head.add_row("devices", ", ".join(f"{n} {k}" for k, n in info["devices"].items()))
    head.add_row("directed links", f"{info['directed_links']:,}")
    ratio = info["bisection_ratio"]
    head.add_row("bisection", f"{info['bisection_gbps']:,.0f} GB/s per direction"
                 + (f"  ({ratio:.2f} of the half's NIC injection)" if ratio is not None else ""))
    inj = info["injection_gbps_per_gpu"]
    head.add_row("injection per GPU", f"intra-node {_range(inj['intra_node'])} GB/s, "
                                      f"inter-node {_range(inj['inter_node'])} GB/s")
    console.print(head)
    links = Table(title="link classes (GB/s per direction)")
    for col, justify in (("class", "left"), ("links", "right"), ("min", "right"), ("max", "right"), ("total", "right")):
        links.add_column(col, justify=justify)
    for c in info["link_classes"]:
        links.add_row(escape(c["class"]), f"{c['links']:,}", f"{c['min_gbps']:,.1f}", f"{c['max_gbps']:,.1f}",
                      f"{c['total_gbps']:,.0f}")
    console.print(links)


def _range(r: dict) -> str:
    return f"{r['min']:,.1f}" if abs(r["min"] - r["max"]) < 1e-9 else f"{r['min']:,.1f}-{r['max']:,.1f}"


@topo_app.command("validate")
@user_errors
def validate(files: Annotated[list[Path], typer.Argument(help="Topology YAML files.", show_default=False)]) -> None:
    """Check topology files and report every problem found; exit 1 if any file is invalid."""
    failed = 0
    for file in files:
        try:
            topo = load_topology(file)
            topo.paths  # path construction finds unreachable GPUs
        except TopologyError as exc:
            failed += 1
            console.print(f"[red]✗[/] {escape(str(file))}", highlight=False)
            for problem in _split_problems(str(exc), str(file)):
                console.print(f"    {problem}", highlight=False, markup=False)
            continue
        console.print(f"[green]✓[/] {escape(str(file))}: {count(topo.num_nodes, 'node')}, {count(topo.num_gpus, 'GPU')}, "
                      f"{topo.num_links} directed links", highlight=False)
        for warning in plausibility_warnings(topo.spec):
            console.print(f"    [yellow]warning:[/] {warning}", highlight=False, markup=True)
    if failed:
        raise typer.Exit(1)


def _split_problems(message: str, source: str) -> list[str]:
    prefix = f"{source}: "
    if message.startswith(prefix):
        message = message[len(prefix):]
    return message.split("; ")


@topo_app.command("gen")
@user_errors
def gen(
    nodes: Annotated[int, typer.Option(help="Number of servers.")],
    node_type: Annotated[str, typer.Option(**listed(NODE_TYPES), help="Built-in server type.")] = "dgx-h100",
    fabric: Annotated[str, typer.Option(**listed(FABRICS), callback=_fabric,
                                        help="Inter-node fabric, as a topology file's fabric.kind names it.")
                      ] = "rail_optimized",
    nodes_per_su: Annotated[int, typer.Option(help="Servers per scalable unit (rail and three-tier).")] = 32,
    spines: Annotated[Optional[int], typer.Option(help="Spine switches (rail); default nodes_per_su/2.")] = None,
    spines_per_su: Annotated[Optional[int], typer.Option(help="Spines per scalable unit (three-tier).")] = None,
    cores: Annotated[Optional[int], typer.Option(help="Core switches (three-tier).")] = None,
    oversubscription: Annotated[float, typer.Option(help="Leaf downlink:uplink ratio, >= 1.")] = 1.0,
    core_oversubscription: Annotated[float, typer.Option(help="Spine downlink:uplink ratio (three-tier), >= 1.")] = 1.0,
    path_routing: Annotated[PathRouting, typer.Option(callback=plain, help=_PATH_ROUTING_HELP)] = PathRouting.ecmp,
    routing: OldRoutingOption = None,
    name: Annotated[Optional[str], typer.Option(help="Topology name; default from the shape.")] = None,
    out: Annotated[Optional[Path], out_option("Write here instead of stdout.")] = None,
) -> None:
    """Write a topology file for a common cluster shape."""
    routing = routing or path_routing  # --routing: the old spelling
    text = generate(nodes=nodes, node_type=node_type, fabric=fabric, nodes_per_su=nodes_per_su, spines=spines,
                    spines_per_su=spines_per_su, cores=cores, oversubscription=oversubscription,
                    core_oversubscription=core_oversubscription, routing=routing, name=name)
    if out is None:
        typer.echo(text, nl=False)
        return
    try:
        atomic_write_text(out, text)  # a failed write leaves an existing file as it was
    except OSError as exc:
        raise TopologyError(f"--out {out}: cannot write: {exc.strerror}") from None
    console.print(f"wrote {escape(str(out))}", highlight=False)


@topo_app.command("import")
@user_errors
def import_(
    files: Annotated[list[Path], typer.Argument(
        help="An NCCL topology XML (NCCL_TOPO_DUMP_FILE) or 'nvidia-smi topo -m' output for the servers, "
             "and/or a Slurm topology.conf for the switches between them.", show_default=False)],
    nodes: Annotated[Optional[int], typer.Option(help="Servers, when no topology.conf names them (one switch).",
                                                 show_default=False)] = None,
    node_type: Annotated[Optional[str], typer.Option(
        **listed(NODE_TYPES), help="Built-in server type, when no server file is given.", show_default=False)] = None,
    gpu: Annotated[Optional[str], typer.Option(help="GPU model (a100, h100, h200, b200), when the file does not "
                                               "say it.", show_default=False)] = None,
    nic_gbps: Annotated[Optional[str], typer.Option(help="NIC speed with its unit (400Gb/s), when the file does "
                                                    "not say it.", show_default=False)] = None,
    name: Annotated[Optional[str], typer.Option(help="Topology name.", show_default=False)] = None,
    out: Annotated[Optional[Path], out_option("Write here instead of stdout.")] = None,
) -> None:
    """Write an epplan topology file from NCCL's topology XML, 'nvidia-smi topo -m' output and a Slurm
    topology.conf (combinable), and say what it assumed."""
    result = import_topology(files, name=name, nodes=nodes, node_type=node_type, gpu=gpu, nic_gbps=nic_gbps)
    for note in result.assumptions:
        err_console.print(f"assumed: {note}", highlight=False, markup=False)
    if out is None:
        typer.echo(result.text, nl=False)
        return
    try:
        atomic_write_text(out, result.text)
    except OSError as exc:
        raise TopologyError(f"--out {out}: cannot write: {exc.strerror}") from None
    console.print(f"wrote {escape(str(out))}", highlight=False)
