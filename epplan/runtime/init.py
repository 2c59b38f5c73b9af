"""Seeded initial weights that do not depend on the placement, written into a built model.

Every parameter draws from its own random stream, keyed by the seed and the parameter's name, and
each routed expert from a stream of its own (the name and the expert's index). A rank that holds
experts 4-7 of a layer therefore draws exactly the rows 4-7 of the single-device model, without
drawing the others. That is what lets ``build_expert_parallel_model`` build on the meta device
and materialise only the weights a rank holds.

The rules are the model's: RMSNorm weights 1, every other weight normal(0, 0.02), buffers 0.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from epplan.runtime.experts import GroupedExperts
from epplan.runtime.expert_tensor_parallel import HIDDEN_DIM, shard
from epplan.runtime.model import RMSNorm

STD = 0.02


def _normal(shape: torch.Size, seed: int, *key: object) -> torch.Tensor:
    """normal(0, STD) values of ``shape`` from the stream of (seed, *key), on the CPU in fp32."""
    digest = hashlib.sha256(repr((seed, *key)).encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") >> 1)
    return torch.randn(shape, generator=generator) * STD


@torch.no_grad()
def init_weights(model: nn.Module, seed: int) -> None:
    """Overwrite every parameter and buffer of ``model`` with its seeded initial value.

    Routed experts are recognised as ``GroupedExperts`` (rows = experts 0..E-1) or as a module
    with ``local_experts`` (the expert-parallel slice: row j = expert local_experts[j]; under
    expert tensor parallelism, ``expert_tp``, this rank's hidden slice of the expert's weight).
    """
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        local = getattr(module, "local_experts", None)
        if isinstance(module, GroupedExperts):
            local = range(module.num_experts)
        for param_name, p in module.named_parameters(recurse=False):
            name = prefix + param_name
            if isinstance(module, RMSNorm):
                p.fill_(1.0)
            elif local is not None:
                etp = getattr(module, "expert_tp", None)
                shape = list(p.shape[1:])
                if etp is not None:
                    shape[HIDDEN_DIM[param_name]] *= etp.size
                for row, expert in enumerate(local):
                    value = _normal(torch.Size(shape), seed, name, int(expert))
                    p[row].copy_(value if etp is None else shard(param_name, value, etp))
            else:
                p.copy_(_normal(p.shape, seed, name))
        for buffer in module.buffers(recurse=False):
            buffer.zero_()
