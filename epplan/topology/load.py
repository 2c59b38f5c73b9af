"""Reading topology files: YAML -> validated ``TopologySpec`` -> ``Topology``.

Every problem is reported as a ``TopologyError`` naming the file and the key path
(``nodes[3].type: unknown node type 'dgx-h200'; known: dgx-h100, pcie-8gpu``). ``check_spec``
collects every semantic problem it finds, so that ``epplan topo validate`` can list them all.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from epplan.errors import TopologyError
from epplan.inputs import MiB, load_yaml, read_text
from epplan.topology.library import NODE_TYPES
from epplan.topology.schema import ExplicitFabric, NodeType, PCIeFabric, TopologySpec

MAX_TOPOLOGY_BYTES = 16 * MiB
# Measured: 'topo show' on 1,024 H100s (128 DGX) takes 1.5 s of CPU, on 16,384 over 120 s.
MAX_NODES = 4096
MAX_GPUS = 4096
_UNION_TAGS = {"nvswitch", "xgmi", "pcie", "switch", "rail_optimized", "three_tier", "explicit"}


def read_spec(path: str | Path) -> tuple[TopologySpec, str]:
    """Parse and schema-check a topology file. Returns the spec and the file's sha256."""
    path = Path(path)
    text = read_text(path, "topology file", TopologyError, MAX_TOPOLOGY_BYTES)
    raw = text.encode("utf-8")
    spec = parse_spec(text, source=str(path))
    return spec, hashlib.sha256(raw).hexdigest()


def parse_spec(text: str, source: str = "<string>") -> TopologySpec:
    """YAML text -> ``TopologySpec``; every failure is a ``TopologyError``."""
    doc = load_yaml(text, source, TopologyError)
    if doc is None:
        raise TopologyError(f"{source}: file is empty; a topology needs at least 'name' and 'nodes'")
    if not isinstance(doc, dict):
        raise TopologyError(
            f"{source}: top level must be a mapping with 'name', 'nodes', 'fabric', ...; "
            f"got {type(doc).__name__}")
    try:
        spec = TopologySpec.model_validate(doc)
    except ValidationError as exc:
        raise TopologyError(f"{source}: " + "; ".join(_format_errors(exc))) from None
    except (TypeError, ValueError, RecursionError) as exc:  # odd YAML values pydantic cannot take
        raise TopologyError(f"{source}: invalid value: {exc}") from None
    problems = check_spec(spec)
    if problems:
        raise TopologyError(f"{source}: " + "; ".join(problems))
    return spec


def _format_errors(exc: ValidationError) -> list[str]:
    out = []
    for err in exc.errors()[:10]:
        path = format_loc(err["loc"])
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "missing":
            msg = "missing required field"
        elif err["type"] == "value_error":
            msg = msg.removeprefix("Value error, ")
        out.append(f"{path}: {msg}" if path else msg)
    if len(exc.errors()) > 10:
        out.append(f"... and {len(exc.errors()) - 10} more")
    return out


def format_loc(loc: tuple[Any, ...]) -> str:
    """('nodes', 3, 'type') -> 'nodes[3].type'; drops pydantic's union tags."""
    text = ""
    for i, part in enumerate(loc):
        if isinstance(part, int):
            text += f"[{part}]"
        elif part in _UNION_TAGS and i > 0 and loc[i - 1] == "fabric":
            continue
        elif isinstance(part, str) and part.startswith(("function-", "tagged-union")):
            continue
        else:
            text += ("." if text else "") + str(part)
    return text


def resolve_node_type(spec: TopologySpec, name: str) -> NodeType | None:
    return spec.node_types.get(name) or NODE_TYPES.get(name)


def known_node_types(spec: TopologySpec) -> list[str]:
    return sorted(set(spec.node_types) | set(NODE_TYPES))


def expand_nodes(spec: TopologySpec) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, type name, disabled NIC indices) of every node, in rank order."""
    out = []
    for entry in spec.nodes:
        disabled = tuple(sorted(set(entry.disabled_nics)))
        if entry.name is not None:
            out.append((entry.name, entry.type, disabled))
        else:
            for k in range(entry.start, entry.start + (entry.count or 0)):
                out.append((f"{entry.prefix}{k}", entry.type, disabled))
    return out


def check_spec(spec: TopologySpec) -> list[str]:
    """Every semantic problem of a schema-valid spec, as 'key.path: what is wrong' lines."""
    problems: list[str] = []
    for tname, ntype in spec.node_types.items():
        problems += [f"node_types.{tname}.{p}" for p in _check_node_type(ntype)]

    num_nodes = num_gpus = 0
    for entry in spec.nodes:  # before anything is expanded: a count of 10**9 must not allocate
        ntype = resolve_node_type(spec, entry.type)
        num_nodes += entry.count or 1
        num_gpus += (entry.count or 1) * (ntype.gpus if ntype is not None else 0)
    if num_nodes > MAX_NODES or num_gpus > MAX_GPUS:
        return [f"nodes: {num_nodes:,} nodes with {num_gpus:,} GPUs; epplan plans up to {MAX_NODES:,} nodes "
                f"and {MAX_GPUS:,} GPUs (path construction alone takes minutes beyond)"]

    names: dict[str, str] = {}
    for i, entry in enumerate(spec.nodes):
        where = f"nodes[{i}]"
        if (entry.name is None) == (entry.prefix is None):
            problems.append(f"{where}: give exactly one of 'name' (one node) or 'prefix' with 'count'")
            continue
        if entry.prefix is not None and entry.count is None:
            problems.append(f"{where}: 'prefix' needs 'count'")
            continue
        if entry.name is not None and entry.count not in (None, 1):
            problems.append(f"{where}: 'count' needs 'prefix' instead of 'name'")
        ntype = resolve_node_type(spec, entry.type)
        if ntype is None:
            problems.append(
                f"{where}.type: unknown node type {entry.type!r}; known: {', '.join(known_node_types(spec))}")
            continue
        num_nics = len(ntype.nics.attach) if ntype.nics else 0
        for k, nic in enumerate(entry.disabled_nics):
            if nic >= num_nics:
                problems.append(
                    f"{where}.disabled_nics[{k}]: NIC {nic} does not exist; type {entry.type!r} has "
                    f"{num_nics} NIC(s)")
        if entry.name is not None:
            node_names = [entry.name]
        else:
            node_names = [f"{entry.prefix}{k}" for k in range(entry.start, entry.start + entry.count)]
        for n in node_names:
            if "/" in n:
                problems.append(f"{where}: node name {n!r} must not contain '/'")
            if n in names:
                problems.append(f"{where}: duplicate node name {n!r} (also in {names[n]})")
            else:
                names[n] = where

    if problems:
        return problems
    nodes = expand_nodes(spec)
    if len(nodes) > 1:
        if spec.fabric is None:
            problems.append("fabric: missing; a cluster of several nodes needs an inter-node fabric")
        for name, tname, disabled in nodes:
            ntype = resolve_node_type(spec, tname)
            working = (len(ntype.nics.attach) if ntype.nics else 0) - len(disabled)
            if working <= 0:
                problems.append(
                    f"nodes: node {name!r} has no working NIC, so its GPUs have no path to the other nodes")
    if isinstance(spec.fabric, ExplicitFabric):
        problems += _check_explicit(spec, nodes)
    return problems


def _check_node_type(ntype: NodeType) -> list[str]:
    problems = []
    g = ntype.gpus
    fabric = ntype.fabric
    if isinstance(fabric, PCIeFabric):
        seen: dict[int, int] = {}
        for k, gpus in enumerate(fabric.switches):
            for j, gpu in enumerate(gpus):
                if gpu >= g:
                    problems.append(f"fabric.switches[{k}][{j}]: GPU {gpu} does not exist (gpus: {g})")
                elif gpu in seen:
                    problems.append(f"fabric.switches[{k}][{j}]: GPU {gpu} is already under switch {seen[gpu]}")
                else:
                    seen[gpu] = k
        missing = sorted(set(range(g)) - set(seen))
        if missing:
            problems.append(f"fabric.switches: GPU(s) {missing} are under no PCIe switch")
        if fabric.sockets is not None:
            covered: list[int] = []
            for c, sws in enumerate(fabric.sockets):
                for j, sw in enumerate(sws):
                    if sw >= len(fabric.switches):
                        problems.append(
                            f"fabric.sockets[{c}][{j}]: PCIe switch {sw} does not exist "
                            f"({len(fabric.switches)} switches)")
                    covered.append(sw)
            if sorted(covered) != list(range(len(fabric.switches))):
                problems.append("fabric.sockets: every PCIe switch must be under exactly one socket")
            if len(fabric.sockets) > 1 and fabric.socket_gbps is None:
                problems.append("fabric.socket_gbps: needed when there are several sockets")
        for k, (a, b) in enumerate(fabric.nvlink_bridges):
            if a >= g or b >= g or a == b:
                problems.append(f"fabric.nvlink_bridges[{k}]: ({a}, {b}) is not a pair of distinct GPUs < {g}")
        if fabric.nvlink_bridges and fabric.bridge_gbps is None:
            problems.append("fabric.bridge_gbps: needed when nvlink_bridges are given")
    if ntype.nics is not None:
        for r, gpu in enumerate(ntype.nics.attach):
            if gpu >= g:
                problems.append(f"nics.attach[{r}]: NIC {r} is attached to GPU {gpu}, which does not exist (gpus: {g})")
    return problems


def _check_explicit(spec: TopologySpec, nodes: list[tuple[str, str, tuple[int, ...]]]) -> list[str]:
    fabric = spec.fabric
    assert isinstance(fabric, ExplicitFabric)
    problems = []
    switches: set[str] = set()
    for i, sw in enumerate(fabric.switches):
        if sw.name in switches:
            problems.append(f"fabric.switches[{i}].name: duplicate switch {sw.name!r}")
        if "/" in sw.name:
            problems.append(f"fabric.switches[{i}].name: {sw.name!r} must not contain '/' (reserved for NICs)")
        switches.add(sw.name)
    nics: set[str] = set()
    for name, tname, disabled in nodes:
        ntype = resolve_node_type(spec, tname)
        for r in range(len(ntype.nics.attach) if ntype.nics else 0):
            if r not in disabled:
                nics.add(f"{name}/nic{r}")
    uplinks: dict[str, int] = {}
    for i, link in enumerate(fabric.links):
        for end in ("a", "b"):
            dev = getattr(link, end)
            if dev in nics:
                uplinks[dev] = uplinks.get(dev, 0) + 1
            elif dev not in switches:
                hint = "NICs are named NODE/nicR" if "/" not in dev else "that NIC does not exist or is disabled"
                problems.append(f"fabric.links[{i}].{end}: unknown device {dev!r} ({hint})")
        if link.a == link.b:
            problems.append(f"fabric.links[{i}]: a link from {link.a!r} to itself")
        if link.a in nics and link.b in nics:
            problems.append(f"fabric.links[{i}]: NICs must connect to a switch, not to each other")
    for nic in sorted(nics):
        count = uplinks.get(nic, 0)
        if count == 0:
            problems.append(f"fabric.links: NIC {nic!r} has no link, so its GPU has no path to other nodes")
        elif count > 1:
            problems.append(f"fabric.links: NIC {nic!r} has {count} links; a NIC has exactly one switch port")
    return problems

