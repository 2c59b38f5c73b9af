"""``epplan topo import``: epplan topology files from what clusters already describe themselves with.

- **NCCL topology XML** (what ``NCCL_TOPO_DUMP_FILE`` writes and ``NCCL_TOPO_FILE`` reads; cloud
  vendors publish theirs): one server. ``<gpu>`` elements under ``<pci>`` bridges under ``<cpu>``
  sockets; ``<nvlink target=BUSID count=N tclass=...>`` (tclass 0x068000: an NVSwitch); ``<net>``
  under ``<nic>`` with ``speed`` in Mb/s; ``link_speed`` (GT/s) and ``link_width`` on ``<pci>``.
- **``nvidia-smi topo -m``** output: one server. ``NV#`` cells (# bonded NVLinks), PCIe relations
  (PIX < PXB < PHB < NODE < SYS) between GPUs and NICs, the NIC legend, NUMA affinity. It gives
  no bandwidths: the GPU model (``--gpu``, else guessed from the NVLink count) and the NIC speed
  (``--nic-gbps``) are assumptions, and the import says so.
- **Slurm ``topology.conf``** (``topology/tree``): the inter-node switches. ``SwitchName=S
  Nodes=HOSTLIST`` for leaves, ``SwitchName=S Switches=LIST`` above them; becomes an ``explicit``
  fabric whose nodes are the listed hosts, each of the imported (or ``--node-type``) server type.

Shape of the result: one node type (from the server file, or a built-in), the nodes, the fabric.
Every assumption is returned beside the YAML, one line each, and written into its header.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from epplan.errors import param, TopologyError
from epplan.topology.library import A100_SXM, B200, H100_SXM, H200_SXM, NODE_TYPES
from epplan.topology.load import parse_spec
from epplan.topology.schema import GPUSpec, NICSpec, NodeType, NVSwitchFabric, PCIeFabric
from epplan.topology.units import parse_bandwidth

# GPU models by name (for --gpu), with NVLink GB/s per link per direction and PCIe GB/s (x16).
GPUS: dict[str, tuple[GPUSpec, float, float]] = {
    "a100": (A100_SXM, 25.0, 32.0), "h100": (H100_SXM, 25.0, 64.0),
    "h200": (H200_SXM, 25.0, 64.0), "b200": (B200, 50.0, 64.0),
}
_BY_SM = {80: "a100", 90: "h100", 100: "b200"}
_BY_PCI_DEVICE = {"0x20b0": "a100", "0x20b2": "a100", "0x2330": "h100", "0x2335": "h200"}
_NVSWITCH_CLASS = "0x068000"
_PCI_RANK = {"PIX": 0, "PXB": 1, "PHB": 2, "NODE": 3, "SYS": 4}
DEFAULT_NIC = "400Gb/s"


@dataclass
class Imported:
    """The topology file text and what was assumed to write it."""

    text: str
    assumptions: list[str] = field(default_factory=list)


@dataclass
class _Server:
    ntype: NodeType
    type_name: str


def import_topology(
    files: list[Path], *, name: str | None = None, nodes: int | None = None, node_type: str | None = None,
    gpu: str | None = None, nic_gbps: str | float | None = None,
) -> Imported:
    """An epplan topology from server files (NCCL XML or nvidia-smi) and a Slurm topology.conf."""
    notes: list[str] = []
    server: _Server | None = None
    slurm: list[dict[str, Any]] | None = None
    for path in files:
        text = _read(path)
        kind = detect(text)
        if kind == "slurm":
            if slurm is not None:
                raise TopologyError(f"{path}: a second Slurm topology.conf; give one")
            slurm = parse_slurm(text, str(path))
            continue
        if server is not None:
            raise TopologyError(f"{path}: a second server description; give one NCCL XML or nvidia-smi "
                                "file (every node is of that type)")
        ntype = (nccl_xml_node(text, str(path), gpu, nic_gbps, notes) if kind == "nccl"
                 else nvidia_smi_node(text, str(path), gpu, nic_gbps, notes))
        server = _Server(ntype, "imported")
    if server is None:
        if node_type is None:
            raise TopologyError("no server file (NCCL XML or nvidia-smi topo -m) given: name a built-in "
                                f"server type with {param('node_type')} ({', '.join(NODE_TYPES)})")
        if node_type not in NODE_TYPES:
            raise TopologyError(f"{param('node_type')}: unknown node type {node_type!r}; built-in: {', '.join(NODE_TYPES)}")
        server = _Server(NODE_TYPES[node_type], node_type)
    elif node_type is not None:
        raise TopologyError(f"{param('node_type')} and a server file both describe the servers; give one")

    doc: dict[str, Any] = {"name": name or "imported", "description": "written by epplan topo import"}
    if server.type_name == "imported":
        doc["node_types"] = {"imported": server.ntype.model_dump(exclude_none=True)}
    if slurm is not None:
        if nodes is not None:
            raise TopologyError(f"{param('nodes')} and a Slurm topology.conf both give the nodes; give one")
        doc["nodes"], doc["fabric"] = _slurm_fabric(slurm, server, notes)
    else:
        count = nodes or 1
        doc["nodes"] = [{"prefix": "node", "count": count, "type": server.type_name}]
        if count > 1:
            doc["fabric"] = {"kind": "switch"}
            notes.append(f"{count} nodes on one non-blocking switch (no Slurm topology.conf given)")
    doc["routing"] = "ecmp"
    header = "".join(f"# assumed: {n}\n" for n in notes)
    text = "# Written by `epplan topo import`.\n" + header + yaml.safe_dump(doc, sort_keys=False)
    parse_spec(text, source="imported topology")  # fail here, not when the user loads it
    return Imported(text, notes)


def detect(text: str) -> str:
    """'nccl', 'nvidia-smi' or 'slurm' by content; a TopologyError if none."""
    stripped = text.lstrip()
    if stripped.startswith("<") and "<system" in text:
        return "nccl"
    if re.search(r"^\s*SwitchName\s*=", text, re.MULTILINE | re.IGNORECASE):
        return "slurm"
    if re.search(r"^\s*GPU0\b", text, re.MULTILINE):
        return "nvidia-smi"
    raise TopologyError("not a topology description epplan imports: expected an NCCL topology XML "
                        "(<system ...>), 'nvidia-smi topo -m' output or a Slurm topology.conf (SwitchName=...)")


def _read(path: Path) -> str:
    from epplan.inputs import MiB, read_text

    return read_text(path, "topology description", TopologyError, 64 * MiB)


def _gpu_model(name: str | None, guess: str, why: str, notes: list[str]) -> tuple[GPUSpec, float, float]:
    if name is not None:
        if name.lower() not in GPUS:
            raise TopologyError(f"{param('gpu', repr(name))} unknown; known: {', '.join(GPUS)}")
        return GPUS[name.lower()]
    notes.append(f"GPU model {guess} ({why}); pass --gpu to change it")
    return GPUS[guess]


def _nic_gbps(value: str | float | None, notes: list[str]) -> float:
    if value is None:
        notes.append(f"NIC speed {DEFAULT_NIC} (50 GB/s): the file does not give it; pass --nic-gbps")
        value = DEFAULT_NIC
    try:
        gbps = parse_bandwidth(value)
    except ValueError as exc:
        raise TopologyError(f"{param('nic_gbps')}: {exc}") from None
    if not isinstance(gbps, (int, float)) or gbps <= 0:
        raise TopologyError(f"{param('nic_gbps')} must be positive, got {value!r}")
    return float(gbps)


# ------------------------------------------------------------------------------ NCCL XML

def _pcie_gbps(el: ET.Element) -> float | None:
    """GB/s per direction of a <pci> element's link: GT/s x lanes x encoding / 8."""
    speed, width = el.get("link_speed"), el.get("link_width")
    if not speed or not width:
        return None
    match = re.match(r"\s*([0-9.]+)", speed)
    if not match:
        return None
    gts, lanes = float(match.group(1)), int(width)
    encoding = 128 / 130 if gts >= 8 else 8 / 10  # Gen3+ 128b/130b, Gen1-2 8b/10b
    return round(gts * lanes * encoding / 8, 1)


def nccl_xml_node(text: str, source: str, gpu: str | None, nic_gbps: str | float | None,
                  notes: list[str]) -> NodeType:
    """One server from an NCCL topology XML."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError as exc:
        raise TopologyError(f"{source}: not well-formed XML: {exc}") from None
    if root.tag != "system":
        raise TopologyError(f"{source}: the root element is <{root.tag}>, NCCL's is <system>")
    parent = {child: el for el in root.iter() for child in el}

    def chain(el: ET.Element) -> list[ET.Element]:
        out = []
        while el in parent:
            el = parent[el]
            out.append(el)
        return out  # nearest first, <system> last

    gpus = sorted(root.iter("gpu"), key=lambda g: int(g.get("dev", 0)))
    if not gpus:
        raise TopologyError(f"{source}: no <gpu> element")
    busid = {}
    for g in gpus:
        pci = parent.get(g)
        if pci is None or pci.tag != "pci" or not pci.get("busid"):
            raise TopologyError(f"{source}: <gpu dev={g.get('dev')!r}> is not inside a <pci busid=...>")
        busid[pci.get("busid").lower()] = g
    sm = int(gpus[0].get("sm", 0))
    device = (parent[gpus[0]].get("device") or "").lower()
    guess = _BY_PCI_DEVICE.get(device) or _BY_SM.get(sm)
    if guess is None and gpu is None:
        raise TopologyError(f"{source}: GPU sm={sm} (PCI device {device or '?'}) is not one epplan knows; "
                            f"pass {param('gpu')} ({', '.join(GPUS)})")
    spec, per_link, pcie_default = _gpu_model(gpu, guess, f"PCI device {device or '?'}, sm {sm}", notes)

    to_switch, bridges = [], {}
    for i, g in enumerate(gpus):
        links = list(g.iter("nvlink"))
        switch = sum(int(l.get("count", 1)) for l in links if (l.get("tclass") or "").lower() == _NVSWITCH_CLASS)
        to_switch.append(switch)
        for l in links:
            peer = busid.get((l.get("target") or "").lower())
            if peer is not None:
                j = gpus.index(peer)
                bridges[tuple(sorted((i, j)))] = int(l.get("count", 1))
    if all(to_switch):
        fabric: Any = NVSwitchFabric(kind="nvswitch", gbps=min(to_switch) * per_link)
        notes.append(f"NVSwitch: {min(to_switch)} NVLinks per GPU x {per_link:g} GB/s = {min(to_switch) * per_link:g} GB/s")
    else:
        fabric = _pcie_fabric_from_xml(gpus, parent, chain, bridges, per_link, pcie_default, notes)

    nets = list(root.iter("net"))
    if not nets:
        notes.append("no <net> in the file: the server has no NIC (a single-node topology)")
        return NodeType(gpus=len(gpus), gpu=spec, fabric=fabric, description=f"imported from {Path(source).name}")
    attach, speeds, links = [], [], []
    gpu_chains = [chain(g) for g in gpus]
    for net in nets:
        net_chain = chain(net)
        attach.append(_nearest(net_chain, gpu_chains))
        speeds.append(float(net.get("speed", 0)) / 8000 if net.get("speed") else None)
        pci = next((el for el in net_chain if el.tag == "pci"), None)
        links.append(_pcie_gbps(pci) if pci is not None else None)
    if nic_gbps is not None or any(s is None or s <= 0 for s in speeds):
        gbps = _nic_gbps(nic_gbps, notes)
    else:
        gbps = min(speeds)
        if len(set(speeds)) > 1:
            notes.append(f"NICs of {sorted(set(speeds))} GB/s: all modelled at the slowest, {gbps:g} GB/s")
    known = [l for l in links if l]
    pcie = min(known) if known else pcie_default
    if not known:
        notes.append(f"NIC PCIe link {pcie:g} GB/s (no link_speed in the file)")
    notes.append(f"{len(nets)} NIC(s), each on the GPU nearest it in the PCIe tree: {attach}")
    return NodeType(gpus=len(gpus), gpu=spec, fabric=fabric,
                    nics=NICSpec(gbps=gbps, attach=attach, pcie_gbps=pcie),
                    description=f"imported from {Path(source).name}")


def _nearest(target_chain: list[ET.Element], gpu_chains: list[list[ET.Element]]) -> int:
    """The GPU whose ancestors meet ``target_chain`` soonest (fewest hops), lowest index on ties."""
    best, best_hops = 0, None
    for i, gc in enumerate(gpu_chains):
        common = next((k for k, el in enumerate(target_chain) if el in gc), None)
        if common is None:
            continue
        hops = common + gc.index(target_chain[common])
        if best_hops is None or hops < best_hops:
            best, best_hops = i, hops
    return best


def _pcie_fabric_from_xml(gpus, parent, chain, bridges, per_link, pcie_default, notes) -> PCIeFabric:
    switch_of: dict[Any, int] = {}
    switches: list[list[int]] = []
    sockets: dict[Any, list[int]] = {}
    gpu_gbps, uplinks = [], []
    for i, g in enumerate(gpus):
        ch = chain(g)  # [pci of the GPU, bridge, ..., cpu, system]
        gpu_gbps.append(_pcie_gbps(ch[0]) or pcie_default)
        bridge = next((el for el in ch[1:] if el.tag == "pci"), None) or ch[0]
        cpu = next((el for el in ch if el.tag == "cpu"), None)
        if bridge not in switch_of:
            switch_of[bridge] = len(switches)
            switches.append([])
            sockets.setdefault(cpu, []).append(switch_of[bridge])
            uplinks.append(_pcie_gbps(bridge) or pcie_default)
        switches[switch_of[bridge]].append(i)
    socket_list = list(sockets.values())
    doc: dict[str, Any] = dict(kind="pcie", switches=switches, gpu_gbps=min(gpu_gbps), uplink_gbps=min(uplinks),
                               sockets=socket_list)
    notes.append(f"PCIe tree: {len(switches)} switch(es) under {len(socket_list)} socket(s)")
    if len(socket_list) > 1:
        doc["socket_gbps"] = 40.0
        notes.append("socket interconnect 40 GB/s (NCCL's XML does not give it)")
    if bridges:
        doc["nvlink_bridges"] = [list(p) for p in sorted(bridges)]
        doc["bridge_gbps"] = min(bridges.values()) * per_link
        notes.append(f"{len(bridges)} NVLink bridge(s) at {doc['bridge_gbps']:g} GB/s")
    return PCIeFabric(**doc)


# ------------------------------------------------------------------------------ nvidia-smi topo -m

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def nvidia_smi_node(text: str, source: str, gpu: str | None, nic_gbps: str | float | None,
                    notes: list[str]) -> NodeType:
    """One server from ``nvidia-smi topo -m`` output."""
    lines = [_ANSI.sub("", ln) for ln in text.splitlines()]
    head = next((i for i, ln in enumerate(lines) if re.match(r"^\s+GPU0\b", ln)), None)
    if head is None:
        raise TopologyError(f"{source}: no header row (a line starting with whitespace, then GPU0 ...)")
    columns = [c for c in lines[head].split() if re.fullmatch(r"(GPU|NIC)\d+", c)]
    rows: dict[str, list[str]] = {}
    for ln in lines[head + 1:]:
        cells = ln.split()
        if not cells or not re.fullmatch(r"(GPU|NIC)\d+", cells[0]):
            if rows:
                break
            continue
        if len(cells) < 1 + len(columns):
            raise TopologyError(f"{source}: row {cells[0]} has {len(cells) - 1} cells, the header {len(columns)}")
        rows[cells[0]] = cells[1:]
    gpu_names = [c for c in columns if c.startswith("GPU")]
    nic_names = [c for c in columns if c.startswith("NIC")]
    missing = [g for g in gpu_names if g not in rows]
    if missing:
        raise TopologyError(f"{source}: no row for {', '.join(missing)}")
    num = len(gpu_names)
    cell = {(r, c): rows[r][k] for r in rows for k, c in enumerate(columns)}
    nv = {}
    for i in range(num):
        for j in range(num):
            if i != j:
                value = cell[(f"GPU{i}", f"GPU{j}")]
                match = re.fullmatch(r"NV(\d+)", value)
                if match:
                    nv[i, j] = int(match.group(1))
                elif value not in _PCI_RANK:
                    raise TopologyError(f"{source}: GPU{i}/GPU{j} cell {value!r} is neither NV# nor one of "
                                        f"{', '.join(_PCI_RANK)}")
    counts = sorted(set(nv.values()))
    guess = "a100" if counts == [12] else "h100"
    why = (f"every GPU pair NV{counts[0]}" if len(nv) == num * (num - 1) and len(counts) == 1
           else "from the NVLink pattern")
    spec, per_link, pcie = _gpu_model(gpu, guess, why, notes)
    if num > 1 and len(nv) == num * (num - 1) and len(counts) == 1:
        fabric: Any = NVSwitchFabric(kind="nvswitch", gbps=counts[0] * per_link)
        notes.append(f"NVSwitch: NV{counts[0]} x {per_link:g} GB/s = {counts[0] * per_link:g} GB/s per GPU")
    else:
        fabric = _pcie_fabric_from_smi(num, cell, rows, columns, nv, per_link, pcie, notes)
    if not nic_names:
        notes.append("no NIC column: the server has no NIC (a single-node topology)")
        return NodeType(gpus=num, gpu=spec, fabric=fabric, description=f"imported from {Path(source).name}")
    attach = []
    for nic in nic_names:
        ranks = [_PCI_RANK.get(cell[(f"GPU{i}", nic)], 9) for i in range(num)]
        attach.append(int(min(range(num), key=lambda i: (ranks[i], i))))
    legend = dict(re.findall(r"^\s*(NIC\d+):\s*(\S+)", text, re.MULTILINE))
    named = [legend.get(n, n) for n in nic_names]
    notes.append(f"{len(nic_names)} NIC(s) ({', '.join(named)}), each on its nearest GPU: {attach}; drop the ones "
                 "NCCL does not use (storage, management) from nics.attach")
    notes.append(f"NIC PCIe link {pcie:g} GB/s (x16 of the GPU's generation)")
    return NodeType(gpus=num, gpu=spec, fabric=fabric,
                    nics=NICSpec(gbps=_nic_gbps(nic_gbps, notes), attach=attach, pcie_gbps=pcie),
                    description=f"imported from {Path(source).name}")


def _pcie_fabric_from_smi(num, cell, rows, columns, nv, per_link, pcie, notes) -> PCIeFabric:
    # GPUs on one PCIe switch: PIX/PXB to each other, or both PIX/PXB to one NIC (an NV# cell hides
    # the PCIe relation of its pair). Sockets from the NUMA affinity column.
    group = list(range(num))

    def root(i: int) -> int:
        while group[i] != i:
            i = group[i]
        return i

    near = [[c for c in columns if c.startswith("NIC") and cell[(f"GPU{i}", c)] in ("PIX", "PXB")]
            for i in range(num)]
    for i in range(num):
        for j in range(i):
            if cell[(f"GPU{i}", f"GPU{j}")] in ("PIX", "PXB") or set(near[i]) & set(near[j]):
                group[root(i)] = root(j)
    keys = list(dict.fromkeys(root(i) for i in range(num)))
    switches = [[i for i in range(num) if root(i) == k] for k in keys]
    numa = []
    for i in range(num):
        extra = rows[f"GPU{i}"][len(columns):]
        numa.append(next((c for c in extra[1:] if re.fullmatch(r"\d+", c)), "0"))
    by_socket: dict[str, list[int]] = {}
    for k, members in enumerate(switches):
        by_socket.setdefault(numa[members[0]], []).append(k)
    doc: dict[str, Any] = dict(kind="pcie", switches=switches, gpu_gbps=pcie, uplink_gbps=pcie,
                               sockets=list(by_socket.values()))
    notes.append(f"PCIe: {len(switches)} switch(es) under {len(by_socket)} socket(s) at {pcie:g} GB/s per link")
    if len(by_socket) > 1:
        doc["socket_gbps"] = 40.0
        notes.append("socket interconnect 40 GB/s (nvidia-smi does not give it)")
    pairs = sorted({tuple(sorted(p)) for p in nv})
    if pairs:
        doc["nvlink_bridges"] = [list(p) for p in pairs]
        doc["bridge_gbps"] = min(nv.values()) * per_link
        notes.append(f"{len(pairs)} NVLink bridge(s) at {doc['bridge_gbps']:g} GB/s")
    return PCIeFabric(**doc)


# ------------------------------------------------------------------------------ Slurm topology.conf

def parse_slurm(text: str, source: str) -> list[dict[str, Any]]:
    """Switch records {name, nodes: [hosts], switches: [names]} of a topology.conf."""
    text = re.sub(r"\\\n", " ", text)
    records = []
    for k, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields: dict[str, str] = {}
        for token in line.split():
            key, eq, value = token.partition("=")
            if not eq:
                raise TopologyError(f"{source}:{k}: {token!r} is not KEY=VALUE")
            fields[key.lower()] = value
        if "switchname" not in fields:
            raise TopologyError(f"{source}:{k}: a line without SwitchName= (only topology/tree's "
                                "SwitchName lines are read)")
        records.append({"name": fields["switchname"], "line": k,
                        "nodes": expand_hostlist(fields["nodes"], f"{source}:{k}") if "nodes" in fields else [],
                        "switches": expand_hostlist(fields["switches"], f"{source}:{k}") if "switches" in fields else []})
    if not records:
        raise TopologyError(f"{source}: no SwitchName lines")
    return records


def expand_hostlist(expr: str, where: str) -> list[str]:
    """Slurm hostlist 'dgx[01-03,7],login' -> ['dgx01', 'dgx02', 'dgx03', 'dgx7', 'login']."""
    out = []
    for item in re.findall(r"[^,\[]+(?:\[[^\]]*\][^,\[]*)*", expr):
        match = re.fullmatch(r"([^\[]*)\[([^\]]+)\](.*)", item)
        if not match:
            out.append(item)
            continue
        prefix, ranges, suffix = match.groups()
        if "[" in suffix:
            raise TopologyError(f"{where}: hostlist {item!r} with more than one bracket is not supported")
        for part in ranges.split(","):
            lo, dash, hi = part.partition("-")
            if not lo.isdigit() or (dash and not hi.isdigit()):
                raise TopologyError(f"{where}: hostlist range {part!r} in {item!r} is not N or N-M")
            width = len(lo) if lo.startswith("0") else 0
            for n in range(int(lo), int(hi if dash else lo) + 1):
                out.append(f"{prefix}{n:0{width}d}{suffix}")
    return out


def _slurm_fabric(records, server: _Server, notes: list[str]) -> tuple[list[dict], dict]:
    nics = server.ntype.nics
    if nics is None:
        raise TopologyError("the servers have no NIC, so a Slurm switch tree cannot reach them")
    by_name = {}
    for rec in records:
        if rec["name"] in by_name:
            raise TopologyError(f"topology.conf line {rec['line']}: switch {rec['name']!r} defined twice")
        by_name[rec["name"]] = rec
    host_leaf: dict[str, str] = {}
    for rec in records:
        for host in rec["nodes"]:
            if host in host_leaf:
                raise TopologyError(f"topology.conf: node {host!r} is under switches {host_leaf[host]!r} and "
                                    f"{rec['name']!r}; epplan takes one leaf per node")
            host_leaf[host] = rec["name"]
        for child in rec["switches"]:
            if child not in by_name:
                raise TopologyError(f"topology.conf line {rec['line']}: switch {child!r} is not defined")
    if not host_leaf:
        raise TopologyError("topology.conf: no switch lists Nodes=")

    down: dict[str, float] = {}  # each switch's downlink capacity, bottom-up
    level: dict[str, int] = {}

    def visit(sw: str, stack: tuple[str, ...] = ()) -> float:
        if sw in stack:
            raise TopologyError(f"topology.conf: switch {sw!r} is its own ancestor")
        if sw not in down:
            rec = by_name[sw]
            hosts = len(rec["nodes"]) * len(nics.attach) * nics.gbps
            down[sw] = hosts + sum(visit(c, stack + (sw,)) for c in rec["switches"])
            level[sw] = 1 + max((level[c] for c in rec["switches"]), default=-1)
        return down[sw]

    for sw in by_name:
        visit(sw)
    kinds = {0: "leaf", 1: "spine"}
    switches = [{"name": sw, "kind": kinds.get(level[sw], "core")} for sw in by_name]
    links = []
    for host, leaf in host_leaf.items():
        for r in range(len(nics.attach)):
            links.append({"a": f"{host}/nic{r}", "b": leaf, "gbps": nics.gbps})
    for rec in records:
        for child in rec["switches"]:
            links.append({"a": child, "b": rec["name"], "gbps": down[child]})
    notes.append("every NIC of a node cabled to the node's leaf switch; each switch-to-switch link as wide "
                 "as everything below it (non-blocking; Slurm's LinkSpeed is in arbitrary units and is ignored)")
    nodes = [{"name": host, "type": server.type_name} for host in host_leaf]
    return nodes, {"kind": "explicit", "switches": switches, "links": links}
