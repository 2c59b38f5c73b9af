"""The training step's options against plain references, in 2 gloo CPU processes.

- Gradient accumulation: 2 micro-batches of 2 sequences give the first step's loss of 1 batch of
  4, and nearly its later losses (the router's auxiliary loss is a per-micro-batch statistic).
- Activation checkpointing recomputes attention exactly: bitwise the same run.
- Byte data (--data) trains from a text file.
- The global gradient norm counts every expert once, whatever the placement's replicas.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epplan.placement.types import LayerPlacement, Placement
from epplan.runtime.testing import run_distributed
from epplan.train.job import Job, Node
from epplan.workload.config import PRESETS

G = 2
REPLICATED = Placement(G, 4, [LayerPlacement([np.array(r) for r in reps], [np.full((G, len(r)), 1 / len(r)) for r in reps])
                              for reps in ([[0, 1], [0], [1], [0, 1]], [[1], [0, 1], [0], [1]])], method="test")


def _run(out: str, steps: int, **kw):
    from epplan.train.options import TrainOptions
    from epplan.train.trainer import Trainer

    job = Job(PRESETS["tiny"], REPLICATED, "h", (Node("n0", (0, 1)),))
    opts = TrainOptions.of(manifest="m.json", out=out, steps=steps, lr=0.01, ckpt_every=100, **kw)
    trainer = Trainer(job, opts, torch.distributed.get_rank(), torch.device("cpu"))
    records = [trainer.train_step() for _ in range(steps)]
    return trainer, [r["loss"] for r in records]


def _check(rank: int, world_size: int, tmp: str, text_file: str) -> None:
    from epplan.runtime.expert_parallel import sync_gradients
    from epplan.runtime.model import Transformer
    from epplan.train.trainer import global_grad_norm

    _, plain_loss = _run(f"{tmp}/a", 3)
    _, accumulated_loss = _run(f"{tmp}/b", 3, micro_batches=2)
    assert abs(accumulated_loss[0] - plain_loss[0]) < 1e-6
    np.testing.assert_allclose(accumulated_loss, plain_loss, rtol=1e-3)

    _, recomputed_loss = _run(f"{tmp}/c", 3, recompute="attention")
    assert recomputed_loss == plain_loss

    _, byte_loss = _run(f"{tmp}/d", 3, data=text_file)
    assert all(np.isfinite(byte_loss)) and byte_loss != plain_loss

    # The norm of the whole model's gradient, from the single-device model with the same grads.
    trainer, _ = _run(f"{tmp}/e", 1, grad_clip=0.0)
    x, y = trainer.data.batch(1, 0)
    trainer.model.zero_grad()
    trainer.model(x, y)[1].backward()
    sync_gradients(trainer.model)
    norm = global_grad_norm(trainer.model)
    reference = Transformer(trainer.config)
    full_grads = _gathered_grads(trainer.model)
    expected = torch.sqrt(sum(full_grads[name].double().pow(2).sum() for name, _ in reference.named_parameters()))
    torch.testing.assert_close(norm.double(), expected, rtol=1e-5, atol=0)


def _gathered_grads(model) -> dict[str, torch.Tensor]:
    """Gradients in the single-device layout (each expert once), via gather_state_dict's rule."""
    from epplan.runtime.expert_parallel import gather_state_dict

    saved = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(p.grad)
    grads = gather_state_dict(model)
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(saved[n])
    return grads


def test_step_options_match_their_references(tmp_path):
    text = tmp_path / "corpus.txt"
    text.write_bytes(("the quick brown fox jumps over the lazy dog. " * 200).encode())
    run_distributed(_check, G, str(tmp_path), str(text))


def test_matrices_every_few_steps_beyond_64_ranks():
    from epplan.train.metrics import matrix_every
    assert [matrix_every(g) for g in (1, 2, 64)] == [1, 1, 1]
    assert matrix_every(65) == 4 and matrix_every(128) == 4 and matrix_every(1024) == 256


def _gather_with_and_without_matrices(rank: int, world_size: int) -> None:
    from epplan.runtime.expert_parallel import ExpertParallelStats
    from epplan.train.metrics import gather_step_stats
    stats = ExpertParallelStats.zeros(2, 3, world_size)
    stats.num_tokens_per_expert[:] = np.arange(6).reshape(2, 3) + 10 * rank
    stats.dispatch_bytes[:] = 100 * (rank + 1)
    stats.combine_bytes[:] = 7
    loss, aux = torch.tensor(1.0 + rank), torch.tensor(0.5)
    full = gather_step_stats(loss, aux, stats, world_size)
    thin = gather_step_stats(loss, aux, stats, world_size, with_matrices=False)
    assert thin.dispatch_bytes is None and thin.combine_bytes is None
    assert thin.loss == full.loss == 1.5 and thin.aux_loss == 0.5
    np.testing.assert_array_equal(thin.tokens_per_expert, full.tokens_per_expert)
    assert full.dispatch_bytes.shape == (2, world_size, world_size)
    assert full.dispatch_bytes[0, 1, 0] == 200 and full.combine_bytes.sum() == 7 * 2 * world_size ** 2
    # the gradient norm (the same on every rank) comes back with them, exactly, in the one sync
    norm = torch.tensor(0.1234567, dtype=torch.float32)
    both = gather_step_stats(loss, aux, stats, world_size, grad_norm=norm)
    assert both.grad_norm == norm.item() and full.grad_norm is None
    np.testing.assert_array_equal(both.tokens_per_expert, full.tokens_per_expert)
    np.testing.assert_array_equal(both.dispatch_bytes, full.dispatch_bytes)


def test_gather_step_stats_without_matrices():
    run_distributed(_gather_with_and_without_matrices, 2)


def test_clip_inside_fused_adamw_matches_multiplying_first():
    """Fused AdamW takes the clipping scale in its kernel (grad_scale); the step equals
    multiplying the gradients first and stepping, to float rounding."""
    from epplan.train.optim import TrainOptimizer

    torch.manual_seed(0)
    models = [torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5)) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    opts = [TrainOptimizer(m, "none", lr=1e-2, weight_decay=0.1, fused=fused)
            for m, fused in zip(models, (True, False))]
    for _ in range(3):
        x = torch.randn(4, 6)
        for m in models:
            m.zero_grad()
            m(x).square().sum().backward()
        scale = torch.tensor(0.3)
        for opt in opts:
            opt.step(grad_scale=scale)
        assert all(getattr(o, "grad_scale", None) is None for opt in opts for o in opt._local())
    for a, b in zip(models[0].parameters(), models[1].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not torch.equal(models[0][0].weight, torch.nn.Linear(6, 5).weight)


def test_adamw_bf16_moments_match_fp32_arithmetic_rounded_each_step():
    """``state_dtype`` bf16 (``optimizer_state_dtype``): the moments are stored in bf16, updated
    in fp32 from their stored values, and the weight update uses them before rounding; against a
    reference written out here, over steps with a moving rate, weight decay and the clip scale."""
    from epplan.train.adamw import step_with_copies

    torch.manual_seed(1)
    shapes = [(6, 5), (7,)]
    ps = [torch.randn(s, requires_grad=True) for s in shapes]
    weights = [p.detach().clone() for p in ps]
    m_ref = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
    v_ref = [torch.zeros(s, dtype=torch.bfloat16) for s in shapes]
    opt = torch.optim.AdamW([{"params": ps[:1], "weight_decay": 0.1}, {"params": ps[1:], "weight_decay": 0.0}],
                            lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    for i in range(5):
        lr, scale = 1e-2 * (1 + i), torch.tensor(0.5 + 0.1 * i)
        for group in opt.param_groups:
            group["lr"] = lr
        for j, p in enumerate(ps):
            g = torch.randn(shapes[j])
            p.grad = g.clone()
            wd = 0.1 if j == 0 else 0.0
            gs = g * scale
            m = m_ref[j].float() * 0.9 + 0.1 * gs
            v = v_ref[j].float() * 0.95 + 0.05 * gs * gs
            m_ref[j], v_ref[j] = m.to(torch.bfloat16), v.to(torch.bfloat16)
            t = i + 1
            w = weights[j] * (1 - lr * wd)
            weights[j] = w - lr / (1 - 0.9 ** t) * m / (v.sqrt() / (1 - 0.95 ** t) ** 0.5 + 1e-8)
        step_with_copies(opt, scale, state_dtype=torch.bfloat16)
        for j, p in enumerate(ps):
            state = opt.state[p]
            assert state["exp_avg"].dtype == state["exp_avg_sq"].dtype == torch.bfloat16
            torch.testing.assert_close(p.detach(), weights[j], rtol=1e-5, atol=1e-6)
            for got, want in ((state["exp_avg"], m_ref[j]), (state["exp_avg_sq"], v_ref[j])):
                # the same fp32 values rounded once: equal, but for a tie broken the other way
                torch.testing.assert_close(got.float(), want.float(), rtol=8e-3, atol=1e-8)
            assert state["step"].item() == i + 1


def test_train_optimizer_bf16_moments():
    from epplan.train.optim import OnePassAdamW, TrainOptimizer

    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    opt = TrainOptimizer(model, "none", lr=1e-2, weight_decay=0.1, state_dtype=torch.bfloat16)
    model(torch.randn(2, 4)).sum().backward()
    before = model[0].weight.detach().clone()
    opt.step(grad_scale=torch.tensor(1.0))
    assert not torch.equal(before, model[0].weight)
    assert opt.state_of(model[0].weight)["exp_avg"].dtype == torch.bfloat16
    assert opt.fresh_state(model[0].bias)["exp_avg_sq"].dtype == torch.bfloat16
    assert all(isinstance(o, OnePassAdamW) and o.clip is None for o in opt.optimizers)


@pytest.mark.parametrize("dtype,together", [(torch.float64, False), (torch.float32, False), (torch.float32, True)])
def test_adamw_with_copies_matches_torch_adamw(dtype, together, monkeypatch):
    """The one-pass AdamW step (epplan.train.adamw, the step on GPUs) against torch.optim.AdamW
    over several steps: a schedule that moves the rate, weight decay on matrices only, the
    clipping scale, a parameter without a gradient; the bf16 copies equal the new weights and
    the state has torch's layout (a torch AdamW continues from it). ``together``: the small
    tensors take the multi-tensor path (as on CUDA) whose kernel is not there, so that its
    bookkeeping (grouping by copy, step counters, copies recorded) runs on the fallback (the
    kernel itself needs a GPU: scripts/device/check_adamw_many.py)."""
    from epplan.runtime.experts import compute_copy
    from epplan.train import adamw
    from epplan.train.adamw import step_with_copies

    if together:
        monkeypatch.setattr(adamw, "_together", lambda p, grad, state, copy: p.numel() < 40)
        monkeypatch.setattr(adamw, "_many_kernel", lambda: None)
        monkeypatch.setattr(adamw, "_MANY_TENSORS", 1)  # a launch per tensor: the chunks' bookkeeping

    torch.manual_seed(0)
    shapes = [(7, 5), (3, 4, 6), (5,), (2, 2)]
    ps = [torch.randn(s, dtype=dtype, requires_grad=True) for s in shapes]
    refs = [p.detach().clone().requires_grad_() for p in ps]

    def groups(xs):
        return [{"params": [x for x in xs if x.dim() >= 2], "weight_decay": 0.1},
                {"params": [x for x in xs if x.dim() < 2], "weight_decay": 0.0}]
    opt = torch.optim.AdamW(groups(ps), lr=1e-2, betas=(0.9, 0.95), eps=1e-8)
    ref = torch.optim.AdamW(groups(refs), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    copies = {0: compute_copy(ps[0], torch.bfloat16), 1: compute_copy(ps[1], torch.bfloat16)}
    for i in range(4):
        grads = [torch.randn(s, dtype=dtype) for s in shapes]
        scale = torch.tensor(0.25 + 0.2 * i, dtype=dtype)
        for j, (p, r, g) in enumerate(zip(ps, refs, grads)):
            has_grad = not (j == 3 and i == 1)  # no gradient at one step: AdamW skips it
            p.grad = g.clone() if has_grad else None
            r.grad = g * scale if has_grad else None
        for o in (opt, ref):
            for group in o.param_groups:
                group["lr"] = 1e-2 * (1 + i)
        step_with_copies(opt, scale)
        ref.step()
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-7)
        for p, r in zip(ps, refs):
            torch.testing.assert_close(p, r, **tol)
            for key in ("exp_avg", "exp_avg_sq"):
                torch.testing.assert_close(opt.state[p][key], ref.state[r][key], **tol)
            assert opt.state[p]["step"].item() == ref.state[r]["step"].item()
        for j, copy in copies.items():
            assert compute_copy(ps[j], torch.bfloat16) is copy
            assert torch.equal(copy, ps[j].detach().to(torch.bfloat16))
    # torch's AdamW continues from the state the one-pass step left
    cont = torch.optim.AdamW(groups(ps), lr=1e-2, betas=(0.9, 0.95), eps=1e-8, foreach=False)
    cont.load_state_dict(opt.state_dict())
    for p, r in zip(ps, refs):
        p.grad = r.grad = torch.ones_like(p)
    cont.step()
    ref.step()
    for p, r in zip(ps, refs):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-7)
