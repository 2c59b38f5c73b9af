"""The cost function against hand-computed cases, its fast path against the reference, and
conservation of bytes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import scipy.sparse as sp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epplan.cost import SPEC_PEAK_TFLOPS, LinkMap, LowRank, evaluate, layer_flow_parts
from epplan.errors import PlacementError, TrafficError
from epplan.placement.baselines import contiguous, eplb, random_placement
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import LayerPlacement, Placement
from epplan.schedule import Schedule
from epplan.topology import build_topology, load_topology, parse_spec
from epplan.workload import make_traffic
from epplan.workload.config import ModelConfig
from epplan.workload.flops import model_costs
from epplan.workload.memory import dense_parameter_shapes, weight_cast_bytes
from epplan.workload.traffic import Traffic
from tests.link_reference import reference_link_loads

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"

# One server, 2 GPUs on an NVSwitch at 100 GB/s each.
TWO_GPUS = """
name: two-gpus
node_types:
  box:
    gpus: 2
    gpu: {model: X, memory_gb: 80, bf16_tflops: 100, hbm_gbps: 1000}
    fabric: {kind: nvswitch, gbps: 100}
nodes:
  - {name: n0, type: box}
"""

# Two such servers, one 10 GB/s NIC per GPU (rails 0 and 1), one switch.
TWO_BY_TWO = """
name: two-by-two
node_types:
  box:
    gpus: 2
    gpu: {model: X, memory_gb: 80, bf16_tflops: 100, hbm_gbps: 1000}
    fabric: {kind: nvswitch, gbps: 100}
    nics: {gbps: 10, attach: [0, 1], pcie_gbps: 40}
nodes:
  - {prefix: n, count: 2, type: box}
fabric: {kind: switch}
"""


def small_config(num_experts: int, num_gpus: int, **kw) -> ModelConfig:
    fields = dict(name="small", num_layers=1, num_experts=num_experts, top_k=1, d_model=8, d_ff=16,
                  num_heads=2, head_dim=4, num_kv_heads=2, vocab_size=16, seq_len=4, global_batch=num_gpus)
    fields.update(kw)
    return ModelConfig(**fields)


def topo_of(text: str, routing: str | None = None):
    return build_topology(parse_spec(text), routing=routing)


def one_per_gpu(num_gpus: int, num_layers: int = 1) -> Placement:
    layer = LayerPlacement([np.array([g]) for g in range(num_gpus)], [np.ones((num_gpus, 1))] * num_gpus)
    return Placement(num_gpus, num_gpus, [layer] * num_layers, method="hand")


def link(topo, u: str, v: str) -> int:
    return topo.graph.edges[u, v]["idx"]


def test_two_gpus_one_nvswitch_by_hand():
    topo = topo_of(TWO_GPUS)
    config = small_config(2, 2)
    counts = np.array([[[30.0, 10.0], [20.0, 40.0]]])  # [layer, source, expert]
    problem = PlacementProblem(topo, config, Traffic(counts, "hand"))
    cost = evaluate(one_per_gpu(2), problem)
    costs = model_costs(config)
    b = costs.bytes_per_assignment
    assert b == 16
    up0, up1 = link(topo, "n0/gpu0", "n0/nvswitch"), link(topo, "n0/gpu1", "n0/nvswitch")
    down1 = link(topo, "n0/nvswitch", "n0/gpu1")
    # F = counts (expert e on GPU e). Dispatch fwd 0->1 carries F[0,1] = 10, combine fwd F[1,0] = 20.
    assert cost.dispatch_fwd_bytes[0, up0] == b * 10 and cost.combine_fwd_bytes[0, up0] == b * 20
    assert cost.dispatch_fwd_bytes[0, up1] == b * 20 and cost.combine_fwd_bytes[0, up1] == b * 10
    a2a = 2 * b * (10 + 20)  # 2b (F + F^T)[0, 1]
    assert cost.a2a_bytes[0, up0] == cost.a2a_bytes[0, down1] == a2a
    assert cost.a2a_link_s[0] == pytest.approx(a2a / 100e9)
    # Expert compute: GPU0 serves 30 + 20, GPU1 10 + 40, each 3 x 2 x params_per_expert FLOPs.
    np.testing.assert_allclose(cost.expert_assignments[0], [50, 50])
    rate = 0.6 * 100e12
    expert_s = 50 * 2 * (2 * 8 * 16) * 3 / rate
    np.testing.assert_allclose(cost.expert_compute_s[0], [expert_s, expert_s])
    assert cost.bottleneck_s[0] == pytest.approx(max(a2a / 100e9, expert_s))
    # Dense: tokens per rank x (attention + router) FLOPs x 3.
    dense_s = 4 * (costs.flops_fwd_moe_layer - costs.flops_routed_experts) * 3 / rate
    np.testing.assert_allclose(cost.dense_compute_s[0], [dense_s, dense_s])
    # One node: `epplan run` does not overlap there, so the exchange adds to the GEMMs.
    assert cost.schedule == Schedule(False, 1)
    assert cost.moe_time_s[0] == pytest.approx(a2a / 100e9 + expert_s)
    assert cost.layer_time_s[0] == pytest.approx(dense_s + a2a / 100e9 + expert_s)
    # Dense DP ring over 2 ranks: each hop carries 2 (2-1)/2 x dense bytes.
    assert cost.dense_sync_bytes[up0] == pytest.approx(costs.params_dense * 2)
    assert cost.expert_sync_s == 0.0  # no expert has two replicas
    other_s = 4 * costs.flops_lm_head * 3 / rate
    # `epplan run` all-reduces after the backward pass, overlapping nothing: the dense ring shows.
    exposed = costs.params_dense * 2 / 100e9
    assert cost.exposed_sync_s == pytest.approx(exposed)
    assert cost.step_time_s == pytest.approx(cost.layer_time_s.sum() + other_s + exposed)
    assert cost.mfu_spec == pytest.approx(costs.model_flops_per_step / (cost.step_time_s * 2 * SPEC_PEAK_TFLOPS * 1e12))
    assert cost.mfu_datasheet == pytest.approx(costs.model_flops_per_step / (cost.step_time_s * 2 * 100e12))
    # Memory: dense params + one expert, fp32 weights and grads (the runtime's master copy), two
    # fp32 AdamW moments and a step counter per tensor; bf16 copies of the linear weights.
    params = costs.params_dense + 4 * 8 + costs.params_per_expert  # + the 4 x 8 position embedding
    np.testing.assert_allclose(cost.weight_bytes, 4 * params)
    num_tensors = len(dense_parameter_shapes(problem.config)) + 2  # + the layer's w1, w2
    np.testing.assert_allclose(cost.optimizer_bytes, 8 * params + 4 * num_tensors)
    # The peak (one micro-batch): the expert backward's input pass, every activation still held
    # with the head weight's gradient the chunked loss made (V x d, fp32) and the pass's
    # transients (dy, dx, da, dh: 2 d + 2 f bf16 per assignment); of the gradients, the LM head's,
    # the final norm's and the layer's dense ones are made, not yet the expert's.
    per_token = (costs.act_bytes_per_token_attention + costs.act_bytes_per_token_moe_local
                 + costs.act_bytes_per_token_head)
    casts = 2 * (costs.params_attention + costs.params_lm_head + costs.params_per_expert)
    transient = 50 * 2 * (2 * 8 + 2 * 16)
    np.testing.assert_allclose(cost.activation_bytes, 4 * per_token + 50 * costs.act_bytes_per_assignment
                               + 16 * 8 * 4 + transient + casts)
    head_and_layer = (costs.params_lm_head + costs.params_final_norm + costs.params_attention + 2 * 8
                      + costs.params_router)
    np.testing.assert_allclose(cost.grad_bytes, 4 * head_and_layer)
    assert cost.fits_memory


def test_two_nodes_through_one_switch_by_hand():
    topo = topo_of(TWO_BY_TWO)
    assert topo.routing == "ecmp"
    counts = np.zeros((1, 4, 4))
    counts[0, 0, 2] = 100.0  # n0/gpu0 -> expert 2 on n1/gpu0
    problem = PlacementProblem(topo, small_config(4, 4), Traffic(counts, "hand"))
    cost = evaluate(one_per_gpu(4), problem)
    b = 16
    path = [("n0/gpu0", "n0/nic0"), ("n0/nic0", "switch"), ("switch", "n1/nic0"), ("n1/nic0", "n1/gpu0")]
    for u, v in path:
        k = link(topo, u, v)
        assert cost.dispatch_fwd_bytes[0, k] == b * 100, (u, v)
        assert cost.combine_fwd_bytes[0, k] == 0.0
        assert cost.combine_fwd_bytes[0, link(topo, v, u)] == b * 100  # combine comes back
    loaded = np.flatnonzero(cost.a2a_bytes[0])
    assert sorted(loaded) == sorted(link(topo, u, v) for u, v in path + [(v, u) for u, v in path])
    assert cost.a2a_link_s[0] == pytest.approx(2 * b * 100 / 10e9)  # NIC, 10 GB/s
    assert topo.link_class[cost.a2a_link[0]] in ("nic_up", "nic_down")
    assert cost.binds == ["link"]
    np.testing.assert_allclose(cost.expert_assignments[0], [0, 0, 100, 0])


@pytest.mark.parametrize("routing", ["ecmp", "rail_aligned"])
def test_rail_aligned_path_crosses_nvlink_to_the_rail_nic(routing):
    topo = topo_of(TWO_BY_TWO, routing)
    counts = np.zeros((1, 4, 4))
    counts[0, 0, 3] = 100.0  # n0/gpu0 (rail 0) -> expert 3 on n1/gpu1 (rail 1)
    cost = evaluate(one_per_gpu(4), PlacementProblem(topo, small_config(4, 4), Traffic(counts, "hand")))
    d = cost.dispatch_fwd_bytes[0]
    b100 = 16 * 100
    if routing == "rail_aligned":  # PXN: NVLink to n0/gpu1, out through rail 1's NIC
        for u, v in [("n0/gpu0", "n0/nvswitch"), ("n0/nvswitch", "n0/gpu1"), ("n0/gpu1", "n0/nic1"),
                     ("n0/nic1", "switch"), ("switch", "n1/nic1"), ("n1/nic1", "n1/gpu1")]:
            assert d[link(topo, u, v)] == b100, (u, v)
        assert d[link(topo, "n0/nic0", "switch")] == 0.0
        assert d.sum() == 6 * b100
    else:  # out through its own NIC on rail 0, in through the destination's own NIC (rail 1)
        for u, v in [("n0/gpu0", "n0/nic0"), ("n0/nic0", "switch"), ("switch", "n1/nic1"),
                     ("n1/nic1", "n1/gpu1")]:
            assert d[link(topo, u, v)] == b100, (u, v)
        assert d[link(topo, "n0/nic1", "switch")] == 0.0
        assert d.sum() == 4 * b100


def test_replicas_split_a_source_s_tokens():
    topo = topo_of(TWO_GPUS)
    config = small_config(1, 2)
    counts = np.array([[[40.0], [20.0]]])
    split = np.array([[0.25, 0.75], [0.5, 0.5]])  # source 0: 10 local, 30 to GPU1; source 1: 10 / 10
    placement = Placement(2, 1, [LayerPlacement([np.array([0, 1])], [split])], method="hand")
    cost = evaluate(placement, PlacementProblem(topo, config, Traffic(counts, "hand")))
    np.testing.assert_allclose(cost.expert_assignments[0], [10 + 10, 30 + 10])
    assert cost.expert_gpu[0] == 1
    up0 = link(topo, "n0/gpu0", "n0/nvswitch")
    assert cost.dispatch_fwd_bytes[0, up0] == 16 * 30 and cost.combine_fwd_bytes[0, up0] == 16 * 10
    # Gradient ring over the 2 replicas: each hop carries 2 (2-1)/2 x expert bytes.
    costs = model_costs(config)
    assert cost.expert_sync_bytes[up0] == pytest.approx(costs.params_per_expert * 2)
    assert cost.expert_sync_s == pytest.approx(costs.params_per_expert * 2 / 100e9)


def test_all_local_traffic_puts_nothing_on_the_network():
    topo = topo_of(TWO_BY_TWO)
    counts = np.zeros((2, 4, 4))
    counts[:, np.arange(4), np.arange(4)] = 250.0  # every source routes to the expert on its own GPU
    config = small_config(4, 4, num_layers=2)
    cost = evaluate(one_per_gpu(4, 2), PlacementProblem(topo, config, Traffic(counts, "hand")))
    assert not cost.dispatch_fwd_bytes.any() and not cost.combine_fwd_bytes.any()
    assert np.all(cost.a2a_link_s == 0.0)
    assert cost.binds == ["gpu", "gpu"]
    np.testing.assert_allclose(cost.bottleneck_s, cost.expert_compute_s.max(axis=1))


def test_memory_peak_holds_every_kept_activation_and_scales_with_micro_batches():
    topo = load_topology(TOPOLOGIES / "dgx-h100-2node.yaml")
    config = small_config(8, 16, num_layers=3, top_k=2, global_batch=32, d_model=64, d_ff=256,
                          vocab_size=64, seq_len=256)
    traffic = make_traffic("zipf:1.1", config, 16)
    problem = PlacementProblem(topo, config, traffic)
    placement = eplb(problem)
    costs = model_costs(config)
    held = np.zeros(16)
    for layer in placement.layers:
        held += np.bincount(np.concatenate(layer.replicas), minlength=16)
    casts = weight_cast_bytes(config, costs, held, "none")  # the bf16 weight copies: not per token
    head_weight = config.vocab_size * config.d_model * 4    # the head weight's gradient (fp32)
    b, d, f = config.dtype_bytes, config.d_model, config.d_ff
    tokens = config.tokens_per_step / 16
    for micro_batches in (1, 2, 4):
        cost = evaluate(placement, PlacementProblem(topo, config, traffic, micro_batches=micro_batches))
        served = cost.expert_assignments / micro_batches                          # [L, G]
        kept = (tokens / micro_batches * (config.num_layers * (costs.act_bytes_per_token_attention
                                                               + costs.act_bytes_per_token_moe_local)
                                          + costs.act_bytes_per_token_head)
                + served.sum(axis=0) * costs.act_bytes_per_assignment + head_weight)
        act = cost.activation_bytes - casts
        # The forward's end holds every activation kept for backward; the peak is at most one
        # transient more: a loss chunk's logits and gradient, or an expert backward's pass.
        assert np.all(act >= kept - 1e-6)
        largest = max(2 * b * min(8192, tokens / micro_batches) * config.vocab_size,
                      float(served.max()) * b * (2 * d + 2 * f))
        if micro_batches > 1:  # every gradient is there from the first micro-batch's backward on
            np.testing.assert_array_equal(cost.grad_bytes, cost.weight_bytes)
            assert np.all(act <= kept + largest + 1e-6)
        else:  # with one, only those backward has made by the peak
            assert np.all(cost.grad_bytes < cost.weight_bytes)
            assert np.all(act + cost.grad_bytes <= kept + largest + cost.weight_bytes)
        # never less than the step's end, where every gradient is held
        assert np.all(cost.memory_bytes >= cost.weight_bytes * 2 + cost.optimizer_bytes + casts - 1e-6)
        if micro_batches > 1:
            assert np.all(cost.memory_bytes < previous)
            assert cost.step_time_s == first.step_time_s
        else:
            first = cost
        previous = cost.memory_bytes


def test_problem_validation_names_the_flag():
    topo = topo_of(TWO_BY_TWO)
    config = small_config(6, 4)
    traffic = make_traffic("uniform", config, 4)
    with pytest.raises(PlacementError, match="experts_per_gpu=2"):
        PlacementProblem(topo, config, traffic)
    problem = PlacementProblem(topo, config, traffic, experts_per_gpu=2)
    cost = evaluate(contiguous(problem), problem)
    assert cost.step_time_s > 0
    with pytest.raises(TrafficError, match=r"\[1, 4, 6\]"):
        PlacementProblem(topo, config, make_traffic("uniform", config, 2), experts_per_gpu=2)
    with pytest.raises(PlacementError, match="efficiency"):
        PlacementProblem(topo, config, traffic, experts_per_gpu=2, compute_efficiency=1.5)


def test_placement_of_another_problem_is_rejected():
    topo = topo_of(TWO_BY_TWO)
    problem = PlacementProblem(topo, small_config(4, 4), make_traffic("uniform", small_config(4, 4), 4))
    with pytest.raises(PlacementError, match="2 ranks"):
        evaluate(one_per_gpu(2), problem)


def test_tflops_override():
    topo = topo_of(TWO_GPUS)
    config = small_config(2, 2)
    traffic = make_traffic("uniform", config, 2)
    a = evaluate(one_per_gpu(2), PlacementProblem(topo, config, traffic, compute_efficiency=0.5))
    b = evaluate(one_per_gpu(2), PlacementProblem(topo, config, traffic, achievable_tflops=50.0))
    np.testing.assert_allclose(a.expert_compute_s, b.expert_compute_s)


# ------------------------------------------------------------------------- fast vs reference

DEGRADED_RAIL = """
name: degraded-rail
nodes:
  - {prefix: a, count: 3, type: dgx-h100}
  - {name: bad, type: dgx-h100, disabled_nics: [1, 5]}
fabric: {kind: rail_optimized, nodes_per_su: 2, spines: 2, oversubscription: 2.0}
routing: rail_aligned
"""


@pytest.mark.parametrize("name", sorted(p.stem for p in TOPOLOGIES.glob("*.yaml")) + ["degraded-rail"])
def test_link_map_equals_slow_reference(name):
    if name == "degraded-rail":
        topos = [topo_of(DEGRADED_RAIL), topo_of(DEGRADED_RAIL, "ecmp")]
    else:
        topos = [load_topology(TOPOLOGIES / f"{name}.yaml")]
        if topos[0].num_gpus <= 128:
            topos.append(load_topology(TOPOLOGIES / f"{name}.yaml",
                                       routing="ecmp" if topos[0].routing == "rail_aligned" else "rail_aligned"))
    for topo in topos:
        lm = LinkMap(topo)
        rng = np.random.default_rng(7)
        t = rng.random((topo.num_gpus, topo.num_gpus)) * (rng.random((topo.num_gpus, topo.num_gpus)) < 0.5)
        got, got_t = lm.pair_loads(t)
        np.testing.assert_allclose(got, reference_link_loads(topo, t), rtol=1e-9, atol=1e-9 * t.sum())
        np.testing.assert_allclose(got_t, reference_link_loads(topo, t.T), rtol=1e-9, atol=1e-9 * t.sum())
        np.testing.assert_allclose(lm.loads(sp.csr_matrix(t)), got, rtol=1e-12, atol=1e-12 * t.sum())
        low = LowRank(rng.random((topo.num_gpus, 3)), rng.random((3, topo.num_gpus)))
        for got, want in zip(lm.pair_loads(low), (low.dense(), low.dense().T)):
            np.testing.assert_allclose(got, reference_link_loads(topo, want), rtol=1e-9, atol=1e-9 * want.sum())


@pytest.mark.parametrize("routing", ["ecmp", "rail_aligned"])
def test_fast_evaluate_equals_reference(routing):
    topo = load_topology(TOPOLOGIES / "h100-8node-oversub.yaml", routing=routing)
    config = small_config(16, 64, num_layers=3, top_k=2, global_batch=64)
    problem = PlacementProblem(topo, config, make_traffic("zipf:1.3", config, 64, seed=3))
    for placement in (eplb(problem), random_placement(problem, 5, even_split=False)):
        fast, ref = evaluate(placement, problem), evaluate(placement, problem, fast=False)
        for name in ("dispatch_fwd_bytes", "combine_fwd_bytes", "expert_sync_bytes", "dense_sync_bytes"):
            np.testing.assert_allclose(getattr(fast, name), getattr(ref, name), rtol=1e-5)
        for name in ("a2a_link_s", "bottleneck_s", "expert_assignments", "layer_time_s"):
            np.testing.assert_allclose(getattr(fast, name), getattr(ref, name), rtol=1e-9)
        assert fast.step_time_s == pytest.approx(ref.step_time_s, rel=1e-9)


def test_layer_flow_parts_sum_to_flows():
    rng = np.random.default_rng(0)
    counts = rng.random((4, 3)) * 100
    shared = np.broadcast_to([0.3, 0.7], (4, 2))
    per_source = rng.dirichlet([1.0, 1.0], size=4)
    replicas = [np.array([0, 1]), np.array([2, 3]), np.array([1])]
    mixed = LayerPlacement(replicas, [per_source, shared.copy(), np.ones((4, 1))])
    even = LayerPlacement(replicas, [shared.copy(), shared.copy(), np.ones((4, 1))])
    for layer, want in ((mixed, (True, True)), (even, (True, False))):
        low, dense_t = layer_flow_parts(layer, counts)
        assert (low is not None, dense_t is not None) == want
        total = (low.dense() if low is not None else 0) + (dense_t.T if dense_t is not None else 0)
        np.testing.assert_allclose(total, layer.flows(counts))


def test_low_rank_traffic_scores_like_its_dense_matrix():
    topo = topo_of(DEGRADED_RAIL)
    rng = np.random.default_rng(3)
    low = LowRank(rng.random((topo.num_gpus, 5)), rng.random((5, topo.num_gpus)))
    got = LinkMap(topo).pair_loads(low)
    want = (reference_link_loads(topo, low.dense()), reference_link_loads(topo, low.dense().T))
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-9 * w.max())


# ------------------------------------------------------------------------- conservation

_CONSERVATION_TOPOS = {
    "two-by-two ecmp": lambda: topo_of(TWO_BY_TWO),
    "two-by-two rail": lambda: topo_of(TWO_BY_TWO, "rail_aligned"),
    "pcie-8gpu": lambda: load_topology(TOPOLOGIES / "pcie-8gpu.yaml"),
    "degraded-rail": lambda: topo_of(DEGRADED_RAIL),
}
_TOPO_CACHE: dict = {}


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.sampled_from(sorted(_CONSERVATION_TOPOS)), num_experts=st.integers(1, 12),
       seed=st.integers(0, 2**31 - 1))
def test_bytes_are_conserved(which, num_experts, seed):
    """What each GPU sends leaves it, what it receives arrives, and every switch, NIC and
    forwarding GPU passes on exactly what it takes in."""
    topo = _TOPO_CACHE.setdefault(which, _CONSERVATION_TOPOS[which]())
    num_gpus = topo.num_gpus
    epg = -(-num_experts // num_gpus)
    config = small_config(num_experts, num_gpus, num_layers=2)
    rng = np.random.default_rng(seed)
    counts = rng.random((2, num_gpus, num_experts)) * 100 * (rng.random((2, num_gpus, num_experts)) < 0.7)
    problem = PlacementProblem(topo, config, Traffic(counts, "random"), experts_per_gpu=epg)
    placement = random_placement(problem, seed, even_split=False)
    placement.validate(epg)
    cost = evaluate(placement, problem)
    b = problem.bytes_per_assignment
    node_index = {v: i for i, v in enumerate(topo.graph.nodes)}
    src = np.array([node_index[u] for u, _ in topo.links])
    dst = np.array([node_index[v] for _, v in topo.links])
    gpu_index = np.array([node_index[name] for name in topo.gpu_names])
    for li in range(2):
        flows = placement.layers[li].flows(counts[li])
        np.testing.assert_allclose(cost.expert_assignments[li], flows.sum(axis=0))
        assert cost.expert_assignments[li].sum() == pytest.approx(counts[li].sum())
        remote = flows - np.diag(np.diag(flows))
        for loads, matrix in ((cost.dispatch_fwd_bytes[li], remote), (cost.combine_fwd_bytes[li], remote.T)):
            loads = loads.astype(np.float64)
            out = np.bincount(src, weights=loads, minlength=len(node_index))
            into = np.bincount(dst, weights=loads, minlength=len(node_index))
            net = np.zeros(len(node_index))
            net[gpu_index] = b * (matrix.sum(axis=1) - matrix.sum(axis=0))  # sent - received
            np.testing.assert_allclose(out - into, net, rtol=1e-5, atol=1e-3 * b * max(counts.sum(), 1))


ONE_GPU_PER_NODE = """
name: one-per-node
node_types:
  box:
    gpus: 1
    gpu: {model: X, memory_gb: 80, bf16_tflops: 100, hbm_gbps: 1000}
    fabric: {kind: nvswitch, gbps: 100}
    nics: {gbps: 10, attach: [0], pcie_gbps: 40}
nodes:
  - {prefix: n, count: 4, type: box}
fabric: {kind: switch}
"""


def test_one_gpu_per_node_has_no_same_node_pairs():
    # Regression: no same-node pair at all used to crash the fast link map (sparse gradient rings).
    topo = topo_of(ONE_GPU_PER_NODE)
    config = small_config(4, 4, num_layers=2, top_k=2)
    problem = PlacementProblem(topo, config, make_traffic("zipf:1.2", config, 4, seed=1))
    for placement in (contiguous(problem), random_placement(problem, 2, even_split=False)):
        fast, ref = evaluate(placement, problem), evaluate(placement, problem, fast=False)
        for name in ("dispatch_fwd_bytes", "combine_fwd_bytes", "expert_sync_bytes", "dense_sync_bytes"):
            np.testing.assert_allclose(getattr(fast, name), getattr(ref, name), rtol=1e-5)
        assert fast.dense_sync_bytes.sum() > 0


def test_one_gpu_is_scored_unchunked_whatever_the_overlap_flag():
    """The runtime keeps a single rank's rows in place and never chunks them, so a one-GPU
    topology's schedule is serial even with overlap on; two GPUs keep the chunks."""
    from epplan.schedule import default_schedule
    from epplan.topology import load_topology
    from epplan.workload import load_model_config
    from epplan.workload.flops import model_costs

    config = load_model_config("seed")
    one = load_topology("scripts/device/gpu-h200.yaml")
    assert not default_schedule(one, config, model_costs(config), overlap="on", num_chunks=8).overlap
    two = load_topology("topologies/h100-pair.yaml")
    assert default_schedule(two, config, model_costs(config), overlap="on", num_chunks=8).num_chunks == 8
