"""Write litdata token shards (the on-disk format every other module reads).

Shards are written with litdata's own ``BinaryWriter`` and ``TokensLoader`` layout, so
``StreamingDataset(path, item_loader=TokensLoader(block_size))`` reads them. Writing goes to a
sibling temp directory that is renamed into place only when complete: an interrupted write never
leaves a directory that shard discovery would accept.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch
from litdata import TokensLoader
from litdata.streaming.writer import BinaryWriter

from midtrain.errors import MidtrainError

DEFAULT_CHUNK_TOKENS = 1 << 21  # 2M tokens (8 MB of int32) per chunk file


def token_dtype(vocab_size: int) -> torch.dtype:
    """Smallest litdata-supported integer dtype that holds every ID below ``vocab_size``."""
    return torch.uint16 if vocab_size <= 65535 else torch.int32


class TokenShardWriter:
    """Append token arrays to a new shard directory; ``close()`` publishes it atomically.

    Documents are concatenated into one token stream (litdata's ``TokensLoader`` serves fixed
    windows across document boundaries, the same as litgpt's pretraining data).
    """

    def __init__(self, path: str | Path, chunk_tokens: int = DEFAULT_CHUNK_TOKENS, dtype: torch.dtype = torch.int32):
        self.path = Path(path)
        if self.path.exists():
            raise MidtrainError(f"Shard directory {self.path} already exists; refusing to overwrite it.")
        self.tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        self.dtype = dtype
        self.chunk_tokens = int(chunk_tokens)
        self._writer = BinaryWriter(str(self.tmp), chunk_size=self.chunk_tokens, item_loader=TokensLoader())
        self._buffer: list[np.ndarray] = []
        self._buffered = 0
        self._index = 0
        self.tokens = 0
        self.documents = 0

    def add(self, tokens: Iterable[int] | np.ndarray | torch.Tensor) -> None:
        """Append one document's tokens."""
        arr = tokens.numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if arr.size == 0:
            return
        self._buffer.append(arr.astype(np.int64, copy=False))
        self._buffered += arr.size
        self.documents += 1
        self.tokens += arr.size
        while self._buffered >= self.chunk_tokens:
            self._flush(self.chunk_tokens)

    def _flush(self, n: int) -> None:
        flat = np.concatenate(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        head, rest = flat[:n], flat[n:]
        self._writer[self._index] = torch.from_numpy(head.astype(_numpy_dtype(self.dtype)))
        self._index += 1
        self._buffer = [rest] if rest.size else []
        self._buffered = rest.size

    def close(self) -> Path:
        """Flush, write ``index.json`` and move the finished shard into place."""
        if self._buffered:
            self._flush(self._buffered)
        if self._index == 0:
            self.abort()
            raise MidtrainError(f"No tokens were written to shard {self.path}; the input was empty.")
        self._writer.done()
        self._writer.merge()
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


def _numpy_dtype(dtype: torch.dtype) -> np.dtype:
    return {torch.uint16: np.uint16, torch.int32: np.int32, torch.int64: np.int64}[dtype]


def write_token_shard(
    path: str | Path,
    documents: Iterable[Iterable[int] | np.ndarray | torch.Tensor],
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    dtype: torch.dtype = torch.int32,
) -> Path:
    """Write ``documents`` (token arrays) as one litdata token shard at ``path``."""
    writer = TokenShardWriter(path, chunk_tokens=chunk_tokens, dtype=dtype)
    try:
        for doc in documents:
            writer.add(doc)
        return writer.close()
    except BaseException:
        writer.abort()
        raise
