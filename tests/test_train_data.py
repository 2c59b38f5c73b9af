"""Training data: the synthetic source's rule and rank independence; byte data shards and windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from epplan.train.data import ByteData, DataError, SyntheticData, check_data_path


def test_synthetic_batches_follow_the_rule_and_not_the_number_of_ranks():
    one_rank = SyntheticData(256, 16, seed=3, rank=0, batch_per_rank=8, micro_batches=2)
    x0, y0 = one_rank.batch(5, 0)
    x1, _ = one_rank.batch(5, 1)
    assert x0.shape == y0.shape == (4, 16) and x0.dtype == torch.int64
    # The same global batch of step 5 over 4 ranks with one micro-batch each.
    parts = [SyntheticData(256, 16, seed=3, rank=r, batch_per_rank=2, micro_batches=1).batch(5, 0)[0]
             for r in range(4)]
    assert torch.equal(torch.cat(parts), torch.cat([x0, x1]))
    assert torch.equal(x0[:, 1:], y0[:, :-1])  # targets: the next token
    assert set(((y0 - x0) % 256).unique().tolist()) <= {1, 2, 3, 5}  # the learnable rule
    assert torch.equal(one_rank.batch(5, 0)[0], x0)  # a pure function of (step, micro-batch)
    assert not torch.equal(one_rank.batch(6, 0)[0], x0)
    assert not torch.equal(SyntheticData(256, 16, 4, 0, 8, 2).batch(5, 0)[0], x0)  # the seed matters


@pytest.fixture
def corpus(tmp_path):
    """1,000 bytes over two files (sorted by path: a.txt, then sub/b.txt); hidden files skipped."""
    stream = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8)
    (tmp_path / "sub").mkdir()
    (tmp_path / "a.txt").write_bytes(stream[:300].tobytes())
    (tmp_path / "sub" / "b.txt").write_bytes(stream[300:].tobytes())
    (tmp_path / ".hidden").write_bytes(b"never read")
    (tmp_path / "empty.txt").write_bytes(b"")
    return tmp_path, stream


def test_byte_data_reads_its_shard_in_consecutive_windows(corpus):
    path, stream = corpus
    assert [p.name for p in check_data_path(path, 256)] == ["a.txt", "b.txt"]
    T = 8
    for rank, (start, end) in enumerate([(0, 500), (500, 1000)]):
        data = ByteData(path, 256, T, rank=rank, num_ranks=2, batch_per_rank=4, micro_batches=2)
        assert data.shard == (start, end) and data.num_windows == (end - start - 1) // T
        for step in (0, 3, 40):  # step 40 wraps around the shard
            for micro in (0, 1):
                x, y = data.batch(step, micro)
                assert x.shape == (2, T)
                for j in range(2):
                    w = ((step * 2 + micro) * 2 + j) % data.num_windows
                    window = torch.from_numpy(stream[start + w * T:start + w * T + T + 1].astype(np.int64))
                    assert torch.equal(x[j], window[:-1]) and torch.equal(y[j], window[1:])
    # Windows 37 and 38 of rank 0 cross the boundary between the two files at byte 300.
    data = ByteData(path, 256, T, rank=0, num_ranks=2, batch_per_rank=1, micro_batches=1)
    x, _ = data.batch(37, 0)
    assert torch.equal(x[0], torch.from_numpy(stream[296:304].astype(np.int64)))


def test_byte_data_mistakes_are_clear(corpus, tmp_path):
    path, _ = corpus
    with pytest.raises(DataError, match="vocab_size is 100"):
        check_data_path(path, 100)
    with pytest.raises(DataError, match="no such file or directory"):
        check_data_path(tmp_path / "nope", 256)
    (tmp_path / "blank").mkdir()
    with pytest.raises(DataError, match="no non-empty files"):
        check_data_path(tmp_path / "blank", 256)
    with pytest.raises(DataError, match="fewer than one sequence of 513"):
        ByteData(path, 256, 512, rank=0, num_ranks=2, batch_per_rank=1, micro_batches=1)
