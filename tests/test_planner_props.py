"""Properties of every plan: feasible, and the manifest's placement scores what the planner said."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from epplan.cost import evaluate
from epplan.manifest import build_manifest, manifest_from_doc
from epplan.placement.layer import gpu_slots
from epplan.placement.problem import PlacementProblem
from epplan.placement.solve import solve
from epplan.workload import load_model_config
from epplan.workload.traffic import Traffic

from test_planner import toy_topology


@st.composite
def problems(draw):
    nodes = draw(st.integers(1, 2))
    gpus = draw(st.integers(2, 3))
    num_gpus = nodes * gpus
    experts = draw(st.integers(2, 6))
    k = draw(st.integers(max(1, -(-experts // num_gpus)), 3))
    layers = draw(st.integers(1, 2))
    d_ff = draw(st.sampled_from([64, 1024, 8192]))
    alpha = draw(st.floats(0.2, 3.0))
    seed = draw(st.integers(0, 2**16))
    topo = toy_topology(nodes, gpus, tflops=draw(st.sampled_from([50.0, 2000.0])))
    config = load_model_config("tiny", {"num_experts": experts, "d_ff": d_ff, "num_layers": layers,
                                        "top_k": min(2, experts)})
    rng = np.random.default_rng(seed)
    counts = rng.gamma(alpha, size=(layers, num_gpus, experts))
    counts[rng.random(counts.shape) < 0.2] = 0.0          # some sources never use some experts
    counts[..., 0] += 1e-3
    counts *= config.tokens_per_step / num_gpus * config.top_k / counts.sum(axis=2, keepdims=True)
    return PlacementProblem(topo, config, Traffic(counts, "hypothesis"), experts_per_gpu=k)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_plans_are_feasible_and_the_manifest_scores_them(problem):
    placement = solve(problem, time_limit=5, workers=1)
    placement.validate(problem.experts_per_gpu)
    slots = gpu_slots(problem)
    for layer in placement.layers:
        held = np.bincount(np.concatenate(layer.replicas), minlength=problem.num_gpus)
        assert np.all(held >= 1) and np.all(held <= slots)     # every GPU holds an expert
    cost = evaluate(placement, problem)
    manifest = manifest_from_doc(build_manifest(placement, problem, cost=cost))
    again = evaluate(manifest.placement, problem)
    reported = np.array([layer["objective_s"] for layer in placement.info["layers"]])
    np.testing.assert_allclose(again.moe_time_s, reported, rtol=1e-8)
    bounds = np.array([layer["bound_s"] for layer in placement.info["layers"]])
    assert np.all(bounds <= reported * (1 + 1e-9))
