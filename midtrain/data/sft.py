"""What litgpt's SFT data modules lack: a deterministic, resumable sample order and shifted batches.

litgpt's modules (``JSON``, ``Alpaca``, ...) tokenise, apply the prompt style and mask the prompt;
their train loader reshuffles with a fixed generator and cannot start in the middle of an epoch.
Here the training order is an endless concatenation of per-epoch permutations, seeded by
``(seed, epoch)``, and the only state is the number of samples consumed. Step ``k`` uses the next
``per_step`` positions of that order (over all processes); process ``rank`` takes its contiguous
slice of them. Resuming = rebuilding the order at the saved position.

Batches are already shifted for next-token prediction: ``input_ids`` are the tokens but the last,
``labels`` the tokens but the first, with the data module's masking (``-100``) kept and padding
labelled ``-100``, so every loss is ``cross_entropy(model(input_ids), labels)``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

IGNORE_INDEX = -100


class SFTOrder:
    """Sample indices of an endless sequence of epochs, each a seeded permutation of ``range(size)``."""

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed = size, seed
        self._epoch, self._perm = -1, np.empty(0, dtype=np.int64)

    def permutation(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.size)
        return self._perm

    def take(self, start: int, count: int) -> list[int]:
        """Indices at positions ``start, ..., start + count - 1`` of the endless order."""
        return [int(self.permutation(p // self.size)[p % self.size]) for p in range(start, start + count)]


class StepBatches(Sampler[list[int]]):
    """Per optimizer step, this process's SFT sample indices; endless, starting at ``consumed``."""

    def __init__(self, order: SFTOrder, consumed: int, per_step: int, rank: int, world_size: int) -> None:
        self.order, self.consumed, self.per_step = order, consumed, per_step
        self.per_rank = per_step // world_size
        self.offset = rank * self.per_rank

    def __iter__(self) -> Iterator[list[int]]:
        position = self.consumed
        while True:
            yield self.order.take(position + self.offset, self.per_rank)
            position += self.per_step


def shifted_batch(rows: Sequence[tuple[torch.Tensor, torch.Tensor]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """``(tokens, labels)`` pairs of full sequences -> right-padded ``input_ids``/``labels`` [B, L]."""
    length = max(len(tokens) - 1 for tokens, _ in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    for i, (tokens, targets) in enumerate(rows):
        n = len(tokens) - 1
        input_ids[i, :n] = tokens[:-1]
        labels[i, :n] = targets[1:]
    return {"input_ids": input_ids, "labels": labels}


def sft_rows(samples: Sequence[dict]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """litgpt SFT samples (``input_ids``, ``labels`` unshifted) as ``(tokens, labels)`` pairs."""
    return [(s["input_ids"].long(), s["labels"].long()) for s in samples]


def collate_sft(samples: Sequence[dict]) -> dict[str, torch.Tensor]:
    """DataLoader collate for litgpt SFT samples: shifted, padded ``input_ids``/``labels``."""
    return shifted_batch(sft_rows(samples))


def scored_fraction(dataset: Dataset, limit: int | None = None) -> float:
    """Fraction of the first ``limit`` samples with at least one scored target (a long prompt can leave none)."""
    n = len(dataset) if limit is None else min(len(dataset), limit)
    scored = sum(bool((dataset[i]["labels"][1:] != IGNORE_INDEX).any()) for i in range(n))
    return scored / max(n, 1)


class _Subset(Dataset):
    def __init__(self, dataset: Dataset, indices: list[int]) -> None:
        self.dataset, self.indices = dataset, indices

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return self.dataset[self.indices[i]]


def sft_val_loader(
    dataset: Dataset, batch_size: int, max_samples: int | None, rank: int, world_size: int, num_workers: int = 0
) -> DataLoader:
    """The first ``max_samples`` validation samples (all if None), split across processes by stride."""
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    return DataLoader(
        _Subset(dataset, list(range(rank, n, world_size))),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_sft,
    )
