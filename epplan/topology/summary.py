"""Facts about a topology that ``epplan topo show`` prints: counts, link classes, bandwidths."""

from __future__ import annotations

from typing import Any

import networkx as nx
import numpy as np

from epplan.topology.build import Topology


def bisection_gbps(topo: Topology) -> float:
    """Max-flow between the first and second half of the cluster, GB/s per direction.

    Halves are whole nodes in rank order (for a single node, GPUs in rank order): on the fabrics
    we generate that is the cut through the top tier, so it is the bisection bandwidth.
    """
    g = topo.graph.copy()
    if topo.num_nodes > 1:
        first = topo.gpu_node < topo.num_nodes // 2
    else:
        first = np.arange(topo.num_gpus) < topo.num_gpus // 2
    for rank, name in enumerate(topo.gpu_names):
        if first[rank]:
            g.add_edge("__src__", name)  # no capacity attribute: unbounded
        else:
            g.add_edge(name, "__dst__")
    if not first.any() or first.all():
        return 0.0
    return float(nx.maximum_flow_value(g, "__src__", "__dst__", capacity="capacity",
                                       flow_func=nx.algorithms.flow.preflow_push))


def injection_gbps(topo: Topology) -> tuple[np.ndarray, np.ndarray]:
    """Per GPU: (intra-node, inter-node) injection bandwidth in GB/s per direction.

    Intra: the capacity of the GPU's links into its server fabric (NVLink/PCIe, bridges
    included). Inter: the node's working NIC bandwidth shared by its GPUs.
    """
    graph = topo.graph
    kinds = dict(graph.nodes(data="kind"))
    intra = np.zeros(topo.num_gpus)
    for rank, gpu in enumerate(topo.gpu_names):
        intra[rank] = sum(d["capacity"] for _, v, d in graph.out_edges(gpu, data=True) if kinds[v] != "nic")
    node_nic = np.zeros(topo.num_nodes)
    for c in range(topo.paths.num_nics):
        up = topo.paths.nic_up[c]
        if up >= 0:
            node_nic[topo.paths.nic_node[c]] += topo.link_capacity[up]
    per_node_gpus = np.bincount(topo.gpu_node, minlength=topo.num_nodes)
    inter = node_nic[topo.gpu_node] / per_node_gpus[topo.gpu_node]
    return intra, inter


def summarize(topo: Topology) -> dict[str, Any]:
    """A JSON-ready summary of a topology."""
    classes = []
    for cls, idx in topo.link_class_index.items():
        cap = topo.link_capacity[idx]
        classes.append({
            "class": cls, "links": int(idx.size), "min_gbps": float(cap.min()),
            "max_gbps": float(cap.max()), "total_gbps": float(cap.sum()),
        })
    kinds = dict(topo.graph.nodes(data="kind"))
    device_counts: dict[str, int] = {}
    for k in kinds.values():
        device_counts[k] = device_counts.get(k, 0) + 1
    node_type_counts: dict[str, int] = {}
    for t in topo.node_types:
        node_type_counts[t] = node_type_counts.get(t, 0) + 1
    intra, inter = injection_gbps(topo)
    bisection = bisection_gbps(topo)
    half_injection = float(inter[topo.gpu_node < topo.num_nodes // 2].sum()) if topo.num_nodes > 1 else 0.0
    fabric = topo.spec.fabric
    return {
        "name": topo.name,
        "description": topo.spec.description,
        "source": topo.source,
        "content_hash": topo.content_hash,
        "routing": topo.routing,
        "fabric": fabric.kind if fabric is not None else "none",
        "nodes": topo.num_nodes,
        "gpus": topo.num_gpus,
        "node_types": node_type_counts,
        "gpu_models": sorted({topo.node_type(n).gpu.model for n in range(topo.num_nodes)}),
        "gpu_memory_gb_total": float(topo.gpu_memory_gb.sum()),
        "devices": device_counts,
        "directed_links": topo.num_links,
        "link_classes": classes,
        "bisection_gbps": bisection,
        # Bisection relative to what the first half's NICs can inject: 1.0 is non-blocking.
        "bisection_ratio": bisection / half_injection if half_injection else None,
        "injection_gbps_per_gpu": {
            "intra_node": {"min": float(intra.min()), "max": float(intra.max())},
            "inter_node": {"min": float(inter.min()), "max": float(inter.max())},
        },
    }
