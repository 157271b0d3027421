"""Shared fixtures: real litdata token shards written into a temp dir."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from midtrain.data.synthetic import write_tree

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Counting-token shards of several types and sizes (sample identity is readable from its tokens)."""
    return write_tree(
        tmp_path / "data",
        {"1": 40_000, "2": 20_000, "c1": 12_000, "c2": 6_000, "m1": 3_000, "q1": 2_000, "q2": 2_000},
        chunk_tokens=1_700,
        sequential=True,
    )
