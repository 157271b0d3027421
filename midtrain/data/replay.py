"""Replay: a fixed share of every fine-tuning step drawn from the pretraining shards.

Layout of one optimizer step (global batch ``G`` sequences, ``W`` processes, ``A`` micro-batches of
``M`` sequences per process, so ``G = W * A * M``):

* ``r = ratio * G`` sequences come from the pretraining stream, ``G - r`` from the SFT data. ``r``
  must be a whole number and a multiple of ``W``; anything else is an error naming valid ratios, so
  the realised replay fraction of every step is exactly ``r / G``.
* Every process takes ``r / W`` replay sequences per step (one batch of its own ``MixedLoader``)
  and spreads them over its micro-batches as evenly as possible, earlier micro-batches first
  (``r / W = 3``, ``A = 2`` gives 2 and 1). The rest of each micro-batch is SFT data, so every
  micro-batch holds exactly ``M`` sequences.
* Replay sequences are ``max_seq_length + 1`` pretraining tokens; the loss covers all their
  next-token targets (no masking).
"""

from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from midtrain.data.sharded_mixed import ShardedMixedDataset
from midtrain.errors import MidtrainError


@dataclass
class Replay:
    """Pretraining data mixed into fine-tuning: ``{ratio: 0.25, data: {data_path: ..., mix_weights_str: ...}}``."""

    ratio: float = 0.0
    """Fraction of the sequences of every optimizer step drawn from pretraining shards, in [0, 1)."""
    data: dict[str, Any] | None = None
    """ShardedMixedDataset fields (``data_path``, a mixture mode, ``val_data_path``, ``seed``, ``num_workers``)."""

    def build(self) -> ShardedMixedDataset | None:
        """Check the settings and build the replay stream's data module (None when there is no replay data)."""
        if not 0.0 <= self.ratio < 1.0:
            raise MidtrainError(f"replay.ratio must be in [0, 1), got {self.ratio}.")
        if self.ratio > 0 and not self.data:
            raise MidtrainError("replay.ratio > 0 needs replay.data: the ShardedMixedDataset fields of the shards.")
        if self.data is None:
            return None
        if not isinstance(self.data, dict):
            raise MidtrainError(f"replay.data must be a mapping of ShardedMixedDataset fields, got {self.data!r}.")
        if self.data.get("stages"):
            raise MidtrainError("replay.data.stages is not supported: replay uses one fixed mixture.")
        try:
            return ShardedMixedDataset(**self.data)
        except TypeError as err:
            raise MidtrainError(f"replay.data: {err}") from err

    def sequences_per_step(self, global_batch_size: int, world_size: int) -> int:
        """Replay sequences per optimizer step over all processes (exact; see the module docstring)."""
        exact = Fraction(self.ratio).limit_denominator(1_000_000) * global_batch_size
        if exact.denominator != 1 or exact.numerator % world_size:
            valid = ", ".join(f"{k / global_batch_size:g}" for k in range(0, global_batch_size, world_size)[:8])
            raise MidtrainError(
                f"replay.ratio={self.ratio} x global_batch_size={global_batch_size} = {float(exact):g} sequences: it "
                f"must be a whole number divisible by the {world_size} process(es) so every step has the same replay "
                f"share. Valid ratios: {valid}, ..."
            )
        return int(exact)


def spread(total: int, parts: int) -> list[int]:
    """``total`` split into ``parts`` near-equal whole counts, larger ones first (7, 3 -> [3, 2, 2])."""
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]
