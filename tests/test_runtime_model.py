"""Single-device runtime: router, experts, MoE and the transformer (CPU, float64 where exactness matters)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from epplan.runtime.experts import GroupedExperts, expert_mlp
from epplan.runtime.model import MLP, MoE, Transformer
from epplan.runtime.router import Router, position_in_expert
from epplan.workload.config import PRESETS

TINY = PRESETS["tiny"]


def _router(dim=8, num_experts=4, top_k=2, **kw) -> Router:
    torch.manual_seed(0)
    return Router(dim, num_experts, top_k, **kw).double()


def test_router_topk_selects_largest_probs_and_renormalises():
    for top_k in (1, 2, 4):
        router = _router(top_k=top_k)
        x = torch.randn(16, 8, dtype=torch.float64)
        idx, weight, _ = router(x)
        probs = torch.softmax(x @ router.gate.weight.T, dim=-1)  # (N, E)
        expected = torch.sort(probs, dim=-1, descending=True).indices[:, :top_k]
        assert torch.equal(torch.sort(idx, dim=-1).values, torch.sort(expected, dim=-1).values)
        torch.testing.assert_close(weight.sum(-1), torch.ones(16, dtype=torch.float64))
        top = probs.gather(1, idx)
        torch.testing.assert_close(weight, top / top.sum(-1, keepdim=True))


def test_router_logits_stay_fp32_under_bf16_autocast():
    """Under bf16 autocast (as epplan run trains) the gate runs in fp32, as Megatron-Core's and
    torchtitan's routers do: the weights and the auxiliary loss equal the fp32 computation on
    the same bf16 stream, and the selection is the fp32 one."""
    torch.manual_seed(0)
    router = Router(64, 16, 2, aux_loss_coef=0.01)  # fp32 weights, as the trainer keeps them
    x = torch.randn(256, 64).to(torch.bfloat16)  # the bf16 residual stream
    with torch.autocast("cpu", dtype=torch.bfloat16):
        idx, weight, aux = router(x)
    logits = x.float() @ router.gate.weight.T  # (N, E) in fp32
    probs = logits.softmax(dim=-1)
    top = probs.topk(2, dim=-1)
    assert weight.dtype == torch.float32 and aux.dtype == torch.float32
    assert torch.equal(idx, top.indices)
    torch.testing.assert_close(weight, top.values / top.values.sum(-1, keepdim=True), rtol=1e-6, atol=1e-7)


def test_router_aux_loss_matches_hand_computation():
    router = _router(num_experts=3, top_k=1, aux_loss_coef=0.1)
    with torch.no_grad():
        router.gate.weight.copy_(torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0],
                                               [0, 1.0, 0, 0, 0, 0, 0, 0],
                                               [0, 0, 1.0, 0, 0, 0, 0, 0]]))
    x = torch.zeros(4, 8, dtype=torch.float64)
    x[0, 0] = x[1, 0] = x[2, 1] = 2.0  # tokens 0, 1 -> expert 0; token 2 -> expert 1
    x[3, 2] = 3.0  # token 3 -> expert 2
    _, _, aux = router(x)
    e2, e3 = math.exp(2), math.exp(3)
    probs = np.array([[e2, 1, 1], [e2, 1, 1], [1, e2, 1], [1, 1, e3]])
    probs /= probs.sum(axis=1, keepdims=True)
    f = np.array([2, 1, 1]) / 4
    expected = 0.1 * 3 * float((f * probs.mean(axis=0)).sum())
    assert aux.item() == pytest.approx(expected, rel=1e-12)


def test_router_bias_balances_skewed_load():
    router = _router(num_experts=4, top_k=1, bias_rate=0.01)
    torch.manual_seed(1)
    x = torch.randn(256, 8, dtype=torch.float64)
    x[:, 7] = 1.0
    with torch.no_grad():
        router.gate.weight[0, 7] = 1.5  # expert 0 wins most tokens

    def imbalance() -> float:
        idx, _, _ = router(x)
        load = torch.bincount(idx.reshape(-1), minlength=4).double()
        return (load.max() / load.mean()).item()

    start = imbalance()
    router.load.zero_()
    for _ in range(200):
        router(x)
        router.update_bias()
    assert start > 2.5
    assert imbalance() < 1.25  # sign steps of fixed size oscillate around balance
    # Bias steers selection only: the gate weights are the unbiased probabilities.
    idx, weight, _ = router(x)
    assert torch.equal(weight, torch.ones_like(weight))


def test_position_in_expert():
    flat = torch.tensor([2, 0, 2, -1, 0, 2])
    assert position_in_expert(flat, 3)[[0, 1, 2, 4, 5]].tolist() == [0, 0, 1, 1, 2]


@pytest.mark.parametrize("activation", ["gelu", "silu", "swiglu"])
def test_loop_and_grouped_experts_agree(activation):
    torch.manual_seed(0)
    experts = GroupedExperts(5, 8, 12, activation).double()
    x = torch.randn(20, 8, dtype=torch.float64, requires_grad=True)
    num_tokens = [7, 0, 9, 0, 4]  # includes experts with no rows
    outs, grads = [], []
    for impl in ("loop", "grouped"):
        y = expert_mlp(x, num_tokens, experts.w1, experts.w2, experts.w3, activation, impl)
        (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum().backward()
        outs.append(y.detach())
        grads.append([t.grad.clone() for t in (x, experts.w1, experts.w2)])
        for t in (x, experts.w1, experts.w2, experts.w3):
            if t is not None:
                t.grad = None
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_capacity_factor_drops_and_counts():
    torch.manual_seed(0)
    router = _router(num_experts=4, top_k=2, capacity_factor=0.5)
    x = torch.randn(32, 8, dtype=torch.float64)
    free = _router(num_experts=4, top_k=2)
    free.gate.weight.data.copy_(router.gate.weight)
    idx_free, _, _ = free(x)
    idx, weight, _ = router(x)
    capacity = math.ceil(0.5 * 32 * 2 / 4)
    counts = torch.bincount(idx_free.reshape(-1), minlength=4)
    expected_dropped = int((counts - capacity).clamp(min=0).sum())
    assert expected_dropped > 0
    assert int(router.num_dropped) == expected_dropped
    assert int((idx == -1).sum()) == expected_dropped
    kept = idx.reshape(-1)[idx.reshape(-1) >= 0]
    assert torch.bincount(kept, minlength=4).max() <= capacity
    # Dropped assignments are the later ones in flat (token-major) order.
    flat_free, flat = idx_free.reshape(-1), idx.reshape(-1)
    for e in range(4):
        where = (flat_free == e).nonzero().squeeze(1)
        assert torch.equal(flat[where[:capacity]], flat_free[where[:capacity]])
        assert bool((flat[where[capacity:]] == -1).all())
    # The MoE still runs: a token whose every assignment was dropped gets zero from the experts.
    moe = MoE(TINY.replace(d_model=8, num_experts=4, top_k=2), capacity_factor=0.5).double()
    y = moe(x.view(4, 8, 8))
    assert torch.isfinite(y).all() and int(moe.router.num_dropped) > 0


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_one_expert_top1_moe_equals_dense_mlp(activation):
    config = TINY.replace(num_experts=1, top_k=1, activation=activation, router_aux_loss_coef=0.0)
    torch.manual_seed(0)
    moe = MoE(config).double()
    dense = MLP(config.d_model, config.d_ff, activation).double()
    with torch.no_grad():
        dense.w1.copy_(moe.experts.w1[0])
        dense.w2.copy_(moe.experts.w2[0])
        if dense.w3 is not None:
            dense.w3.copy_(moe.experts.w3[0])
    x = torch.randn(2, 5, config.d_model, dtype=torch.float64)
    y_moe, y_dense = moe(x), dense(x)
    torch.testing.assert_close(y_moe, y_dense, rtol=1e-12, atol=1e-12)
    y_moe.square().sum().backward()
    y_dense.square().sum().backward()
    torch.testing.assert_close(moe.experts.w1.grad[0], dense.w1.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(moe.experts.w2.grad[0], dense.w2.grad, rtol=1e-12, atol=1e-12)


def test_transformer_variants_are_causal_and_train():
    config = TINY.replace(num_layers=3, num_dense_layers=1, dense_d_ff=48, num_shared_experts=1,
                          num_kv_heads=2, activation="swiglu", top_k=3)
    torch.manual_seed(0)
    model = Transformer(config).double()
    idx = torch.randint(0, config.vocab_size, (2, 12))
    logits, loss = model(idx, idx)
    assert logits.shape == (2, 12, config.vocab_size) and loss.ndim == 0
    changed = idx.clone()
    changed[:, 8:] = (changed[:, 8:] + 1) % config.vocab_size
    # Past positions ignore future tokens, unless routing of a later token changes (it cannot
    # here: routing is per token), so the first 8 positions' logits are unchanged.
    torch.testing.assert_close(model(changed)[0][:, :8], logits[:, :8], rtol=1e-12, atol=1e-12)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(5):
        opt.zero_grad()
        _, loss = model(idx, idx)
        loss.backward()
        opt.step()
        model.update_router_biases()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    with pytest.raises(ValueError, match="seq_len"):
        model(torch.zeros(1, config.seq_len + 1, dtype=torch.int64))


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_segment_mlp_matches_the_loop_reference(activation):
    """The hand-written backward (one GEMM per expert) of the CUDA expert path, in float64."""
    from epplan.runtime.experts import segment_mlp

    torch.manual_seed(0)
    experts = GroupedExperts(3, 8, 16, activation).double()
    num_tokens = [5, 0, 7]  # an expert with no rows still gets a (zero) gradient
    bounds = [0, 5, 5, 12]
    x = torch.randn(12, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(12, 8, dtype=torch.float64)
    ws = [w for w in (experts.w1, experts.w2, experts.w3) if w is not None]
    w3 = experts.w3
    y = segment_mlp(x, bounds, None, experts.w1, experts.w2, w3, activation)
    grads = torch.autograd.grad(y, [x, *ws], g)
    y_ref = expert_mlp(x, num_tokens, experts.w1, experts.w2, w3, activation, impl="loop")
    ref = torch.autograd.grad(y_ref, [x, *ws], g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert torch.count_nonzero(grads[1][1]) == 0


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_segment_mlp_on_rows_rounded_up(activation, monkeypatch):
    """The loop's GEMMs on an expert's rows rounded up to ROW_QUANTUM (the window reads and writes
    rows of the experts after it, whose own GEMMs overwrite them): forward and backward equal the
    per-expert reference, with empty experts between, and the last window kept inside the rows."""
    from epplan.runtime import experts as experts_mod
    from epplan.runtime.experts import _quantised_ends, segment_mlp

    monkeypatch.setattr(experts_mod, "ROW_QUANTUM", 4)
    num_tokens = [5, 0, 7, 3, 0, 9, 2]
    bounds = [0, *np.cumsum(num_tokens).tolist()]
    rows = bounds[-1]
    # bounds 0 5 5 12 15 15 24 26: 5 -> 8 rows, 7 -> 8, 3 -> 4; 9 and 2 would pass row 26
    assert _quantised_ends(bounds, rows) == [(0, 8), (2, 13), (3, 16), (5, 24), (6, 26)]

    torch.manual_seed(0)
    experts = GroupedExperts(len(num_tokens), 8, 16, activation).double()
    ws = [w for w in (experts.w1, experts.w2, experts.w3) if w is not None]
    x = torch.randn(rows, 8, dtype=torch.float64, requires_grad=True)
    g = torch.randn(rows, 8, dtype=torch.float64)
    y = segment_mlp(x, bounds, None, experts.w1, experts.w2, experts.w3, activation)
    grads = torch.autograd.grad(y, [x, *ws], g)
    y_ref = expert_mlp(x, num_tokens, experts.w1, experts.w2, experts.w3, activation, impl="loop")
    ref = torch.autograd.grad(y_ref, [x, *ws], g)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_segment_mlp_with_fp32_masters_of_bf16_rows(activation):
    """Mixed precision on the segment path: fp32 master weights, bf16 rows. The weights are cast
    once until they change, and two micro-batches accumulate their weight gradients straight
    into the masters' fp32 .grad; against autograd through w.to(bf16) (the plain cast) and a
    float64 reference."""
    from epplan.runtime.experts import compute_copy, segment_mlp

    torch.manual_seed(0)
    experts = GroupedExperts(3, 8, 16, activation)  # fp32
    ws = [w for w in (experts.w1, experts.w2, experts.w3) if w is not None]
    num_tokens, bounds = [5, 0, 7], [0, 5, 5, 12]
    xs = [torch.randn(12, 8).bfloat16().requires_grad_() for _ in range(2)]
    gs = [torch.randn(12, 8).bfloat16() for _ in range(2)]
    for x, g in zip(xs, gs):
        segment_mlp(x, bounds, None, experts.w1, experts.w2, experts.w3, activation).backward(g)
    assert all(w.grad.dtype == torch.float32 for w in ws)
    copy1 = compute_copy(experts.w1, torch.bfloat16)
    assert copy1 is compute_copy(experts.w1, torch.bfloat16), "cast once while the weight is unchanged"

    ref_ws = [w.detach().clone().requires_grad_() for w in ws]
    w3_ref = ref_ws[2] if activation == "swiglu" else None
    ref_xs = [x.detach().clone().requires_grad_() for x in xs]
    for x, g in zip(ref_xs, gs):
        expert_mlp(x, num_tokens, *[w.to(torch.bfloat16) for w in ref_ws[:2]],
                   None if w3_ref is None else w3_ref.to(torch.bfloat16), activation, impl="loop").backward(g)
    exact_ws = [w.detach().double().requires_grad_() for w in ws]
    w3_exact = exact_ws[2] if activation == "swiglu" else None
    for x, g in zip(xs, gs):
        expert_mlp(x.detach().double(), num_tokens, exact_ws[0], exact_ws[1], w3_exact, activation,
                   impl="loop").backward(g.double())
    for w, ref, exact in zip(ws, ref_ws, exact_ws):
        torch.testing.assert_close(w.grad, ref.grad, rtol=2e-2, atol=2e-3)
        err = (w.grad.double() - exact.grad).norm() / exact.grad.norm()
        assert err < 2e-2, err
    assert torch.count_nonzero(ws[0].grad[1]) == 0  # expert 1 had no rows
    for x, ref in zip(xs, ref_xs):
        torch.testing.assert_close(x.grad, ref.grad, rtol=2e-2, atol=2e-3)

    # An in-place write through autograd-visible ops advances the version: a new copy.
    with torch.no_grad():
        experts.w1.mul_(0.5)
    copy2 = compute_copy(experts.w1, torch.bfloat16)
    assert copy2 is not copy1 and torch.equal(copy2, experts.w1.detach().bfloat16())
    # epplan run's step on GPUs writes the copy in the same pass as the weight and keeps it; the
    # unfused step (CPU) drops the copies. Either way the next forward sees the new weights.
    from epplan.train.optim import TrainOptimizer

    for fused in (True, False):
        before = experts.w1.detach().clone()
        opt = TrainOptimizer(experts, "none", lr=1e-2, weight_decay=0.0, fused=fused)
        opt.step()
        assert not torch.equal(experts.w1, before)
        copy3 = compute_copy(experts.w1, torch.bfloat16)
        assert (copy3 is copy2) == fused and torch.equal(copy3, experts.w1.detach().bfloat16())
        copy2 = copy3


@pytest.mark.parametrize("num_tokens", [37, 8, 0])
def test_linear_cross_entropy_matches_the_plain_loss(num_tokens):
    """The chunked LM head + loss (gradient made in the forward) against F.cross_entropy of the
    full logits, in float64: loss, input and weight gradients, for chunks that do not divide
    the tokens, one chunk, and no tokens."""
    from epplan.runtime.loss import linear_cross_entropy, reference_cross_entropy

    torch.manual_seed(0)
    h = torch.randn(num_tokens, 6, dtype=torch.float64, requires_grad=True)
    w = torch.randn(11, 6, dtype=torch.float64, requires_grad=True)
    t = torch.randint(0, 11, (num_tokens,))
    loss = linear_cross_entropy(h, w, t, chunk_tokens=8)
    (2.5 * loss).backward()
    ref_h, ref_w = h.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    ref = reference_cross_entropy(ref_h, ref_w, t)
    if num_tokens == 0:
        assert loss.item() == 0.0 and torch.count_nonzero(w.grad) == 0
        return
    (2.5 * ref).backward()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h.grad, ref_h.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(w.grad, ref_w.grad, rtol=1e-10, atol=1e-12)


def test_fused_loss_in_the_model_matches_the_logits_path():
    config = PRESETS["tiny"]
    torch.manual_seed(0)
    model = Transformer(config).double()
    idx = torch.randint(0, config.vocab_size, (2, 12))
    _, ref = model(idx, idx)
    ref_grads = torch.autograd.grad(ref, list(model.parameters()), allow_unused=True)
    model.fused_loss = True
    logits, loss = model(idx, idx)
    assert logits is None
    grads = torch.autograd.grad(loss, list(model.parameters()), allow_unused=True)
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref_grads):
        if b is not None:
            torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_bf16_residual_stream_under_autocast_against_float64():
    """Under bf16 autocast (epplan run on GPUs; here CPU autocast) the residual stream is bf16
    from the embeddings on, the weights and their gradients stay fp32, and the loss and the
    gradients stay within bf16 rounding of the float64 model's (every expert chosen, so that no
    routing decision flips under rounding: a flip moves an expert's gradient by a token's
    whole share)."""
    config = PRESETS["tiny"].replace(top_k=PRESETS["tiny"].num_experts)
    torch.manual_seed(0)
    model = Transformer(config)
    model.fused_loss = True
    exact = Transformer(config).double()
    exact.load_state_dict(model.state_dict())
    exact.fused_loss = True
    idx = torch.randint(0, config.vocab_size, (2, 12))
    stream = []
    hooks = [block.register_forward_hook(lambda m, i, o: stream.append((i[0].dtype, o.dtype)))
             for block in model.layers]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, loss = model(idx, idx)
    loss.backward()
    for h in hooks:
        h.remove()
    assert stream and all(i == o == torch.bfloat16 for i, o in stream), stream
    _, ref = exact(idx, idx)
    ref.backward()
    assert loss.dtype == torch.float32
    assert abs(loss.item() - ref.item()) / ref.item() < 1e-2
    for (name, p), q in zip(model.named_parameters(), exact.parameters()):
        assert p.grad.dtype == torch.float32, name
        err = ((p.grad.double() - q.grad).norm() / q.grad.norm()).item()
        assert err < 3e-2, (name, err)


def test_position_embedding_gradient_is_the_batch_summed_stream_gradient():
    """The position embeddings are the table's first T rows: their gradient is the gradient of
    the embeddings' sum summed over the batch, in rows 0..T-1, and zero in the rows no position
    reached (T shorter than seq_len), as the lookup of arange(T) gives."""
    config = PRESETS["tiny"]
    torch.manual_seed(0)
    model = Transformer(config).double()
    T = config.seq_len - 3
    idx = torch.randint(0, config.vocab_size, (3, T))
    seen = []

    def keep(module, inputs, out):
        out.retain_grad()
        seen.append(out)
    hook = model.tok_emb.register_forward_hook(keep)
    _, loss = model(idx, idx)
    hook.remove()
    loss.backward()
    stream_grad = seen[0].grad  # (B, T, D): the gradient of tok_emb(idx) + pos, the same tensor's
    expected = torch.zeros_like(model.pos_emb.weight)
    expected[:T] = stream_grad.sum(0)
    torch.testing.assert_close(model.pos_emb.weight.grad, expected, rtol=1e-12, atol=1e-15)
    lookup = torch.nn.functional.embedding(torch.arange(T), model.pos_emb.weight)
    torch.testing.assert_close(lookup, model.pos_emb.weight[:T], rtol=0, atol=0)
