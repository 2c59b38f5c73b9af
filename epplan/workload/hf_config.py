"""Hugging Face ``config.json`` -> ``ModelConfig``, for the MoE families users train and serve.

Read by ``--model path/to/config.json``. The families and the fields each uses (names as the
published configs spell them; values checked against Mixtral-8x7B-v0.1, Qwen1.5-MoE-A2.7B,
Qwen3-30B-A3B, DeepSeek-V2, DeepSeek-V3 and OLMoE-1B-7B-0924):

==============  ======================================================================
model_type      routed experts / top-k / expert width / extras
==============  ======================================================================
mixtral         num_local_experts, num_experts_per_tok, intermediate_size
qwen2_moe       num_experts, num_experts_per_tok, moe_intermediate_size,
                shared_expert_intermediate_size (-> shared experts of the routed width),
                decoder_sparse_step, mlp_only_layers (a leading run -> dense layers)
qwen3_moe       as qwen2_moe, without a shared expert
deepseek_v2/v3  n_routed_experts, num_experts_per_tok, moe_intermediate_size,
                n_shared_experts, first_k_dense_replace (+ intermediate_size of the dense
                layers), moe_layer_freq, n_group / topk_group (group-limited routing)
olmoe           num_experts, num_experts_per_tok, intermediate_size
==============  ======================================================================

Every family: num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads,
head_dim (else hidden_size / num_attention_heads), vocab_size, hidden_act (silu with the gated
MLPs of all five families -> swiglu), torch_dtype, router_aux_loss_coef. DeepSeek's multi-head
latent attention is modelled as plain attention of v_head_dim per head (the wire and expert
terms the planner uses are exact). A config carries no training batch: seq_len and global_batch
default to 4096 x 1024 sequences and every import says so (``--set seq_len=...``).

``read_hf_config`` returns the config with the fields it used, the fields it ignored and notes
on every assumption, so the CLI can print them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from epplan.errors import ConfigError
from epplan.workload.config import ModelConfig

DEFAULT_SEQ_LEN = 4096
DEFAULT_GLOBAL_BATCH = 1024
FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "olmoe")
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
_ACTIVATIONS = {"silu": "swiglu", "swiglu": "swiglu", "gelu": "gelu", "gelu_new": "gelu"}
_ARCHITECTURES = {
    "MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
    "Qwen3MoeForCausalLM": "qwen3_moe", "DeepseekV2ForCausalLM": "deepseek_v2",
    "DeepseekV3ForCausalLM": "deepseek_v3", "OlmoeForCausalLM": "olmoe",
}


@dataclass
class HFImport:
    """A Hugging Face config read into a ``ModelConfig``.

    used:    config.json keys that set a field.
    ignored: keys present in the file that epplan does not model (rope, norms, tokens, ...).
    notes:   assumptions, one line each.
    """

    config: ModelConfig
    family: str
    used: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def summary(self) -> list[str]:
        lines = [f"{self.family} config: used {', '.join(self.used)}"]
        if self.ignored:
            lines.append(f"ignored (not modelled): {', '.join(self.ignored)}")
        return lines + self.notes


def read_hf_config(path: str | Path, name: str | None = None) -> HFImport:
    """Read a Hugging Face MoE ``config.json``; any defect is a ``ConfigError`` naming it."""
    path = Path(path)
    from epplan.inputs import MiB, load_json, read_text

    doc = load_json(read_text(path, "model config file", ConfigError, 16 * MiB), str(path), ConfigError)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a Hugging Face config.json is a JSON object")
    if name is None:
        name = path.parent.name if path.name == "config.json" and path.parent.name else path.stem
    return _convert(doc, name, str(path))


def model_notes(spec: str) -> list[str]:
    """What importing ``spec`` used, ignored and assumed, if it is a config.json; else []."""
    if not str(spec).endswith(".json"):
        return []
    return read_hf_config(spec).summary()


def _convert(doc: dict[str, Any], name: str, source: str) -> HFImport:
    family = _family(doc, source)
    reader = _Reader(doc, source)
    reader.take("model_type", "architectures")
    notes: list[str] = []
    num_layers = reader.int("num_hidden_layers")
    d_model = reader.int("hidden_size")
    num_heads = reader.int("num_attention_heads")
    num_kv_heads = reader.int("num_key_value_heads", default=num_heads)
    vocab = reader.int("vocab_size")
    act = reader.str("hidden_act", default="silu")
    if act not in _ACTIVATIONS:
        raise ConfigError(f"{source}: hidden_act {act!r} is not one epplan models; "
                          f"known: {', '.join(_ACTIVATIONS)}")
    dtype_name = reader.str("torch_dtype", default=None) or reader.str("dtype", default="bfloat16")
    if dtype_name not in _DTYPES:
        raise ConfigError(f"{source}: torch_dtype {dtype_name!r} unknown; known: {', '.join(_DTYPES)}")
    values: dict[str, Any] = dict(
        name=name, num_layers=num_layers, d_model=d_model, num_heads=num_heads,
        num_kv_heads=num_kv_heads, vocab_size=vocab, activation=_ACTIVATIONS[act],
        dtype=_DTYPES[dtype_name], seq_len=DEFAULT_SEQ_LEN, global_batch=DEFAULT_GLOBAL_BATCH)
    aux = reader.float("router_aux_loss_coef", default=None)
    if aux is not None:
        values["router_aux_loss_coef"] = aux

    if family.startswith("deepseek"):
        head_dim = reader.int("v_head_dim", default=d_model // num_heads)
        reader.take("qk_nope_head_dim", "qk_rope_head_dim", "kv_lora_rank", "q_lora_rank")
        notes.append(f"multi-head latent attention modelled as {num_heads} x {head_dim} plain attention")
    else:
        head_dim = reader.int("head_dim", default=None) or d_model // num_heads
    values["head_dim"] = head_dim

    if family == "mixtral":
        values.update(num_experts=reader.int("num_local_experts"),
                      d_ff=reader.int("intermediate_size"))
    elif family == "olmoe":
        values.update(num_experts=reader.int("num_experts"), d_ff=reader.int("intermediate_size"))
    elif family in ("qwen2_moe", "qwen3_moe"):
        routed = reader.int("moe_intermediate_size")
        values.update(num_experts=reader.int("num_experts"), d_ff=routed)
        values["num_dense_layers"] = _qwen_dense_layers(reader, num_layers, source)
        if values["num_dense_layers"]:
            values["dense_d_ff"] = reader.int("intermediate_size")
        shared = reader.int("shared_expert_intermediate_size", default=0)
        if shared:
            count = max(1, round(shared / routed))
            values["num_shared_experts"] = count
            if count * routed != shared:
                notes.append(f"shared expert of width {shared} modelled as {count} experts of the routed "
                             f"width {routed} ({count * routed})")
            else:
                notes.append(f"shared expert of width {shared} = {count} x the routed width {routed}")
    else:  # deepseek_v2 / deepseek_v3
        values.update(num_experts=reader.int("n_routed_experts"), d_ff=reader.int("moe_intermediate_size"),
                      num_shared_experts=reader.int("n_shared_experts", default=0))
        dense = reader.int("first_k_dense_replace", default=0)
        values["num_dense_layers"] = dense
        if dense:
            values["dense_d_ff"] = reader.int("intermediate_size")
        freq = reader.int("moe_layer_freq", default=1)
        if freq != 1:
            raise ConfigError(f"{source}: moe_layer_freq={freq} interleaves dense and MoE layers; epplan "
                              "models the first layers dense and the rest MoE (moe_layer_freq 1)")
        groups = reader.int("n_group", default=0)
        topk_groups = reader.int("topk_group", default=0)
        method = reader.str("topk_method", default="greedy")
        if groups > 1 and method in ("group_limited_greedy", "noaux_tc"):
            values.update(num_expert_groups=groups, topk_groups=topk_groups)
            notes.append(f"group-limited routing: {groups} groups of {values['num_experts'] // groups} "
                         f"experts, each token within its best {topk_groups} ({method})")
        elif groups > 1:
            notes.append(f"n_group={groups} with topk_method {method!r}: routing is not group-limited")
        reader.take("scoring_func", "norm_topk_prob", "routed_scaling_factor", "seq_aux",
                    "num_nextn_predict_layers", "ep_size")
        if reader.present("num_nextn_predict_layers"):
            notes.append("multi-token-prediction layers (num_nextn_predict_layers) are not modelled")
    values["top_k"] = reader.int("num_experts_per_tok")

    notes.append(f"seq_len {DEFAULT_SEQ_LEN} and global_batch {DEFAULT_GLOBAL_BATCH} sequences assumed "
                 "(a config.json has no training batch); set them with --set seq_len=N --set global_batch=N")
    try:
        config = ModelConfig(**values)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None
    return HFImport(config, family, used=reader.used, ignored=reader.ignored(), notes=notes)


def _family(doc: dict[str, Any], source: str) -> str:
    model_type = doc.get("model_type")
    if model_type in FAMILIES:
        return model_type
    for arch in doc.get("architectures") or []:
        if arch in _ARCHITECTURES:
            return _ARCHITECTURES[arch]
    if model_type is None and "num_layers" in doc:
        raise ConfigError(f"{source}: looks like an epplan model file, which is YAML; rename it to .yaml")
    raise ConfigError(f"{source}: model_type {model_type!r} is not a Mixture-of-Experts family epplan reads; "
                      f"known: {', '.join(FAMILIES)}")


def _qwen_dense_layers(reader: "_Reader", num_layers: int, source: str) -> int:
    """Qwen's decoder_sparse_step / mlp_only_layers as a count of leading dense layers."""
    step = reader.int("decoder_sparse_step", default=1)
    only = reader.list_of_int("mlp_only_layers")
    dense = sorted(set(only) | {i for i in range(num_layers) if (i + 1) % step})
    if dense != list(range(len(dense))):
        raise ConfigError(f"{source}: dense layers {dense[:8]}{'...' if len(dense) > 8 else ''} "
                          "(decoder_sparse_step, mlp_only_layers) interleave with MoE layers; epplan models "
                          "the first layers dense and the rest MoE")
    return len(dense)


_REQUIRED = object()


class _Reader:
    """Typed access to config.json fields that records which were used."""

    def __init__(self, doc: dict[str, Any], source: str) -> None:
        self.doc, self.source = doc, source
        self.used: list[str] = []

    def present(self, key: str) -> bool:
        return key in self.doc and self.doc[key] is not None

    def take(self, *keys: str) -> None:
        self.used += [k for k in keys if self.present(k) and k not in self.used]

    def _get(self, key: str, default: Any) -> tuple[bool, Any]:
        """(found, value); a missing required key is a ConfigError."""
        if not self.present(key):
            if default is _REQUIRED:
                raise ConfigError(f"{self.source}: missing field {key!r}, which a config of this model "
                                  "type needs")
            return False, default
        self.take(key)
        return True, self.doc[key]

    def int(self, key: str, default: Any = _REQUIRED) -> Any:
        found, value = self._get(key, default)
        if found and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
            raise ConfigError(f"{self.source}: {key} must be a non-negative integer, got {value!r}")
        return value

    def float(self, key: str, default: Any = _REQUIRED) -> Any:
        found, value = self._get(key, default)
        if found and (not isinstance(value, (int, float)) or isinstance(value, bool)):
            raise ConfigError(f"{self.source}: {key} must be a number, got {value!r}")
        return float(value) if found else value

    def str(self, key: str, default: Any = _REQUIRED) -> Any:
        found, value = self._get(key, default)
        if found and not isinstance(value, str):
            raise ConfigError(f"{self.source}: {key} must be a string, got {value!r}")
        return value

    def list_of_int(self, key: str) -> list[int]:
        _, value = self._get(key, [])
        if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            raise ConfigError(f"{self.source}: {key} must be a list of layer indices, got {value!r}")
        return value

    def ignored(self) -> list[str]:
        return sorted(k for k in self.doc if k not in self.used and not k.startswith("_"))

