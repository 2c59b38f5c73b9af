"""``write_plot(report, path)``: a PNG with a GPU x GPU traffic heatmap and the hottest links.

Headless: the Agg backend, set on the figure itself (no pyplot, no global state).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from epplan.fileio import atomic_write_bytes
from epplan.report.build import Report
from epplan.errors import param
from epplan.report.predicted import CLASS_LABELS, ReportError, pair_bytes
from epplan.report.render import fmt_bytes, fmt_time

BANDWIDTH_TARGET = 0.80
_MAX_BARS = 30


def plotted_series(report: Report) -> tuple[np.ndarray, dict[str, np.ndarray], list[str]]:
    """The links the bar chart shows (hottest first), each series drawn on them as a busy
    fraction (this plan's; every --compare plan on the same topology; the run's measured bytes
    with --metrics), and a line for each plan it cannot draw, saying why."""
    table = report.links
    links = table.order[:min(report.top or _MAX_BARS, _MAX_BARS)]
    series = {report.plan.label: table.busy[links]}
    refused = []
    if report.comparison is not None:
        for plan, other in zip(report.comparison.plans[1:], report.comparison.tables[1:]):
            if plan.cost.topology.content_hash != report.plan.cost.topology.content_hash:
                refused.append(f"--plot: {plan.label} is planned on another topology "
                               f"({plan.cost.topology.name}); its links are not these, so it is not drawn")
                continue
            method = plan.cost.placement_method
            series[plan.label if plan.label == method else f"{plan.label} ({method})"] = other.busy[links]
    if report.measured is not None:
        capacity = report.plan.cost.capacity_bytes_per_s
        measured = report.measured.measured_total[links] / capacity[links] / table.period_s
        series["measured (--metrics)"] = measured
    return links, series, refused


def write_plot(report: Report, path: str | Path) -> Path:
    """Draw ``report``'s heatmap (predicted all-to-all bytes per GPU pair, node boundaries in
    red) and bar chart (busy fraction of the hottest links, the bottleneck in red; every
    ``plotted_series`` as markers on the same links) into ``path`` (PNG)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ReportError(f"{param('plot', path)}: write a .png file")
    plan = report.plan
    cost, topo = plan.cost, plan.cost.topology
    traffic = pair_bytes(plan.placement, plan.problem, report.layer)  # [G, G]

    # Imported here, not with the module: matplotlib takes 1.5 s to import on an idle 2-core
    # machine (10 s loaded), which every epplan command would pay (place's --time-limit counts it).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import LogNorm
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(15, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    ax_map, ax_bar = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1, 1.25]})
    positive = traffic[traffic > 0]
    if positive.size:
        norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-4), vmax=positive.max())
        shown = np.where(traffic > 0, traffic, np.nan)
    else:
        norm, shown = None, traffic
    image = ax_map.imshow(shown, cmap="viridis", norm=norm, interpolation="nearest", aspect="equal")
    cbar = fig.colorbar(image, ax=ax_map, fraction=0.046, pad=0.04)
    cbar.set_label("bytes per step (both passes)")
    num_gpus = topo.num_gpus
    nodes = np.flatnonzero(np.diff(topo.gpu_node)) + 0.5  # boundaries between servers
    if 0 < nodes.size <= 64:  # red: zero-traffic cells are blank (white)
        for x in nodes:
            ax_map.axhline(x, color="tab:red", lw=0.8, alpha=0.8)
            ax_map.axvline(x, color="tab:red", lw=0.8, alpha=0.8)
    for axis in (ax_map.xaxis, ax_map.yaxis):
        axis.set_major_locator(MaxNLocator(integer=True))
    scope = "step" if report.layer is None else f"MoE layer {report.layer}"
    ax_map.set_title(f"predicted all-to-all, GPU x GPU ({scope}; red lines: node boundaries)\n{plan.label}: "
                     f"{cost.placement_method} on {topo.name}", fontsize=10)
    ax_map.set_xlabel(f"destination rank (0..{num_gpus - 1})")
    ax_map.set_ylabel("source rank")

    table = report.links
    links, series, _ = plotted_series(report)
    busy = table.busy[links]
    colors = ["tab:red" if k == table.bottleneck else "tab:blue" for k in links]
    y = np.arange(links.size)
    ax_bar.barh(y, busy, color=colors, label=f"{plan.label} (bottleneck in red)")
    styles = iter(zip(("o", "s", "^", "D", "v", "P", "X", "*"),
                      ("tab:orange", "tab:green", "tab:purple", "tab:brown", "tab:pink", "tab:olive", "tab:cyan",
                       "tab:gray")))
    for label, values in list(series.items())[1:]:
        marker, color = ("x", "black") if label.startswith("measured") else next(styles, ("o", "tab:gray"))
        ax_bar.scatter(values, y, marker=marker, color=color, s=30, zorder=3, label=label)
    ax_bar.set_yticks(y, [f"{topo.link_name(int(k))} ({CLASS_LABELS.get(topo.link_class[k], '')})"
                          for k in links], fontsize=7)
    ax_bar.invert_yaxis()
    period = "step" if report.layer is None else "layer"
    ax_bar.set_xlabel(f"busy: link time / {period} time ({fmt_time(table.period_s)})")
    if report.layer is None:
        ax_bar.axvline(BANDWIDTH_TARGET, color="gray", ls="--", lw=1, label="80 % utilisation target")
    top = max([float(v.max()) for v in series.values() if v.size] or [0.0])
    if links.size:
        k = table.bottleneck
        ax_bar.annotate(f"bottleneck: {fmt_bytes(table.total_bytes[k])}, {fmt_time(table.time_s[k])}",
                        xy=(max(float(v[0]) for v in series.values()), 0), xytext=(8, 0), textcoords="offset points", va="center",
                        fontsize=8, color="tab:red")
        ax_bar.set_xlim(0, max(top * 1.45, BANDWIDTH_TARGET * 1.1 if report.layer is None else 0))
    ax_bar.legend(loc="lower right", fontsize=7)
    ax_bar.set_title(f"hottest {links.size} links", fontsize=10)
    fig.tight_layout()
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        atomic_write_bytes(path, buffer.getvalue())  # a failed write leaves an existing file as it was
    except OSError as exc:
        raise ReportError(f"{param('plot', path)}: cannot write: {exc.strerror or exc}") from None
    return path
