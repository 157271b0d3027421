"""Data: shard discovery, mixtures, the mixed stream and the litgpt DataModule."""

import litgpt.data

from midtrain.data.sharded_mixed import ShardedMixedDataset

# Old configs say `class_path: litgpt.data.ShardedMixedDataset` (the research fork's location).
litgpt.data.ShardedMixedDataset = ShardedMixedDataset

__all__ = ["ShardedMixedDataset"]
