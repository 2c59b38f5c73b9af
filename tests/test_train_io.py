"""Training run I/O: pre-tokenised data files and TensorBoard events (read with tensorboard's reader)."""

from __future__ import annotations

import struct

import numpy as np
import pytest
from typer.testing import CliRunner

from epplan.cli import app
from epplan.train.data import DataError, make_data
from epplan.runfiles import read_metrics
from epplan.train.tokens import TokenData

runner = CliRunner()
TOPOLOGY = """\
name: cpu-pair
node_types:
  box:
    gpus: 2
    gpu: {model: H100-SXM5-80GB, memory_gb: 80, bf16_tflops: 989, hbm_gbps: 3350}
    fabric: {kind: nvswitch, gbps: 450}
nodes:
  - {name: n0, type: box}
"""


def _megatron_idx(path, code: int) -> None:
    """The header of a Megatron-LM .idx (MMIDIDX, version 1, dtype code) and an empty index."""
    path.write_bytes(b"MMIDIDX\x00\x00" + struct.pack("<QB", 1, code) + struct.pack("<QQ", 0, 0))


def _reference_windows(tokens: np.ndarray, rank: int, num_ranks: int, seq_len: int, first: int, count: int):
    """Slow reference: window p of rank r's shard starts at shard_start + (p % windows) * T."""
    lo, hi = len(tokens) * rank // num_ranks, len(tokens) * (rank + 1) // num_ranks
    windows = (hi - lo - 1) // seq_len
    return np.stack([tokens[lo + (p % windows) * seq_len: lo + (p % windows) * seq_len + seq_len + 1]
                     for p in range(first, first + count)])


def test_nanogpt_uint16_windows_match_the_reference(tmp_path):
    tokens = np.random.default_rng(0).integers(0, 50257, 5000).astype(np.uint16)  # GPT-2 vocabulary
    tokens.tofile(tmp_path / "train.bin")
    for rank in range(3):
        data = make_data(str(tmp_path / "train.bin"), vocab_size=50304, seq_len=16, seed=0, rank=rank,
                         num_ranks=3, batch_per_rank=4, micro_batches=2)
        assert isinstance(data, TokenData) and data.dtype == np.uint16
        for step, micro in ((0, 0), (7, 1), (400, 0)):  # 400: wraps around the shard
            x, y = data.batch(step, micro)
            ref = _reference_windows(tokens.astype(np.int64), rank, 3, 16, data.window_index(step, micro), 2)
            np.testing.assert_array_equal(x.numpy(), ref[:, :-1])
            np.testing.assert_array_equal(y.numpy(), ref[:, 1:])


def test_megatron_idx_gives_the_dtype_and_prefix_names_one(tmp_path):
    tokens = np.arange(1000, dtype=np.int32) * 300  # ids above uint16's range
    tokens.tofile(tmp_path / "corpus_text_document.bin")
    _megatron_idx(tmp_path / "corpus_text_document.idx", 4)  # int32
    data = TokenData(str(tmp_path / "corpus_text_document.bin"), 300_000, 8, 0, 1, 2, 1)
    assert data.dtype == np.int32 and int(data.batch(0, 0)[0][0, 1]) == 300
    tokens.astype(np.uint32).tofile(tmp_path / "flat.bin")
    data = TokenData(f"uint32:{tmp_path / 'flat.bin'}", 300_000, 8, 0, 1, 2, 1)
    assert data.dtype == np.uint32 and data.describe()["tokens"] == 1000


@pytest.mark.parametrize("write, spec, vocab, match", [
    (lambda d: np.array([1, 2, 70000], dtype=np.uint32).repeat(20).tofile(d / "t.bin"), "uint32:{d}/t.bin",
     1000, "token 70000 at position 40 is outside the model's vocabulary 0..999"),
    (lambda d: (d / "t.bin").write_bytes(b"\x01\x02\x03"), "{d}/t.bin", 1000, "not a whole number of uint16"),
    (lambda d: (d / "t.bin").write_bytes(b"\x01\x00" * 4), "{d}/t.bin", 1000, "fewer than one sequence"),
    (lambda d: ((d / "t.bin").write_bytes(b"\x00" * 100), (d / "t.idx").write_bytes(b"junk")), "{d}/t.bin",
     1000, "not a Megatron index"),
    (lambda d: None, "float8:{d}/t.bin", 1000, "dtype 'float8' unknown"),
])
def test_bad_token_files_are_clear_errors(tmp_path, write, spec, vocab, match):
    write(tmp_path)
    with pytest.raises(DataError, match=match):
        TokenData(spec.format(d=tmp_path), vocab, 8, 0, 1, 2, 1)


# torch.utils.tensorboard's import goes through torch.jit, which warns that it is deprecated.
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_run_with_token_data_writes_tensorboard_events(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    topology = tmp_path / "pair.yaml"
    topology.write_text(TOPOLOGY)
    plan = tmp_path / "tiny.json"
    result = runner.invoke(app, ["place", "--topology", str(topology), "--model", "tiny", "--experts-per-gpu", "2",
                                 "--out", str(plan)])
    assert result.exit_code == 0, result.output
    np.random.default_rng(1).integers(0, 256, 20_000).astype(np.uint16).tofile(tmp_path / "train.bin")
    out, tb = tmp_path / "run", tmp_path / "tb"
    result = runner.invoke(app, ["run", str(plan), "--out", str(out), "--steps", "3", "--device", "cpu",
                                 "--data", str(tmp_path / "train.bin"), "--tensorboard", str(tb)])
    assert result.exit_code == 0, result.output
    records = read_metrics(out / "metrics.jsonl")
    assert records[0]["data"]["kind"] == "tokens"
    steps = [r for r in records if r["kind"] == "step"]
    events = EventAccumulator(str(tb))
    events.Reload()
    losses = events.Scalars("train/loss")
    assert [e.step for e in losses] == [1, 2, 3]
    np.testing.assert_allclose([e.value for e in losses], [r["loss"] for r in steps], rtol=1e-6)
    assert {"perf/step_time_s", "moe/load_max_over_mean/layer1"} <= set(events.Tags()["scalars"])
