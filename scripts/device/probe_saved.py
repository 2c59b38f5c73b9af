"""Bytes saved for backward per token, by module, on the GPU path `epplan run` trains
(bf16 autocast, fp32 weights, grouped expert GEMMs, fused attention), beside the cost model's count.

Counted with torch.autograd.graph.saved_tensors_hooks: each storage once, weights and their bf16
autocast copies apart (they do not grow with the batch)."""

import collections
import json

import torch

from epplan.runtime.model import Transformer
from epplan.workload.config import PRESETS
from epplan.workload.flops import model_costs

config = PRESETS["tiny"].replace(d_model=2048, d_ff=8192, num_heads=16, head_dim=128, num_kv_heads=16,
                                 num_layers=2, num_experts=8, seq_len=2048, vocab_size=32000)
costs = model_costs(config)
model = Transformer(config).cuda()
stack = ["(loss)"]
for name, module in model.named_modules():
    if name and name.count(".") <= 3:
        module.register_forward_pre_hook(lambda m, i, name=name: stack.append(name) and None)
        module.register_forward_hook(lambda m, i, o: stack.pop() and None)


def saved_by_module(batch: int) -> collections.Counter:
    """Bytes of the distinct storages saved for backward in one forward, by module."""
    seen, by_module = set(), collections.Counter()

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            where = stack[-1].split(".", 2)[-1] if stack[-1].startswith("layers.") else stack[-1]
            by_module[where] += t.untyped_storage().nbytes()
        return t

    idx = torch.randint(0, config.vocab_size, (batch, config.seq_len), device="cuda")
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(idx, idx)
    del loss
    return by_module


# Weights and their bf16 autocast copies are saved too but do not grow with the batch: the
# difference between two batches leaves the bytes per token.
one, two = saved_by_module(1), saved_by_module(2)
T = config.seq_len
per_token = {k: (two[k] - one[k]) / T for k in sorted(two)}
print(json.dumps({"saved_per_token_by_module (both layers summed)": per_token,
                  "total_per_token": sum(per_token.values()),
                  "model": {"attention": costs.act_bytes_per_token_attention,
                            "moe_local": costs.act_bytes_per_token_moe_local,
                            "per_assignment": costs.act_bytes_per_assignment,
                            "moe_layer": costs.act_bytes_per_token_moe_layer,
                            "head": costs.act_bytes_per_token_head,
                            "total": costs.act_bytes_per_token}}, indent=1))
