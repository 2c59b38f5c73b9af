"""Bandwidth units, plausibility warnings, and the node types beyond Hopper (A100, B200, GB200
NVL72, MI300X with its xGMI mesh)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from epplan.cli import app
from epplan.errors import TopologyError
from epplan.topology import build_topology, parse_spec
from epplan.topology.generate import generate
from epplan.topology.library import NODE_TYPES
from epplan.topology.units import parse_bandwidth, plausibility_warnings
from tests.link_reference import reference_pair

runner = CliRunner()


def _node_type(nics: dict) -> dict:
    return {
        "name": "units",
        "node_types": {"box": {
            "gpus": 2, "gpu": {"model": "x", "memory_gb": 80, "bf16_tflops": 989, "hbm_gbps": "3.35TB/s"},
            "fabric": {"kind": "nvswitch", "gbps": "450GB/s"},
            "nics": {"attach": [0, 1], "pcie_gbps": 64, **nics}}},
        "nodes": [{"prefix": "n", "count": 2, "type": "box"}],
        "fabric": {"kind": "switch"},
    }


@pytest.mark.parametrize("text,gbytes", [
    ("400Gb/s", 50.0), ("400 Gbit/s", 50.0), ("400Gbps", 50.0), ("50GB/s", 50.0), ("50 GBps", 50.0),
    ("1.8TB/s", 1800.0), ("3.2Tb/s", 400.0), ("800Mb/s", 0.1), (" 25 GB/s ", 25.0),
])
def test_units(text, gbytes):
    assert parse_bandwidth(text) == pytest.approx(gbytes)
    assert parse_bandwidth(12.5) == 12.5  # a bare number is GB/s, unchanged


def test_a_400_gbit_nic_with_its_unit_is_50_gbytes():
    topo = build_topology(parse_spec(yaml.safe_dump(_node_type({"gbps": "400Gb/s"}))))
    nic_up = topo.link_class_index["nic_up"]
    assert np.all(topo.link_capacity[nic_up] == 50.0)
    assert topo.node_type(topo.gpu_node[0]).gpu.hbm_gbps == 3350.0
    assert plausibility_warnings(topo.spec) == []


@pytest.mark.parametrize("value,match", [
    ("400G", "say bits or bytes"), ("fast", "not understood"), ("-4GB/s", "not understood"),
])
def test_bad_units_name_the_key(value, match):
    with pytest.raises(TopologyError, match=rf"node_types\.box\.nics\.gbps: .*{match}"):
        parse_spec(yaml.safe_dump(_node_type({"gbps": value})), source="bad.yaml")


def test_validate_warns_on_a_nic_faster_than_its_pcie_link(tmp_path):
    path = tmp_path / "t.yaml"
    path.write_text(yaml.safe_dump(_node_type({"gbps": 400})))  # 400 Gb/s written as vendors do
    result = runner.invoke(app, ["topo", "validate", str(path)])
    assert result.exit_code == 0, result.output
    out = " ".join(result.stdout.split())
    assert "warning: node_types.box.nics.gbps: 400 GB/s is more than the NIC's PCIe link" in out
    assert "gbps: 50" in out and "'400Gb/s'" in out


def test_validate_warns_on_nvlink_slower_than_pcie():
    doc = _node_type({"gbps": 50})
    doc["node_types"]["box"]["fabric"]["gbps"] = 40
    warnings = plausibility_warnings(parse_spec(yaml.safe_dump(doc)))
    assert len(warnings) == 1 and "nvswitch link (40 GB/s) is slower than PCIe (64 GB/s)" in warnings[0]


def test_builtin_types_are_plausible_and_gen_takes_each():
    for name in NODE_TYPES:
        spec = parse_spec(generate(nodes=2, node_type=name, fabric="switch"))
        assert plausibility_warnings(spec) == [], name


def test_gb200_nvl72_is_one_nvlink_domain_of_72():
    topo = build_topology(parse_spec(generate(nodes=2, node_type="gb200-nvl72", fabric="switch")))
    assert topo.num_gpus == 144 and topo.num_nodes == 2
    names = {topo.link_name(i) for i in topo.paths.pair_fractions(0, 71)}
    assert names == {"node0/gpu0 -> node0/nvswitch", "node0/nvswitch -> node0/gpu71"}


def test_mi300x_mesh_pairs_use_their_own_link():
    topo = build_topology(parse_spec(generate(nodes=2, node_type="mi300x", fabric="switch")))
    assert set(topo.link_class) >= {"xgmi"}
    assert {topo.link_name(i): f for i, f in topo.paths.pair_fractions(2, 5).items()} == {
        "node0/gpu2 -> node0/gpu5": 1.0}
    xgmi = topo.link_class_index["xgmi"]
    assert xgmi.size == 2 * 8 * 7 and np.all(topo.link_capacity[xgmi] == 64.0)


def test_mi300x_link_loads_match_slow_reference():
    spec = generate(nodes=2, node_type="mi300x", fabric="rail", routing="rail_aligned")
    topo = build_topology(parse_spec(spec), routing="rail_aligned")
    rng = np.random.default_rng(3)
    traffic = rng.random((16, 16))
    np.fill_diagonal(traffic, 0)
    expected = np.zeros(topo.num_links)
    for s in range(16):
        for t in range(16):
            if s != t:
                for idx, f in reference_pair(topo, s, t).items():
                    expected[idx] += traffic[s, t] * f
    np.testing.assert_allclose(topo.link_loads(traffic), expected, rtol=1e-9, atol=1e-9)
