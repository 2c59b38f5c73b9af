"""Tensor parallelism x expert parallelism vs the single-device model: gloo, CPU processes, float64.

Each process builds the reference model and runs it on the whole global batch; the TP x EP copy
runs its TP group's sequences. Logits, the loss, every gradient (after ``sync_gradients``) and
the weights after AdamW steps must agree, with the experts whole on their ranks and with their
hidden dimension split over each TP group (``--expert-tp``).
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from epplan.errors import RuntimeSetupError
from epplan.placement.types import Placement
from epplan.runtime.expert_parallel import ExpertParallelExperts, parallelize_experts
from epplan.runtime.expert_tensor_parallel import shard
from epplan.runtime.tensor_parallel import (full_state_dict, parallelize_tensor, sync_gradients,
                                            tensor_parallel_mesh)
from epplan.runtime.testing import Scenario, check_scenarios, layer_placement as _layer, run_distributed, tiny_model

TOL = dict(rtol=1e-9, atol=1e-12)


def _check(rank: int, world_size: int, cases: list[tuple]) -> None:
    """Each (TP degree, expert TP, scenario[, more keywords of ``parallelize_experts``])."""
    how = {id(case[2]): (case[0], case[1], case[3] if len(case) > 3 else {}) for case in cases}
    check_scenarios(lambda r, w, sc: _check_scenario(r, w, *how[id(sc)][:2], sc, how[id(sc)][2]), rank,
                    world_size, [case[2] for case in cases])


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_scenario(rank: int, world_size: int, tp: int, expert_tp: bool, sc: Scenario, parallel: dict) -> None:
    ref = tiny_model(sc.overrides, sc.biases)
    config = ref.config
    model = copy.deepcopy(ref)
    mesh = tensor_parallel_mesh(tp)
    parallelize_experts(model, sc.placement, overlap=False, expert_tp=mesh["tp"] if expert_tp else None,
                        **parallel)
    parallelize_tensor(model, mesh, loss_chunk_tokens=5)  # chunks of 5 of the group's tokens
    state = model.tensor_parallel
    ref.fused_loss = False
    for name, p in model.named_parameters():  # the weights TP splits hold 1 / t of their rows or columns
        if name.endswith(("wq.weight", "wkv.weight", "wo.weight", "lm_head.weight", "ffn.w1", "ffn.w2")):
            assert isinstance(p, DTensor) and p.to_local().numel() * tp == p.numel(), name
    expert_names = {f"{name}.{w}": module for name, module in model.named_modules()
                    if isinstance(module, ExpertParallelExperts) for w in ("w1", "w2", "w3")}
    layers = model.expert_parallel.layers
    if expert_tp:  # each rank a 1 / t slice of each of its group's experts
        for layer, placed in zip(layers, sc.placement.layers):
            assert layer.local_experts == [e for e, ranks in enumerate(placed.replicas)
                                           if rank // tp in {int(r) // tp for r in ranks}]
            assert layer.w1.shape[2] * tp == config.d_ff and layer.w2.shape[1] * tp == config.d_ff

    gen = torch.Generator().manual_seed(1)
    shape = (sc.batch_per_rank * state.dp, sc.seq)
    idx = torch.randint(0, config.vocab_size, shape, generator=gen)
    targets = torch.randint(0, config.vocab_size, shape, generator=gen)
    mine = slice(state.dp_rank * sc.batch_per_rank, (state.dp_rank + 1) * sc.batch_per_rank)
    opt_ref = torch.optim.AdamW(ref.parameters(), lr=1e-2, weight_decay=0.1)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)

    for step in range(sc.steps):
        ref_logits, ref_loss = ref(idx, targets)
        ref_loss.backward()
        model.fused_loss = step % 2 == 1  # odd steps: the vocab-parallel chunked loss, no logits
        logits, loss = model(idx[mine], targets[mine])
        loss.backward()
        sync_gradients(model)

        if model.fused_loss:
            assert logits is None
        else:
            torch.testing.assert_close(logits, ref_logits[mine], **TOL, msg=f"step {step}: logits")
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # t equal copies of each group's loss
        torch.testing.assert_close(mean_loss / world_size, ref_loss.detach(), **TOL)
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            expected = ref_params[name].grad
            if name in expert_names:
                module = expert_names[name]
                expected = expected[module.local_experts]
                if expert_tp:
                    expected = shard(name.rsplit(".", 1)[1], expected, module.expert_tp)
            assert isinstance(p.grad, DTensor) == isinstance(p, DTensor), name
            torch.testing.assert_close(_full(p.grad), expected, **TOL, msg=f"step {step}: grad of {name}")

        opt_ref.step()
        opt.step()
        opt_ref.zero_grad()
        opt.zero_grad()
        ref.update_router_biases()
        model.update_router_biases()

        full = full_state_dict(model)
        for name, value in ref.state_dict().items():
            torch.testing.assert_close(full[name], value, **TOL, msg=f"step {step}: {name}")


VARIANT = dict(num_layers=3, num_dense_layers=1, dense_d_ff=48, num_shared_experts=1, num_kv_heads=2,
               activation="swiglu")


def test_tp2_and_tp4_ep_over_4_ranks_match_single_device():
    """TP = 2 (two data-parallel groups) and TP = 4 (one), experts over all 4 ranks (replicas,
    uneven splits, an idle rank)."""
    G = 4
    rng = np.random.default_rng(0)
    moe0 = _layer([[0, 1, 2], [3], [1, 3], [2]], {0: rng.dirichlet(np.ones(3), size=G)}, G)
    moe1 = _layer([[0], [1], [0, 1], [3]], {2: [[0.9, 0.1]] * G}, G)  # rank 2 holds nothing
    placement = Placement(G, 4, [moe0, moe1])
    run_distributed(_check, G, [
        (2, False, Scenario("tp 2: dense + MoE layers, GQA, shared expert", placement, overrides=VARIANT,
                            biases={(1, 3): -10.0})),
        (4, False, Scenario("tp 4: dense + MoE layers, shared expert", placement,
                            overrides={**VARIANT, "num_kv_heads": 4}, seq=12)),
        (2, True, Scenario("tp 2, expert tp: dense + MoE layers, GQA, shared expert", placement,
                           overrides=VARIANT, biases={(1, 3): -10.0})),
        (4, True, Scenario("tp 4, expert tp: one group holds every expert", placement,
                           overrides={**VARIANT, "num_kv_heads": 4}, seq=12)),
        (2, False, Scenario("tp 2, hierarchical dispatch over 2 nodes of 2", placement, overrides=VARIANT),
         dict(dispatch="hierarchical", nodes=[[0, 1], [2, 3]])),
    ])


def test_tp2_and_tp4_ep_over_8_ranks_match_single_device():
    """8 processes (tiny dims, two optimizer steps): TP = 2 (four data-parallel groups) and TP = 4
    (two), with and without expert TP; eight experts over the 8 ranks with replicas inside and
    across TP groups, uneven splits and an idle rank."""
    G = 8
    rng = np.random.default_rng(1)
    reps = [[0, 5], [1], [2, 3], [4], [5, 6, 7], [6], [0, 7], [2]]  # rank 1 holds only expert 1
    moe0 = _layer(reps, {e: rng.dirichlet(np.ones(len(r)), size=G) for e, r in enumerate(reps) if len(r) > 1}, G)
    moe1 = _layer([[e] for e in range(G)][::-1], {}, G)
    moe1.replicas[3] = np.array([1, 4])
    moe1.split[3] = np.full((G, 2), 0.5)
    placement = Placement(G, 8, [moe0, moe1])
    small = dict(num_experts=8, d_model=16, d_ff=32, head_dim=4, vocab_size=64)
    run_distributed(_check, G, [
        (tp, etp, Scenario(f"8 ranks, tp {tp}{', expert tp' if etp else ''}", placement, overrides=small,
                           batch_per_rank=1, seq=8, steps=2))
        for tp in (2, 4) for etp in (False, True)])


def test_tp2_alone_matches_single_device():
    """TP = 2 over 2 ranks (one TP group, no data parallelism), gelu, one expert per rank pair."""
    G = 2
    layer = _layer([[0], [1], [0], [1]], {}, G)
    run_distributed(_check, G, [(2, False, Scenario("tp only", Placement(G, 4, [layer, layer])))])


def _heads_do_not_split(rank: int, world_size: int) -> None:
    model = tiny_model(dict(num_kv_heads=1), {})
    parallelize_experts(model, Placement(2, 4, [_layer([[0], [1], [0], [1]], {}, 2)] * 2), overlap=False)
    with pytest.raises(RuntimeSetupError, match="1 key/value heads do not split over 2 ranks"):
        parallelize_tensor(model, tensor_parallel_mesh(2))
    with pytest.raises(RuntimeSetupError, match="tp=3 does not divide the 2 ranks"):
        tensor_parallel_mesh(3)


def test_tp_refuses_heads_that_do_not_split():
    run_distributed(_heads_do_not_split, 2)
