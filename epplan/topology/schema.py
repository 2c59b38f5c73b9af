"""The topology file format, validated with pydantic.

A topology file has four parts (see topologies/*.yaml for worked examples):

- ``node_types``: what one server looks like: GPUs (model, memory, bf16 TFLOP/s, HBM bandwidth),
  the intra-node fabric (an NVSwitch at a per-GPU bandwidth, an xGMI full mesh at a per-link
  bandwidth, or a PCIe tree with optional NVLink bridges) and the NICs (bandwidth, and the GPU each hangs off). The built-in types of
  ``epplan.topology.library`` can be used by name without being declared.
- ``nodes``: a list of servers, each of a type, one by ``name`` or many by ``prefix`` + ``count``;
  a node may mark NICs as ``disabled_nics`` (a degraded server).
- ``fabric``: how NICs are wired: one non-blocking ``switch``; ``rail_optimized`` two-tier
  leaf/spine (one leaf per rail per scalable unit) with an oversubscription; ``three_tier`` with a
  core; or ``explicit`` switches and links.
- ``routing``: ``ecmp`` (default: each GPU sends through its nearest NIC, equal-cost paths share
  traffic evenly hop by hop) or ``rail_aligned`` (NCCL's PXN: traffic first crosses the intra-node
  fabric to the GPU whose NIC is on the destination's rail).

Bandwidths are GB/s per direction (a bare number), or strings with a unit such as ``400Gb/s``
(``epplan.topology.units``); latencies microseconds.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, model_validator, PositiveFloat, PositiveInt, NonNegativeFloat, NonNegativeInt

from epplan.inputs import no_bool_numbers
from epplan.topology.units import Bandwidth

# How traffic between two nodes picks its path (``routing:``); ``epplan topo --routing`` lists these.
Routing = Literal["ecmp", "rail_aligned"]
ROUTINGS: tuple[str, ...] = get_args(Routing)


class _Strict(BaseModel):
    # allow_inf_nan=False: '.inf' and '.nan' are YAML floats, never a bandwidth or a latency.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_bool_numbers(cls, data: Any) -> Any:
        return no_bool_numbers(cls, data)


# Plausible ceilings (a typo of a few orders of magnitude is refused, not planned for).
Latency = Annotated[NonNegativeFloat, Field(le=1e6)]  # microseconds: up to one second
Ratio = Annotated[float, Field(ge=1.0, le=1e3)]  # oversubscription
Switches = Annotated[PositiveInt, Field(le=4096)]  # spines, cores, nodes per scalable unit


class GPUSpec(_Strict):
    model: str
    memory_gb: Annotated[PositiveFloat, Field(le=1e5)]
    bf16_tflops: Annotated[PositiveFloat, Field(le=1e6)]
    hbm_gbps: Bandwidth


class NVSwitchFabric(_Strict):
    """All GPUs of the node on one NVSwitch plane: each GPU has ``gbps`` per direction to it."""

    kind: Literal["nvswitch"]
    gbps: Bandwidth
    latency_us: Latency = 1.0


class XGMIFabric(_Strict):
    """AMD Infinity Fabric (xGMI): every pair of the node's GPUs joined by its own link of
    ``gbps`` per direction (a full mesh, no switch), as on MI300X platforms."""

    kind: Literal["xgmi"]
    gbps: Bandwidth
    latency_us: Latency = 1.0


class PCIeFabric(_Strict):
    """GPUs under PCIe switches, switches under CPU sockets, sockets joined by one link.

    switches[k]: the local GPU indices under PCIe switch k.
    sockets[c]:  the PCIe switch indices under CPU socket c (default: all on socket 0).
    nvlink_bridges: pairs of GPUs joined by an NVLink bridge at ``bridge_gbps``.
    """

    kind: Literal["pcie"]
    switches: list[list[NonNegativeInt]]
    gpu_gbps: Bandwidth
    uplink_gbps: Bandwidth
    sockets: list[list[NonNegativeInt]] | None = None
    socket_gbps: Bandwidth | None = None
    nvlink_bridges: list[tuple[NonNegativeInt, NonNegativeInt]] = []
    bridge_gbps: Bandwidth | None = None
    latency_us: Latency = 2.0


class NICSpec(_Strict):
    """NICs of a node: NIC r hangs off local GPU ``attach[r]`` (its rail is r)."""

    gbps: Bandwidth
    attach: list[NonNegativeInt] = Field(min_length=1)
    pcie_gbps: Bandwidth
    latency_us: Latency = 2.0


class NodeType(_Strict):
    """``calibration``: a file written by ``epplan calibrate`` on this node type's GPUs (a path
    relative to the topology file); the cost model then uses its measured rates."""

    gpus: PositiveInt
    gpu: GPUSpec
    fabric: Annotated[Union[NVSwitchFabric, XGMIFabric, PCIeFabric], Field(discriminator="kind")]
    nics: NICSpec | None = None
    description: str | None = None
    calibration: str | None = None


class NodeEntry(_Strict):
    """One node (``name``) or ``count`` nodes named ``prefix``0, ``prefix``1, ... (from ``start``)."""

    type: str
    name: str | None = None
    prefix: str | None = None
    count: PositiveInt | None = None
    start: NonNegativeInt = 0
    disabled_nics: list[NonNegativeInt] = []


class SwitchFabric(_Strict):
    kind: Literal["switch"]
    latency_us: Latency = 1.0


class RailOptimizedFabric(_Strict):
    """Two tiers: a leaf per rail per scalable unit (SU), every leaf wired to every spine.

    A leaf's uplink capacity is its downlink capacity (nodes_per_su x NIC bandwidth) divided by
    ``oversubscription``, spread evenly over the spines.
    """

    kind: Literal["rail_optimized"]
    nodes_per_su: Switches
    spines: Switches
    oversubscription: Ratio = 1.0
    latency_us: Latency = 1.0


class ThreeTierFabric(_Strict):
    """Rail leaves per SU, a spine group per SU (leaf-spine full mesh inside the SU), and a core
    layer wired to every spine. Oversubscription applies at the leaf and at the spine."""

    kind: Literal["three_tier"]
    nodes_per_su: Switches
    spines_per_su: Switches
    cores: Switches
    oversubscription: Ratio = 1.0
    core_oversubscription: Ratio = 1.0
    latency_us: Latency = 1.0


class SwitchEntry(_Strict):
    name: str
    kind: Literal["leaf", "spine", "core", "switch"] = "switch"


class LinkEntry(_Strict):
    """A cable between two devices: switches by name, NICs as ``NODE/nicR``."""

    a: str
    b: str
    gbps: Bandwidth
    latency_us: Latency = 1.0
    one_way: bool = False


class ExplicitFabric(_Strict):
    kind: Literal["explicit"]
    switches: list[SwitchEntry] = Field(min_length=1)
    links: list[LinkEntry] = Field(min_length=1)


Fabric = Annotated[
    Union[SwitchFabric, RailOptimizedFabric, ThreeTierFabric, ExplicitFabric],
    Field(discriminator="kind"),
]


class TopologySpec(_Strict):
    name: str
    description: str | None = None
    node_types: dict[str, NodeType] = {}
    nodes: list[NodeEntry] = Field(min_length=1)
    fabric: Fabric | None = None
    routing: Routing = "ecmp"
