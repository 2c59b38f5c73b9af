"""The training runtime: single-device model code; expert parallelism in ``expert_parallel``.

``epplan.runtime.expert_parallel`` (``build_expert_parallel_model``, ``parallelize_experts``,
``sync_gradients``, ``gather_state_dict``, ``get_stats``) is imported explicitly where a process
group exists. ``epplan.runtime.init.init_weights`` gives seeded weights that do not depend on the
placement.
"""

from epplan.runtime.experts import GroupedExperts, expert_mlp
from epplan.runtime.model import MLP, MoE, Transformer
from epplan.runtime.router import Router

__all__ = ["GroupedExperts", "MLP", "MoE", "Router", "Transformer", "expert_mlp"]
