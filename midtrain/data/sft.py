"""What litgpt's SFT data modules lack: a deterministic, resumable sample order and shifted, tight batches.

litgpt's modules (``JSON``, ``Alpaca``, ...) tokenise, apply the prompt style and mask the prompt;
their train loader reshuffles with a fixed generator and cannot start in the middle of an epoch.
Here the training order is an endless concatenation of per-epoch permutations, seeded by
``(seed, epoch)``, and the only state is the number of samples consumed. Step ``k`` uses the next
``per_step`` positions of that order (over all processes); process ``rank`` takes its contiguous
slice of them. Resuming = rebuilding the order at the saved position.

Batches are already shifted for next-token prediction: ``input_ids`` are the tokens but the last,
``labels`` the tokens but the first, with the data module's masking (``-100``) kept and padding
labelled ``-100``, so every loss is ``cross_entropy(model(input_ids), labels)``.

Micro-batches of a step are planned, not filled in order (``plan_micro_batches``): the step's SFT
rows, longest first, in runs of ``micro_batch_size``, each padded to its own longest row; replay
rows (full-length pretraining sequences) in micro-batches of their own, so they never force
full-length padding onto SFT rows. The step's rows, and so its loss and the replay fraction, are
the same however they are grouped (the loss is a sum over the step's scored tokens).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

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


@dataclass(frozen=True)
class MicroBatchPlan:
    """One micro-batch of a step: which rows (indices into the step's SFT or replay rows) it holds."""

    replay: bool
    rows: tuple[int, ...]


def plan_micro_batches(sft_lengths: Sequence[int], n_replay: int, micro_batch_size: int) -> list[MicroBatchPlan]:
    """Group one step's rows into micro-batches of at most ``micro_batch_size`` rows.

    SFT rows go longest first (ties in their given order) in runs of ``micro_batch_size``; the
    ``n_replay`` replay rows fill micro-batches of their own, after the SFT ones. Every row is in
    exactly one micro-batch. A step whose SFT or replay count is not a multiple of
    ``micro_batch_size`` gets one smaller micro-batch of each kind rather than a mixed one.
    """
    if micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be >= 1, got {micro_batch_size}")
    by_length = sorted(range(len(sft_lengths)), key=lambda i: -sft_lengths[i])
    plans = [
        MicroBatchPlan(False, tuple(by_length[i : i + micro_batch_size]))
        for i in range(0, len(by_length), micro_batch_size)
    ]
    plans += [
        MicroBatchPlan(True, tuple(range(i, min(i + micro_batch_size, n_replay))))
        for i in range(0, n_replay, micro_batch_size)
    ]
    return plans


def step_micro_batches(
    sft_samples: Sequence[dict], replay_rows: torch.Tensor | None, micro_batch_size: int
) -> list[tuple[bool, dict[str, torch.Tensor]]]:
    """One process's micro-batches of one step as ``(is_replay, shifted batch)``, per ``plan_micro_batches``.

    ``replay_rows`` are ``[R, L + 1]`` pretraining tokens; every next-token target of them is scored.
    """
    sft = sft_rows(sft_samples)
    n_replay = 0 if replay_rows is None else len(replay_rows)
    out = []
    for plan in plan_micro_batches([len(tokens) for tokens, _ in sft], n_replay, micro_batch_size):
        if plan.replay:
            rows = replay_rows[plan.rows[0] : plan.rows[-1] + 1].long()  # replay runs are contiguous
            out.append((True, {"input_ids": rows[:, :-1], "labels": rows[:, 1:]}))
        else:
            out.append((False, shifted_batch([sft[i] for i in plan.rows])))
    return out


def scored_fraction(dataset: Dataset, limit: int | None = None) -> float:
    """Fraction of the first ``limit`` samples with at least one scored target (a long prompt can leave none)."""
    n = len(dataset) if limit is None else min(len(dataset), limit)
    scored = sum(bool((dataset[i]["labels"][1:] != IGNORE_INDEX).any()) for i in range(n))
    return scored / max(n, 1)


class RankShare(Dataset):
    """Rank ``rank``'s share of the first ``n`` samples of ``dataset`` (``rank, rank + world_size, ...``), padded to
    ``ceil(n / world_size)`` items with copies of a sample whose labels are all masked.

    Every rank then runs the same number of forwards (each one a collective under FSDP), and the padding adds no
    scored token, so a summed, all-reduced loss is the same for every world size.
    """

    def __init__(self, dataset: Dataset, n: int, rank: int, world_size: int) -> None:
        self.dataset, self.indices = dataset, list(range(rank, n, world_size))
        self.length = -(-n // world_size)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, i: int) -> dict:
        if not 0 <= i < self.length:
            raise IndexError(i)
        if i < len(self.indices):
            return self.dataset[self.indices[i]]
        sample = dict(self.dataset[0])
        sample["labels"] = torch.full_like(torch.as_tensor(sample["labels"]), IGNORE_INDEX)
        return sample


def sft_val_loader(
    dataset: Dataset, batch_size: int, max_samples: int | None, rank: int, world_size: int, num_workers: int = 0
) -> DataLoader:
    """The first ``max_samples`` validation samples (all if None), split across processes by stride and padded to
    the same number of items on every process (:class:`RankShare`)."""
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    return DataLoader(
        RankShare(dataset, n, rank, world_size),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_sft,
    )
