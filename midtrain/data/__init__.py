"""Data: shard discovery, mixtures, the mixed stream and the litgpt DataModule.

``ShardedMixedDataset`` is imported lazily so that tools which only read shards (similarity,
prepare) start without importing litgpt and Lightning.
"""

from typing import Any

__all__ = ["ShardedMixedDataset"]


def __getattr__(name: str) -> Any:
    if name == "ShardedMixedDataset":
        from midtrain.data.sharded_mixed import ShardedMixedDataset

        return ShardedMixedDataset
    raise AttributeError(f"module 'midtrain.data' has no attribute {name!r}")
