"""Building the cluster graph: ``TopologySpec`` -> ``Topology`` (a networkx DiGraph + arrays).

Devices are graph nodes named ``NODE/gpuI``, ``NODE/nvswitch``, ``NODE/pcieK``, ``NODE/cpuC``,
``NODE/nicR`` inside servers and ``switch``, ``suS/leafR``, ``spineK``, ``suS/spineK``, ``coreK``
(or the explicit names) in the fabric. Node attribute ``kind`` is one of ``gpu nvswitch
pcie_switch cpu nic leaf spine core switch``. Every cable is two directed edges, each with
``capacity`` (GB/s), ``latency_us``, ``cls`` (link class) and ``idx`` (its position in
``Topology.links``).

Shape legend: G = GPUs (ranks), L = directed links, N = nodes (servers).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np

from epplan.errors import TopologyError
from epplan.topology.load import expand_nodes, read_spec, resolve_node_type
from epplan.topology.schema import (
    ExplicitFabric, NodeType, NVSwitchFabric, PCIeFabric, RailOptimizedFabric, SwitchFabric,
    ThreeTierFabric, TopologySpec, XGMIFabric,
)

if TYPE_CHECKING:  # for the annotation only: the path model is imported where it is first built
    from epplan.topology.paths import PathModel

LINK_CLASSES = ("nvlink", "xgmi", "pcie", "socket", "nic_up", "nic_down", "leaf_spine", "spine_core", "fabric")


@dataclass
class Topology:
    """A cluster: its graph, GPU ranks, per-link arrays and the path model.

    gpu_node:  int64[G]   node index of each rank (ranks are node-major, local index minor)
    gpu_local: int64[G]   local GPU index within its node
    link_capacity: float64[L] GB/s per direction;  link_latency_us: float64[L]
    link_class: list[str] of length L, one of ``LINK_CLASSES``
    """

    name: str
    spec: TopologySpec
    graph: nx.DiGraph
    node_names: list[str]
    node_types: list[str]
    gpu_names: list[str]
    gpu_node: np.ndarray
    gpu_local: np.ndarray
    links: list[tuple[str, str]]
    link_capacity: np.ndarray
    link_latency_us: np.ndarray
    link_class: list[str]
    routing: str
    content_hash: str = ""
    source: str = ""
    _paths: object = field(default=None, repr=False)

    @property
    def num_gpus(self) -> int:
        return len(self.gpu_names)

    @property
    def num_nodes(self) -> int:
        return len(self.node_names)

    @property
    def num_links(self) -> int:
        return len(self.links)

    def node_type(self, node: int) -> NodeType:
        return resolve_node_type(self.spec, self.node_types[node])

    @cached_property
    def gpu_memory_gb(self) -> np.ndarray:
        """float64[G] GPU memory of each rank."""
        return np.array([self.node_type(n).gpu.memory_gb for n in self.gpu_node])

    @cached_property
    def gpu_tflops(self) -> np.ndarray:
        """float64[G] datasheet dense bf16 TFLOP/s of each rank."""
        return np.array([self.node_type(n).gpu.bf16_tflops for n in self.gpu_node])

    @cached_property
    def link_class_index(self) -> dict[str, np.ndarray]:
        """class -> int64 indices of its links."""
        classes = np.array(self.link_class)
        return {c: np.flatnonzero(classes == c) for c in LINK_CLASSES if np.any(classes == c)}

    @property
    def paths(self) -> PathModel:
        """The ``PathModel``: how traffic between GPU pairs spreads over links (built lazily)."""
        if self._paths is None:
            from epplan.topology.paths import PathModel

            self._paths = PathModel(self)
        return self._paths

    def link_loads(self, traffic: np.ndarray) -> np.ndarray:
        """float64[L] bytes (or any unit) on each link for a [G, G] traffic matrix (its diagonal
        ignored): ``epplan.cost.linkmap``, the one map from traffic to link loads."""
        from epplan.cost.linkmap import link_map

        return link_map(self).loads(traffic)

    def link_name(self, idx: int) -> str:
        u, v = self.links[idx]
        return f"{u} -> {v}"


class _GraphBuilder:
    def __init__(self) -> None:
        self.graph = nx.DiGraph()
        self.links: list[tuple[str, str]] = []
        self.capacity: list[float] = []
        self.latency: list[float] = []
        self.cls: list[str] = []

    def device(self, name: str, kind: str, **attrs) -> str:
        assert name not in self.graph, f"device {name} added twice"
        self.graph.add_node(name, kind=kind, **attrs)
        return name

    def edge(self, u: str, v: str, gbps: float, latency_us: float, cls: str) -> None:
        assert cls in LINK_CLASSES
        if self.graph.has_edge(u, v):  # parallel cables add up
            idx = self.graph.edges[u, v]["idx"]
            self.capacity[idx] += gbps
            self.graph.edges[u, v]["capacity"] = self.capacity[idx]
            return
        self.graph.add_edge(u, v, capacity=gbps, latency_us=latency_us, cls=cls, idx=len(self.links))
        self.links.append((u, v))
        self.capacity.append(gbps)
        self.latency.append(latency_us)
        self.cls.append(cls)

    def cable(self, a: str, b: str, gbps: float, latency_us: float, cls_ab: str, cls_ba: str | None = None) -> None:
        self.edge(a, b, gbps, latency_us, cls_ab)
        self.edge(b, a, gbps, latency_us, cls_ba or cls_ab)


def build_topology(spec: TopologySpec, content_hash: str = "", source: str = "",
                   routing: str | None = None) -> Topology:
    """Build the graph of a checked spec. ``routing`` overrides the file's ``routing``."""
    routing = routing or spec.routing
    if routing not in ("ecmp", "rail_aligned"):
        raise TopologyError(f"routing {routing!r} unknown; use 'ecmp' or 'rail_aligned'")
    b = _GraphBuilder()
    nodes = expand_nodes(spec)
    gpu_names: list[str] = []
    gpu_node: list[int] = []
    gpu_local: list[int] = []
    nics: list[tuple[str, int, int]] = []  # (device name, node index, rail)
    for n, (name, tname, disabled) in enumerate(nodes):
        ntype = resolve_node_type(spec, tname)
        gpus = [b.device(f"{name}/gpu{i}", "gpu", node=n, local=i, rank=len(gpu_names) + i)
                for i in range(ntype.gpus)]
        gpu_names += gpus
        gpu_node += [n] * ntype.gpus
        gpu_local += list(range(ntype.gpus))
        attach_point = _intra_node(b, name, n, ntype, gpus)
        if ntype.nics is not None:
            for r, gpu in enumerate(ntype.nics.attach):
                if r in disabled:
                    continue
                nic = b.device(f"{name}/nic{r}", "nic", node=n, rail=r, gpu=gpu)
                b.cable(attach_point[gpu], nic, ntype.nics.pcie_gbps, ntype.nics.latency_us, "pcie")
                nics.append((nic, n, r))
    _fabric(b, spec, nodes, nics)
    return Topology(
        name=spec.name, spec=spec, graph=b.graph,
        node_names=[n[0] for n in nodes], node_types=[n[1] for n in nodes],
        gpu_names=gpu_names, gpu_node=np.array(gpu_node, dtype=np.int64),
        gpu_local=np.array(gpu_local, dtype=np.int64), links=b.links,
        link_capacity=np.array(b.capacity, dtype=np.float64),
        link_latency_us=np.array(b.latency, dtype=np.float64), link_class=b.cls,
        routing=routing, content_hash=content_hash, source=source,
    )


def _intra_node(b: _GraphBuilder, name: str, n: int, ntype: NodeType, gpus: list[str]) -> list[str]:
    """Add the server's internal fabric; return, per local GPU, the device its NIC plugs into."""
    fabric = ntype.fabric
    if isinstance(fabric, NVSwitchFabric):
        sw = b.device(f"{name}/nvswitch", "nvswitch", node=n)
        for gpu in gpus:
            b.cable(gpu, sw, fabric.gbps, fabric.latency_us, "nvlink")
        # On HGX boards each NIC shares a PCIe switch with its GPU (GPUDirect RDMA): model the
        # pair as a direct GPU<->NIC PCIe link.
        return list(gpus)
    if isinstance(fabric, XGMIFabric):
        # A full mesh: one cable per GPU pair. Each NIC sits on its GPU's PCIe switch, as on HGX.
        for i, gi in enumerate(gpus):
            for gj in gpus[i + 1:]:
                b.cable(gi, gj, fabric.gbps, fabric.latency_us, "xgmi")
        return list(gpus)
    assert isinstance(fabric, PCIeFabric)
    switches = [b.device(f"{name}/pcie{k}", "pcie_switch", node=n) for k in range(len(fabric.switches))]
    sockets_of = fabric.sockets if fabric.sockets is not None else [list(range(len(switches)))]
    cpus = [b.device(f"{name}/cpu{c}", "cpu", node=n) for c in range(len(sockets_of))]
    attach = [""] * len(gpus)
    for k, members in enumerate(fabric.switches):
        for i in members:
            b.cable(gpus[i], switches[k], fabric.gpu_gbps, fabric.latency_us, "pcie")
            attach[i] = switches[k]
    for c, sws in enumerate(sockets_of):
        for k in sws:
            b.cable(switches[k], cpus[c], fabric.uplink_gbps, fabric.latency_us, "pcie")
    for c in range(len(cpus)):
        for d in range(c + 1, len(cpus)):
            b.cable(cpus[c], cpus[d], fabric.socket_gbps, fabric.latency_us, "socket")
    for i, j in fabric.nvlink_bridges:
        b.cable(gpus[i], gpus[j], fabric.bridge_gbps, fabric.latency_us, "nvlink")
    return attach


def _fabric(b: _GraphBuilder, spec: TopologySpec,
            nodes: list[tuple[str, str, tuple[int, ...]]], nics: list[tuple[str, int, int]]) -> None:
    fabric = spec.fabric
    if fabric is None:
        return

    def nic_gbps(node: int) -> float:
        return resolve_node_type(spec, nodes[node][1]).nics.gbps

    if isinstance(fabric, SwitchFabric):
        sw = b.device("switch", "switch")
        for nic, n, _ in nics:
            b.cable(nic, sw, nic_gbps(n), fabric.latency_us, "nic_up", "nic_down")
        return
    if isinstance(fabric, ExplicitFabric):
        for s in fabric.switches:
            b.device(s.name, s.kind)
        kinds = nx.get_node_attributes(b.graph, "kind")
        for link in fabric.links:
            ka, kb = kinds[link.a], kinds[link.b]
            cls_ab = _explicit_class(ka, kb)
            cls_ba = _explicit_class(kb, ka)
            b.edge(link.a, link.b, link.gbps, link.latency_us, cls_ab)
            if not link.one_way:
                b.edge(link.b, link.a, link.gbps, link.latency_us, cls_ba)
        return

    assert isinstance(fabric, (RailOptimizedFabric, ThreeTierFabric))
    per_su = fabric.nodes_per_su
    num_su = -(-len(nodes) // per_su)
    rails = max((len(resolve_node_type(spec, t).nics.attach) for _, t, _ in nodes), default=0)
    ref_gbps = max(nic_gbps(n) for _, n, _ in nics)
    leaves = {}
    for su in range(num_su):
        for r in range(rails):
            leaves[su, r] = b.device(f"su{su}/leaf{r}", "leaf", su=su, rail=r)
    for nic, n, r in nics:
        b.cable(nic, leaves[n // per_su, r], nic_gbps(n), fabric.latency_us, "nic_up", "nic_down")
    # A leaf's downlink capacity is nodes_per_su NIC ports; uplinks carry that / oversubscription.
    leaf_up = per_su * ref_gbps / fabric.oversubscription
    if isinstance(fabric, RailOptimizedFabric):
        spines = [b.device(f"spine{k}", "spine") for k in range(fabric.spines)]
        for leaf in leaves.values():
            for spine in spines:
                b.cable(leaf, spine, leaf_up / len(spines), fabric.latency_us, "leaf_spine")
        return
    cores = [b.device(f"core{k}", "core") for k in range(fabric.cores)]
    spine_down = rails * leaf_up / fabric.spines_per_su  # what each spine receives from its SU
    for su in range(num_su):
        spines = [b.device(f"su{su}/spine{k}", "spine", su=su) for k in range(fabric.spines_per_su)]
        for r in range(rails):
            for spine in spines:
                b.cable(leaves[su, r], spine, leaf_up / len(spines), fabric.latency_us, "leaf_spine")
        for spine in spines:
            for core in cores:
                b.cable(spine, core, spine_down / fabric.core_oversubscription / len(cores),
                        fabric.latency_us, "spine_core")


def _explicit_class(ka: str, kb: str) -> str:
    if ka == "nic":
        return "nic_up"
    if kb == "nic":
        return "nic_down"
    if {ka, kb} == {"leaf", "spine"}:
        return "leaf_spine"
    if {ka, kb} == {"spine", "core"}:
        return "spine_core"
    return "fabric"


def load_topology(path: str | Path, routing: str | None = None) -> Topology:
    """Read, validate and build a topology file (``read_spec``, then ``build_topology``)."""
    spec, digest = read_spec(path)
    return build_topology(spec, content_hash=digest, source=str(path), routing=routing)
