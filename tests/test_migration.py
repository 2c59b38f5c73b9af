"""Moving between placements: the moves, sources and bytes against a hand count, link bytes
against the path model's reference, and what costs nothing (dropped replicas, re-splits)."""

from __future__ import annotations

import numpy as np
import pytest

from epplan.cost.migration import plan_migration, replica_bytes, replica_state_bytes
from epplan.errors import ConfigError, PlacementError
from epplan.placement.problem import PlacementProblem
from epplan.placement.types import LayerPlacement, Placement
from epplan.topology import build_topology, parse_spec
from epplan.workload import make_traffic
from epplan.workload.flops import model_costs
from epplan.workload.memory import dense_parameter_shapes, memory_per_gpu
from tests.test_cost import TWO_BY_TWO, small_config


def _problem(num_layers: int, **kw) -> PlacementProblem:
    topo = build_topology(parse_spec(TWO_BY_TWO))
    config = small_config(2, 4, num_layers=num_layers, **kw)
    return PlacementProblem(topo, config, make_traffic("uniform", config, 4))


def _placement(layers: list[list[list[int]]], num_ranks: int = 4) -> Placement:
    out = []
    for replicas in layers:
        reps = [np.array(r, dtype=np.int64) for r in replicas]
        out.append(LayerPlacement(reps, [np.full((num_ranks, r.size), 1.0 / r.size) for r in reps]))
    return Placement(num_ranks, len(layers[0]), out)


def test_replica_bytes_hand_count_and_memory_model():
    # gelu expert, d_model 8, d_ff 16: 2 * 8 * 16 = 256 elements, fp32 storage for bf16.
    config = small_config(2, 4)
    assert replica_state_bytes(config) == {"weights": 1024, "exp_avg": 1024, "exp_avg_sq": 1024,
                                           "step": 8}
    assert replica_bytes(config) == 3080
    swiglu64 = small_config(2, 4, activation="swiglu", dtype="fp64")
    assert replica_bytes(swiglu64) == 3 * 384 * 8 + 3 * 4
    # The memory model charges one more replica exactly its weights and moments (the step
    # counters there are per weight tensor and layer, held whether or not the rank has experts).
    costs = model_costs(config)
    args = dict(tokens_per_rank=1.0, served=np.zeros((1, 1)), micro_batches=1, recompute="none",
                optimizer_sharding="none")
    one = memory_per_gpu(config, costs, replicas_held=np.array([1]), **args)
    two = memory_per_gpu(config, costs, replicas_held=np.array([2]), **args)
    delta = (two["weight_bytes"] + two["optimizer_bytes"] - one["weight_bytes"] - one["optimizer_bytes"])
    state = replica_state_bytes(config)
    assert float(delta[0]) == state["weights"] + state["exp_avg"] + state["exp_avg_sq"]


def test_bf16_moments_halve_the_optimizer_state_moved_held_and_stepped():
    """optimizer_state_dtype bf16: 2 bytes per moment in a move, in memory and in the step's
    bytes (24 per parameter against 32); tensor parallelism is refused by name."""
    from epplan.cost.step import optimizer_bytes
    from epplan.workload.memory import optimizer_state_conflict, state_bytes

    config = small_config(2, 4)
    half = config.replace(optimizer_state_dtype="bf16")
    assert (state_bytes(config), state_bytes(half)) == (4, 2)
    assert replica_state_bytes(half) == {"weights": 1024, "exp_avg": 512, "exp_avg_sq": 512, "step": 8}
    costs = model_costs(config)
    args = dict(replicas_held=np.array([3]), tokens_per_rank=1.0, served=np.zeros((1, 1)), micro_batches=1,
                recompute="none", optimizer_sharding="none")
    full_state, half_state = (memory_per_gpu(c, costs, **args)["optimizer_bytes"][0] for c in (config, half))
    elements = sum(int(np.prod(shape)) for _, shape in dense_parameter_shapes(config)) + 3 * costs.params_per_expert
    assert full_state - half_state == 2 * 2 * elements  # two moments, 2 bytes less each
    assert optimizer_bytes(10.0, 0.0, 4) == 320.0 and optimizer_bytes(10.0, 3.0, 2) == 246.0
    assert optimizer_state_conflict(config, "dense", 2) is None
    assert optimizer_state_conflict(half, "none", 1) is None and optimizer_state_conflict(half, "all", 1) is None
    message = optimizer_state_conflict(half, "dense", 2)
    assert "--tp 1" in message and "optimizer_state_dtype=fp32" in message
    with pytest.raises(ConfigError, match="optimizer_state_dtype"):
        config.replace(optimizer_state_dtype="fp8")


def test_moves_sources_and_bytes_by_hand():
    # Two nodes x two GPUs; GPU i of each node sits on rail i.
    problem = _problem(3)
    old = _placement([[[0], [1, 2, 3]],     # layer 0
                      [[0, 1], [2, 3]],     # layer 1
                      [[0, 2], [1, 3]]])    # layer 2
    new = _placement([[[0, 3], [1, 2]],     # e0 -> 3: only rank 0 holds it (other node, other rail)
                      [[0, 2], [1, 3]],     # e0 -> 2 from 0 (same rail); e1 -> 1 from 3 (same rail)
                      [[2, 3], [0, 1]]])    # e0 -> 3 from 2 (same node); e1 -> 0 from 1 (same node)
    mig = plan_migration(old, new, problem)
    b = replica_bytes(problem.config)
    got = [(m.layer, m.expert, m.src_rank, m.dst_rank, m.bytes) for m in mig.moves]
    assert got == [(0, 0, 0, 3, b), (1, 0, 0, 2, b), (1, 1, 3, 1, b), (2, 0, 2, 3, b), (2, 1, 1, 0, b)]
    assert mig.bytes_moved == 5 * b
    assert mig.bytes_per_layer(3).tolist() == [b, 2 * b, 2 * b]
    # Link bytes are the path model's routing of the src -> dst bytes (the slow reference).
    traffic = np.zeros((4, 4))
    for m in mig.moves:
        traffic[m.src_rank, m.dst_rank] += m.bytes
    ref = problem.topology.link_loads(traffic)
    np.testing.assert_allclose(mig.link_bytes, ref, rtol=1e-12, atol=1e-9)
    # The busiest link sets the time: rank 0's NIC up-link (10 GB/s, ECMP routing sends a GPU's
    # traffic through its own NIC) carries two replicas, 0 -> 3 and 0 -> 2.
    capacity = problem.topology.link_capacity * 1e9
    assert mig.seconds == pytest.approx(float((ref / capacity).max()))
    assert mig.seconds == pytest.approx(2 * b / 10e9)


def test_what_costs_nothing():
    problem = _problem(1)
    old = _placement([[[0, 1], [2, 3]]])
    # Dropping replicas and changing the splits move nothing.
    new = _placement([[[0], [3]]])
    for target in (old, new):
        mig = plan_migration(old, target, problem)
        assert mig.moves == () and mig.bytes_moved == 0.0 and mig.seconds == 0.0
        assert not mig.link_bytes.any()


def test_shapes_must_match():
    problem = _problem(2)
    with pytest.raises(PlacementError, match="same model and cluster"):
        plan_migration(_placement([[[0], [1]]]), _placement([[[0], [1]], [[2], [3]]]), problem)
