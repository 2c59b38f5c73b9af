"""The certificate where the fabric binds: every lower bound (analytic cuts, the node-level LP
and MILP, the per-GPU MILP) stays below the exact optimum (brute force) on tiny clusters whose
leaf/spine links are the bottleneck, and the cut sets are the fabric's."""

from __future__ import annotations

import numpy as np
import pytest

from epplan.placement.bounds import cut_bound, cut_sets, lower_bound
from epplan.placement.bruteforce import brute_force
from epplan.placement.layer import layer_data
from epplan.placement.nodelp import node_model
from epplan.placement.problem import PlacementProblem
from epplan.placement.solve import solve
from epplan.schedule import Schedule
from epplan.topology import build_topology, load_topology, parse_spec
from epplan.workload import load_model_config
from epplan.workload.traffic import Traffic

# Four one-GPU servers, two under each leaf, the leaves joined through a spine by thin links.
LEAF_SPINE = """name: toy-leaf-spine
node_types:
  toy:
    gpus: {gpus}
    gpu: {{model: toy, memory_gb: 80, bf16_tflops: {tflops}, hbm_gbps: 1000}}
    fabric: {{kind: nvswitch, gbps: 100}}
    nics: {{gbps: 50, attach: {attach}, pcie_gbps: 64}}
nodes: [{{prefix: n, count: 4, type: toy}}]
fabric:
  kind: explicit
  switches: [{{name: leaf-a, kind: leaf}}, {{name: leaf-b, kind: leaf}}, {{name: spine, kind: spine}}]
  links:
{nic_links}
    - {{a: leaf-a, b: spine, gbps: {trunk}}}
    - {{a: leaf-b, b: spine, gbps: {trunk}}}
"""


def leaf_spine(gpus: int = 1, trunk: float = 10.0, tflops: float = 2000.0):
    nic_links = "\n".join(f"    - {{a: n{n}/nic{i}, b: leaf-{'a' if n < 2 else 'b'}, gbps: 50}}"
                          for n in range(4) for i in range(gpus))
    text = LEAF_SPINE.format(gpus=gpus, tflops=tflops, attach=list(range(gpus)), nic_links=nic_links,
                             trunk=trunk)
    return build_topology(parse_spec(text))


def problem_on(topo, experts: int, *, seed: int, d_ff: int = 256, overlap: str = "auto") -> PlacementProblem:
    config = load_model_config("tiny", {"num_experts": experts, "d_ff": d_ff, "num_layers": 1})
    rng = np.random.default_rng(seed)
    g = topo.num_gpus
    counts = rng.gamma(0.7, size=(1, g, experts)) + 1e-3
    counts *= config.tokens_per_step / g * config.top_k / counts.sum(axis=2, keepdims=True)
    return PlacementProblem(topo, config, Traffic(counts, "test"), overlap=overlap)


def test_cut_sets_are_the_fabric_s():
    topo = leaf_spine()
    sets = cut_sets(topo)
    assert [s[0].tolist() for s in sets] == [[0], [1], [2], [3], [0, 1], [2, 3]]
    # A leaf's servers leave through its trunk: 10 GB/s out, 10 in.
    assert sets[4][1] == sets[4][2] == 10e9
    oversub = load_topology("topologies/h100-8node-oversub.yaml")
    su = [s for s in cut_sets(oversub) if s[0].size == 4]
    assert [s[0].tolist() for s in su] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert all(s[1] == 32 * 50e9 / 2 for s in su)  # 2:1: half of its 32 NICs' 50 GB/s
    assert cut_sets(load_topology("topologies/dgx-h100-1node.yaml")) == []


@pytest.mark.parametrize("overlap", ["off", "on"])
@pytest.mark.parametrize("seed", range(3))
def test_every_bound_is_below_the_optimum_where_the_spine_binds(seed, overlap):
    problem = problem_on(leaf_spine(), 4, seed=seed, overlap=overlap)
    best, _ = brute_force(problem)
    data = layer_data(problem, problem.traffic.counts[0])
    analytic, _ = lower_bound(data)
    lp = node_model(data, integer=False)
    milp = node_model(data, integer=True)
    assert lp.status == milp.status == "optimal"
    for bound in (analytic, lp.bound, milp.bound):
        assert 0 < bound <= best * (1 + 1e-7)
    assert lp.bound <= milp.bound * (1 + 1e-9)
    plan = solve(problem, gap=0.0, time_limit=30)
    layer = plan.info["layers"][0]
    assert layer["objective_s"] == pytest.approx(best, rel=1e-6)
    assert layer["bound_s"] <= best * (1 + 1e-6)


def test_leaf_cut_sees_the_trunk():
    """Four experts, one per server: each leaf holds two, so half of every source's demand
    crosses the 10 GB/s trunk; with the leaf sets the cut bound counts it, with servers alone
    it would see only the 50 GB/s NICs."""
    topo = leaf_spine()
    problem = problem_on(topo, 4, seed=7, overlap="off")
    data = layer_data(problem, problem.traffic.counts[0])
    counts = data.counts
    b2 = 2.0 * problem.bytes_per_assignment
    leaf = [np.array([0, 1]), np.array([2, 3])]
    unavoidable = [counts[m].sum() - np.sort(counts[m].sum(axis=0))[::-1][:2].sum() for m in leaf]
    assert cut_bound(data) >= b2 * max(unavoidable) / 10e9 * (1 - 1e-12)
