"""Hierarchical dispatch vs flat dispatch: gloo, 2 nodes x 2 ranks and 4 nodes x 2, float64.

Each process builds one model, an expert-parallel copy with flat dispatch and one with
hierarchical dispatch over the same placement and node layout, and runs both on its own slice of
the batch: outputs, losses, every gradient, the weights after AdamW steps and the routing
statistics must agree. The rows counted on the wire are checked against a plain count of
distinct (token, node) and (token, GPU) pairs computed from the routing alone.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.distributed as dist

from epplan.errors import RuntimeSetupError
from epplan.placement.types import Placement
from epplan.runtime.expert_parallel import (ExpertParallelExperts, gather_state_dict, get_stats,
                                            parallelize_experts, set_exchange_timer, sync_gradients)
from epplan.runtime.hierarchical import distinct_rows, pair_counts
from epplan.runtime.model import Transformer
from epplan.runtime.testing import (Scenario as BaseScenario, check_scenarios, gather_byte_matrices,
                                    layer_placement as _layer, run_distributed, tiny_model)
from epplan.train.timing import StepTimer
from epplan.workload.config import PRESETS

TOL = dict(rtol=1e-9, atol=1e-12)


@dataclass
class Scenario(BaseScenario):
    nodes: list[list[int]] = field(default_factory=list)  # ranks of each node
    overlap: bool = False
    num_chunks: int | None = None


def _check(rank: int, world_size: int, scenarios: list[Scenario]) -> None:
    check_scenarios(_check_scenario, rank, world_size, scenarios)


def _check_scenario(rank: int, world_size: int, sc: Scenario) -> None:
    base = tiny_model(sc.overrides, sc.biases)
    config = base.config
    flat, hier = copy.deepcopy(base), copy.deepcopy(base)
    parallelize_experts(flat, sc.placement, overlap=sc.overlap, num_chunks=sc.num_chunks,
                        nodes=sc.nodes)
    parallelize_experts(hier, sc.placement, overlap=sc.overlap, num_chunks=sc.num_chunks,
                        nodes=sc.nodes, dispatch="hierarchical")

    gen = torch.Generator().manual_seed(1)
    shape = (sc.batch_per_rank * world_size, sc.seq)
    idx = torch.randint(0, config.vocab_size, shape, generator=gen)
    targets = torch.randint(0, config.vocab_size, shape, generator=gen)
    mine = slice(rank * sc.batch_per_rank, (rank + 1) * sc.batch_per_rank)
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (flat, hier)]
    routed = _record_routing(hier)

    for step in range(sc.steps):
        for m in (flat, hier):
            get_stats(m).reset()
        routed.clear()
        flat_logits, flat_loss = flat(idx[mine], targets[mine])
        flat_loss.backward()
        sync_gradients(flat)
        timer = StepTimer(torch.device("cpu"))
        set_exchange_timer(None if sc.overlap else timer)
        logits, loss = hier(idx[mine], targets[mine])
        loss.backward()
        set_exchange_timer(None)
        sync_gradients(hier)
        # Unchunked: each layer's 4 exchanges (2 stages, dispatch and combine) timed, twice (backward).
        spans = timer._spans.get("exchange", [])
        assert len(spans) == (0 if sc.overlap else 8 * len(sc.placement.layers)), len(spans)

        torch.testing.assert_close(logits, flat_logits, **TOL)
        torch.testing.assert_close(loss, flat_loss, **TOL)
        flat_params = dict(flat.named_parameters())
        for name, p in hier.named_parameters():
            torch.testing.assert_close(p.grad, flat_params[name].grad, **TOL,
                                       msg=f"step {step}: grad of {name}")
        _check_stats(rank, sc, flat, hier, routed)

        for opt in opts:
            opt.step()
            opt.zero_grad()
        flat.update_router_biases()
        hier.update_router_biases()
        full_flat, full_hier = gather_state_dict(flat), gather_state_dict(hier)
        for name, value in full_flat.items():
            torch.testing.assert_close(full_hier[name], value, **TOL, msg=f"step {step}: {name}")


def _record_routing(model: Transformer) -> list:
    """Each layer's destination of every assignment, (N, k) with G for dropped, as it routes."""
    routed = []
    for layer in model.modules():
        if isinstance(layer, ExpertParallelExperts):
            keys = layer._destination_keys

            def spy(topk_idx, keys=keys, layer=layer):
                key = keys(topk_idx)
                G, E = layer.num_ranks, layer.num_experts
                routed.append((topk_idx.clone(), torch.where(key < G * E, key // E, G).view(topk_idx.shape)))
                return key

            layer._destination_keys = spy
    return routed


def _check_stats(rank: int, sc: Scenario, flat: Transformer, hier: Transformer, routed: list) -> None:
    a, b = get_stats(flat), get_stats(hier)
    G, M = len(sum(sc.nodes, [])), len(sc.nodes)
    for name in ("num_tokens_per_expert", "pairs", "gpu_rows", "node_rows"):
        np.testing.assert_array_equal(getattr(b, name), getattr(a, name), err_msg=name)
    node_of = np.empty(G, np.int64)
    local_of = np.empty(G, np.int64)
    for n, ranks in enumerate(sc.nodes):
        node_of[ranks], local_of[ranks] = n, np.arange(len(ranks))
    row_bytes = hier.config.d_model * 8
    assert len(routed) == len(sc.placement.layers)
    for li, (topk_idx, dest) in enumerate(routed):
        # A plain count, token by token, of the pairs the wire must carry once each.
        gpu_rows, node_rows = np.zeros(G, np.int64), np.zeros(M, np.int64)
        pairs = np.zeros((4, 4), np.int64)
        for t in range(dest.shape[0]):
            gpus = {int(g) for g in dest[t] if g < G}
            for g in gpus:
                gpu_rows[g] += 1
            for n in {int(node_of[g]) for g in gpus}:
                node_rows[n] += 1
            chosen = sorted(int(e) for e in topk_idx[t] if e >= 0)
            for i in range(len(chosen)):
                for j in range(i + 1, len(chosen)):
                    pairs[chosen[i], chosen[j]] += 1
        np.testing.assert_array_equal(b.gpu_rows[li], gpu_rows)
        np.testing.assert_array_equal(b.node_rows[li], node_rows)
        np.testing.assert_array_equal(b.pairs[li], pairs)
        # Rows this rank put on the network: one per (token, other node), to the rail peer only.
        sent = b.dispatch_bytes[li] // row_bytes
        for t in range(G):
            if node_of[t] != node_of[rank]:
                expected = node_rows[node_of[t]] if local_of[t] == local_of[rank] else 0
                assert sent[t] == expected, (li, t, sent, node_rows)
        # Flat sends every assignment; hierarchical never more across nodes.
        flat_sent = a.dispatch_bytes[li] // row_bytes
        off_node = node_of != node_of[rank]
        assert sent[off_node].sum() <= flat_sent[off_node].sum()
    # What s dispatches to t, t combines back to s (both stages together).
    dispatch, _ = gather_byte_matrices(b, G)
    # Stage 2: a rail peer forwards to the other GPUs of its node what their tokens' sources sent.
    rows = torch.from_numpy(b.gpu_rows.copy())  # (L, G) of this source
    everyone = [torch.empty_like(rows) for _ in range(G)]
    dist.all_gather(everyone, rows)
    gpu_rows_all = torch.stack(everyone).numpy()  # (s, L, g)
    for li in range(len(routed)):
        for g in range(G):
            if g == rank or node_of[g] != node_of[rank]:
                continue
            sources = [s for s in range(G) if local_of[s] == local_of[rank]]  # my rail
            expected = sum(gpu_rows_all[s, li, g] for s in sources)
            assert dispatch[rank, li, g] == expected * row_bytes, (li, g)


def test_hierarchical_matches_flat_2_nodes_x_2():
    G = 4
    nodes = [[0, 1], [2, 3]]
    rng = np.random.default_rng(0)
    # Experts 0 and 1 on node 0 (one on each GPU), 2 and 3 on node 1; expert 0 replicated across
    # nodes with uneven per-source splits; rank 3 idle in layer 1, expert 3 gets no token there.
    moe0 = _layer([[0, 2], [1], [2], [3]], {0: rng.dirichlet(np.ones(2), size=G)}, G)
    moe1 = _layer([[0], [0, 1], [2], [2]], {1: [[0.8, 0.2], [0.0, 1.0], [0.5, 0.5], [1.0, 0.0]]}, G)
    placement = Placement(G, 4, [moe0, moe1])
    run_distributed(_check, G, [
        Scenario("replicas, uneven splits, idle rank, zero-token expert", placement, nodes=nodes,
                 biases={(1, 3): -10.0}),
        Scenario("overlap, 3 chunks", placement, nodes=nodes, overlap=True, num_chunks=3,
                 overrides=dict(activation="swiglu", num_shared_experts=1)),
        Scenario("overlap, automatic chunks, top-1", placement, nodes=[[0, 2], [1, 3]], overlap=True,
                 overrides=dict(top_k=1)),
    ])


def test_hierarchical_matches_flat_4_nodes_x_2():
    G = 8
    nodes = [[0, 1], [2, 3], [4, 5], [6, 7]]
    # Layer 0: expert e on both GPUs of node e, shares uneven per source; layer 1: experts on
    # ranks 0, 1, 2, 4 only (3, 5, 6, 7 idle), expert 3 replicated on nodes 0 and 2.
    split = np.array([[0.9, 0.1], [0.3, 0.7]] * 4)
    moe0 = _layer([[0, 1], [2, 3], [4, 5], [6, 7]], {e: split[np.roll(np.arange(G), e)] for e in range(4)}, G)
    moe1 = _layer([[0], [1], [2], [1, 4]], {3: np.tile([[0.25, 0.75]], (G, 1))}, G)
    run_distributed(_check, G, [
        Scenario("4 nodes, overlap", Placement(G, 4, [moe0, moe1]), nodes=nodes, overlap=True, num_chunks=2,
                 biases={(0, 2): 3.0}, batch_per_rank=1),
    ])


def _unequal_nodes(rank: int, world_size: int) -> None:
    placement = Placement(3, 4, [_layer([[0], [1], [2], [0]], {}, 3)] * 2)
    with pytest.raises(RuntimeSetupError, match="same number of GPUs on every node"):
        parallelize_experts(Transformer(PRESETS["tiny"]), placement, nodes=[[0, 1], [2]],
                            dispatch="hierarchical")


def test_hierarchical_needs_equal_nodes():
    run_distributed(_unequal_nodes, 3)


def test_distinct_rows_and_pairs_against_a_loop():
    rng = np.random.default_rng(0)
    topk = torch.from_numpy(np.stack([rng.choice(6, size=3, replace=False) for _ in range(40)]))
    topk[::7, 1] = -1  # dropped assignments
    dest = torch.where(topk >= 0, topk // 2, 3)  # GPU of expert e is e // 2; 3 = dropped
    rows = distinct_rows(dest, 3).tolist()
    assert rows == [sum(1 for t in range(40) if g in {int(d) for d in dest[t] if d < 3}) for g in range(3)]
    pairs = pair_counts(topk, 6).view(6, 6)
    for i in range(6):
        for j in range(6):
            expected = sum(1 for t in range(40) if i < j and {i, j} <= set(topk[t].tolist()))
            assert pairs[i, j] == expected
