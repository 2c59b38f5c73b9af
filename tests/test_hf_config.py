"""Hugging Face config.json import, on configs with the published field names and values."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from epplan.cli import app
from epplan.errors import ConfigError
from epplan.workload import load_model_config
from epplan.workload.hf_config import read_hf_config

TOPOLOGIES = Path(__file__).resolve().parent.parent / "topologies"

# mistralai/Mixtral-8x7B-v0.1 config.json
MIXTRAL = {
    "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
    "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
    "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
    "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
    "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
    "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
    "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000,
}
# Qwen/Qwen1.5-MoE-A2.7B config.json (model_type qwen2_moe)
QWEN2_MOE = {
    "architectures": ["Qwen2MoeForCausalLM"], "decoder_sparse_step": 1, "hidden_act": "silu",
    "hidden_size": 2048, "intermediate_size": 5632, "max_position_embeddings": 32768,
    "max_window_layers": 21, "model_type": "qwen2_moe", "moe_intermediate_size": 1408,
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 60, "num_experts_per_tok": 4,
    "num_hidden_layers": 24, "num_key_value_heads": 16, "output_router_logits": False,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "shared_expert_intermediate_size": 5632, "sliding_window": 32768, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_sliding_window": False, "vocab_size": 151936,
}
# Qwen/Qwen3-30B-A3B config.json
QWEN3_MOE = {
    "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False, "decoder_sparse_step": 1,
    "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048, "intermediate_size": 6144,
    "max_position_embeddings": 40960, "mlp_only_layers": [], "model_type": "qwen3_moe",
    "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
    "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
    "torch_dtype": "bfloat16", "vocab_size": 151936,
}
# deepseek-ai/DeepSeek-V2 config.json (MoE and attention fields)
DEEPSEEK_V2 = {
    "architectures": ["DeepseekV2ForCausalLM"], "first_k_dense_replace": 1, "hidden_act": "silu",
    "hidden_size": 5120, "intermediate_size": 12288, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v2", "moe_intermediate_size": 1536,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 160, "n_shared_experts": 2,
    "norm_topk_prob": False, "num_attention_heads": 128, "num_experts_per_tok": 6,
    "num_hidden_layers": 60, "num_key_value_heads": 128, "q_lora_rank": 1536, "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64, "routed_scaling_factor": 16.0, "scoring_func": "softmax", "seq_aux": True,
    "topk_group": 3, "topk_method": "group_limited_greedy", "torch_dtype": "bfloat16",
    "v_head_dim": 128, "vocab_size": 102400,
}
# deepseek-ai/DeepSeek-V3 config.json (MoE and attention fields)
DEEPSEEK_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "intermediate_size": 18432, "kv_lora_rank": 512,
    "max_position_embeddings": 163840, "model_type": "deepseek_v3", "moe_intermediate_size": 2048,
    "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256, "n_shared_experts": 1,
    "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "topk_group": 4, "topk_method": "noaux_tc",
    "torch_dtype": "bfloat16", "v_head_dim": 128, "vocab_size": 129280,
}
# allenai/OLMoE-1B-7B-0924 config.json
OLMOE = {
    "architectures": ["OlmoeForCausalLM"], "clip_qkv": None, "hidden_act": "silu", "hidden_size": 2048,
    "intermediate_size": 1024, "max_position_embeddings": 4096, "model_type": "olmoe",
    "norm_topk_prob": False, "num_attention_heads": 16, "num_experts": 64, "num_experts_per_tok": 8,
    "num_hidden_layers": 16, "num_key_value_heads": 16, "rms_norm_eps": 1e-05, "rope_theta": 10000.0,
    "router_aux_loss_coef": 0.01, "torch_dtype": "float32", "vocab_size": 50304,
}


def _write(tmp_path: Path, name: str, doc: dict) -> Path:
    folder = tmp_path / name
    folder.mkdir()
    path = folder / "config.json"
    path.write_text(json.dumps(doc))
    return path


def test_mixtral(tmp_path):
    imp = read_hf_config(_write(tmp_path, "Mixtral-8x7B-v0.1", MIXTRAL))
    c = imp.config
    assert c.name == "Mixtral-8x7B-v0.1"
    assert (c.num_layers, c.num_experts, c.top_k, c.d_model, c.d_ff) == (32, 8, 2, 4096, 14336)
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size) == (32, 8, 128, 32000)
    assert c.activation == "swiglu" and c.dtype == "bf16" and c.router_aux_loss_coef == 0.02
    assert c.num_dense_layers == 0 and c.num_shared_experts == 0
    assert "num_local_experts" in imp.used and "rope_theta" in imp.ignored
    # The preset and the import agree on everything the file holds.
    preset = load_model_config("mixtral-8x7b")
    assert c.replace(name=preset.name, router_aux_loss_coef=preset.router_aux_loss_coef) == preset


def test_qwen2_moe_shared_expert(tmp_path):
    c = read_hf_config(_write(tmp_path, "q2", QWEN2_MOE)).config
    assert (c.num_layers, c.num_experts, c.top_k, c.d_ff) == (24, 60, 4, 1408)
    assert c.num_shared_experts == 4 and c.num_dense_layers == 0  # 5632 = 4 x 1408


def test_qwen3_moe(tmp_path):
    c = read_hf_config(_write(tmp_path, "q3", QWEN3_MOE)).config
    assert (c.num_layers, c.num_experts, c.top_k, c.d_ff, c.head_dim, c.num_kv_heads) == (48, 128, 8, 768, 128, 4)
    assert c.num_shared_experts == 0


def test_qwen_leading_dense_layers_and_interleaving(tmp_path):
    c = read_hf_config(_write(tmp_path, "a", {**QWEN3_MOE, "mlp_only_layers": [0, 1]})).config
    assert c.num_dense_layers == 2 and c.dense_d_ff == 6144
    with pytest.raises(ConfigError, match="interleave"):
        read_hf_config(_write(tmp_path, "b", {**QWEN3_MOE, "decoder_sparse_step": 2}))


def test_deepseek_v2_groups(tmp_path):
    imp = read_hf_config(_write(tmp_path, "v2", DEEPSEEK_V2))
    c = imp.config
    assert (c.num_layers, c.num_experts, c.top_k, c.d_ff) == (60, 160, 6, 1536)
    assert (c.num_dense_layers, c.dense_d_ff, c.num_shared_experts) == (1, 12288, 2)
    assert (c.num_expert_groups, c.topk_groups) == (8, 3)
    assert any("group-limited" in n for n in imp.notes)


def test_deepseek_v3_matches_the_preset(tmp_path):
    imp = read_hf_config(_write(tmp_path, "DeepSeek-V3", DEEPSEEK_V3))
    preset = load_model_config("deepseek-v3")
    keep = dict(name=preset.name, seq_len=preset.seq_len, global_batch=preset.global_batch)
    assert imp.config.replace(**keep) == preset
    assert "quantization_config" in imp.ignored and "n_group" in imp.used
    assert any("num_nextn_predict_layers" in n for n in imp.notes)


def test_olmoe(tmp_path):
    c = read_hf_config(_write(tmp_path, "olmoe", OLMOE)).config
    assert (c.num_layers, c.num_experts, c.top_k, c.d_ff, c.vocab_size, c.dtype) == (16, 64, 8, 1024, 50304, "fp32")


@pytest.mark.parametrize("doc, match", [
    ({"model_type": "llama", "hidden_size": 8}, "not a Mixture-of-Experts family"),
    ({**MIXTRAL, "num_local_experts": None}, "missing field 'num_local_experts'"),
    ({**MIXTRAL, "num_experts_per_tok": "two"}, "num_experts_per_tok must be a non-negative integer"),
    ({**DEEPSEEK_V3, "moe_layer_freq": 2}, "moe_layer_freq=2"),
    ({**MIXTRAL, "num_experts_per_tok": 9}, "top_k=9 exceeds num_experts=8"),
])
def test_bad_configs_are_clear_errors(tmp_path, doc, match):
    with pytest.raises(ConfigError, match=match):
        read_hf_config(_write(tmp_path, "bad", doc))


def test_place_reads_config_json_and_says_what_it_used(tmp_path):
    path = _write(tmp_path, "Mixtral-8x7B-v0.1", MIXTRAL)
    result = CliRunner().invoke(app, [
        "place", "--topology", str(TOPOLOGIES / "dgx-h100-1node.yaml"), "--model", str(path),
        "--set", "num_layers=2", "--placement", "eplb", "--out", str(tmp_path / "plan.json")])
    assert result.exit_code == 0, result.output
    assert "mixtral config: used" in result.stdout and "ignored (not modelled)" in result.stdout
    assert "Mixtral-8x7B-v0.1" in result.stdout
