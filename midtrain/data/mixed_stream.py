"""The mixed token stream: weighted sampling over litdata token shards, with exact resume.

litdata does the streaming: every source is a ``StreamingDataset(TokensLoader)`` that shuffles
its chunks, splits them across ranks and loader workers, and reads them. This module only
decides *which source* serves the next sample, and keeps the state needed to continue exactly.

Semantics (each is tested):

* **Weights.** Every sample's source is drawn independently with the resolved weights.
* **Independent RNG per worker and rank.** The source RNG is seeded with
  ``(seed, rank, logical worker, mixture generation)``, so workers and ranks draw different
  source sequences (litdata's ``CombinedStreamingDataset`` seeds every worker identically).
* **Each source cycles on its own.** When a source runs out, only that source starts its next
  epoch (a new litdata shuffle); the others keep their position. No source re-serves a sample
  before it has served all of its samples once (litdata's combined stream instead restarts
  every source whenever the smallest one ends).
* **Micro-batches are built inside the worker**, so each batch comes from one logical worker
  together with a snapshot of that worker's state *after* the batch: per source
  ``{epoch, consumed}`` and the RNG state. The loader keeps the newest snapshot per worker and
  which worker serves next; that is the complete resume state, exact with any number of workers
  and any prefetch depth.
* **Resume** rotates worker roles so the worker that was due next serves first, restores each
  source's epoch and fast-forwards it to its position (no data is read twice, none skipped).
* **Mixture change** (a stage switch or a resume with a new mixture): sources present before and
  after keep their stream position, new ones start fresh, removed ones are dropped; the source
  RNG is re-seeded with the next mixture generation.
* **Topology change** (other world size or worker count) cannot map per-worker positions: each
  carried source then starts its next epoch, and a warning says so.
"""

from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset, TokensLoader
from litdata.utilities.env import _WorkerEnv
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from midtrain.errors import MidtrainError

STATE_VERSION = 1


@dataclass(frozen=True)
class Source:
    """One sampled shard: identity, location, size and weight."""

    id: str
    type: str
    path: str
    tokens: int
    weight: float


def _fast_forward(ds: StreamingDataset, n: int) -> None:
    """Advance a freshly iterated ``StreamingDataset`` by ``n`` samples of this worker's epoch.

    Whole chunk intervals are skipped without reading them; the remainder (< one chunk) is read
    and discarded. Relies on litdata's per-worker interval bookkeeping (pinned version).
    """
    skipped = 0
    index = 0
    intervals = ds.worker_intervals
    while index < len(intervals):
        size = intervals[index][2] - intervals[index][1]
        if n - skipped < size:
            break
        skipped += size
        index += 1
    ds.worker_next_chunk_index = index
    ds.global_index = skipped
    ds.upcoming_indexes = deque()
    for _ in range(n - skipped):
        next(ds)


class MixedStream(IterableDataset):
    """Infinite iterable of micro-batches ``{"input_ids", "source", "worker", "state"}``."""

    def __init__(
        self,
        sources: list[Source],
        block_size: int,
        batch_size: int,
        seed: int = 42,
        generation: int = 0,
        shuffle: bool = True,
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if not sources:
            raise MidtrainError("A mixture needs at least one source with weight > 0.")
        self.sources = list(sources)
        self.block_size = int(block_size)
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.generation = int(generation)
        weights = np.array([s.weight for s in sources], dtype=np.float64)
        self.probs = weights / weights.sum()
        self.datasets = [
            StreamingDataset(
                s.path,
                item_loader=TokensLoader(block_size=self.block_size),
                shuffle=shuffle,
                seed=self.seed,
                drop_last=True,
                storage_options=storage_options,
            )
            for s in sources
        ]
        env = self.datasets[0].distributed_env
        self.rank, self.world_size = env.global_rank, env.world_size
        self.worker_offset = 0
        self.resume_states: dict[int, dict] = {}

    def _rng(self, logical_worker: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.rank, logical_worker, self.generation, 0x6D6978])

    def __iter__(self):
        info = get_worker_info()
        num_workers = info.num_workers if info is not None else 1
        worker = ((info.id if info is not None else 0) + self.worker_offset) % num_workers
        ids = [s.id for s in self.sources]
        state = self.resume_states.get(worker) or {}
        rng = self._rng(worker)
        if state.get("rng") is not None:
            rng.bit_generator.state = state["rng"]
        saved = state.get("sources", {})
        epochs = [int(saved[sid]["epoch"]) if sid in saved else 1 for sid in ids]
        consumed = [int(saved[sid]["consumed"]) if sid in saved else 0 for sid in ids]
        batches = int(state.get("batches", 0))
        worker_env = _WorkerEnv(world_size=num_workers, rank=worker)

        def start(i: int) -> None:
            """(Re)start source ``i`` at its current epoch and position."""
            ds = self.datasets[i]
            ds._forced_worker_env = worker_env  # this worker's share of the shard (logical worker id)
            ds.set_epoch(epochs[i])
            iter(ds)
            if consumed[i]:
                _fast_forward(ds, consumed[i])

        def next_epoch(i: int) -> torch.Tensor:
            """Source ``i`` ran out: only it starts its next epoch (a new litdata shuffle)."""
            epochs[i] += 1
            consumed[i] = 0
            start(i)
            try:
                return next(self.datasets[i])
            except StopIteration:
                raise MidtrainError(
                    f"Source {ids[i]} ({self.sources[i].path}) has no {self.block_size}-token samples for loader "
                    f"worker {worker} of {num_workers} on rank {self.rank} of {self.world_size}: the shard is too "
                    "small to split this many ways. Use fewer data.num_workers, or a larger shard."
                ) from None

        for i in range(len(ids)):
            start(i)
        fetch = [ds.__next__ for ds in self.datasets]
        cumulative = np.cumsum(self.probs)
        cumulative[-1] = 1.0  # u < 1 always lands on a source, whatever the float rounding
        while True:
            picks = np.searchsorted(cumulative, rng.random(self.batch_size), side="right")
            rows = []
            for i in picks.tolist():
                try:
                    rows.append(fetch[i]())
                except StopIteration:
                    rows.append(next_epoch(i))
                consumed[i] += 1
            batch = torch.empty((len(rows), self.block_size), dtype=rows[0].dtype)
            if info is not None:  # in a loader worker: build the batch in shared memory, no copy at hand-over
                batch.share_memory_()
            batches += 1
            yield {
                "input_ids": torch.stack(rows, out=batch),
                "source": picks.astype(np.int64),  # numpy: pickled inline, no shared-memory segment
                "worker": worker,
                "state": {
                    "rng": rng.bit_generator.state,
                    "sources": {sid: {"epoch": e, "consumed": c} for sid, e, c in zip(ids, epochs, consumed)},
                    "batches": batches,
                },
            }


def _as_is(batch: dict) -> dict:
    """Batches are built in the worker already; pass them through untouched."""
    return batch


class MixedLoader(DataLoader):
    """DataLoader over a :class:`MixedStream` that records the exact resume state.

    With ``plain=True`` it yields bare token tensors (what the stock ``litgpt pretrain`` loop
    expects); otherwise dicts with ``input_ids`` and ``source`` (index into ``sources``).
    """

    def __init__(self, stream: MixedStream, num_workers: int = 0, plain: bool = False, pin_memory: bool = False):
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            pin_memory=pin_memory,
            prefetch_factor=4 if num_workers > 0 else None,
            collate_fn=_as_is,
        )
        self.stream = stream
        self.plain = plain
        self.worker_states: dict[int, dict] = dict(stream.resume_states)
        self.next_worker = 0

    @property
    def sources(self) -> list[Source]:
        return self.stream.sources

    def __iter__(self):
        workers = max(1, self.num_workers)
        self.stream.worker_offset = self.next_worker
        self.stream.resume_states = dict(self.worker_states)
        for batch in super().__iter__():
            worker = int(batch.pop("worker"))
            self.worker_states[worker] = batch.pop("state")
            self.next_worker = (worker + 1) % workers
            if self.plain:
                yield batch["input_ids"]
            else:
                batch["source"] = torch.as_tensor(batch["source"])
                yield batch

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable resume state of this rank's stream."""
        return {
            "version": STATE_VERSION,
            "num_workers": max(1, self.num_workers),
            "world_size": self.stream.world_size,
            "rank": self.stream.rank,
            "seed": self.stream.seed,
            "block_size": self.stream.block_size,
            "generation": self.stream.generation,
            "sources": {s.id: {"tokens": s.tokens, "weight": s.weight} for s in self.stream.sources},
            "next_worker": self.next_worker,
            "workers": {str(k): v for k, v in self.worker_states.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state`` (see the module docstring for mixture and topology changes)."""
        if state.get("version") != STATE_VERSION:
            raise MidtrainError(f"Unknown loader state version {state.get('version')}; expected {STATE_VERSION}.")
        if int(state["block_size"]) != self.stream.block_size:
            raise MidtrainError(
                f"The checkpoint's data stream used sequences of {state['block_size'] - 1} tokens, this run uses "
                f"{self.stream.block_size - 1}; resuming would change what a sample is. Keep max_seq_length."
            )
        for sid, old in state["sources"].items():
            new = next((s for s in self.stream.sources if s.id == sid), None)
            if new is not None and int(old["tokens"]) != new.tokens:
                raise MidtrainError(
                    f"Shard {sid} had {old['tokens']} tokens when the checkpoint was written and has {new.tokens} now; "
                    "its data changed, so its stream position is meaningless. Restore the shard or rename it."
                )
        same_sources = {sid: old["weight"] for sid, old in state["sources"].items()} == {
            s.id: s.weight for s in self.stream.sources
        }
        workers = {int(k): v for k, v in state["workers"].items()}
        same_topology = (
            int(state["num_workers"]) == max(1, self.num_workers) and int(state["world_size"]) == self.stream.world_size
        )
        if not same_topology:
            warnings.warn(
                f"Data loader topology changed (world size {state['world_size']} -> {self.stream.world_size}, "
                f"workers {state['num_workers']} -> {max(1, self.num_workers)}): per-worker stream positions cannot "
                "be carried, so every carried source starts its next epoch (a fresh shuffle).",
                stacklevel=2,
            )
            epochs: dict[str, int] = {}
            for w in workers.values():
                for sid, pos in w["sources"].items():
                    epochs[sid] = max(epochs.get(sid, 1), int(pos["epoch"]) + 1)
            fresh = {"sources": {sid: {"epoch": e, "consumed": 0} for sid, e in epochs.items()}}
            workers = {w: fresh for w in range(max(1, self.num_workers))}
            next_worker = 0
        else:
            next_worker = int(state["next_worker"])
        generation = int(state.get("generation", 0))
        if not same_sources or not same_topology:
            # Positions carry over; the source RNG starts the next generation's sequence.
            workers = {w: {"sources": s["sources"], "batches": s.get("batches", 0)} for w, s in workers.items()}
            generation += 1
        self.stream.generation = generation
        self.worker_states = workers
        self.next_worker = next_worker
