"""The optimizer step behind the next forward (epplan.train.step_behind): its groups cover every
parameter once, in the order the forward reads them, and stepping by groups gives the weights of
one step over all (the side stream itself needs a GPU: scripts/device/dev15r.sh checks the run's
losses bitwise against the inline step)."""

from __future__ import annotations

import pytest
import torch

from epplan.runtime.model import Transformer
from epplan.train.adamw import step_with_copies
from epplan.train.step_behind import forward_order
from epplan.workload import load_model_config


@pytest.mark.parametrize("overrides", [{}, {"num_dense_layers": 1, "dense_d_ff": 48}, {"num_shared_experts": 1}])
def test_groups_cover_every_parameter_once_in_forward_order(overrides):
    config = load_model_config("tiny").replace(num_layers=3, **overrides)
    model = Transformer(config)
    groups = forward_order(model)
    ids = [id(p) for _, params in groups for p in params]
    assert sorted(ids) == sorted(id(p) for p in model.parameters()) and len(ids) == len(set(ids))
    order = []  # the gates' first forward calls, in the order they run
    hooks = [gate.register_forward_pre_hook(lambda m, a, i=i: order.append(i)) for i, (gate, _) in enumerate(groups)]
    model(torch.randint(0, config.vocab_size, (2, 8)))
    for h in hooks:
        h.remove()
    assert order[:len(groups)] == list(range(len(groups)))
    # each gate's group holds the weights its module and the modules after it (until the next
    # gate) read: the LM head with the final norm, each block's experts with its FFN norm
    assert any(p is model.lm_head.weight for p in groups[-1][1])
    assert any(p is model.pos_emb.weight for p in groups[0][1])


def test_stepping_by_groups_gives_the_one_step_weights():
    torch.manual_seed(0)
    config = load_model_config("tiny").replace(num_layers=2, dtype="fp64")
    models = [Transformer(config).double() for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in models]
    for step in range(3):
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            a.grad = torch.randn_like(a)
            b.grad = a.grad.clone()
        scale = torch.tensor(0.5, dtype=torch.float64)
        step_with_copies(opts[0], scale)
        for gate, params in reversed(forward_order(models[1])):  # any order of the groups
            step_with_copies(opts[1], scale, only={id(p) for p in params})
        for a, b in zip(models[0].parameters(), models[1].parameters()):
            assert torch.equal(a, b)
            assert torch.equal(opts[0].state[a]["exp_avg_sq"], opts[1].state[b]["exp_avg_sq"])
