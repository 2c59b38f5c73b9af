"""The workload: model configuration and expected routing traffic."""

from epplan.workload.config import PRESETS, ModelConfig, load_model_config

__all__ = ["PRESETS", "ModelConfig", "load_model_config"]
