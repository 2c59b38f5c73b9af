"""Malformed topology files: every one raises TopologyError with the file and key path."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epplan.errors import TopologyError
from epplan.topology import build_topology, parse_spec

GOOD = {
    "name": "t",
    "nodes": [{"prefix": "n", "count": 2, "type": "dgx-h100"}],
    "fabric": {"kind": "switch"},
}


def _error(doc_or_text) -> str:
    text = doc_or_text if isinstance(doc_or_text, str) else yaml.safe_dump(doc_or_text)
    with pytest.raises(TopologyError) as info:
        build_topology(parse_spec(text, source="bad.yaml")).paths
    message = str(info.value)
    assert message.startswith("bad.yaml: ") or "no path" in message
    return message


def test_good_document_builds():
    assert build_topology(parse_spec(yaml.safe_dump(GOOD))).num_gpus == 16


@pytest.mark.parametrize("doc,expected", [
    ({**GOOD, "nodes": [{"name": "a", "type": "dgx-h100"}, {"name": "b", "type": "dgx-h200x"}]},
     "nodes[1].type: unknown node type 'dgx-h200x'; known: dgx-a100, dgx-b200, dgx-h100, dgx-h200, "
     "gb200-nvl72, mi300x, pcie-8gpu"),
    ({**GOOD, "colour": "blue"}, "colour: unknown key"),
    ({**GOOD, "nodes": [{"name": "a", "type": "dgx-h100", "gpus": 3}]}, "nodes[0].gpus: unknown key"),
    ({"nodes": GOOD["nodes"], "fabric": GOOD["fabric"]}, "name: missing required field"),
    ({**GOOD, "nodes": [{"name": "a"}]}, "nodes[0].type: missing required field"),
    ({**GOOD, "nodes": [{"name": "a", "type": "dgx-h100"}, {"name": "a", "type": "dgx-h100"}]},
     "nodes[1]: duplicate node name 'a'"),
    ({**GOOD, "nodes": [{"prefix": "n", "count": 2, "type": "dgx-h100"}, {"name": "n1", "type": "dgx-h100"}]},
     "duplicate node name 'n1'"),
    ({**GOOD, "nodes": [{"prefix": "n", "count": 2, "type": "dgx-h100", "disabled_nics": list(range(8))}]},
     "has no working NIC"),
    ({**GOOD, "nodes": [{"name": "a", "type": "dgx-h100", "disabled_nics": [9]}]},
     "nodes[0].disabled_nics[0]: NIC 9 does not exist"),
    ({**GOOD, "fabric": None}, "fabric: missing"),
    ({**GOOD, "fabric": {"kind": "rail_optimized", "nodes_per_su": 2, "spines": 0}},
     "fabric.spines: Input should be greater than 0"),
    ({**GOOD, "fabric": {"kind": "mesh"}}, "fabric"),
    ({**GOOD, "nodes": [{"name": "a", "type": "x"}], "node_types": {"x": {
        "gpus": 2, "gpu": {"model": "g", "memory_gb": 80, "bf16_tflops": 100, "hbm_gbps": 1000},
        "fabric": {"kind": "nvswitch", "gbps": -5}}}},
     "node_types.x.fabric.gbps: Input should be greater than 0"),
    ({**GOOD, "nodes": [{"name": "a", "type": "x"}], "node_types": {"x": {
        "gpus": 2, "gpu": {"model": "g", "memory_gb": 80, "bf16_tflops": 100, "hbm_gbps": 1000},
        "fabric": {"kind": "nvswitch", "gbps": 100},
        "nics": {"gbps": 50, "attach": [0, 5], "pcie_gbps": 64}}}},
     "node_types.x.nics.attach[1]: NIC 1 is attached to GPU 5, which does not exist"),
    ({**GOOD, "nodes": [{"name": "a", "type": "x"}], "node_types": {"x": {
        "gpus": 4, "gpu": {"model": "g", "memory_gb": 80, "bf16_tflops": 100, "hbm_gbps": 1000},
        "fabric": {"kind": "pcie", "switches": [[0, 1], [2]], "gpu_gbps": 32, "uplink_gbps": 32}}}},
     "node_types.x.fabric.switches: GPU(s) [3] are under no PCIe switch"),
    ({**GOOD, "fabric": {"kind": "explicit", "switches": [{"name": "s"}], "links": [
        {"a": "n0/nic0", "b": "s", "gbps": 50}]}},
     "NIC 'n0/nic1' has no link"),
    ({**GOOD, "fabric": {"kind": "explicit", "switches": [{"name": "s"}], "links": [
        {"a": "n7/nic0", "b": "s", "gbps": 50}]}},
     "fabric.links[0].a: unknown device 'n7/nic0'"),
])
def test_malformed_documents_name_the_key(doc, expected):
    assert expected in _error(doc)


def test_disconnected_explicit_fabric_has_no_path():
    nics = [f"n{n}/nic{r}" for n in range(2) for r in range(8)]
    links = [{"a": nic, "b": "s0" if nic.startswith("n0") else "s1", "gbps": 50} for nic in nics]
    doc = {**GOOD, "fabric": {"kind": "explicit", "switches": [{"name": "s0"}, {"name": "s1"}], "links": links}}
    assert "has no path to switch" in _error(doc)


def test_empty_file():
    assert "file is empty" in _error("")


def test_yaml_syntax_error_names_the_line():
    assert "YAML syntax error at line 3" in _error("name: t\nnodes:\n  - {name: a: type: b}\n")


def test_top_level_must_be_a_mapping():
    assert "top level must be a mapping" in _error("- 1\n- 2\n")


def test_missing_file(tmp_path):
    from epplan.topology import load_topology

    with pytest.raises(TopologyError, match="not found"):
        load_topology(tmp_path / "nope.yaml")


# Property: whatever document is thrown at the loader, it either builds a topology whose invariants
# hold, or raises TopologyError naming the source (and, for a schema error, the key).
_scalars = st.one_of(st.none(), st.booleans(), st.integers(-3, 20), st.floats(allow_nan=True),
                     st.sampled_from([float("inf"), float("nan"), 10**9, 10**30, 1e308, -1e308]),
                     st.text(max_size=6), st.sampled_from(["dgx-h100", "switch", "nvswitch", "pcie", "n0/nic0"]))
_keys = st.sampled_from(["name", "nodes", "fabric", "kind", "type", "count", "prefix", "gbps", "gpus",
                         "node_types", "attach", "spines", "nodes_per_su", "links", "a", "b", "switches",
                         "disabled_nics", "routing", "latency_us", "oversubscription", "junk"])
_docs = st.recursive(_scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=5)), max_leaves=25)


def _mutations():
    """Valid documents with one part replaced by noise."""
    return st.builds(
        lambda key, value: {**GOOD, key: value},
        st.sampled_from(["name", "nodes", "fabric", "node_types", "routing"]), _docs)


def _outcome(text: str) -> None:
    try:
        topo = build_topology(parse_spec(text, source="fuzz.yaml"))
        topo.paths
    except TopologyError as exc:
        assert str(exc).startswith("fuzz.yaml: "), str(exc)
        return
    assert topo.num_gpus >= 1 and topo.num_gpus <= 4096
    assert np.all(np.isfinite(topo.link_capacity)) and np.all(topo.link_capacity > 0)
    assert np.all(np.isfinite(topo.link_latency_us)) and np.all(topo.link_latency_us >= 0)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_docs, _mutations()))
def test_loader_raises_only_topology_error(doc):
    _outcome(yaml.safe_dump(doc))


@settings(max_examples=100, deadline=None)
@given(st.text(max_size=80))
def test_loader_survives_arbitrary_text(text):
    _outcome(text)


@pytest.mark.parametrize("path, value, key", [
    (("fabric", "gbps"), float("inf"), "gbps"), (("fabric", "gbps"), float("nan"), "gbps"),
    (("fabric", "latency_us"), float("inf"), "latency_us"), (("gpus",), True, "gpus"),
    (("gpu", "memory_gb"), 1e308, "memory_gb"), (("gpus",), 10**9, "nodes"),
])
def test_infinities_booleans_and_huge_values_are_named(path, value, key):
    ntype = {"gpus": 8, "gpu": {"model": "g", "memory_gb": 80, "bf16_tflops": 100, "hbm_gbps": 1000},
             "fabric": {"kind": "nvswitch", "gbps": 100}}
    node = ntype
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    doc = {**GOOD, "nodes": [{"prefix": "n", "count": 2, "type": "x"}], "node_types": {"x": ntype}}
    assert key in _error(doc)
