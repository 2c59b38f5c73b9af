"""``write_plot(report, path)``: a PNG with a GPU x GPU traffic heatmap and the hottest links.

Headless: the Agg backend, set on the figure itself (no pyplot, no global state).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from epplan.fileio import atomic_write_bytes
from epplan.report.build import Report
from epplan.report.predicted import CLASS_LABELS, ReportError, pair_bytes
from epplan.report.render import fmt_bytes

BANDWIDTH_TARGET = 0.80
_MAX_BARS = 30


def write_plot(report: Report, path: str | Path) -> Path:
    """Draw ``report``'s heatmap (predicted all-to-all bytes per GPU pair) and bar chart (busy
    fraction of the hottest links, the bottleneck in red) into ``path`` (PNG)."""
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ReportError(f"--plot {path}: write a .png file")
    plan = report.plan
    cost, topo = plan.cost, plan.cost.topology
    traffic = pair_bytes(plan.placement, plan.problem, report.layer)  # [G, G]

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
    if 0 < nodes.size <= 64:
        for x in nodes:
            ax_map.axhline(x, color="white", lw=0.4, alpha=0.6)
            ax_map.axvline(x, color="white", lw=0.4, alpha=0.6)
    scope = "step" if report.layer is None else f"MoE layer {report.layer}"
    ax_map.set_title(f"predicted all-to-all, GPU x GPU ({scope})\n{plan.label}: {cost.placement_method} "
                     f"on {topo.name}", fontsize=10)
    ax_map.set_xlabel(f"destination rank (0..{num_gpus - 1})")
    ax_map.set_ylabel("source rank")

    table = report.links
    links = table.order[:min(report.top or _MAX_BARS, _MAX_BARS)]
    busy = table.busy[links]
    colors = ["tab:red" if k == table.bottleneck else "tab:blue" for k in links]
    y = np.arange(links.size)
    ax_bar.barh(y, busy, color=colors)
    ax_bar.set_yticks(y, [f"{topo.link_name(int(k))} ({CLASS_LABELS.get(topo.link_class[k], '')})"
                          for k in links], fontsize=7)
    ax_bar.invert_yaxis()
    period = "step" if report.layer is None else "layer"
    ax_bar.set_xlabel(f"busy: link time / {period} time")
    if report.layer is None:
        ax_bar.axvline(BANDWIDTH_TARGET, color="gray", ls="--", lw=1)
        ax_bar.text(BANDWIDTH_TARGET, 0.01, " 80 % target", color="gray", fontsize=7, va="bottom",
                    transform=ax_bar.get_xaxis_transform())
    if links.size:
        k = table.bottleneck
        ax_bar.annotate(f"bottleneck: {fmt_bytes(table.total_bytes[k])}, {table.time_s[k]:.3g} s",
                        xy=(busy[0], 0), xytext=(6, 0), textcoords="offset points", va="center",
                        fontsize=8, color="tab:red")
        ax_bar.set_xlim(0, max(float(busy.max()) * 1.35, BANDWIDTH_TARGET * 1.1 if report.layer is None else 0))
    ax_bar.set_title(f"hottest {links.size} links (bottleneck in red)", fontsize=10)
    fig.tight_layout()
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")
        atomic_write_bytes(path, buffer.getvalue())  # a failed write leaves an existing file as it was
    except OSError as exc:
        raise ReportError(f"--plot {path}: cannot write: {exc.strerror or exc}") from None
    return path
