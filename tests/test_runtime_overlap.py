"""Chunked, overlapped expert exchange vs the unchunked reference: gloo CPU processes, float64.

The overlapped path (``overlap=True``) must compute the same function as the reference path
(``overlap=False``: plain autograd through one all-to-all each way and ``expert_mlp``) for any
chunk count, including chunks in which some (destination, expert) blocks are empty.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from epplan.errors import RuntimeSetupError
from epplan.placement.types import LayerPlacement, Placement
from epplan.runtime.experts import (expert_mlp, expert_mlp_backward_input,
                                    expert_mlp_backward_weight, expert_mlp_forward)
from epplan.runtime.expert_parallel import parallelize_experts, sync_gradients
from epplan.runtime.model import Transformer
from epplan.runtime.overlap import auto_num_chunks, chunk_of_row, chunk_parts
from epplan.runtime.router import position_in_expert
from epplan.runtime.testing import run_distributed
from epplan.workload.config import PRESETS

TOL = dict(rtol=1e-9, atol=1e-12)


def _layer(replicas: list[list[int]], splits: dict[int, list], num_ranks: int) -> LayerPlacement:
    """Replica lists; split rows given per expert where replicated (default: even shares)."""
    reps = [np.array(r, dtype=np.int64) for r in replicas]
    split = [np.asarray(splits[e], dtype=np.float64) if e in splits
             else np.full((num_ranks, len(r)), 1.0 / len(r)) for e, r in enumerate(reps)]
    return LayerPlacement(replicas=reps, split=split)


def _compare(rank: int, world_size: int, placement: Placement, overrides: dict,
             chunk_counts: list, batch_per_rank: int, seq: int) -> None:
    config = PRESETS["tiny"].replace(**overrides)
    torch.manual_seed(0)
    base = Transformer(config).double()
    ref = parallelize_experts(copy.deepcopy(base), placement, overlap=False)
    gen = torch.Generator().manual_seed(1 + rank)
    idx = torch.randint(0, config.vocab_size, (batch_per_rank, seq), generator=gen)
    targets = torch.randint(0, config.vocab_size, (batch_per_rank, seq), generator=gen)
    ref_logits, ref_loss = ref(idx, targets)
    ref_loss.backward()
    sync_gradients(ref)
    ref_grads = {name: p.grad for name, p in ref.named_parameters()}

    # Hidden exchanges on a second communicator (on GPUs: CTA-limited NCCL; here gloo) with SMs
    # reserved (a no-op on CPU) by default; with 3 chunks all on one group: same results.
    for num_chunks in chunk_counts:
        model = parallelize_experts(copy.deepcopy(base), placement, overlap=True,
                                    num_chunks=num_chunks if isinstance(num_chunks, int) else None,
                                    overlap_ctas=None if num_chunks == 3 else 4)
        if isinstance(num_chunks, tuple):  # a different proposal per rank: the largest wins
            for layer in model.expert_parallel.layers:
                layer.num_chunks = num_chunks[rank]
        logits, loss = model(idx, targets)
        loss.backward()
        sync_gradients(model)
        msg = f"rank {rank}, chunks {num_chunks}"
        torch.testing.assert_close(logits, ref_logits, **TOL, msg=msg)
        torch.testing.assert_close(loss, ref_loss, **TOL, msg=msg)
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.grad, ref_grads[name], **TOL, msg=f"{msg}: grad of {name}")


def test_chunked_matches_reference_2_ranks():
    G = 2
    blocks = _layer([[0], [0], [1], [1]], {}, G)
    replicated = _layer([[0, 1], [0], [1], [0, 1]],
                        {0: [[0.7, 0.3], [0.25, 0.75]], 3: [[1.0, 0.0], [0.0, 1.0]]}, G)
    # 3 and 7 chunks leave many (destination, expert) blocks with fewer rows than chunks.
    run_distributed(_compare, G, Placement(G, 4, [blocks, replicated]), {}, [1, 2, 3, 7, (2, 5)],
                    2, 8)


def test_chunked_matches_reference_4_ranks_swiglu_idle_rank():
    G = 4
    rng = np.random.default_rng(0)
    moe0 = _layer([[0, 1, 2], [3], [1, 3], [2]],
                  {0: rng.dirichlet(np.ones(3), size=G), 2: rng.dirichlet(np.ones(2), size=G)}, G)
    moe1 = _layer([[0], [1], [0, 1], [3]], {2: [[0.9, 0.1]] * G}, G)  # rank 2 holds nothing
    variant = dict(num_layers=3, num_dense_layers=1, dense_d_ff=48, num_shared_experts=1,
                   num_kv_heads=2, activation="swiglu")
    run_distributed(_compare, G, Placement(G, 4, [moe0, moe1]), variant, [2, 4], 1, 12)


def test_chunk_rule_is_shared_by_sender_and_receiver():
    """The device rule (chunk of each row) and the host rule (rows per chunk) agree."""
    rng = np.random.default_rng(0)
    for num_chunks in (1, 2, 3, 8):
        num_keys = 6
        key = torch.from_numpy(rng.integers(0, num_keys + 1, 200))  # num_keys = invalid
        sizes = torch.bincount(key, minlength=num_keys + 1)[:num_keys]
        chunk = chunk_of_row(key, position_in_expert(key, num_keys), sizes, num_chunks)
        assert bool((chunk[key == num_keys] == num_chunks).all())
        counted = np.zeros((num_chunks, num_keys), np.int64)
        valid = key < num_keys
        np.add.at(counted, (chunk[valid].numpy(), key[valid].numpy()), 1)
        assert np.array_equal(counted, chunk_parts(sizes.numpy(), num_chunks))
        # Within a block, chunks follow the flat order (chunk never decreases).
        for k in range(num_keys):
            assert bool((chunk[key == k].diff() >= 0).all())


def test_auto_num_chunks():
    assert auto_num_chunks(32, 2, 4) == 1  # tiny CI models: one chunk
    assert auto_num_chunks(160_000, 2, 16) == 16  # the spec's block on 2 GPUs: 20k rows per expert
    assert auto_num_chunks(160_000, 4, 16) == 16  # on 4 GPUs: 40k rows per expert, capped
    assert auto_num_chunks(40_000, 2, 16) == 4  # 5k rows per expert: chunks of at least 1,024
    assert auto_num_chunks(16_000, 2, 16) == 1
    assert auto_num_chunks(0, 2, 16) == 1
    # With the GEMM FLOPs of a row: chunks also keep each chunk's forward GEMMs at MIN_CHUNK_FLOPS.
    seed_row = 2 * 2 * 4096 * 16384  # two matrices, 2 FLOPs per multiply-add
    assert auto_num_chunks(160_000, 4, 16, seed_row) == 16  # 43 TFLOP per rank: plenty
    medium_row = 2 * 2 * 2048 * 8192
    assert auto_num_chunks(65_536, 4, 8, medium_row) == 8  # 4.4 TFLOP: 8 chunks, not 16
    assert auto_num_chunks(65_536, 4, 8, 3 * medium_row // 2) == 13  # swiglu: three matrices


@pytest.mark.parametrize("activation", ["gelu", "silu", "swiglu"])
def test_expert_mlp_manual_backward_matches_autograd(activation):
    torch.manual_seed(0)
    num_tokens, E, D, F = [5, 0, 7], 3, 6, 10
    x = torch.randn(sum(num_tokens), D, dtype=torch.float64, requires_grad=True)
    ws = [torch.randn(E, D, F, dtype=torch.float64, requires_grad=True),
          torch.randn(E, F, D, dtype=torch.float64, requires_grad=True),
          torch.randn(E, D, F, dtype=torch.float64, requires_grad=True) if activation == "swiglu"
          else None]
    dy = torch.randn(sum(num_tokens), D, dtype=torch.float64)
    y_ref = expert_mlp(x, num_tokens, *ws, activation, impl="loop")
    y_ref.backward(dy)

    bounds = [0, 5, 5, 12]
    y, saved = expert_mlp_forward(x.detach(), bounds, None, *[None if w is None else w.detach() for w in ws],
                                  activation)
    torch.testing.assert_close(y, y_ref.detach(), **TOL)
    dx, dh, dg = expert_mlp_backward_input(dy, saved, bounds, None, *[None if w is None else w.detach() for w in ws],
                                           activation)
    torch.testing.assert_close(dx, x.grad, **TOL)
    grads = [None if w is None else torch.full_like(w, float("nan")) for w in ws]
    expert_mlp_backward_weight(x.detach(), dy, dh, dg, saved, bounds, grads, accumulate=False)
    expert_mlp_backward_weight(x.detach(), dy, dh, dg, saved, bounds, grads, accumulate=True)
    for g, w in zip(grads, ws):
        if w is not None:  # written twice: overwrite, then accumulate; expert 1 has no rows
            torch.testing.assert_close(g, 2 * w.grad, **TOL)


def _bad_chunks(rank: int, world_size: int) -> None:
    placement = Placement(2, 4, [_layer([[0], [0], [1], [1]], {}, 2)] * 2)
    with pytest.raises(RuntimeSetupError, match="num_chunks"):
        parallelize_experts(Transformer(PRESETS["tiny"]), placement, num_chunks=0)


def test_bad_chunk_count_is_refused():
    run_distributed(_bad_chunks, 2)


def _autocast(rank: int, world_size: int, placement: Placement) -> None:
    """Under bf16 autocast with fp32 weights, both exchange paths run, send bf16 rows, return the
    residual stream's dtype, and agree with the single-device model under the same autocast."""
    config = PRESETS["tiny"]
    torch.manual_seed(0)
    base = Transformer(config)
    gen = torch.Generator().manual_seed(7)
    idx = torch.randint(0, config.vocab_size, (2 * world_size, 8), generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref_logits, _ = copy.deepcopy(base)(idx)
    mine = idx[2 * rank:2 * rank + 2]
    expert_grads = {}
    for overlap in (False, True):
        model = parallelize_experts(copy.deepcopy(base), placement, overlap=overlap, num_chunks=2)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits, loss = model(mine, mine)
        loss.backward()
        sync_gradients(model)
        assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
        # overlap: the chunked path writes the fp32 gradients itself; without: autograd's cast
        expert_grads[overlap] = [w.grad for layer in model.expert_parallel.layers
                                 for w in (layer.w1, layer.w2)]
        torch.testing.assert_close(logits.float(), ref_logits[2 * rank:2 * rank + 2].float(),
                                   rtol=0.05, atol=0.05, msg=f"overlap={overlap}")
        stats = model.expert_parallel.stats
        rows = stats.dispatch_bytes.sum() // (config.d_model * 2)
        assert rows > 0 and stats.dispatch_bytes.sum() == rows * config.d_model * 2, "bf16 rows on the wire"
    for chunked, reference in zip(expert_grads[True], expert_grads[False]):
        err = (chunked - reference).norm() / reference.norm()
        assert err < 3e-2, err  # bf16 GEMMs either way; chunk sums round differently


def test_autocast_bf16_with_fp32_weights():
    G = 2
    layer = _layer([[0, 1], [0], [1], [1]], {0: [[0.5, 0.5], [0.2, 0.8]]}, G)
    run_distributed(_autocast, G, Placement(G, 4, [layer, layer]))
