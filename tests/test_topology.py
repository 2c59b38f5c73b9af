"""Topology files -> graph -> path fractions: shipped clusters, hand-checked paths, and the sparse
path model against a slow per-pair reference."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np
import pytest

from epplan.topology import load_topology, parse_spec, build_topology
from epplan.cost.linkmap import link_map
from tests.link_reference import reference_pair

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"
SHIPPED = sorted(TOPOLOGIES.glob("*.yaml"))

EXPECTED_GPUS = {
    "dgx-h100-1node": 8, "dgx-h100-2node": 16, "h100-16node-rail": 128, "h100-superpod-1024": 1024,
    "h100-8node-oversub": 64, "pcie-8gpu": 8, "hetero-degraded": 32, "h100-64node-3tier": 512,
    "explicit-2node": 16, "h100-pair": 2,
}


def test_every_expected_topology_is_shipped():
    assert {p.stem for p in SHIPPED} >= set(EXPECTED_GPUS)


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_topology_builds(path):
    topo = load_topology(path)
    assert topo.num_gpus == EXPECTED_GPUS[path.stem]
    assert len(path.read_text().splitlines()[0]) > 0 and path.read_text().startswith("#"), "say where numbers come from"
    # Ranks are node-major, local index minor.
    assert np.all(np.diff(topo.gpu_node) >= 0)
    for n in range(topo.num_nodes):
        local = topo.gpu_local[topo.gpu_node == n]
        assert local.tolist() == list(range(local.size))
    assert np.all(topo.link_capacity > 0)
    for u, v in topo.links:
        assert topo.graph.has_edge(v, u), "every cable is two directed links"


def _check_conservation(topo, s, t, fractions):
    out = {}
    inn = {}
    for idx, f in fractions.items():
        u, v = topo.links[idx]
        out[u] = out.get(u, 0.0) + f
        inn[v] = inn.get(v, 0.0) + f
    src, dst = topo.gpu_names[s], topo.gpu_names[t]
    assert out.get(src, 0.0) == pytest.approx(1.0)
    assert inn.get(dst, 0.0) == pytest.approx(1.0)
    assert inn.get(src, 0.0) == pytest.approx(0.0)
    for dev in set(out) | set(inn):
        if dev not in (src, dst):
            assert inn.get(dev, 0.0) == pytest.approx(out.get(dev, 0.0)), dev


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_path_fractions_conserve_flow(path):
    topo = load_topology(path)
    rng = np.random.default_rng(0)
    pairs = [(int(a), int(b)) for a, b in rng.integers(0, topo.num_gpus, size=(12, 2)) if a != b]
    pairs.append((0, topo.num_gpus - 1))
    for s, t in pairs:
        _check_conservation(topo, s, t, topo.paths.pair_fractions(s, t))


def _names(topo, fractions):
    return {topo.link_name(i): round(f, 6) for i, f in fractions.items()}


def test_same_node_nvswitch_path():
    topo = load_topology(TOPOLOGIES / "dgx-h100-2node.yaml")
    assert _names(topo, topo.paths.pair_fractions(0, 1)) == {
        "dgx0/gpu0 -> dgx0/nvswitch": 1.0, "dgx0/nvswitch -> dgx0/gpu1": 1.0}


def test_ecmp_cross_unit_path_spreads_over_spines():
    topo = load_topology(TOPOLOGIES / "h100-16node-rail.yaml")
    s, t = 0, 8 * 8 + 1  # dgx0/gpu0 -> dgx8/gpu1 (other scalable unit, other rail)
    got = _names(topo, topo.paths.pair_fractions(s, t))
    expected = {"dgx0/gpu0 -> dgx0/nic0": 1.0, "dgx0/nic0 -> su0/leaf0": 1.0,
                "su1/leaf1 -> dgx8/nic1": 1.0, "dgx8/nic1 -> dgx8/gpu1": 1.0}
    for k in range(8):
        expected[f"su0/leaf0 -> spine{k}"] = 0.125
        expected[f"spine{k} -> su1/leaf1"] = 0.125
    assert got == expected


def test_rail_aligned_path_crosses_nvlink_first():
    topo = load_topology(TOPOLOGIES / "h100-16node-rail.yaml", routing="rail_aligned")
    got = _names(topo, topo.paths.pair_fractions(0, 8 + 1))  # dgx0/gpu0 -> dgx1/gpu1, same unit
    assert got == {
        "dgx0/gpu0 -> dgx0/nvswitch": 1.0, "dgx0/nvswitch -> dgx0/gpu1": 1.0,
        "dgx0/gpu1 -> dgx0/nic1": 1.0, "dgx0/nic1 -> su0/leaf1": 1.0,
        "su0/leaf1 -> dgx1/nic1": 1.0, "dgx1/nic1 -> dgx1/gpu1": 1.0}


def test_degraded_node_spreads_over_working_nics():
    topo = load_topology(TOPOLOGIES / "hetero-degraded.yaml")
    s = int(np.flatnonzero((topo.gpu_node == 3) & (topo.gpu_local == 3))[0])  # NIC 3 is down
    got = _names(topo, topo.paths.pair_fractions(s, 0))
    working = [r for r in range(8) if r not in (3, 6)]
    assert got["dgx-degraded/gpu3 -> dgx-degraded/nvswitch"] == pytest.approx(1.0)
    for r in working:
        assert got[f"dgx-degraded/nic{r} -> switch"] == pytest.approx(1 / 6, abs=1e-6)


def test_pcie_node_routes_through_the_cpu_sockets():
    topo = load_topology(TOPOLOGIES / "pcie-8gpu.yaml")
    assert _names(topo, topo.paths.pair_fractions(0, 1)) == {
        "pcie0/gpu0 -> pcie0/pcie0": 1.0, "pcie0/pcie0 -> pcie0/gpu1": 1.0}
    got = _names(topo, topo.paths.pair_fractions(0, 7))
    assert got["pcie0/cpu0 -> pcie0/cpu1"] == 1.0
    assert len(got) == 5  # gpu0 -> pcie0 -> cpu0 -> cpu1 -> pcie3 -> gpu7


def test_explicit_fabric_trunk():
    topo = load_topology(TOPOLOGIES / "explicit-2node.yaml")
    got = _names(topo, topo.paths.pair_fractions(0, 8 + 5))  # nic0 on sw-a -> nic5 on sw-b
    assert got["sw-a -> sw-b"] == 1.0
    trunk = topo.graph.edges["sw-a", "sw-b"]["capacity"]
    assert trunk == 100.0  # two parallel cables add up


# ------------------------------------------- both forms of the link map against a slow reference

@pytest.mark.parametrize("name,routing", [
    ("dgx-h100-2node", None), ("h100-8node-oversub", "ecmp"), ("h100-8node-oversub", "rail_aligned"),
    ("hetero-degraded", "ecmp"), ("hetero-degraded", "rail_aligned"), ("pcie-8gpu", None),
    ("explicit-2node", "rail_aligned"),
])
def test_link_loads_match_slow_reference(name, routing):
    topo = load_topology(TOPOLOGIES / f"{name}.yaml", routing=routing)
    rng = np.random.default_rng(1)
    G = topo.num_gpus
    traffic = rng.random((G, G)) * (rng.random((G, G)) < 0.3)
    sources = rng.choice(G, size=min(G, 6), replace=False)
    sub = np.zeros_like(traffic)
    sub[sources] = traffic[sources]
    expected = np.zeros(topo.num_links)
    lm = link_map(topo)
    for s in sources:
        dst = np.array([t for t in range(G) if t != s])
        incidence = lm.pair_incidence(np.full(dst.size, s), dst).toarray()   # (G - 1, L)
        for t, row in zip(dst, incidence):
            ref = np.zeros(topo.num_links)
            for idx, f in reference_pair(topo, int(s), int(t)).items():
                ref[idx] = f
            np.testing.assert_allclose(row, ref, atol=1e-12)
            expected += sub[s, t] * ref
    np.testing.assert_allclose(topo.link_loads(sub), expected, rtol=1e-9, atol=1e-9)


def test_link_loads_are_linear_and_ignore_the_diagonal():
    topo = load_topology(TOPOLOGIES / "h100-8node-oversub.yaml")
    rng = np.random.default_rng(2)
    a, b = rng.random((2, 64, 64))
    np.testing.assert_allclose(topo.link_loads(a + 2 * b), topo.link_loads(a) + 2 * topo.link_loads(b))
    diag = np.diag(rng.random(64))
    assert np.all(topo.link_loads(diag) == 0)


def test_oversubscription_thins_the_uplinks():
    full = load_topology(TOPOLOGIES / "h100-16node-rail.yaml")
    thin = load_topology(TOPOLOGIES / "h100-8node-oversub.yaml")
    up_full = full.link_capacity[full.link_class_index["leaf_spine"]]
    up_thin = thin.link_capacity[thin.link_class_index["leaf_spine"]]
    # 8 nodes x 50 GB/s over 8 spines at 1:1; 4 nodes x 50 GB/s / 2 over 4 spines at 2:1.
    assert np.allclose(up_full, 8 * 50 / 8)
    assert np.allclose(up_thin, 4 * 50 / 2 / 4)


def test_three_tier_has_a_core():
    topo = load_topology(TOPOLOGIES / "h100-64node-3tier.yaml")
    core = topo.link_class_index["spine_core"]
    assert core.size == 2 * 4 * 8 * 8  # 4 units x 8 spines x 8 cores, both directions
    # Two nodes in different units meet only at the core.
    got = topo.paths.pair_fractions(0, 16 * 8)
    assert sum(f for i, f in got.items() if topo.link_class[i] == "spine_core") == pytest.approx(2.0)


def test_graph_node_kinds_and_rank_attributes():
    topo = load_topology(TOPOLOGIES / "dgx-h100-2node.yaml")
    kinds = nx.get_node_attributes(topo.graph, "kind")
    assert sorted(set(kinds.values())) == ["gpu", "nic", "nvswitch", "switch"]
    assert [topo.graph.nodes[n]["rank"] for n in topo.gpu_names] == list(range(16))


def test_inline_spec_builds():
    spec = parse_spec("""
name: two
nodes: [{prefix: n, count: 2, type: dgx-h100}]
fabric: {kind: switch}
""")
    topo = build_topology(spec)
    assert topo.num_gpus == 16 and topo.num_nodes == 2
