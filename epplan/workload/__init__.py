"""The workload: model configuration, derived costs and expected routing traffic."""

from epplan.workload.config import PRESETS, ModelConfig, load_model_config
from epplan.workload.flops import ModelCosts, model_costs
from epplan.workload.routing_stats import RoutingStats, read_routing_stats, write_routing_stats
from epplan.workload.traffic import Traffic, make_traffic

__all__ = [
    "PRESETS", "ModelConfig", "load_model_config",
    "ModelCosts", "model_costs",
    "RoutingStats", "read_routing_stats", "write_routing_stats",
    "Traffic", "make_traffic",
]
