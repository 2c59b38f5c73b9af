"""Building an expert-parallel model without the full model: meta-device construction, then
placement-independent initialisation of what each rank holds (gloo, CPU processes)."""

from __future__ import annotations

import resource

import numpy as np
import torch

from epplan.placement.types import LayerPlacement, Placement
from epplan.runtime.expert_parallel import build_expert_parallel_model, gather_state_dict
from epplan.runtime.init import init_weights
from epplan.runtime.model import Transformer
from epplan.runtime.testing import run_distributed
from epplan.workload.config import PRESETS

CONFIG = PRESETS["tiny"].replace(num_shared_experts=1, num_dense_layers=1, dense_d_ff=48, num_layers=3)


def _placement(layers: list[list[list[int]]], num_ranks: int) -> Placement:
    return Placement(num_ranks=num_ranks, num_experts=len(layers[0]), layers=[
        LayerPlacement(replicas=[np.array(r, dtype=np.int64) for r in reps],
                       split=[np.full((num_ranks, len(r)), 1.0 / len(r)) for r in reps])
        for reps in layers])


def test_init_weights_is_seeded_and_follows_the_module_rules():
    a, b, c = (Transformer(CONFIG) for _ in range(3))
    init_weights(a, seed=5)
    init_weights(b, seed=5)
    init_weights(c, seed=6)
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not torch.equal(sa["lm_head.weight"], sc["lm_head.weight"])
    assert torch.equal(sa["norm.weight"], torch.ones(CONFIG.d_model))
    for moe in a.moe_layers():
        assert torch.equal(moe.router.bias, torch.zeros(CONFIG.num_experts))
    big = torch.cat([sa["tok_emb.weight"].reshape(-1), sa["lm_head.weight"].reshape(-1)])
    assert abs(float(big.std()) - 0.02) < 1e-3 and abs(float(big.mean())) < 1e-3
    # Experts: each expert its own stream, different from its neighbours.
    w1 = a.moe_layers()[0].experts.w1
    assert not torch.equal(w1[0], w1[1])


def _meta_build_matches(rank: int, world_size: int, placements: list[Placement]) -> None:
    full = Transformer(CONFIG)
    init_weights(full, seed=11)
    expected = full.state_dict()
    for placement in placements:
        model = build_expert_parallel_model(CONFIG, placement, seed=11, device=torch.device("cpu"))
        assert all(not p.is_meta for p in model.parameters())
        assert all(not b.is_meta for b in model.buffers())
        got = gather_state_dict(model)
        assert got.keys() == expected.keys()
        for name, value in expected.items():
            assert torch.equal(got[name], value), name


def test_meta_build_equals_the_full_model_under_any_placement():
    E = CONFIG.num_experts
    halves = [list(range(E // 2)), list(range(E // 2, E))]
    one = _placement([[[0] if e in halves[0] else [1] for e in range(E)]] * 2, 2)
    # Reversed owners, a replicated expert and an idle rank in the second MoE layer.
    other = _placement([[[1] if e in halves[0] else [0] for e in range(E)],
                        [[0, 1]] + [[0]] * (E - 1)], 2)
    run_distributed(_meta_build_matches, 2, [one, other])


def _peak_growth(rank: int, world_size: int, config, placement: Placement) -> None:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # bytes (Linux: KiB)
    model = build_expert_parallel_model(config, placement, seed=0, device=torch.device("cpu"))
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - before
    held = sum(p.numel() * p.element_size() for p in model.parameters())
    # Building the full model first would add all 32 experts (1.07 GB) on top of what is held.
    assert grown < held + 256 * 2**20, (f"rank {rank}: peak memory grew {grown / 2**20:.0f} MiB "
                                        f"for {held / 2**20:.0f} MiB of parameters")


def test_meta_build_never_holds_the_full_experts():
    # 32 experts of 8.4 M parameters each, 1.07 GB in fp32; rank 0 holds 2 of them, rank 1 30.
    config = PRESETS["tiny"].replace(num_layers=1, num_experts=32, d_model=1024, d_ff=4096,
                                     num_heads=8, head_dim=128, num_kv_heads=8)
    owners = [[0] if e < 2 else [1] for e in range(32)]
    run_distributed(_peak_growth, 2, config, _placement([owners], 2))
