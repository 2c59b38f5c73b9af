"""Expert parallelism vs the single-device model: gloo, 2 and 4 CPU processes, float64.

Each process builds the same reference model, runs it on the whole global batch, and runs the
expert-parallel copy on its own slice; forward, loss, every gradient (after sync_gradients), the
weights after AdamW steps, the router biases and the routing statistics must agree.
"""

from __future__ import annotations

import copy
import numpy as np
import pytest
import torch
import torch.distributed as dist

from epplan.errors import RuntimeSetupError
from epplan.placement.types import Placement
from epplan.runtime.expert_parallel import (ExpertParallelExperts, gather_state_dict, get_stats,
                                            parallelize_experts, split_assignments, sync_gradients)
from epplan.runtime.model import Transformer
from epplan.runtime.testing import (Scenario, check_scenarios, gather_byte_matrices,
                                    layer_placement as _layer, run_distributed, tiny_model)
from epplan.workload.config import PRESETS

TOL = dict(rtol=1e-9, atol=1e-12)


def _check(rank: int, world_size: int, scenarios: list[Scenario]) -> None:
    check_scenarios(_check_scenario, rank, world_size, scenarios)


def _check_scenario(rank: int, world_size: int, sc: Scenario) -> None:
    ref = tiny_model(sc.overrides, sc.biases)
    config = ref.config
    ep = copy.deepcopy(ref)
    parallelize_experts(ep, sc.placement)
    expert_names = {f"{name}.{w}": module.local_experts
                    for name, module in ep.named_modules() if isinstance(module, ExpertParallelExperts)
                    for w in ("w1", "w2", "w3")}

    gen = torch.Generator().manual_seed(1)
    shape = (sc.batch_per_rank * world_size, sc.seq)
    idx = torch.randint(0, config.vocab_size, shape, generator=gen)
    targets = torch.randint(0, config.vocab_size, shape, generator=gen)
    mine = slice(rank * sc.batch_per_rank, (rank + 1) * sc.batch_per_rank)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt_ep = torch.optim.AdamW(ep.parameters(), lr=1e-2, weight_decay=0.1)
    stats = get_stats(ep)

    for step in range(sc.steps):
        stats.reset()
        ref_logits, ref_loss = ref(idx, targets)
        ref_loss.backward()
        logits, loss = ep(idx[mine], targets[mine])
        loss.backward()
        sync_gradients(ep)

        torch.testing.assert_close(logits, ref_logits[mine], **TOL)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        torch.testing.assert_close(mean_loss / world_size, ref_loss.detach(), **TOL)
        ref_params = dict(ref.named_parameters())
        for name, p in ep.named_parameters():
            expected = ref_params[name].grad
            if name in expert_names:
                expected = expected[expert_names[name]]
            torch.testing.assert_close(p.grad, expected, **TOL, msg=f"step {step}: grad of {name}")
        _check_stats(rank, world_size, ref, ep, sc.placement)

        opt_ref.step()
        opt_ep.step()
        opt_ref.zero_grad()
        opt_ep.zero_grad()
        ref.update_router_biases()
        ep.update_router_biases()

        full = gather_state_dict(ep)
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(full[name], value, **TOL, msg=f"step {step}: {name}")
        _check_replicas_identical(ep)


def _check_stats(rank: int, world_size: int, ref: Transformer, ep: Transformer,
                 placement: Placement) -> None:
    stats = get_stats(ep)
    num_layers, num_experts = stats.num_tokens_per_expert.shape
    assert stats.dispatch_bytes.shape == stats.combine_bytes.shape == (num_layers, world_size)
    assert stats.num_forward == 1
    counts = torch.from_numpy(stats.num_tokens_per_expert.copy())
    dist.all_reduce(counts)
    ref_counts = torch.stack([moe.router.load for moe in ref.moe_layers()]).to(torch.int64)
    assert torch.equal(counts, ref_counts), (counts, ref_counts)

    row_bytes = ep.config.d_model * 8
    for li, layer in enumerate(placement.layers):
        # Rows sent per destination follow the placement's fractional flows within rounding.
        local = np.zeros((world_size, num_experts))
        local[rank] = stats.num_tokens_per_expert[li]
        expected_rows = layer.flows(local)[rank]  # (G,)
        rows = stats.dispatch_bytes[li] / row_bytes
        assert np.all(np.abs(rows - expected_rows) <= num_experts), (li, rows, expected_rows)
        assert rows.sum() == stats.num_tokens_per_expert[li].sum()
    # What s dispatches to t, t combines back to s.
    dispatch, _ = gather_byte_matrices(stats, world_size)


def _check_replicas_identical(ep: Transformer) -> None:
    """Every replica of an expert holds bit-identical weights (min == max over holders)."""
    for module in ep.modules():
        if not isinstance(module, ExpertParallelExperts):
            continue
        for w in (module.w1, module.w2, module.w3):
            if w is None:
                continue
            lo = torch.full((module.num_experts, *w.shape[1:]), torch.inf, dtype=w.dtype)
            lo[module.local_experts] = w.detach()
            hi = torch.full_like(lo, -torch.inf)
            hi[module.local_experts] = w.detach()
            dist.all_reduce(lo, op=dist.ReduceOp.MIN)
            dist.all_reduce(hi, op=dist.ReduceOp.MAX)
            assert torch.equal(lo, hi)


def test_ep_matches_single_device_2_ranks():
    G = 2
    blocks = _layer([[0], [0], [1], [1]], {}, G)  # two experts per rank
    replicated = _layer([[0, 1], [0], [1], [0, 1]],
                        {0: [[0.7, 0.3], [0.25, 0.75]], 3: [[1.0, 0.0], [0.0, 1.0]]}, G)
    all_on_0 = _layer([[0]] * 4, {}, G)  # rank 1 holds nothing and receives nothing
    all_on_1 = _layer([[1]] * 4, {}, G)
    run_distributed(_check, G, [
        Scenario("blocks+replicas", Placement(G, 4, [blocks, replicated])),
        # top-1, every token to expert 2 in MoE layer 0; expert 0 gets no token in layer 1.
        Scenario("idle rank, one hot expert", Placement(G, 4, [all_on_0, all_on_1]),
                 overrides=dict(top_k=1), biases={(0, 2): 10.0, (1, 0): -10.0}),
    ])


def test_ep_matches_single_device_4_ranks():
    G = 4
    rng = np.random.default_rng(0)
    split0 = rng.dirichlet(np.ones(3), size=G)
    split0[1] = [0.0, 0.4, 0.6]  # source 1 never uses replica 0 of expert 0
    moe0 = _layer([[0, 1, 2], [3], [1, 3], [2]], {0: split0, 2: rng.dirichlet(np.ones(2), size=G)}, G)
    moe1 = _layer([[0], [1], [0, 1], [3]], {2: [[0.9, 0.1]] * G}, G)  # rank 2 idle
    everywhere = _layer([[0, 1, 2, 3]] * 4, {e: np.eye(G) for e in range(4)}, G)  # pure DP
    variant = dict(num_layers=3, num_dense_layers=1, dense_d_ff=48, num_shared_experts=1,
                   num_kv_heads=2, activation="swiglu")
    run_distributed(_check, G, [
        Scenario("replicas, uneven splits, idle rank", Placement(G, 4, [moe0, moe1]),
                 overrides=variant, biases={(1, 3): -10.0}),
        Scenario("every expert everywhere", Placement(G, 4, [everywhere, everywhere])),
    ])


def test_split_assignments_largest_remainder():
    shares = torch.tensor([[0.5, 0.5, 0.0], [0.7, 0.3, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 1.0, 0.0]],
                          dtype=torch.float64)
    n = torch.tensor([3, 10, 5, 7])
    counts = split_assignments(n, shares)
    assert counts.tolist() == [[2, 1, 0], [7, 3, 0], [2, 2, 1], [0, 7, 0]]
    rng = np.random.default_rng(0)
    for _ in range(50):
        shares = torch.from_numpy(rng.dirichlet(np.ones(4), size=6) * (rng.random((6, 4)) > 0.3))
        shares[:, 0] += (shares.sum(1) == 0).double()
        shares /= shares.sum(1, keepdim=True)
        n = torch.from_numpy(rng.integers(0, 1000, 6))
        counts = split_assignments(n, shares)
        assert torch.equal(counts.sum(1), n)
        assert bool(((counts - shares * n[:, None]).abs() < 1).all())
        assert bool((counts[shares == 0] == 0).all())


def _wrong_world(rank: int, world_size: int) -> None:
    placement = Placement(4, 4, [_layer([[0], [1], [2], [3]], {}, 4)] * 2)
    with pytest.raises(RuntimeSetupError, match="launch 4 processes"):
        parallelize_experts(Transformer(PRESETS["tiny"]), placement)


def test_placement_for_another_world_size_is_refused():
    run_distributed(_wrong_world, 2)


def test_ep_matches_single_device_1_rank():
    """One rank takes the local path (no exchange, no chunks): still the single-device model."""
    run_distributed(_check, 1, [Scenario("one rank", Placement(1, 4, [_layer([[0]] * 4, {}, 1)] * 2))])
