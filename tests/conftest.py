"""Shared fixtures: real litdata token shards written into a temp dir."""

from __future__ import annotations

import os

# Tiny models: one thread per process is fastest and keeps 2-process (DDP) tests from oversubscribing
# a 2-core machine. Set before torch is imported so subprocesses inherit it too.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from tests.synthetic import write_tree  # noqa: E402


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Counting-token shards of several types and sizes (sample identity is readable from its tokens)."""
    return write_tree(
        tmp_path / "data",
        {"1": 40_000, "2": 20_000, "c1": 12_000, "c2": 6_000, "m1": 3_000, "q1": 2_000, "q2": 2_000},
        chunk_tokens=1_700,
        sequential=True,
    )


def set_dotted(cfg: dict, key: str, value: object) -> None:
    """Set ``cfg["a"]["b"] = value`` for ``key="a.b"`` (what a CLI dotted override does to a YAML config)."""
    *parents, leaf = key.split(".")
    for part in parents:
        cfg = cfg.setdefault(part, {})
    cfg[leaf] = value


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The modules that submit to the local SLURM cluster (``*_slurm``) get the ``slurm`` mark: ``make test`` runs them
    alone after the rest, whose two pytest-xdist workers would otherwise take the CPUs their jobs' timing assumes.
    Under xdist a module's tests stay on one worker (``--dist loadgroup``), so module fixtures are built once."""
    for item in items:
        module = item.module.__name__ if item.module else item.nodeid
        if module.endswith("_slurm"):
            item.add_marker(pytest.mark.slurm)
            item.add_marker(pytest.mark.timeout(1800))  # they wait up to 900 s for jobs themselves
        item.add_marker(pytest.mark.xdist_group(module))
