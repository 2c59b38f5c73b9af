"""The training runtime: single-device model code; expert parallelism in ``expert_parallel``.

``epplan.runtime.expert_parallel`` (``parallelize_experts``, ``sync_gradients``,
``gather_state_dict``, ``get_stats``) is imported explicitly where a process group exists.
"""

from epplan.runtime.experts import GroupedExperts, expert_mlp
from epplan.runtime.model import MLP, MoE, Transformer
from epplan.runtime.router import Router

__all__ = ["GroupedExperts", "MLP", "MoE", "Router", "Transformer", "expert_mlp"]
