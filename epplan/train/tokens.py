"""Pre-tokenised training data: a flat file of token ids, memory-mapped, a shard per rank.

``--data PATH.bin`` reads the layouts the usual preprocessors write:

- nanoGPT (``data/*/prepare.py``): ``train.bin`` is a flat ``uint16`` array of token ids.
- Megatron-LM (``tools/preprocess_data.py``): ``PREFIX.bin`` is the flat token array and
  ``PREFIX.idx`` beside it starts with ``b"MMIDIDX\\x00\\x00"``, a little-endian uint64 version (1)
  and a uint8 dtype code (1 uint8, 2 int8, 3 int16, 4 int32, 5 int64, 8 uint16); the dtype is
  read from there. Document boundaries in the rest of the index are not used: sequences are
  windows of the stream, as nanoGPT samples them.
- Anything else flat: ``--data uint32:PATH.bin`` (or ``uint16:``, ``int32:``) names the dtype.

Windows are read as ``ByteData`` reads bytes (a contiguous shard per rank, consecutive windows of
T + 1 tokens with stride T, wrapping at the shard's end), so batches are a pure function of the
step and a resume continues exactly. Every rank checks that its shard's largest token id is
below the model's vocab_size before training (a chunked scan of the memory map).
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np

from epplan.errors import DataError, param
from epplan.train.data import ByteData

_IDX_MAGIC = b"MMIDIDX\x00\x00"
_MEGATRON_DTYPES = {1: np.uint8, 2: np.int8, 3: np.int16, 4: np.int32, 5: np.int64, 8: np.uint16}
_NAMED = {"uint8": np.uint8, "uint16": np.uint16, "int16": np.int16, "uint32": np.uint32,
          "int32": np.int32, "int64": np.int64}
_SCAN = 1 << 24  # tokens per chunk of the vocabulary check


def is_token_file(data: str) -> bool:
    """Whether ``--data`` names a pre-tokenised file (``.bin``, optionally ``DTYPE:``-prefixed)."""
    return data.endswith(".bin")


def token_dtype(data: str) -> tuple[Path, np.dtype, str]:
    """(path, dtype, where the dtype came from) of a ``--data`` token file."""
    head, sep, rest = data.partition(":")
    if sep and head in _NAMED:
        return Path(rest), np.dtype(_NAMED[head]), param("data", f"{head}:")
    path = Path(data)
    idx = path.with_suffix(".idx")
    if idx.is_file():
        with open(idx, "rb") as fh:
            header = fh.read(len(_IDX_MAGIC) + 9)
        if len(header) < len(_IDX_MAGIC) + 9 or not header.startswith(_IDX_MAGIC):
            raise DataError(f"{param('data', data)}: {idx.name} beside it is not a Megatron index (no MMIDIDX header)")
        version, code = struct.unpack("<QB", header[len(_IDX_MAGIC):])
        if version != 1 or code not in _MEGATRON_DTYPES:
            raise DataError(f"{param('data', data)}: {idx.name} has version {version}, dtype code {code}; epplan reads "
                            f"version 1 with integer codes {sorted(_MEGATRON_DTYPES)}")
        return path, np.dtype(_MEGATRON_DTYPES[code]), f"Megatron index {idx.name}"
    if sep:
        raise DataError(f"{param('data', data)}: dtype {head!r} unknown; use one of {', '.join(_NAMED)}")
    return path, np.dtype(np.uint16), f"uint16 (nanoGPT's layout; name another as {param('data', 'uint32:PATH')})"


class TokenData(ByteData):
    """Token ids of one flat file; the window arithmetic is ``ByteData``'s."""

    def __init__(self, data: str, vocab_size: int, seq_len: int, rank: int, num_ranks: int,
                 batch_per_rank: int, micro_batches: int) -> None:
        path, self.dtype, self.dtype_source = token_dtype(data)
        if not path.is_file():
            raise DataError(f"{param('data', data)}: no such file")
        size = path.stat().st_size
        if size % self.dtype.itemsize or size == 0:
            raise DataError(f"{param('data', data)}: {size:,} bytes is not a whole number of {self.dtype} tokens "
                            f"({self.dtype.itemsize} bytes each; dtype from {self.dtype_source})")
        self.path, self.files = data, [path]
        self.maps = [np.memmap(path, dtype=self.dtype, mode="r")]
        total = int(self.maps[0].size)
        self.offsets = np.array([0, total])
        self.shard = (total * rank // num_ranks, total * (rank + 1) // num_ranks)
        self.seq_len = seq_len
        self.num_windows = (self.shard[1] - self.shard[0] - 1) // seq_len
        if self.num_windows < 1:
            raise DataError(f"{param('data', data)}: {total:,} tokens give each of {num_ranks} ranks "
                            f"{total // num_ranks:,}, fewer than one sequence of {seq_len + 1}")
        self.micro_batch = batch_per_rank // micro_batches
        self.micro_batches = micro_batches
        self._check_vocab(vocab_size)

    def _check_vocab(self, vocab_size: int) -> None:
        shard = self.maps[0][self.shard[0]:self.shard[1]]
        for at in range(0, shard.size, _SCAN):
            chunk = shard[at:at + _SCAN]
            top, low = int(chunk.max()), int(chunk.min())
            if top >= vocab_size or low < 0:
                bad = at + int(np.argmax((chunk >= vocab_size) | (chunk < 0)))
                raise DataError(
                    f"{param('data', self.path)}: token {int(shard[bad])} at position {self.shard[0] + bad:,} is outside "
                    f"the model's vocabulary 0..{vocab_size - 1}; use the model the data was tokenised for "
                    f"({param('set', 'vocab_size=N')} when planning) or check the dtype ({self.dtype}, from {self.dtype_source})")

    def _read(self, start: int, size: int) -> np.ndarray:
        return np.asarray(self.maps[0][start:start + size])

    def describe(self, step: int = 0) -> dict:
        return {"kind": "tokens", "path": self.path, "dtype": str(self.dtype), "tokens": int(self.offsets[-1]),
                "shard": list(self.shard), "windows_per_shard": self.num_windows, "next_step": step,
                "windows_read": self.window_index(step, 0)}
