"""Tensor parallelism x expert parallelism vs the single-device model: gloo, CPU processes, float64.

Each process builds the reference model and runs it on the whole global batch; the TP x EP copy
runs its TP group's sequences. Logits, the loss, every gradient (after ``sync_gradients``) and
the weights after AdamW steps must agree.
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
from epplan.runtime.tensor_parallel import (full_state_dict, parallelize_tensor, sync_gradients,
                                            tensor_parallel_mesh)
from epplan.runtime.testing import Scenario, check_scenarios, layer_placement as _layer, run_distributed, tiny_model

TOL = dict(rtol=1e-9, atol=1e-12)


def _check(rank: int, world_size: int, cases: list[tuple[int, Scenario]]) -> None:
    """Each (TP degree, scenario)."""
    tp_of = {id(sc): tp for tp, sc in cases}
    check_scenarios(lambda r, w, sc: _check_scenario(r, w, tp_of[id(sc)], sc), rank, world_size,
                    [sc for _, sc in cases])


def _full(t: torch.Tensor) -> torch.Tensor:
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_scenario(rank: int, world_size: int, tp: int, sc: Scenario) -> None:
    ref = tiny_model(sc.overrides, sc.biases)
    config = ref.config
    model = copy.deepcopy(ref)
    parallelize_experts(model, sc.placement, overlap=False)
    mesh = tensor_parallel_mesh(tp)
    parallelize_tensor(model, mesh)
    state = model.tensor_parallel
    ref.fused_loss = False
    for name, p in model.named_parameters():  # the weights TP splits hold 1 / t of their rows or columns
        if name.endswith(("wq.weight", "wkv.weight", "wo.weight", "lm_head.weight", "ffn.w1", "ffn.w2")):
            assert isinstance(p, DTensor) and p.to_local().numel() * tp == p.numel(), name
    expert_names = {f"{name}.{w}": module.local_experts
                    for name, module in model.named_modules() if isinstance(module, ExpertParallelExperts)
                    for w in ("w1", "w2", "w3")}

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
        logits, loss = model(idx[mine], targets[mine])
        loss.backward()
        sync_gradients(model)

        torch.testing.assert_close(logits, ref_logits[mine], **TOL, msg=f"step {step}: logits")
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)  # t equal copies of each group's loss
        torch.testing.assert_close(mean_loss / world_size, ref_loss.detach(), **TOL)
        ref_params = dict(ref.named_parameters())
        for name, p in model.named_parameters():
            expected = ref_params[name].grad
            if name in expert_names:
                expected = expected[expert_names[name]]
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
        (2, Scenario("tp 2: dense + MoE layers, GQA, shared expert", placement, overrides=VARIANT,
                     biases={(1, 3): -10.0})),
        (4, Scenario("tp 4: dense + MoE layers, shared expert", placement,
                     overrides={**VARIANT, "num_kv_heads": 4}, seq=12)),
    ])


def test_tp2_alone_matches_single_device():
    """TP = 2 over 2 ranks (one TP group, no data parallelism), gelu, one expert per rank pair."""
    G = 2
    layer = _layer([[0], [1], [0], [1]], {}, G)
    run_distributed(_check, G, [(2, Scenario("tp only", Placement(G, 4, [layer, layer])))])


def _heads_do_not_split(rank: int, world_size: int) -> None:
    model = tiny_model(dict(num_kv_heads=1), {})
    parallelize_experts(model, Placement(2, 4, [_layer([[0], [1], [0], [1]], {}, 2)] * 2), overlap=False)
    with pytest.raises(RuntimeSetupError, match="1 key/value heads do not split over 2 ranks"):
        parallelize_tensor(model, tensor_parallel_mesh(2))
    with pytest.raises(RuntimeSetupError, match="--tp 3 does not divide the 2 ranks"):
        tensor_parallel_mesh(3)


def test_tp_refuses_heads_that_do_not_split():
    run_distributed(_heads_do_not_split, 2)
