"""Traffic specs, fitting routing files to the problem, and the routing-statistics file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epplan.errors import TrafficError
from epplan.workload.config import PRESETS
from epplan.workload.routing_stats import read_routing_stats, write_routing_stats
from epplan.workload.traffic import make_traffic, zipf_pattern

TRACE = Path(__file__).resolve().parents[2] / "shared" / "data" / "smartmoe-trace" / "counts.npz"
SEED = PRESETS["seed"]
TINY = PRESETS["tiny"]


def _row_total(config, num_ranks: int) -> float:
    return config.tokens_per_step / num_ranks * config.top_k


# --- synthetic specs --------------------------------------------------------------------------

def test_uniform_seed_16_ranks() -> None:
    t = make_traffic("uniform", SEED, 16)
    assert t.counts.shape == (16, 16, 16)
    # 1,280,000 tokens / 16 ranks * top-2 = 160,000 assignments per rank, 10,000 per expert
    np.testing.assert_allclose(t.counts, 10_000.0)
    assert t.notes == [] and t.source == "uniform"


def test_uniform_non_integer_tokens_per_rank() -> None:
    t = make_traffic("uniform", TINY, 3)  # 256 tokens over 3 ranks
    np.testing.assert_allclose(t.counts.sum(axis=2), 256 / 3 * 2)


def test_zipf_shares_by_hand() -> None:
    t = make_traffic("zipf:1", TINY, 2, seed=7)
    harmonic = 1 + 1 / 2 + 1 / 3 + 1 / 4
    expected = np.sort(np.array([1, 1 / 2, 1 / 3, 1 / 4]) / harmonic * 256)[::-1]
    for layer in t.counts:
        np.testing.assert_allclose(layer[0], layer[1])  # every source routes alike
        np.testing.assert_allclose(np.sort(layer[0])[::-1], expected)
    assert t.source == "zipf:1 (seed 7)"


def test_zipf_seeded_and_per_layer_order() -> None:
    a = zipf_pattern(1.2, 16, 16, seed=3)
    np.testing.assert_array_equal(a, zipf_pattern(1.2, 16, 16, seed=3))
    assert not np.array_equal(a, zipf_pattern(1.2, 16, 16, seed=4))
    assert len({int(np.argmax(row)) for row in a}) > 1  # hottest expert differs across layers


def test_zipf_beyond_top_k_is_noted() -> None:
    assert any("top-2" in n for n in make_traffic("zipf:4", TINY, 2).notes)


@settings(max_examples=40, deadline=None)
@given(alpha=st.floats(0.01, 5.0), num_ranks=st.integers(1, 96), seed=st.integers(0, 2**31))
def test_zipf_row_sums_property(alpha: float, num_ranks: int, seed: int) -> None:
    t = make_traffic(f"zipf:{alpha}", SEED, num_ranks, seed=seed)
    assert t.counts.shape == (16, num_ranks, 16)
    assert np.all(t.counts > 0)
    np.testing.assert_allclose(t.counts.sum(axis=2), _row_total(SEED, num_ranks), rtol=1e-12)


@pytest.mark.parametrize("spec, match", [
    ("banana", "not understood"),
    ("zipf", "zipf:ALPHA"),
    ("zipf:0", "> 0"),
    ("zipf:-1", "> 0"),
    ("zipf:nan", "> 0"),
    ("zipf:x", "must be a number"),
    ("counts.csv", "not understood"),
    ("/nonexistent/counts.npz", "not found"),
    ("/nonexistent/stats.json", "not found"),
])
def test_bad_specs(spec: str, match: str) -> None:
    with pytest.raises(TrafficError, match=match):
        make_traffic(spec, TINY, 2)


def test_bad_num_ranks_and_stray_window() -> None:
    with pytest.raises(TrafficError, match="positive integer"):
        make_traffic("uniform", TINY, 0)
    with pytest.raises(TrafficError, match="window"):
        make_traffic("zipf:1", TINY, 2, window=(1, 2))


# --- .npz traces ------------------------------------------------------------------------------

def _write_npz(path: Path, **arrays: np.ndarray) -> Path:
    np.savez(path, **arrays)
    return path


def test_npz_window_replication_and_scale(tmp_path: Path) -> None:
    # 3 iterations x 4 layers x 2 sources x 4 experts; tiny has 2 MoE layers, 4 experts
    counts = np.zeros((3, 4, 2, 4))
    counts[:, :, 0, 0] = 10.0          # source 0 sends everything to expert 0
    counts[:, :, 1, :] = [1, 1, 1, 1]  # source 1 is uniform
    counts[2] *= 100                   # iteration 20 is far larger (averaging, not pattern)
    path = _write_npz(tmp_path / "t.npz", counts=counts, iterations=np.array([0, 10, 20]))

    t = make_traffic(f"{path}@0:10", TINY, 4)
    row = _row_total(TINY, 4)
    assert t.counts.shape == (2, 4, 4)
    # 4 ranks from 2 sources: ranks 0, 1 <- source 0; ranks 2, 3 <- source 1
    np.testing.assert_allclose(t.counts[:, :2, 0], row)
    np.testing.assert_allclose(t.counts[:, 2:, :], row / 4)
    assert "2 iterations" in t.source
    joined = " ".join(t.notes)
    assert "first 2" in joined and "replicated to 2 ranks" in joined and "scale x" in joined

    same = make_traffic(str(path), TINY, 4, window=(0, 10))
    np.testing.assert_array_equal(same.counts, t.counts)


def test_npz_pooling_and_floor_mapping(tmp_path: Path) -> None:
    counts = np.zeros((2, 6, 4))  # no iteration axis; 6 sources, source s -> expert s % 4
    for s in range(6):
        counts[:, s, s % 4] = 1.0
    path = _write_npz(tmp_path / "t.npz", counts=counts)

    pooled = make_traffic(str(path), TINY, 3)  # 6 = 2 x 3: rank g pools sources 2g, 2g+1
    row = _row_total(TINY, 3)
    np.testing.assert_allclose(pooled.counts[0, 0], [row / 2, row / 2, 0, 0])
    np.testing.assert_allclose(pooled.counts[0, 2], [row / 2, row / 2, 0, 0])  # sources 4, 5
    assert any("pooled" in n for n in pooled.notes)

    mapped = make_traffic(str(path), TINY, 4)  # rank g <- source floor(g * 6 / 4) = 0, 1, 3, 4
    assert [int(np.argmax(r)) for r in mapped.counts[0]] == [0, 1, 3, 0]
    assert any("floor" in n for n in mapped.notes)


def test_npz_fewer_layers_tile_and_empty_rows(tmp_path: Path) -> None:
    counts = np.zeros((1, 2, 4))
    counts[0, 0] = [4, 0, 0, 0]  # source 1 recorded nothing
    path = _write_npz(tmp_path / "t.npz", counts=counts)
    t = make_traffic(str(path), TINY, 2)
    np.testing.assert_array_equal(t.counts[0], t.counts[1])  # layer 1 <- file layer 0
    np.testing.assert_allclose(t.counts[0, 1], [256, 0, 0, 0])  # empty row takes the layer mean
    assert any("cyclically" in n for n in t.notes)
    assert any("no assignments" in n for n in t.notes)


@pytest.mark.parametrize("arrays, window, match", [
    ({"counts": np.ones((2, 2, 3))}, None, "3 experts.*num_experts=3"),
        ({"other": np.ones((2, 2, 4)), "more": np.ones(2)}, None, "holds arrays other, more"),
    ({"counts": np.ones((2, 4))}, None, "shape"),
    ({"counts": -np.ones((2, 2, 4))}, None, "non-negative"),
    ({"counts": np.ones((2, 2, 2, 4)), "iterations": np.array([1, 11])}, (2, 10), "no iteration in window"),
    ({"counts": np.ones((2, 2, 2, 4)), "iterations": np.array([1])}, None, "'iterations' has shape"),
    ({"counts": np.ones((2, 2, 4))}, (1, 1), "no iteration axis"),
    ({"counts": np.zeros((2, 2, 4))}, None, "no assignments at all"),
])
def test_npz_errors(tmp_path: Path, arrays: dict, window, match: str) -> None:
    path = _write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(TrafficError, match=match):
        make_traffic(str(path), TINY, 2, window=window)


def test_window_syntax(tmp_path: Path) -> None:
    path = _write_npz(tmp_path / "t.npz", counts=np.ones((2, 2, 2, 4)), iterations=np.array([5, 6]))
    assert "1 iterations" in make_traffic(f"{path}@6", TINY, 2).source
    with pytest.raises(TrafficError, match="FIRST:LAST"):
        make_traffic(f"{path}@5-6", TINY, 2)
    with pytest.raises(TrafficError, match="give it once"):
        make_traffic(f"{path}@5:6", TINY, 2, window=(5, 5))


@pytest.mark.skipif(not TRACE.is_file(), reason="needs ../shared/data/smartmoe-trace/counts.npz")
def test_real_trace_64_ranks() -> None:
    config = SEED.replace(num_experts=32)
    t = make_traffic(f"{TRACE}@991:1001", config, 64)
    assert t.counts.shape == (16, 64, 32)
    np.testing.assert_allclose(t.counts.sum(axis=2), _row_total(config, 64), rtol=1e-12)
    load = t.expert_load()  # [L, E]
    skew = load.max(axis=1) / load.mean(axis=1)
    assert np.median(skew) > 4  # the trace's busiest expert carries ~11x the mean
    np.testing.assert_allclose(t.counts[:, 0], t.counts[:, 3])  # ranks 0..3 replicate source 0
    assert "2 iterations" in t.source and len(t.notes) == 3  # layers, sources, scale
    with pytest.raises(TrafficError, match="num_experts=32"):
        make_traffic(str(TRACE), SEED, 64)


# --- routing statistics (JSON) ------------------------------------------------------------------

def _stats_counts(rng: np.random.Generator, shape=(2, 3, 4)) -> np.ndarray:
    return rng.integers(0, 1000, size=shape)


def test_routing_stats_round_trip(tmp_path: Path) -> None:
    counts = _stats_counts(np.random.default_rng(0))
    path = write_routing_stats(tmp_path / "r.json", counts, steps=5, model="tiny", top_k=2,
                               tokens_per_rank_per_step=85.5, manifest_hash="abc123")
    stats = read_routing_stats(path)
    np.testing.assert_array_equal(stats.counts, counts)
    assert (stats.model, stats.top_k, stats.steps, stats.manifest_hash) == ("tiny", 2, 5, "abc123")
    assert stats.tokens_per_rank_per_step == 85.5
    np.testing.assert_allclose(stats.per_step(), counts / 5)
    assert [p.name for p in tmp_path.iterdir()] == ["r.json"]  # no temporary left behind
    doc = json.loads(path.read_text())
    assert doc["format"] == "epplan.routing-stats" and doc["version"] == 2
    assert stats.pairs is None and stats.node_rows is None and stats.nodes is None


def _v2_arrays(rng: np.random.Generator, L=2, G=4, E=4, top_k=2, tokens=50):
    """counts, pairs, node_rows, gpu_rows of random top-k routing on 2 nodes of 2 GPUs, expert e
    on GPU e: the statistics a run would record."""
    counts = np.zeros((L, G, E), np.int64)
    pairs = np.zeros((L, G, E, E), np.int64)
    node_rows = np.zeros((L, G, 2), np.int64)
    gpu_rows = np.zeros((L, G, G), np.int64)
    for l in range(L):
        for s in range(G):
            for _ in range(tokens):
                chosen = np.sort(rng.choice(E, size=top_k, replace=False))
                counts[l, s, chosen] += 1
                pairs[l, s, chosen[0], chosen[1]] += 1
                gpu_rows[l, s, np.unique(chosen)] += 1
                node_rows[l, s, np.unique(chosen // 2)] += 1
    return counts, pairs, node_rows, gpu_rows


def test_routing_stats_v2_round_trip(tmp_path: Path) -> None:
    counts, pairs, node_rows, gpu_rows = _v2_arrays(np.random.default_rng(0))
    nodes = [("a", [0, 1]), ("b", [2, 3])]
    path = write_routing_stats(tmp_path / "r.json", counts, steps=2, model="tiny", top_k=2,
                               tokens_per_rank_per_step=25.0, pairs=pairs, node_rows=node_rows,
                               gpu_rows=gpu_rows, nodes=nodes, dispatch="hierarchical")
    stats = read_routing_stats(path)
    for got, want in ((stats.counts, counts), (stats.pairs, pairs), (stats.node_rows, node_rows),
                      (stats.gpu_rows, gpu_rows)):
        np.testing.assert_array_equal(got, want)
    assert stats.nodes == (("a", (0, 1)), ("b", (2, 3))) and stats.dispatch == "hierarchical"
    doc = json.loads(path.read_text())
    assert len(doc["pairs"][0][0]) == 4 * 3 // 2  # the upper triangle, row-major
    assert doc["pairs"][1][2] == pairs[1, 2][np.triu_indices(4, k=1)].tolist()


def test_routing_stats_v1_still_read(tmp_path: Path) -> None:
    stats = read_routing_stats(_write_text(tmp_path / "v1.json", json.dumps(_good_doc())))
    assert stats.counts.tolist() == [[[1, 3], [2, 2]]] and stats.pairs is None and stats.dispatch is None


def _good_v2_doc() -> dict:
    return _good_doc() | {"version": 2, "top_k": 2, "counts": [[[1, 3, 2], [2, 2, 0]]], "num_experts": 3,
                          "dispatch": "flat", "nodes": [{"name": "a", "ranks": [0]}, {"name": "b", "ranks": [1]}],
                          "pairs": [[[1, 0, 2], [2, 0, 0]]], "node_rows": [[[3, 0], [0, 2]]],
                          "gpu_rows": [[[3, 0], [0, 2]]]}


@pytest.mark.parametrize("change, match", [
    ({"version": 1}, "dispatch is a version 2 field"),
    ({"dispatch": "sideways"}, "dispatch"),
    ({"pairs": [[[1, 0], [2, 0]]]}, r"pairs has shape .* num_experts \(num_experts - 1\) / 2"),
    ({"pairs": [[[1, 0, 3], [2, 0, 0]]]}, r"experts \(1, 2\) is 3, more than the counts"),
    ({"node_rows": [[[3], [2]]]}, "node_rows has shape"),
    ({"nodes": None}, "node_rows needs nodes"),
    ({"nodes": [{"name": "a", "ranks": [0, 1]}, {"name": "b", "ranks": [1]}]}, "every rank 0..1 exactly once"),
    ({"gpu_rows": [[[7, 0], [0, 2]]]}, "gpu_rows of layer 0, rank 0 sum to more"),
    ({"node_rows": [[[1, 0], [0, 2]]]}, r"node_rows\[0\]\[0\]\[0\] = 1 does not fit gpu_rows"),
    ({"gpu_rows": [[[3, 0], [0, True]]]}, "true/false"),
])
def test_routing_stats_v2_errors(tmp_path: Path, change: dict, match: str) -> None:
    read_routing_stats(_write_text(tmp_path / "good.json", json.dumps(_good_v2_doc())))
    path = _write_text(tmp_path / "bad.json", json.dumps(_good_v2_doc() | change))
    with pytest.raises(TrafficError, match=match) as exc:
        read_routing_stats(path)
    assert "bad.json" in str(exc.value)


def test_json_traffic_matches_per_step_pattern(tmp_path: Path) -> None:
    counts = _stats_counts(np.random.default_rng(1), shape=(2, 2, 4)) + 1
    path = write_routing_stats(tmp_path / "r.json", counts, steps=3, model="tiny", top_k=2,
                               tokens_per_rank_per_step=128.0)
    t = make_traffic(str(path), TINY, 2)
    np.testing.assert_allclose(t.counts, counts / counts.sum(axis=2, keepdims=True) * 256)
    assert "3 steps" in t.source
    with pytest.raises(TrafficError, match="window"):
        make_traffic(f"{path}@1:2", TINY, 2)


def _good_doc() -> dict:
    return {"format": "epplan.routing-stats", "version": 1, "model": "tiny", "num_moe_layers": 1,
            "num_ranks": 2, "num_experts": 2, "top_k": 1, "steps": 1,
            "tokens_per_rank_per_step": 4.0, "counts": [[[1, 3], [2, 2]]]}


@pytest.mark.parametrize("change, match", [
    ({"format": "something-else"}, "expected 'epplan.routing-stats'"),
    ({"version": 3}, "version 3 .* not supported"),
    ({"steps": 0}, "steps"),
    ({"num_ranks": True}, "num_ranks"),
    ({"surprise": 1}, "surprise"),
    ({"counts": [[[1, 3], [2]]]}, "ragged"),
    ({"counts": [[[1, 3], [2, -2]]]}, r"counts\[0\]\[1\]\[1\] = -2 is negative"),
    ({"counts": [[[1.5, 3], [2, 2]]]}, "integers"),
    ({"counts": [[1, 3], [2, 2]]}, "nesting"),
    ({"num_experts": 3}, "header says"),
])
def test_routing_stats_errors(tmp_path: Path, change: dict, match: str) -> None:
    doc = _good_doc() | change
    path = _write_text(tmp_path / "bad.json", json.dumps(doc))
    with pytest.raises(TrafficError, match=match) as exc:
        read_routing_stats(path)
    assert "bad.json" in str(exc.value)
    read_routing_stats(_write_text(tmp_path / "good.json", json.dumps(_good_doc())))


def test_routing_stats_not_json(tmp_path: Path) -> None:
    with pytest.raises(TrafficError, match="not valid JSON"):
        read_routing_stats(_write_text(tmp_path / "x.json", "{nope"))


def _write_text(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_write_rejects_bad_counts(tmp_path: Path) -> None:
    with pytest.raises(TrafficError, match="non-negative integers"):
        write_routing_stats(tmp_path / "r.json", np.array([[[0.5]]]), steps=1, model="m", top_k=1,
                            tokens_per_rank_per_step=1.0)
    with pytest.raises(TrafficError, match="shape"):
        write_routing_stats(tmp_path / "r.json", np.ones((2, 2)), steps=1, model="m", top_k=1,
                            tokens_per_rank_per_step=1.0)
    assert list(tmp_path.iterdir()) == []


def test_write_rejects_bad_header(tmp_path: Path) -> None:
    with pytest.raises(TrafficError, match="top_k"):
        write_routing_stats(tmp_path / "r.json", np.ones((1, 1, 2), dtype=int), steps=1, model="m",
                            top_k=0, tokens_per_rank_per_step=1.0)
