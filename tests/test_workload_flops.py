"""Derived model quantities, checked against hand-computed numbers."""

from __future__ import annotations

import pytest

from epplan.workload.config import PRESETS, load_model_config
from epplan.workload.flops import EXCHANGES_PER_LAYER_PER_STEP, model_costs


def test_seed_parameters_by_hand() -> None:
    c = model_costs(PRESETS["seed"])
    assert c.params_per_expert == 2 * 4096 * 16384 == 134_217_728  # gelu: up + down
    assert c.params_router == 4096 * 16 == 65_536
    assert c.params_moe_block == 16 * 134_217_728 + 65_536
    assert c.params_attention == 4 * 4096 * 4096 == 67_108_864  # no GQA: q, k, v, o all square
    per_layer = 67_108_864 + 16 * 134_217_728 + 65_536 + 2 * 4096
    embeddings = 2 * 32000 * 4096  # untied embedding + LM head
    assert c.params_total == 16 * per_layer + embeddings + 4096 == 35_696_807_936
    assert c.params_routed_experts == 16 * 16 * 134_217_728
    assert c.params_dense == c.params_total - c.params_routed_experts == 1_337_069_568
    assert c.params_dense == 16 * (67_108_864 + 65_536 + 2 * 4096) + 2 * 32000 * 4096 + 4096
    assert c.params_active == 16 * (67_108_864 + 2 * 134_217_728 + 65_536) + 32000 * 4096


def test_seed_flops_by_hand() -> None:
    c = model_costs(PRESETS["seed"])
    assert c.flops_attention_proj == 2 * 67_108_864
    # causal: 2 (mul-add) * 2 (QK^T and PV) * 10000/2 positions * 32 heads * 128
    assert c.flops_attention_scores == 2 * 10_000 * 32 * 128 == 81_920_000
    assert c.flops_per_assignment == 2 * 134_217_728
    assert c.flops_routed_experts == 2 * 2 * 134_217_728
    assert c.flops_router == 2 * 4096 * 16
    assert c.flops_lm_head == 2 * 32000 * 4096
    layer = 2 * 67_108_864 + 81_920_000 + 4 * 134_217_728 + 2 * 4096 * 16
    assert c.flops_fwd_moe_layer == layer
    assert c.flops_fwd_per_token == 16 * layer + 2 * 32000 * 4096 == 12_312_379_392
    assert c.flops_train_per_token == 3 * 12_312_379_392
    assert c.model_flops_per_step == 3 * 12_312_379_392 * 128 * 10_000
    # = 6 * active params * tokens + 3 * attention-score FLOPs * tokens
    tokens = 128 * 10_000
    assert c.model_flops_per_step == pytest.approx(
        6 * c.params_active * tokens + 3 * 16 * 81_920_000 * tokens, rel=1e-12)


def test_seed_wire_and_activation_bytes() -> None:
    c = model_costs(PRESETS["seed"])
    assert c.bytes_per_assignment == 4096 * 2
    assert EXCHANGES_PER_LAYER_PER_STEP == 4
    # per assignment: expert input d, up output f, activation f, expert output d, bf16
    assert c.act_bytes_per_assignment == 2 * (4096 + 16384 + 16384 + 4096) == 81_920
    # Norm inputs are the fp32 residual stream (fp32 weights under autocast) with an fp32 rstd;
    # attention casts the norm output to bf16 twice (wq, wkv); the router casts it once.
    # Measured on an H100 with saved_tensors_hooks (scripts/device/probe_saved.py).
    assert c.act_bytes_per_token_attention == (4 * 4096 + 4) + 2 * (2 * 4096 + 3 * 4096 + 4096) + 4 * 32
    assert c.act_bytes_per_token_moe_local == (4 * 4096 + 4) + 2 * 4096 + 4 * 16
    assert c.act_bytes_per_token_moe_layer == 65_668 + 24_644 + 2 * 81_920 == 254_152
    # Head: the final norm's fp32 input and rstd, and the gradient of the LM head's input (bf16),
    # which the chunked loss makes in the forward; no logits are kept (the head weight's
    # gradient, once per rank, is memory.py's).
    assert c.act_bytes_per_token_head == (4 * 4096 + 4) + 2 * 4096 == 24_580
    assert c.act_bytes_per_token == 16 * 254_152 + 24_580


def test_tiny_by_hand() -> None:
    c = model_costs(PRESETS["tiny"])
    assert c.params_per_expert == 2 * 32 * 64 == 4096
    per_layer = 4 * 32 * 32 + 4 * 4096 + 32 * 4 + 2 * 32  # 20,672
    assert c.params_total == 2 * per_layer + 2 * 256 * 32 + 32 == 57_760
    assert c.params_dense == 57_760 - 2 * 4 * 4096
    fwd_layer = 2 * 4096 + 2 * 32 * 4 * 8 + 2 * 2 * 4096 + 2 * 32 * 4  # 26,880
    assert c.flops_fwd_per_token == 2 * fwd_layer + 2 * 256 * 32 == 70_144
    assert c.model_flops_per_step == 3 * 70_144 * 8 * 32
    assert c.bytes_per_assignment == 64


def test_swiglu_gqa_shared_and_dense_layers() -> None:
    mix = model_costs(PRESETS["mixtral-8x7b"])
    assert mix.params_per_expert == 3 * 4096 * 14336
    assert mix.params_attention == 2 * 4096 * 4096 + 2 * 4096 * 8 * 128  # GQA 32/8
    assert mix.params_total == 46_702_792_704  # Mixtral's model card: 46.7B
    assert mix.params_active + mix.params_embedding == pytest.approx(12.9e9, rel=0.01)

    ds_cfg = PRESETS["deepseek-v3"]
    ds = model_costs(ds_cfg)
    assert ds.params_shared_experts == 3 * 7168 * 2048
    assert ds.params_dense_mlp == 3 * 7168 * 18432
    assert ds.flops_fwd_dense_layer == 2 * ds.params_attention + ds.flops_attention_scores \
        + 2 * 3 * 7168 * 18432
    assert ds.flops_fwd_per_token == pytest.approx(
        58 * ds.flops_fwd_moe_layer + 3 * ds.flops_fwd_dense_layer + ds.flops_lm_head)
    assert ds.params_routed_experts == 58 * 256 * 3 * 7168 * 2048
    assert ds.act_bytes_per_assignment == 2 * (7168 + 2 * 2048 + 2048 + 7168)


def test_silu_is_ungated_and_fp32_doubles_wire_bytes() -> None:
    seed = PRESETS["seed"]
    assert model_costs(seed.replace(activation="silu")).params_per_expert == 2 * 4096 * 16384
    assert model_costs(seed.replace(dtype="fp32")).bytes_per_assignment == 4096 * 4


def test_mfu() -> None:
    c = model_costs(load_model_config("tiny"))
    assert c.mfu(2.0, 2, c.model_flops_per_step / 2) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        c.mfu(0.0, 1, 1e12)
