"""Activation memory, measured vs the cost model's count (epplan.workload.flops), on one GPU.

The medium model of the training runs (d_model 2048, d_ff 8192, 2 layers, 8 experts, vocab
32,000, sequences of 2,048), fp32 weights under bf16 autocast as `epplan run` trains. For each
batch: peak bytes allocated during forward + backward above the weights, less the weight
gradients, per token; beside it the cost model's activations per token. Then the LM head and loss
alone, per token and vocabulary entry."""

import json

import torch
import torch.nn.functional as F

from epplan.runtime.model import Transformer
from epplan.workload.config import PRESETS
from epplan.workload.flops import model_costs

config = PRESETS["tiny"].replace(d_model=2048, d_ff=8192, num_heads=16, head_dim=128, num_kv_heads=16,
                                 num_layers=2, num_experts=8, seq_len=2048, vocab_size=32000)
costs = model_costs(config)
model = Transformer(config).cuda()
param_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
V, T = config.vocab_size, config.seq_len
rows = []
for batch in (2, 4, 8):
    idx = torch.randint(0, V, (batch, T), device="cuda")
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    after_forward = torch.cuda.memory_allocated() - base
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base - param_bytes  # less the fp32 weight grads
    tokens = batch * T
    rows.append({"batch": batch, "tokens": tokens, "peak_per_token": peak / tokens,
                 "kept_after_forward_per_token": after_forward / tokens,
                 "model_per_token": costs.act_bytes_per_token, "model_head_per_token": costs.act_bytes_per_token_head})
    print(json.dumps(rows[-1]))

# The head alone: final norm, LM head, fp32 cross-entropy.
model.zero_grad(set_to_none=True)
for tokens in (8192, 16384):
    h = torch.randn(1, tokens, config.d_model, device="cuda", requires_grad=True)
    targets = torch.randint(0, V, (tokens,), device="cuda")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model.lm_head(model.norm(h))
        loss = F.cross_entropy(logits.float().reshape(tokens, V), targets)
    del logits
    kept = torch.cuda.memory_allocated() - base
    loss.backward()
    peak = torch.cuda.max_memory_allocated() - base
    print(json.dumps({"head_tokens": tokens, "kept_per_token_per_V": kept / tokens / V,
                      "peak_per_token_per_V": peak / tokens / V}))
    del h, loss
