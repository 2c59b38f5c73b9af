"""The predicted half of a report: per-link, per-link-class and per-GPU tables of one ``Cost``.

Pure functions of what ``epplan.cost.evaluate`` returns (plus, for the GPU x GPU heatmap, the
placement and problem it scored): no files, no printing.

Shape legend: L = MoE layers, G = GPUs (ranks), K = directed links.

A link's bytes per step are split into four components that sum to ``Cost.link_step_bytes``:

dispatch     ``a2a_passes`` * ``dispatch_fwd_bytes``: tokens travelling to their experts (source
             -> expert's rank) in the forward pass, and the combine's gradient in the backward
             pass, which travels the same way (passes 2; 3 under block recompute, whose
             recompute dispatches again).
combine      ``a2a_passes`` * ``combine_fwd_bytes``: expert outputs travelling back forward, and
             the dispatch's gradient in the backward pass.
expert_sync  the gradient all-reduce rings among each expert's replicas (whole step only).
dense_sync   the data-parallel ring of the dense parameters (whole step only).

With ``layer`` given, only that MoE layer's all-to-all counts: gradient synchronisation is
bucketed over all layers and has no per-layer share. A link's time is bytes / capacity;
``vs_bottleneck`` is that time over the hottest link's; ``busy`` is it over the step time (the
layer's time with ``layer``), i.e. the fraction of the step the link moves data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from epplan.cost import Cost
from epplan.errors import param, ReportError
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import Placement

COMPONENTS = ("dispatch", "combine", "expert_sync", "dense_sync")
CLASS_LABELS = {
    "nvlink": "NVLink", "xgmi": "xGMI", "pcie": "PCIe", "socket": "socket", "nic_up": "NIC up",
    "nic_down": "NIC down", "leaf_spine": "leaf-spine", "spine_core": "spine-core", "fabric": "fabric",
}


def check_layer(cost: Cost, layer: int | None) -> None:
    if layer is not None and not 0 <= layer < cost.num_layers:
        raise ReportError(f"{param('layer', layer)}: the model has MoE layers 0..{cost.num_layers - 1}")


def component_bytes(cost: Cost, layer: int | None = None) -> dict[str, np.ndarray]:
    """Component -> float64[K] bytes on each link per step (see the module docstring)."""
    check_layer(cost, layer)
    num_links = cost.topology.num_links
    if layer is None:
        dispatch = cost.dispatch_fwd_bytes.sum(axis=0, dtype=np.float64)
        combine = cost.combine_fwd_bytes.sum(axis=0, dtype=np.float64)
        expert_sync = cost.expert_sync_bytes.astype(np.float64)
        dense_sync = cost.dense_sync_bytes.astype(np.float64)
    else:
        dispatch = cost.dispatch_fwd_bytes[layer].astype(np.float64)
        combine = cost.combine_fwd_bytes[layer].astype(np.float64)
        expert_sync = dense_sync = np.zeros(num_links)
    # forward and backward; under block recompute the forward's exchanges run again (a2a_passes 3)
    passes = float(cost.a2a_passes)
    return {"dispatch": passes * dispatch, "combine": passes * combine,
            "expert_sync": expert_sync, "dense_sync": dense_sync}


@dataclass
class LinkTable:
    """Every link's predicted load, hottest first.

    order: int64[K] link indices sorted by time, descending (ties: lower index first).
    bytes: component -> float64[K] per link (indexed by link, not by ``order``).
    total_bytes, time_s, vs_bottleneck, busy: float64[K], indexed by link.
    period_s: the step time, or the layer's time when ``layer`` is set.
    """

    layer: int | None
    order: np.ndarray
    bytes: dict[str, np.ndarray]
    total_bytes: np.ndarray
    time_s: np.ndarray
    vs_bottleneck: np.ndarray
    busy: np.ndarray
    period_s: float

    @property
    def bottleneck(self) -> int:
        return int(self.order[0])

    @property
    def bottleneck_s(self) -> float:
        return float(self.time_s[self.bottleneck])


def link_table(cost: Cost, layer: int | None = None) -> LinkTable:
    """The per-link table of the whole step (``layer`` None) or of one MoE layer."""
    parts = component_bytes(cost, layer)
    if layer is None:
        total = cost.link_step_bytes  # the cost function's own sum
        period = cost.step_time_s
    else:
        total = parts["dispatch"] + parts["combine"]
        period = float(cost.layer_time_s[layer])
    time_s = total / cost.capacity_bytes_per_s
    order = np.argsort(-time_s, kind="stable")
    peak = float(time_s[order[0]])
    vs = time_s / peak if peak > 0 else np.zeros_like(time_s)
    return LinkTable(layer, order, parts, total, time_s, vs, time_s / period, period)


def link_row(cost: Cost, table: LinkTable, k: int) -> dict:
    """One link of ``table`` as a JSON-ready dict."""
    topo = cost.topology
    src, dst = topo.links[k]
    row = {"index": int(k), "src": src, "dst": dst, "class": topo.link_class[k],
           "capacity_gbps": float(topo.link_capacity[k])}
    row.update({f"{c}_bytes": float(table.bytes[c][k]) for c in COMPONENTS})
    row.update({"total_bytes": float(table.total_bytes[k]), "time_s": float(table.time_s[k]),
                "vs_bottleneck": float(table.vs_bottleneck[k]), "busy": float(table.busy[k])})
    return row


@dataclass
class ClassRow:
    """One link class: how many links, their summed and largest load, the hottest of them."""

    cls: str
    num_links: int
    capacity_gbps: tuple[float, float]  # (min, max) over the class's links
    total_bytes: float
    max_bytes: float
    max_time_s: float
    vs_bottleneck: float
    hottest: int

    def to_dict(self, cost: Cost) -> dict:
        return {"class": self.cls, "num_links": self.num_links,
                "capacity_gbps_min": self.capacity_gbps[0], "capacity_gbps_max": self.capacity_gbps[1],
                "total_bytes": self.total_bytes, "max_bytes": self.max_bytes,
                "max_time_s": self.max_time_s, "vs_bottleneck": self.vs_bottleneck,
                "hottest_link": cost.topology.link_name(self.hottest)}


def class_summary(cost: Cost, table: LinkTable) -> list[ClassRow]:
    """Per link class present in the topology, hottest class first."""
    cap = np.asarray(cost.topology.link_capacity, dtype=np.float64)
    rows = []
    for cls, idx in cost.topology.link_class_index.items():
        k = int(idx[np.argmax(table.time_s[idx])])
        rows.append(ClassRow(cls, int(idx.size), (float(cap[idx].min()), float(cap[idx].max())),
                             float(table.total_bytes[idx].sum()), float(table.total_bytes[idx].max()),
                             float(table.time_s[k]), float(table.vs_bottleneck[k]), k))
    rows.sort(key=lambda r: -r.max_time_s)
    return rows


@dataclass
class GpuTable:
    """Per GPU, busiest expert compute first.

    order: int64[G] ranks sorted by expert_s, descending.
    assignments: float64[G, L'] token-assignments each GPU's experts serve, per MoE layer
        (L' = 1 with ``layer``).
    experts: per rank, the experts it holds a replica of (in ``layer``; all layers: count).
    expert_s: float64[G] expert compute (fwd + bwd), summed over the layers shown.
    compute_s: float64[G] all compute of the step on the GPU (dense + expert + other), or of
        the layer.
    memory_bytes, capacity_bytes: float64[G] (the whole step; memory has no per-layer view).
    """

    layer: int | None
    order: np.ndarray
    assignments: np.ndarray
    experts: list
    expert_s: np.ndarray
    compute_s: np.ndarray
    memory_bytes: np.ndarray
    capacity_bytes: np.ndarray


def gpu_table(cost: Cost, placement: Placement, layer: int | None = None) -> GpuTable:
    check_layer(cost, layer)
    layers = range(cost.num_layers) if layer is None else [layer]
    rows = list(layers)
    assignments = cost.expert_assignments[rows].T.copy()                      # [G, L']
    expert_s = cost.expert_compute_s[rows].sum(axis=0)
    compute_s = expert_s + cost.dense_compute_s[rows].sum(axis=0)
    if layer is None:
        compute_s = compute_s + cost.other_compute_s
        held = np.zeros(cost.num_gpus, dtype=np.int64)
        for lp in placement.layers:
            for ranks in lp.replicas:
                held[np.asarray(ranks)] += 1
        experts: list = held.tolist()
    else:
        experts = placement.layers[layer].experts_on_rank(cost.num_gpus)
    order = np.argsort(-expert_s, kind="stable")
    return GpuTable(layer, order, assignments, experts, expert_s, compute_s,
                    cost.memory_bytes.copy(), cost.memory_capacity_bytes.copy())


def gpu_row(cost: Cost, table: GpuTable, g: int) -> dict:
    topo = cost.topology
    row = {"rank": int(g), "gpu": topo.gpu_names[g], "node": topo.node_names[int(topo.gpu_node[g])]}
    if table.layer is None:
        row["replicas_held"] = int(table.experts[g])
    else:
        row["experts"] = [int(e) for e in table.experts[g]]
    row.update({"assignments_per_layer": [float(v) for v in table.assignments[g]],
                "expert_s": float(table.expert_s[g]), "compute_s": float(table.compute_s[g]),
                "memory_bytes": float(table.memory_bytes[g]),
                "memory_capacity_bytes": float(table.capacity_bytes[g])})
    return row


def pair_bytes(placement: Placement, problem: PlacementProblem, layer: int | None = None) -> np.ndarray:
    """float64[G, G] predicted all-to-all bytes per step from GPU s to GPU t, both passes:
    2 b (F + F^T) per layer, summed over the layers shown (diagonal: zero, nothing leaves)."""
    counts = problem.traffic.counts
    b = float(problem.bytes_per_assignment)
    layers = range(problem.num_layers) if layer is None else [layer]
    out = np.zeros((problem.num_gpus, problem.num_gpus))
    done: dict[int, np.ndarray] = {}  # baselines reuse one layer object: one flows() each
    for li in layers:
        lp = placement.layers[li]
        key = id(lp)
        if key in done and np.array_equal(counts[li], counts[done[key][0]]):
            out += done[key][1]
            continue
        flows = lp.flows(counts[li])                               # [G, G]
        both = 2.0 * b * (flows + flows.T)
        done[key] = (li, both)
        out += both
    np.fill_diagonal(out, 0.0)
    return out
