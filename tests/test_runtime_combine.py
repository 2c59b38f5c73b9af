"""The gather-based combine against the ``index_add`` scatter it replaces (forward and backward)."""

import pytest
import torch

from epplan.runtime.combine import combine, token_rows


def reference(y, weight, order, num_tokens, top_k):
    return y.new_zeros(num_tokens, y.shape[1]).index_add(0, order // top_k, y * weight[:, None])


def case(num_tokens, top_k, width, drop, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    kept = torch.rand(num_tokens * top_k, generator=gen) >= drop
    key = torch.randint(0, 5, (num_tokens * top_k,), generator=gen)  # the served rows come grouped by "expert"
    order = torch.argsort(torch.where(kept, key, 5), stable=True)[:int(kept.sum())]  # (S,)
    y = torch.randn(order.numel(), width, generator=gen, dtype=torch.float64).to(dtype)
    weight = torch.rand(order.numel(), generator=gen, dtype=torch.float64).to(dtype)
    return y, weight, order


@pytest.mark.parametrize("num_tokens,top_k,drop", [(7, 1, 0.0), (13, 2, 0.0), (13, 2, 0.3), (9, 4, 0.5), (6, 3, 1.0)])
def test_combine_equals_the_scatter_forward_and_backward(num_tokens, top_k, drop):
    y, weight, order = case(num_tokens, top_k, 5, drop, torch.float64, seed=num_tokens * top_k)
    grad = torch.randn(num_tokens, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    outs, grads = [], []
    for fn in (combine, reference):
        yy, ww = y.clone().requires_grad_(), weight.clone().requires_grad_()
        out = fn(yy, ww, order, num_tokens, top_k)
        out.backward(grad)
        outs.append(out.detach())
        grads.append((yy.grad, ww.grad))
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-12, atol=1e-12)
    for got, want in zip(grads[0], grads[1]):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_combine_in_bf16_matches_the_float64_sum():
    y, weight, order = case(64, 2, 32, 0.1, torch.bfloat16, seed=3)
    got = combine(y, weight, order, 64, 2)
    want = reference(y.double(), weight.double(), order, 64, 2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.double(), want, rtol=1e-2, atol=1e-2)


def test_combine_gradcheck():
    y, weight, order = case(5, 2, 3, 0.2, torch.float64, seed=7)
    torch.autograd.gradcheck(lambda a, b: combine(a, b, order, 5, 2),
                             (y.requires_grad_(), weight.requires_grad_()))


@pytest.mark.parametrize("num_tokens,top_k,drop", [(7, 1, 0.0), (13, 2, 0.3), (6, 3, 1.0)])
def test_token_rows_equal_the_indexing_forward_and_backward(num_tokens, top_k, drop):
    _, _, order = case(num_tokens, top_k, 5, drop, torch.float64, seed=num_tokens + top_k)
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(num_tokens, 5, dtype=torch.float64, generator=gen)
    grad = torch.randn(order.numel(), 5, dtype=torch.float64, generator=gen)
    got, want = x.clone().requires_grad_(), x.clone().requires_grad_()
    rows = token_rows(got, order, top_k)
    rows.backward(grad)
    ref = want[order // top_k]
    ref.backward(grad)
    torch.testing.assert_close(rows, ref, rtol=0, atol=0)
    torch.testing.assert_close(got.grad, want.grad, rtol=1e-12, atol=1e-12)
