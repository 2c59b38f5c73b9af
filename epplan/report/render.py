"""Rendering a ``Report``: rich tables for a terminal, markdown for docs, CSV for spreadsheets.

Rich and markdown share one layout (``sections``: titled tables of formatted cells), so that both
show the same columns. CSV is the per-link table only, one row per link, raw numbers.
"""

from __future__ import annotations

import csv
import io
import math
from dataclasses import dataclass, field

import numpy as np
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from epplan.report.build import Report
from epplan.report.predicted import CLASS_LABELS, COMPONENTS, link_row

_COMPONENT_TITLES = {"dispatch": "dispatch", "combine": "combine", "expert_sync": "expert grad",
                     "dense_sync": "dense grad"}


@dataclass
class Section:
    """One titled table; ``highlight`` rows are shown in bold (the bottleneck)."""

    title: str
    columns: list[tuple[str, str]]          # (header, 'left' | 'right')
    rows: list[list[str]]
    lines: list[str] = field(default_factory=list)   # printed above the table
    notes: list[str] = field(default_factory=list)   # printed below it
    highlight: set[int] = field(default_factory=set)
    optional: list[str] = field(default_factory=list)  # columns a narrow terminal may drop, first first


# ------------------------------------------------------------------------------ formatting

def fmt_bytes(value: float | None) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value:.0f} B"


def fmt_time(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "-"
    if value == 0:
        return "0"
    for unit, size in (("s", 1.0), ("ms", 1e-3), ("µs", 1e-6)):
        if abs(value) >= size:
            return f"{value / size:.3g} {unit}"
    return f"{value / 1e-9:.3g} ns"


def fmt_pct(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.1%}"


def fmt_ratio(value: float | None) -> str:
    return "-" if value is None or math.isnan(value) else f"{value:.3g}"


def _link(src: str, dst: str) -> str:
    return f"{src} -> {dst}"


# ------------------------------------------------------------------------------ layout

def sections(report: Report) -> list[Section]:
    out = [_links_section(report), _classes_section(report), _gpus_section(report)]
    if report.measured is not None:
        out.append(_measured_section(report))
        if report.measured.expert_tp is not None:
            out.append(_expert_tp_section(report))
    components = _components_section(report)
    if components is not None:
        out.append(components)
    if report.comparison is not None:
        out += _compare_sections(report)
    return out


def header_lines(report: Report) -> list[str]:
    cost, problem, plan = report.plan.cost, report.plan.problem, report.plan
    topo = cost.topology
    table = report.links
    k = table.bottleneck
    scope = "whole step" if report.layer is None else f"MoE layer {report.layer}"
    period = "step" if report.layer is None else "layer"
    lines = [
        f"{plan.label}: placement {cost.placement_method}, model {problem.config.name} on {topo.name} "
        f"({cost.num_gpus} GPUs), routing {cost.traffic_source}",
        f"{scope}: predicted {period} time {fmt_time(table.period_s)}; bottleneck link "
        f"{_link(*topo.links[k])} ({CLASS_LABELS.get(topo.link_class[k], topo.link_class[k])}) busy "
        f"{fmt_time(table.bottleneck_s)} = {fmt_pct(table.busy[k])} of the {period}",
    ]
    if report.layer is None:
        lines.append(f"MFU {fmt_pct(cost.mfu_datasheet)} of the GPUs' datasheet bf16 peak; memory "
                     f"{'fits' if cost.fits_memory else 'DOES NOT FIT'}")
    return lines + [f"note: {n}" for n in report.notes]


def _links_section(report: Report) -> Section:
    cost, table = report.plan.cost, report.links
    comps = COMPONENTS if report.layer is None else ("dispatch", "combine")
    columns = [("#", "right"), ("link", "left"), ("class", "left"), ("GB/s", "right")]
    columns += [(_COMPONENT_TITLES[c], "right") for c in comps]
    columns += [("total", "right"), ("time", "right"), ("vs bottleneck", "right"), ("busy", "right")]
    rows = []
    for i, k in enumerate(report.shown_links):
        r = link_row(cost, table, int(k))
        rows.append([str(i + 1), _link(r["src"], r["dst"]), CLASS_LABELS.get(r["class"], r["class"]),
                     f"{r['capacity_gbps']:g}"]
                    + [fmt_bytes(r[f"{c}_bytes"]) for c in comps]
                    + [fmt_bytes(r["total_bytes"]), fmt_time(r["time_s"]), fmt_pct(r["vs_bottleneck"]),
                       fmt_pct(r["busy"])])
    shown = "all" if report.top is None else f"top {min(report.top, len(table.order))}"
    what = "per step" if report.layer is None else f"MoE layer {report.layer}, all-to-all only"
    notes = ["dispatch: tokens to experts forward + the combine's gradient backward (same direction); "
             "combine: results back + the dispatch's gradient. time = bytes / capacity; busy = time / "
             + ("step time." if report.layer is None else "layer time.")]
    return Section(f"links, hottest first ({shown} of {len(table.order)}; bytes {what})", columns, rows,
                   lines=header_lines(report), notes=notes, highlight={0} if rows else set(),
                   optional=["GB/s", "busy", "expert grad", "dense grad", "combine", "dispatch"])


def _classes_section(report: Report) -> Section:
    columns = [("class", "left"), ("links", "right"), ("GB/s", "right"), ("total", "right"),
               ("max", "right"), ("max time", "right"), ("vs bottleneck", "right"), ("hottest link", "left")]
    rows = []
    cost = report.plan.cost
    for c in report.classes:
        lo, hi = c.capacity_gbps
        src, dst = cost.topology.links[c.hottest]
        rows.append([CLASS_LABELS.get(c.cls, c.cls), str(c.num_links), f"{lo:g}" if lo == hi else f"{lo:g}-{hi:g}",
                     fmt_bytes(c.total_bytes), fmt_bytes(c.max_bytes), fmt_time(c.max_time_s),
                     fmt_pct(c.vs_bottleneck), _link(src, dst)])
    return Section("per link class (total: summed over the class's links)", columns, rows,
                   highlight={0} if rows else set(), optional=["hottest link", "GB/s", "total"])


def _gpus_section(report: Report) -> Section:
    cost, table = report.plan.cost, report.gpus
    topo = cost.topology
    if report.layer is None:
        columns = [("#", "right"), ("GPU", "left"), ("replicas", "right"), ("assignments/layer", "right"),
                   ("max layer", "right")]
    else:
        columns = [("#", "right"), ("GPU", "left"), ("experts", "left"), ("assignments", "right")]
    columns += [("expert compute", "right"), ("all compute", "right"), ("memory", "right"), ("of capacity", "right")]
    rows = []
    for i, g in enumerate(report.shown_gpus):
        g = int(g)
        a = table.assignments[g]
        row = [str(i + 1), topo.gpu_names[g]]
        if report.layer is None:
            row += [str(table.experts[g]), f"{a.mean():,.0f}", f"{a.max():,.0f} (L{int(np.argmax(a))})"]
        else:
            row += [",".join(str(e) for e in table.experts[g]) or "-", f"{a[0]:,.0f}"]
        row += [fmt_time(table.expert_s[g]), fmt_time(table.compute_s[g]), fmt_bytes(table.memory_bytes[g]),
                fmt_pct(table.memory_bytes[g] / table.capacity_bytes[g])]
        rows.append(row)
    shown = "all" if report.top is None else f"top {min(report.top, len(table.order))}"
    scope = "per step" if report.layer is None else f"MoE layer {report.layer}"
    return Section(f"GPUs, busiest expert compute first ({shown} of {len(table.order)}; {scope})", columns, rows,
                   notes=["assignments: token-assignments the GPU's experts serve (a top-2 token makes 2); "
                          "compute: forward + backward; memory: whole step."],
                   optional=["max layer", "replicas", "all compute", "experts"])


def _measured_section(report: Report) -> Section:
    m, run, cost = report.measured, report.run, report.plan.cost
    topo = cost.topology
    ratio = m.ratio()
    replayed = m.replayed_total
    columns = [("#", "right"), ("link", "left"), ("class", "left"), ("predicted", "right"),
               ("measured", "right"), ("ratio", "right"), ("replayed", "right"),
               ("measured dispatch", "right"), ("measured combine", "right")]
    rows = []
    for i, k in enumerate(report.measured_order()):
        k = int(k)
        rows.append([str(i + 1), _link(*topo.links[k]), CLASS_LABELS.get(topo.link_class[k], topo.link_class[k]),
                     fmt_bytes(m.predicted_total[k]), fmt_bytes(m.measured_total[k]), fmt_ratio(ratio[k]),
                     fmt_bytes(None if replayed is None else replayed[k]),
                     fmt_bytes(m.measured["dispatch"][k]), fmt_bytes(m.measured["combine"][k])])
    total_ratio = m.measured_total.sum() / m.predicted_total.sum() if m.predicted_total.sum() > 0 else math.nan
    lines = [
        f"measured in {run.run_dir}: {run.num_steps} steps on {run.device or '?'}"
        + ("" if run.is_finished else " (unfinished)"),
        (f"step time: predicted {fmt_time(m.predicted_step_time_s)}, measured {fmt_time(m.measured_step_time_s)} "
         f"(median, first step left out)"
         + (f", predicted from the run's routing {fmt_time(m.replayed_step_time_s)}"
            if m.replayed_step_time_s is not None else "")) if run.device == "cuda" else
        (f"step time: measured {fmt_time(m.measured_step_time_s)} on {run.device or '?'}; the prediction "
         f"({fmt_time(m.predicted_step_time_s)}) is for the topology's GPUs, so only bytes are compared"),
        f"all-to-all bytes on links: predicted {fmt_bytes(m.predicted_total.sum())}, measured "
        f"{fmt_bytes(m.measured_total.sum())} (ratio {fmt_ratio(total_ratio)})",
        *([f"memory of rank 0: predicted {m.predicted_memory_gb:.1f} GB (weights, gradients, AdamW state, "
           f"activations; an upper bound), the allocator's peak {m.measured_peak_memory_gb:.1f} GB"]
          if m.measured_peak_memory_gb is not None else []),
        (f"bytes per token-assignment: runtime {m.runtime_bytes_per_assignment:,.0f}, cost model "
         f"{m.model_bytes_per_assignment:,.0f}") if run.dispatch == "flat" else
        (f"hierarchical dispatch (one row per token and node across nodes, per token and GPU inside): "
         f"bytes per row: runtime {m.runtime_bytes_per_assignment:,.0f}, cost model "
         f"{m.model_bytes_per_assignment:,.0f}"),
    ]
    if m.replay_pair_error_bytes is not None:
        lines.append(f"replay of the run's routing statistics ({m.replay_steps} steps): largest difference "
                     f"from the measurement {fmt_bytes(m.replay_pair_error_bytes)} per (layer, source, destination)")
    notes = ["measured: the runtime's forward dispatch/combine bytes per (source, destination), mean per step, "
             "x2 for backward, through the same path fractions as the prediction. predicted: the cost "
             "function's, in the runtime's bytes per assignment. replayed: the cost function on the run's own "
             "routing statistics" + (" (flat)." if run.dispatch == "flat" else
                                     "' measured (token, node) and (token, GPU) rows on the links (hierarchical).")]
    lines += [f"note: {n}" for n in m.notes]
    shown = "all" if report.top is None else f"top {min(report.top, len(ratio))}"
    scope = "per step" if report.layer is None else f"MoE layer {report.layer}"
    return Section(f"measured vs predicted all-to-all, hottest measured first ({shown}; {scope})",
                   columns, rows, lines=lines, notes=notes,
                   optional=["measured combine", "measured dispatch", "class"])


def _expert_tp_section(report: Report) -> Section:
    etp, topo = report.measured.expert_tp, report.plan.cost.topology
    rows = [[str(g), topo.gpu_names[g], fmt_bytes(etp.predicted[g]), fmt_bytes(etp.measured[g]),
             fmt_ratio(etp.measured[g] / etp.predicted[g] if etp.predicted[g] > 0 else math.nan),
             fmt_bytes(None if etp.replayed is None else etp.replayed[g])]
            for g in range(etp.measured.size)]
    columns = [("rank", "right"), ("gpu", "left"), ("predicted", "right"), ("measured", "right"),
               ("ratio", "right"), ("replayed", "right")]
    scope = "per step" if report.layer is None else f"MoE layer {report.layer}"
    total = etp.predicted.sum()
    return Section(f"--expert-tp: bytes each GPU sends inside its TP group ({scope})", columns, rows,
                   lines=[f"predicted {fmt_bytes(total)}, measured {fmt_bytes(etp.measured.sum())} (ratio "
                          f"{fmt_ratio(etp.measured.sum() / total if total > 0 else math.nan)}), "
                          f"replayed {fmt_bytes(None if etp.replayed is None else etp.replayed.sum())}"],
                   notes=[f"measured: the runtime's forward gathers of the received rows and reduce-scatters "
                          f"of the partial outputs, mean per step, x{etp.passes} (backward"
                          + (", the block recompute" if etp.passes > 2 else "") + "). predicted: the cost "
                          "function's on the rows each GPU serves; replayed: on the run's own routing "
                          "statistics; both in the runtime's bytes per row."],
                   optional=["gpu"])


def _components_section(report: Report) -> Section | None:
    comp = report.components
    if comp is None:
        return None
    rows = []
    for name, row in comp.to_dict()["components"].items():
        if row["measured_s"] is None and row["predicted_s"] is None:
            continue
        rows.append([name.replace("_", " "), fmt_time(row["predicted_s"]), fmt_time(row["measured_s"]),
                     fmt_ratio(row["predicted_over_measured"])])
    columns = [("component", "left"), ("predicted", "right"), ("measured", "right"), ("predicted / measured", "right")]
    return Section(f"time per step by component, predicted vs measured ({comp.num_steps} steps, medians)",
                   columns, rows, lines=[f"note: {comp.note}"],
                   notes=["measured: 'epplan run''s own timings, CUDA events on GPUs (attention and MoE: norm + layer, forward + backward; "
                          "exchange: the unchunked exchanges the compute stream waits for)."])


def _compare_sections(report: Report) -> list[Section]:
    c = report.comparison
    totals = c.totals()
    labels = [t["label"] for t in totals]
    columns = [("", "left")] + [(label, "right") for label in labels]
    metrics = [
        ("placement", lambda t: t["placement"]),
        ("step time", lambda t: fmt_time(t["step_time_s"])),
        ("MoE layers (the objective)", lambda t: fmt_time(t["objective_s"])),
        ("bottleneck link time", lambda t: fmt_time(t["bottleneck_time_s"])),
        ("bottleneck link", lambda t: f"{t['bottleneck_link']} "
                                      f"({CLASS_LABELS.get(t['bottleneck_class'], t['bottleneck_class'])})"),
        ("bytes on links (sum)", lambda t: fmt_bytes(t["link_bytes_total"])),
        ("MFU (datasheet)", lambda t: fmt_pct(t["mfu_datasheet"])),
        ("bandwidth utilisation", lambda t: fmt_pct(t["bandwidth_utilisation"])),
        ("fits memory", lambda t: "yes" if t["fits_memory"] else "NO"),
    ]
    if report.layer is not None:
        metrics.insert(1, (f"layer {report.layer} time", lambda t: fmt_time(t["layer_time_s"])))
    rows = [[name] + [fn(t) for t in totals] for name, fn in metrics]
    out = [Section("placements side by side", columns, rows)]
    if c.same_topology:
        topo = report.plan.cost.topology
        lcols = [("#", "right"), ("link", "left"), ("class", "left"), ("GB/s", "right")]
        lcols += [(label, "right") for label in labels]
        lrows = []
        for i, r in enumerate(c.link_rows()):
            lrows.append([str(i + 1), _link(r["src"], r["dst"]), CLASS_LABELS.get(r["class"], r["class"]),
                          f"{r['capacity_gbps']:g}"] + [fmt_time(t) for t in r["time_s"]])
        out.append(Section(f"link time under each placement, hottest under any first ({topo.name})", lcols, lrows,
                           optional=["GB/s", "class"]))
    return out


# ------------------------------------------------------------------------------ backends

def print_rich(report: Report, console: Console) -> None:
    for sec in sections(report):
        for line in sec.lines:
            console.print(escape(line), highlight=False)
        keep = _fit(sec, console.width)
        table = Table(title=escape(sec.title), title_justify="left", box=box.SIMPLE_HEAD, pad_edge=False)
        for j in keep:
            name, justify = sec.columns[j]
            # The first data column keeps its line; the others fold a word too long for them
            # (a plan's file name heading its column) onto the next line instead of cutting it to "…".
            table.add_column(escape(name), justify=justify, no_wrap=j == 1, overflow="fold")
        for i, row in enumerate(sec.rows):
            table.add_row(*(escape(row[j]) for j in keep), style="bold" if i in sec.highlight else None)
        console.print(table)
        dropped = [sec.columns[j][0] for j in range(len(sec.columns)) if j not in keep]
        if dropped:
            console.print(f"[dim]({', '.join(dropped)} left out to fit {console.width} columns; "
                          "--markdown or --csv has them)[/]", highlight=False)
        for note in sec.notes:
            console.print(f"[dim]{escape(note)}[/]", highlight=False)


def _fit(sec: Section, width: int) -> list[int]:
    """Indices of the columns to show: all, or without optional ones (those with nothing to
    show first) until the table fits."""
    names = [name for name, _ in sec.columns]
    # each column: its widest cell + padding and separator (3 with box.SIMPLE_HEAD, no edge padding)
    widths = [max([len(name)] + [len(row[j]) for row in sec.rows]) + 3 for j, name in enumerate(names)]
    keep = list(range(len(names)))
    empty = [n for n in sec.optional if n in names
             and all(row[names.index(n)] in ("0", "0 B", "-", "") for row in sec.rows)]
    for name in empty + [n for n in sec.optional if n not in empty]:
        if sum(widths[j] for j in keep) <= width:
            break
        if name in names:
            keep.remove(names.index(name))
    return keep


def to_markdown(report: Report) -> str:
    out = []
    for sec in sections(report):
        out += [f"- {line}" for line in sec.lines]
        if sec.lines:
            out.append("")
        out += [f"### {sec.title}", ""]
        out.append("| " + " | ".join(_md(name) for name, _ in sec.columns) + " |")
        out.append("|" + "|".join("---:" if j == "right" else "---" for _, j in sec.columns) + "|")
        for i, row in enumerate(sec.rows):
            cells = [f"**{_md(c)}**" if i in sec.highlight and c else _md(c) for c in row]
            out.append("| " + " | ".join(cells) + " |")
        if sec.notes:
            out.append("")
            out += [f"_{_md(n)}_" for n in sec.notes]
        out.append("")
    return "\n".join(out)


def _md(text: str) -> str:
    return text.replace("|", "\\|")


def csv_rows(report: Report) -> tuple[list[str], list[list]]:
    """(header, rows): every shown link of the per-link table, with the measured columns and the
    compared plans' times when the report has them."""
    cost = report.plan.cost
    table = report.links
    header = ["rank", "index", "src", "dst", "class", "capacity_gbps", *[f"{c}_bytes" for c in COMPONENTS],
              "total_bytes", "time_s", "vs_bottleneck", "busy"]
    m = report.measured
    if m is not None:
        header += ["measured_dispatch_bytes", "measured_combine_bytes", "measured_bytes",
                   "predicted_a2a_bytes", "replayed_bytes", "ratio"]
        ratio, replayed = m.ratio(), m.replayed_total
    others = report.comparison.plans[1:] if report.comparison and report.comparison.same_topology else []
    header += [f"time_s[{p.label}]" for p in others]
    rows = []
    for i, k in enumerate(report.shown_links):
        k = int(k)
        r = link_row(cost, table, k)
        row = [i + 1, k, r["src"], r["dst"], r["class"], r["capacity_gbps"],
               *[r[f"{c}_bytes"] for c in COMPONENTS], r["total_bytes"], r["time_s"], r["vs_bottleneck"], r["busy"]]
        if m is not None:
            row += [m.measured["dispatch"][k], m.measured["combine"][k], m.measured_total[k],
                    m.predicted_total[k], "" if replayed is None else replayed[k],
                    "" if math.isnan(ratio[k]) else ratio[k]]
        row += [t.time_s[k] for t in report.comparison.tables[1:]] if others else []
        rows.append([float(v) if isinstance(v, np.floating) else v for v in row])
    return header, rows


def to_csv(report: Report) -> str:
    header, rows = csv_rows(report)
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(header)
    for row in rows:
        writer.writerow([repr(v) if isinstance(v, float) else v for v in row])
    return buf.getvalue()
