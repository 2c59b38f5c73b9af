"""Bandwidth values with units, and the plausibility checks ``epplan topo validate`` warns with.

Every ``*_gbps`` field of a topology file is GB/s (gigabytes per second) per direction. A bare
number keeps that meaning. A string names its unit, as vendors write it::

    400Gb/s  400 Gbit/s  400Gbps   -> 50 GB/s   (bits: network ports, PCIe lanes)
    50GB/s   50 GBps                -> 50 GB/s   (bytes: NVLink, HBM)
    1.8TB/s  3.2Tb/s  800Mb/s       -> scaled by T or M

``Gbps`` is bits, as network vendors use it (lower-case b = bits, upper-case B = bytes).
"""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING, Annotated, Any

from pydantic import Field, BeforeValidator, PositiveFloat

if TYPE_CHECKING:
    from epplan.topology.schema import TopologySpec

_UNIT = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*([KMGT])\s*(b|B|bit|byte)?\s*(/s|ps)?\s*$")
_SCALE = {"K": 1e-6, "M": 1e-3, "G": 1.0, "T": 1e3}  # to giga
FORMS = "a number (GB/s) or a string with a unit such as '400Gb/s', '50GB/s', '1.8TB/s'"


def parse_bandwidth(value: Any) -> Any:
    """'400Gb/s' -> 50.0 (GB/s); numbers pass through for pydantic to check.

    Raises ValueError (which pydantic reports with the field's path) on a string it cannot read.
    """
    if not isinstance(value, str):
        return value
    match = _UNIT.match(value)
    if not match:
        raise ValueError(f"bandwidth {value!r} not understood; write {FORMS}")
    number, prefix, unit, _ = match.groups()
    if unit is None:
        raise ValueError(f"bandwidth {value!r}: say bits or bytes ('{number}{prefix}b/s' or "
                         f"'{number}{prefix}B/s')")
    giga = float(number) * _SCALE[prefix]
    is_bits = unit in ("b", "bit")
    gbytes = giga / 8 if is_bits else giga
    if not (math.isfinite(gbytes) and gbytes > 0):
        raise ValueError(f"bandwidth {value!r} must be positive")
    return gbytes


# A plausible ceiling: 1 PB/s per direction is hundreds of times any link built (NVLink 5: 900 GB/s).
MAX_GBPS = 1e6
Bandwidth = Annotated[PositiveFloat, Field(le=MAX_GBPS), BeforeValidator(parse_bandwidth)]
"""GB/s per direction: a number, or a string with its unit (see the module docstring)."""


def plausibility_warnings(spec: TopologySpec) -> list[str]:
    """Values that parse but are physically odd, as 'key.path: what and what to check' lines.

    Checked per node type (declared ones and the built-ins the file uses): a NIC faster than the
    PCIe link it hangs off (usually a port speed in Gb/s written as a bare number, i.e. GB/s); an
    NVLink/xGMI or NVSwitch port slower than that PCIe link; an NVLink bridge slower than PCIe.
    """
    from epplan.topology.load import resolve_node_type
    from epplan.topology.schema import NVSwitchFabric, PCIeFabric, XGMIFabric

    names = dict.fromkeys(list(spec.node_types) + [e.type for e in spec.nodes])
    out: list[str] = []
    for tname in names:
        ntype = resolve_node_type(spec, tname)
        if ntype is None:
            continue
        where = f"node_types.{tname}" if tname in spec.node_types else f"node type {tname!r}"
        nics, fabric = ntype.nics, ntype.fabric
        pcie = nics.pcie_gbps if nics is not None else None
        if nics is not None and nics.gbps > nics.pcie_gbps:
            out.append(f"{where}.nics.gbps: {nics.gbps:g} GB/s is more than the NIC's PCIe link "
                       f"(pcie_gbps {nics.pcie_gbps:g} GB/s); gbps is gigabytes per second: a "
                       f"{nics.gbps:g} Gb/s port is gbps: {nics.gbps / 8:g} (or write '{nics.gbps:g}Gb/s')")
        if isinstance(fabric, (NVSwitchFabric, XGMIFabric)) and pcie is not None and fabric.gbps < pcie:
            out.append(f"{where}.fabric.gbps: the {fabric.kind} link ({fabric.gbps:g} GB/s) is slower "
                       f"than PCIe ({pcie:g} GB/s); check the unit (GB/s per direction)")
        if isinstance(fabric, PCIeFabric) and fabric.bridge_gbps is not None \
                and fabric.bridge_gbps < fabric.gpu_gbps:
            out.append(f"{where}.fabric.bridge_gbps: the NVLink bridge ({fabric.bridge_gbps:g} GB/s) is "
                       f"slower than the GPU's PCIe link ({fabric.gpu_gbps:g} GB/s); check the unit")
    return out
