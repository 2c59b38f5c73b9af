"""Cluster topologies: YAML files -> validated specs -> a networkx graph with path fractions."""

from epplan.topology.build import LINK_CLASSES, Topology, build_topology, load_topology
from epplan.topology.load import parse_spec, read_spec

__all__ = ["LINK_CLASSES", "Topology", "build_topology", "load_topology", "parse_spec", "read_spec"]
