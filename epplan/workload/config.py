"""Model configurations: the founding spec's ``seed`` model and a few well-known MoE models.

A ``ModelConfig`` is a frozen value: presets are looked up by name and overridden field by field
(from CLI flags or a YAML file) through ``load_model_config``. Quantities derived from it
(parameters, FLOPs, bytes on the wire) live in ``epplan.workload.flops``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

from epplan.errors import ConfigError

ACTIVATIONS = ("gelu", "silu", "swiglu")
DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "fp64": 8}
OPTIMIZER_STATE_DTYPES = ("fp32", "bf16")  # ModelConfig.optimizer_state_dtype
# Upper bounds well above any published MoE (DeepSeek-V3: 61 layers, 256 experts, d_model 7168);
# beyond them a typo (num_experts=1000000) would allocate for minutes before anything fails.
MAX_SIZES = {"num_layers": 1024, "num_experts": 4096, "d_model": 1 << 17, "d_ff": 1 << 20,
             "num_heads": 4096, "head_dim": 4096, "num_kv_heads": 4096, "vocab_size": 1 << 24,
             "seq_len": 1 << 24, "global_batch": 1 << 20, "num_dense_layers": 1024, "dense_d_ff": 1 << 20,
             "num_shared_experts": 64}


@dataclass(frozen=True)
class ModelConfig:
    """A decoder-only MoE transformer and the batch it is trained on.

    Layers ``[0, num_dense_layers)`` have a dense MLP of hidden size ``dense_d_ff``; the rest are
    MoE layers with ``num_experts`` routed experts (plus ``num_shared_experts`` that every token
    visits), each an MLP of hidden size ``d_ff``.
    """

    name: str
    num_layers: int
    num_experts: int
    top_k: int
    d_model: int
    d_ff: int
    num_heads: int
    head_dim: int
    num_kv_heads: int
    vocab_size: int
    seq_len: int
    global_batch: int  # sequences per optimizer step
    activation: str = "gelu"
    dtype: str = "bf16"
    num_dense_layers: int = 0
    dense_d_ff: int = 0
    num_shared_experts: int = 0
    router_aux_loss_coef: float = 0.01
    router_bias_rate: float = 0.001
    # Group-limited routing (DeepSeek-V2/V3's n_group / topk_group): the routed experts form
    # num_expert_groups equal groups and a token picks its top_k experts inside its best
    # topk_groups groups. 0 = ungrouped. Recorded for the baselines (EPLB's hierarchical policy).
    num_expert_groups: int = 0
    topk_groups: int = 0
    # AdamW's moments: fp32 (torch's AdamW; fp64 in fp64 models) or bf16 (DeepSeek-V3's choice,
    # Megatron-Core's --exp-avg-dtype / --exp-avg-sq-dtype bf16: 4 bytes less memory and 8 less
    # traffic per parameter, the arithmetic still in fp32). bf16 needs --tp 1.
    optimizer_state_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise ConfigError(f"model name {self.name!r}: give a non-empty string")
        positive = ("num_layers", "num_experts", "top_k", "d_model", "d_ff", "num_heads",
                    "head_dim", "num_kv_heads", "vocab_size", "seq_len", "global_batch")
        for field in positive:
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"model {self.name!r}: {field} must be a positive integer, got {value!r}")
        for field in ("num_dense_layers", "dense_d_ff", "num_shared_experts", "num_expert_groups",
                      "topk_groups"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ConfigError(f"model {self.name!r}: {field} must be a non-negative integer, got {value!r}")
        for field, most in MAX_SIZES.items():
            if getattr(self, field) > most:
                raise ConfigError(f"model {self.name!r}: {field}={getattr(self, field):,} is more than epplan "
                                  f"plans for ({most:,}); check the value")
        for field in ("router_aux_loss_coef", "router_bias_rate"):
            value = getattr(self, field)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < 1e6:
                raise ConfigError(f"model {self.name!r}: {field} must be a finite number >= 0, got {value!r}")
        if self.top_k > self.num_experts:
            raise ConfigError(
                f"model {self.name!r}: top_k={self.top_k} exceeds num_experts={self.num_experts}; "
                "choose top_k <= num_experts")
        if self.num_heads % self.num_kv_heads:
            raise ConfigError(
                f"model {self.name!r}: num_heads={self.num_heads} is not a multiple of "
                f"num_kv_heads={self.num_kv_heads}")
        if self.num_dense_layers >= self.num_layers:
            raise ConfigError(
                f"model {self.name!r}: num_dense_layers={self.num_dense_layers} leaves no MoE layer "
                f"out of num_layers={self.num_layers}")
        if self.num_dense_layers and not self.dense_d_ff:
            raise ConfigError(f"model {self.name!r}: dense layers need dense_d_ff > 0")
        if self.num_expert_groups:
            if self.num_experts % self.num_expert_groups:
                raise ConfigError(
                    f"model {self.name!r}: num_expert_groups={self.num_expert_groups} does not divide "
                    f"num_experts={self.num_experts}")
            if not 1 <= self.topk_groups <= self.num_expert_groups:
                raise ConfigError(
                    f"model {self.name!r}: topk_groups={self.topk_groups} must be in "
                    f"1..num_expert_groups={self.num_expert_groups}")
            reachable = self.topk_groups * (self.num_experts // self.num_expert_groups)
            if self.top_k > reachable:
                raise ConfigError(
                    f"model {self.name!r}: top_k={self.top_k} exceeds the {reachable} experts of the "
                    f"topk_groups={self.topk_groups} groups a token may use")
        elif self.topk_groups:
            raise ConfigError(f"model {self.name!r}: topk_groups needs num_expert_groups > 0")
        if self.activation not in ACTIVATIONS:
            raise ConfigError(
                f"model {self.name!r}: activation {self.activation!r} unknown; known: {', '.join(ACTIVATIONS)}")
        if self.dtype not in DTYPE_BYTES:
            raise ConfigError(
                f"model {self.name!r}: dtype {self.dtype!r} unknown; known: {', '.join(DTYPE_BYTES)}")
        if self.optimizer_state_dtype not in OPTIMIZER_STATE_DTYPES:
            raise ConfigError(
                f"model {self.name!r}: optimizer_state_dtype {self.optimizer_state_dtype!r} unknown; "
                f"known: {', '.join(OPTIMIZER_STATE_DTYPES)}")

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - self.num_dense_layers

    @property
    def dtype_bytes(self) -> int:
        return DTYPE_BYTES[self.dtype]

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch * self.seq_len

    def replace(self, **overrides: Any) -> "ModelConfig":
        return dataclasses.replace(self, **overrides)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


PRESETS: dict[str, ModelConfig] = {
    # The founding spec, exactly: 16 MoE layers x 16 experts, d_model 4096, MLP hidden 16384,
    # 32 heads x 128, BF16, top-2, batch 128 sequences x 10,000 tokens.
    "seed": ModelConfig(
        name="seed", num_layers=16, num_experts=16, top_k=2, d_model=4096, d_ff=16384,
        num_heads=32, head_dim=128, num_kv_heads=32, vocab_size=32000, seq_len=10_000,
        global_batch=128, activation="gelu"),
    # Mixtral 8x7B (Mistral AI's model card): 32 layers, 8 experts top-2, SwiGLU 14336, GQA 32/8.
    "mixtral-8x7b": ModelConfig(
        name="mixtral-8x7b", num_layers=32, num_experts=8, top_k=2, d_model=4096, d_ff=14336,
        num_heads=32, head_dim=128, num_kv_heads=8, vocab_size=32000, seq_len=4096,
        global_batch=1024, activation="swiglu"),
    # DeepSeek-V3 (technical report): 61 layers, the first 3 dense (SwiGLU 18432), then 256
    # routed experts (SwiGLU 2048) + 1 shared, top-8, d_model 7168, 128 heads. Its multi-head
    # latent attention is modelled as plain 128 x 128 attention (the wire and expert terms,
    # which the planner cares about, are exact).
    "deepseek-v3": ModelConfig(
        name="deepseek-v3", num_layers=61, num_experts=256, top_k=8, d_model=7168, d_ff=2048,
        num_heads=128, head_dim=128, num_kv_heads=128, vocab_size=129280, seq_len=4096,
        global_batch=15360, activation="swiglu", num_dense_layers=3, dense_d_ff=18432,
        num_shared_experts=1, num_expert_groups=8, topk_groups=4),
    # For CPU tests and the README demo: small enough to train in seconds with gloo.
    "tiny": ModelConfig(
        name="tiny", num_layers=2, num_experts=4, top_k=2, d_model=32, d_ff=64,
        num_heads=4, head_dim=8, num_kv_heads=4, vocab_size=256, seq_len=32,
        global_batch=8, activation="gelu"),
}

_FIELDS = {f.name: f for f in dataclasses.fields(ModelConfig)}


def load_model_config(
    spec: str | Path | ModelConfig = "seed",
    overrides: Mapping[str, Any] | None = None,
) -> ModelConfig:
    """A preset name, a YAML file, a Hugging Face ``config.json`` or a config, with field
    overrides applied.

    A YAML file holds field values, and may start from a preset with ``base: NAME``. A ``.json``
    file is a Hugging Face model config (``epplan.workload.hf_config``).
    """
    if isinstance(spec, ModelConfig):
        return _apply(spec, dict(overrides or {}), source="override")
    spec_str = str(spec)
    if spec_str in PRESETS:
        config = PRESETS[spec_str]
    elif spec_str.endswith(".json"):
        from epplan.workload.hf_config import read_hf_config

        config = read_hf_config(spec_str).config
    elif spec_str.endswith((".yaml", ".yml")) or Path(spec_str).is_file():
        config = _from_yaml(Path(spec_str))
    else:
        raise ConfigError(
            f"model {spec_str!r}: not a preset and not a YAML file; presets: {', '.join(PRESETS)}")
    return _apply(config, dict(overrides or {}), source="override")


def _from_yaml(path: Path) -> ModelConfig:
    from epplan.inputs import MiB, load_yaml, read_text

    doc = load_yaml(read_text(path, "model config file", ConfigError, MiB), str(path), ConfigError)
    if not isinstance(doc, dict):
        raise ConfigError(f"{path}: a model config must be a mapping of field: value")
    base_name = doc.pop("base", None)
    if base_name is not None:
        if not isinstance(base_name, str) or base_name not in PRESETS:
            raise ConfigError(f"{path}: base: unknown preset {base_name!r}; presets: {', '.join(PRESETS)}")
        base = PRESETS[base_name]
    else:
        missing = [n for n, f in _FIELDS.items()
                   if f.default is dataclasses.MISSING and n not in doc and n != "name"]
        if missing:
            raise ConfigError(f"{path}: missing fields {', '.join(missing)} (or start from a preset with 'base:')")
        base = None
    doc.setdefault("name", path.stem)
    if base is None:
        return _construct(doc, source=str(path))
    return _apply(base, doc, source=str(path))


def _apply(config: ModelConfig, overrides: dict[str, Any], source: str) -> ModelConfig:
    if not overrides:
        return config
    merged = config.to_dict()
    merged.update(overrides)
    return _construct(merged, source)


def _construct(values: dict[str, Any], source: str) -> ModelConfig:
    unknown = sorted(map(str, set(values) - set(_FIELDS)))
    if unknown:
        raise ConfigError(f"{source}: unknown model field(s) {', '.join(unknown)}; known: {', '.join(_FIELDS)}")
    try:
        return ModelConfig(**values)
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from None
