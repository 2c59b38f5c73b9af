"""Training data: a seeded synthetic source, or byte-level text memory-mapped from disk.

Shape legend: B = sequences per micro-batch on this rank, T = sequence length, V = vocabulary.

Both sources are pure functions of (step, micro-batch): the batch of a step never depends on what
was read before, so a resumed or restarted run sees exactly the data of an uninterrupted one, and
the "data position" stored in a checkpoint is the step plus a description to check it against.

- ``SyntheticData``: sequence i of the global batch of step s is drawn from a generator seeded with
  (seed, s, i); each token is the previous one plus an increment from {1, 2, 3, 5} with
  probabilities (0.55, 0.25, 0.15, 0.05), modulo V. A model learns the rule in a few dozen steps
  (loss from ln V towards the increments' entropy, 1.1 nats). Rank r takes sequences
  r*B_rank .. (r+1)*B_rank - 1, so the global batch does not depend on the number of ranks.
- ``ByteData``: the bytes of a file, or of every file under a directory (sorted by path,
  concatenated), are tokens 0..255. The byte stream is cut into one contiguous shard per rank;
  each rank reads its shard in consecutive windows of T + 1 bytes (stride T), wrapping around at
  its end. Only the windows read are paged in (``np.memmap``).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from epplan.errors import DataError, param

INCREMENTS = np.array([1, 2, 3, 5])
INCREMENT_PROBS = np.array([0.55, 0.25, 0.15, 0.05])


class SyntheticData:
    def __init__(self, vocab_size: int, seq_len: int, seed: int, rank: int, batch_per_rank: int,
                 micro_batches: int) -> None:
        self.vocab_size, self.seq_len, self.seed = vocab_size, seq_len, seed
        self.micro_batch = batch_per_rank // micro_batches
        self.first = rank * batch_per_rank  # this rank's first sequence in the global batch

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Inputs and targets of micro-batch ``micro`` of ``step``: int64 (B, T) each."""
        first = self.first + micro * self.micro_batch
        rows = []
        for i in range(first, first + self.micro_batch):
            rng = np.random.default_rng([self.seed, step, i])
            start = rng.integers(self.vocab_size)
            steps = rng.choice(INCREMENTS, size=self.seq_len, p=INCREMENT_PROBS)
            rows.append((start + np.concatenate([[0], np.cumsum(steps)])) % self.vocab_size)
        seqs = torch.from_numpy(np.stack(rows))  # (B, T + 1)
        return seqs[:, :-1], seqs[:, 1:]

    def describe(self, step: int = 0) -> dict:
        """What the source is and, for a checkpoint, where it stands before ``step``."""
        return {"kind": "synthetic", "seed": self.seed, "vocab_size": self.vocab_size, "next_step": step}


class ByteData:
    def __init__(self, path: str | Path, vocab_size: int, seq_len: int, rank: int, num_ranks: int,
                 batch_per_rank: int, micro_batches: int) -> None:
        self.path = str(path)
        self.files = check_data_path(path, vocab_size)
        self.maps = [np.memmap(f, dtype=np.uint8, mode="r") for f in self.files]
        self.offsets = np.cumsum([0] + [m.size for m in self.maps])  # start of each file in the stream
        total = int(self.offsets[-1])
        self.shard = (total * rank // num_ranks, total * (rank + 1) // num_ranks)
        self.seq_len = seq_len
        self.num_windows = (self.shard[1] - self.shard[0] - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"{param('data', path)}: {total:,} bytes give each of {num_ranks} ranks a shard of "
                            f"{total // num_ranks:,} bytes, fewer than one sequence of {seq_len + 1}")
        self.micro_batch = batch_per_rank // micro_batches
        self.micro_batches = micro_batches

    def window_index(self, step: int, micro: int) -> int:
        """Windows of this shard read before micro-batch ``micro`` of ``step`` (the data position)."""
        return (step * self.micro_batches + micro) * self.micro_batch

    def batch(self, step: int, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.window_index(step, micro)
        rows = [self._read(self.shard[0] + (p % self.num_windows) * self.seq_len, self.seq_len + 1)
                for p in range(first, first + self.micro_batch)]
        seqs = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T + 1)
        return seqs[:, :-1], seqs[:, 1:]

    def _read(self, start: int, size: int) -> np.ndarray:
        """Bytes [start, start + size) of the concatenated stream."""
        out = np.empty(size, dtype=np.uint8)
        done = 0
        f = int(np.searchsorted(self.offsets, start, side="right")) - 1
        while done < size:
            at = start + done - int(self.offsets[f])
            take = min(size - done, self.maps[f].size - at)
            out[done:done + take] = self.maps[f][at:at + take]
            done += take
            f += 1
        return out

    def describe(self, step: int = 0) -> dict:
        return {"kind": "bytes", "path": self.path, "files": len(self.files), "bytes": int(self.offsets[-1]),
                "shard": list(self.shard), "windows_per_shard": self.num_windows, "next_step": step,
                "windows_read": self.window_index(step, 0)}


def check_data_path(data: str | Path, vocab_size: int) -> list[Path]:
    """The files that ``--data`` names, in reading order; ``DataError`` if they do not fit."""
    from epplan.train.tokens import is_token_file, token_dtype

    if is_token_file(str(data)):  # token ids: their range is checked against the vocabulary on load
        path = token_dtype(str(data))[0]
        if not path.is_file():
            raise DataError(f"{param('data', data)}: no such file")
        return [path]
    if vocab_size < 256:
        raise DataError(f"{param('data')} gives byte tokens 0..255 but the model's vocab_size is {vocab_size}; "
                        f"use a model with vocab_size >= 256 or the synthetic data (no {param('data')})")
    path = Path(data)
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts))
    else:
        raise DataError(f"{param('data', path)}: no such file or directory")
    files = [f for f in files if f.stat().st_size > 0]
    if not files:
        raise DataError(f"{param('data', path)}: no non-empty files")
    return files


def make_data(data: str | None, *, vocab_size: int, seq_len: int, seed: int, rank: int, num_ranks: int,
              batch_per_rank: int, micro_batches: int) -> SyntheticData | ByteData:
    if data is None:
        return SyntheticData(vocab_size, seq_len, seed, rank, batch_per_rank, micro_batches)
    from epplan.train.tokens import TokenData, is_token_file

    if is_token_file(data):  # pre-tokenised ids (nanoGPT / Megatron .bin): epplan.train.tokens
        return TokenData(data, vocab_size, seq_len, rank, num_ranks, batch_per_rank, micro_batches)
    return ByteData(data, vocab_size, seq_len, rank, num_ranks, batch_per_rank, micro_batches)
