"""Synthetic token shard trees for tests, benchmarks and config checks (no tokenizer needed).

Token values encode provenance: sample ``k`` of a shard starts with ``offset + k * block`` when
``sequential=True``, so a test can tell exactly which sample it got.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from midtrain.prepare.writer import write_token_shard


def write_shard(
    path: Path,
    tokens: int,
    seed: int = 0,
    vocab_size: int = 512,
    chunk_tokens: int = 1 << 16,
    sequential_from: int | None = None,
) -> Path:
    """One shard of ``tokens`` tokens: random IDs below ``vocab_size`` or a counting sequence."""
    if sequential_from is not None:
        data = torch.arange(sequential_from, sequential_from + tokens, dtype=torch.int64)
        dtype = torch.int32
    else:
        rng = np.random.default_rng(seed)
        data = torch.from_numpy(rng.integers(0, vocab_size, size=tokens))
        dtype = torch.uint16 if vocab_size <= 65535 else torch.int32
    return write_token_shard(path, [data], chunk_tokens=chunk_tokens, dtype=dtype)


def write_tree(
    root: Path, layout: dict[str, int], vocab_size: int = 512, chunk_tokens: int = 1 << 16, sequential: bool = False
) -> Path:
    """Shards named by ``layout`` (directory name -> tokens) under ``root``; ``sequential`` numbers tokens."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i, (name, tokens) in enumerate(sorted(layout.items())):
        write_shard(
            root / name,
            tokens,
            seed=i,
            vocab_size=vocab_size,
            chunk_tokens=chunk_tokens,
            sequential_from=(i + 1) * 10_000_000 if sequential else None,
        )
    return root
