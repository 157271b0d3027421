"""The training loader over the data order (``midtrain.data.order``): this rank's micro-batches, read by index.

:class:`MixedStream` is an ``IterableDataset`` that deals this rank's micro-batches ``j`` to the
loader workers round-robin (worker ``w`` of ``W`` builds ``j = w, w + W, ...``; the DataLoader
hands them out in ``j`` order), so workers only prefetch and what a step trains on depends only
on the global index. Being iterable, it keeps its order under ``fabric.setup_dataloaders`` too
(which would inject a ``DistributedSampler`` into a map-style loader). Samples are read through
litdata's public random access (``StreamingDataset(...)[i]`` over unshuffled shards), so neither
litdata's split of chunks across workers nor its read path decides anything.

:class:`MixedLoader` counts the micro-batches handed out; its state (the generations and the
consumed global index) is the same on every rank and continues exactly on any number of ranks,
workers or micro-batch size.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from litdata import StreamingDataset, TokensLoader
from litdata.streaming.sampler import ChunkedIndex
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from midtrain.data.order import DataOrder, Generation, RankSlice
from midtrain.errors import MidtrainError

PLAN_AHEAD = 4096
"""Samples whose order a worker computes at once (a vectorised lookup per block, not per micro-batch)."""


@dataclass(frozen=True)
class Source:
    """One sampled shard: identity, location (local path or URL), size and layout fingerprint (weights: the order)."""

    id: str
    type: str
    path: str
    tokens: int
    fingerprint: str
    dtype_code: int | None = None
    """litdata's dtype code of the stored tokens (``index.json``); ``None`` when unknown."""


_INT32_SAFE = frozenset({11, 12, 13, 14, 15, 16, 20})  # litdata codes of uint8, int8, int16, int32, uint16


def batch_dtype(sources: list[Source]) -> torch.dtype | None:
    """One token dtype for every batch when the shards store different ones (``None``: they agree, no cast).

    int32 holds every id of 8-, 16- and 32-bit shards (uint16 included, which torch cannot promote);
    anything else is widened to int64.
    """
    codes = {s.dtype_code for s in sources}
    if len(codes) <= 1:
        return None
    return torch.int32 if codes <= _INT32_SAFE else torch.int64


class MixedStream(IterableDataset):
    """Infinite iterable of this rank's micro-batches ``{"input_ids", "source"}`` from global index ``start``."""

    def __init__(
        self,
        order: DataOrder,
        sources: list[Source],
        block_size: int,
        ranks: RankSlice,
        start: int = 0,
        storage_options: dict | None = None,
    ) -> None:
        self.order = order
        self.sources = list(sources)
        self.block_size = int(block_size)
        self.ranks = ranks
        self.start = int(start)
        self.first_micro_batch = 0
        self.storage_options = storage_options
        self.dtype = batch_dtype(self.sources)

    def open(self, source: Source) -> StreamingDataset:
        """Random access to one source, in litdata's unshuffled sample order."""
        return StreamingDataset(
            source.path,
            item_loader=TokensLoader(block_size=self.block_size),
            shuffle=False,
            storage_options=self.storage_options or {},
        )

    def micro_batches(self, j: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Sources (positions in ``sources``), sample ids and their chunks for this rank's micro-batches ``j``.

        The order names sources by shard id (positions in its generation's weights); they are mapped to
        positions in ``sources`` by id, so a resume whose shards are discovered in another order reads the same
        samples.
        """
        g = self.ranks.indices(self.start, j)
        gen, src, _, ids = self.order.lookup(g.ravel())
        if gen != len(self.order.generations) - 1:
            raise MidtrainError("The stream serves the newest mixture generation only.")
        where = {s.id: i for i, s in enumerate(self.sources)}
        missing = [sid for sid in self.order.generations[gen].weights if sid not in where]
        if missing:
            raise MidtrainError(f"Shard(s) {missing} are in the data order but not among this run's sources.")
        src = np.asarray([where[sid] for sid in self.order.generations[gen].weights], dtype=np.int64)[src]
        chunks = np.empty_like(ids)
        for s, source in enumerate(self.sources):
            sel = src == s
            chunks[sel] = self.order.source(source.id).chunk_of(ids[sel])
        return src.reshape(g.shape), ids.reshape(g.shape), chunks.reshape(g.shape)

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        datasets = [self.open(s) for s in self.sources]
        ahead = max(1, PLAN_AHEAD // self.ranks.micro_batch)  # micro-batches looked up in one vectorised call
        j = self.first_micro_batch + worker
        warm = set()
        while True:
            sources, samples, chunks = self.micro_batches(j + workers * np.arange(ahead))
            for s in set(np.unique(sources).tolist()) - warm:  # a source's first read sets litdata up (~1 ms):
                first = np.flatnonzero(sources.ravel() == s)[0]  # pay it before the first batch, not inside one
                datasets[s][ChunkedIndex(int(samples.flat[first]), int(chunks.flat[first]))]
                warm.add(s)
            for src, ids, chunk in zip(sources, samples, chunks):
                # litdata's public ChunkedIndex: the sample id plus its chunk (ds[i] would search the chunk linearly)
                rows = [datasets[s][ChunkedIndex(i, c)] for s, i, c in zip(src.tolist(), ids.tolist(), chunk.tolist())]
                if self.dtype is not None:  # shards of several token dtypes: cast the rows that differ
                    rows = [r if r.dtype == self.dtype else r.to(self.dtype) for r in rows]
                batch = torch.empty((len(rows), self.block_size), dtype=rows[0].dtype)
                if info is not None:  # in a loader worker: build the batch in shared memory, no copy at hand-over
                    batch.share_memory_()
                yield {"input_ids": torch.stack(rows, out=batch), "source": src}  # numpy: pickled inline
            j += workers * ahead


def _as_is(batch: dict) -> dict:
    """Batches are built in the worker already; pass them through untouched."""
    return batch


STATE_VERSION = 3
"""3: the random blend draws its counts from a tree of keyed splits (2 drew every block i.i.d.)."""


class MixedLoader(DataLoader):
    """DataLoader over a :class:`MixedStream` that knows how far the run has read.

    With ``plain=True`` it yields bare token tensors (what the stock ``litgpt pretrain`` loop
    expects); otherwise dicts with ``input_ids`` and ``source`` (index into ``sources``).
    ``state_dict``/``load_state_dict`` are also set on the instance: Fabric's dataloader wrapper
    copies the instance attributes, so the stock loop saves and restores this state as well.
    """

    def __init__(self, stream: MixedStream, num_workers: int = 0, plain: bool = False):
        super().__init__(
            stream,
            batch_size=None,
            num_workers=num_workers,
            prefetch_factor=4 if num_workers > 0 else None,
            collate_fn=_as_is,
        )
        self.stream = stream
        self.plain = plain
        self.served = 0  # micro-batches handed out from stream.start on
        self.shards_seen: dict[str, dict] = {
            s.id: {"tokens": s.tokens, "fingerprint": s.fingerprint} for s in stream.sources
        }
        self.state_dict = self._state_dict
        self.load_state_dict = self._load_state_dict

    @property
    def sources(self) -> list[Source]:
        return self.stream.sources

    def __iter__(self):
        self.stream.first_micro_batch = self.served
        for batch in super().__iter__():
            self.served += 1
            if self.plain:
                yield batch["input_ids"]
            else:
                batch["source"] = torch.as_tensor(batch["source"])
                yield batch

    def _state_dict(self) -> dict[str, Any]:
        """JSON-serialisable and identical on every rank: generations, consumed global index, what is checked."""
        ranks = self.stream.ranks
        steps, into = divmod(self.served, ranks.micro_batches_per_step)
        return {
            "version": STATE_VERSION,
            "seed": self.stream.order.seed,
            "block_size": self.stream.block_size,
            "shards": self.shards_seen,
            "generations": [g.to_json() for g in self.stream.order.generations],
            "consumed": self.stream.start + steps * ranks.global_batch,
            "into_step": [into, ranks.global_batch, ranks.world, ranks.micro_batch] if into else None,
        }

    def _load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from ``state``, written by any number of ranks, workers or micro-batch size (see
        :func:`resume_order`; the mixture in force is this loader's newest generation)."""
        stream = self.stream
        current = stream.order.generations[-1]
        restored, consumed, into = resume_order(
            state, stream.order, stream.block_size, self.shards_seen, current.weights, current.blend,
            current.reason or "resume",
        )  # fmt: skip
        served = 0
        if into:
            if list(into[1:]) != [stream.ranks.global_batch, stream.ranks.world, stream.ranks.micro_batch]:
                raise MidtrainError(
                    "The checkpoint was written in the middle of an optimizer step; resume it with the same global "
                    "batch size, number of processes and micro-batch size."
                )
            served = int(into[0])
        restored.blend(len(restored.generations) - 1)  # computed once here; workers get it with the stream
        stream.order, stream.start, self.served = restored, consumed, served
        self.shards_seen = {**state["shards"], **self.shards_seen}


def resume_order(
    state: dict[str, Any], current: DataOrder, block_size: int, shards_seen: dict[str, dict],
    weights: dict[str, float], blend: str, reason: str = "resume",
) -> tuple[DataOrder, int, list | None]:
    """The order a loader state continues with the mixture ``weights``/``blend``: the saved generations, plus
    a new one at the consumed index when the mixture differs (:meth:`DataOrder.continue_with`). Returns the
    order, the consumed global index and the state's ``into_step`` (micro-batches of an unfinished step).

    The seed, the sequence length and every carried shard (tokens and chunk layout; ``shards_seen``: this
    run's) must be unchanged; a checkpoint written inside an optimizer step cannot change the mixture (the
    ranks' served micro-batches are no prefix of the step, so a new generation would repeat some samples
    and skip others). The one restore of training and of ``midtrain inspect``.
    """
    if not isinstance(state, dict) or state.get("version") not in (2, STATE_VERSION):
        raise MidtrainError(
            "The checkpoint's data-loader state was written by an older midtrain (per-worker streams); "
            "its data order cannot be continued. Start the data order fresh from a new run directory."
        )
    if state["version"] == 2 and any(g.get("blend") == "random" for g in state["generations"]):
        raise MidtrainError(
            "The checkpoint's `blend: random` order was drawn by an older midtrain whose random order this "
            "version no longer reproduces; resume it with that version or start a new run directory."
        )
    if int(state["seed"]) != current.seed:
        raise MidtrainError(
            f"data.seed changed: the checkpoint's data order used seed {state['seed']}, this run {current.seed}. "
            "Keep data.seed to continue the same order."
        )
    if int(state["block_size"]) != block_size:
        raise MidtrainError(
            f"The sequence length changed: the checkpoint read samples of {int(state['block_size']) - 1} tokens, "
            f"this run {block_size - 1}. Keep max_seq_length."
        )
    for sid, old in state["shards"].items():
        new = shards_seen.get(sid)
        if new is not None and new != old:
            raise MidtrainError(
                f"Shard {sid} changed since the checkpoint (tokens {old['tokens']} -> {new['tokens']}, chunk "
                f"layout {old['fingerprint']} -> {new['fingerprint']}); its positions would be "
                "meaningless. Restore the shard or give the new data another shard name."
            )
    consumed = int(state["consumed"])
    into = state.get("into_step")
    generations = [Generation.from_json(g) for g in state["generations"]]
    restored = DataOrder(current.seed, current.samples_per_chunk, generations)
    last = restored.generations[-1]
    if into and (last.weights != dict(weights) or last.blend != blend):
        raise MidtrainError(
            f"The checkpoint was written after {into[0]} micro-batch(es) of an unfinished optimizer step, and this "
            f"run changes the mixture there ({last.weights} -> {dict(weights)}). Resume with the checkpoint's "
            "mixture, or from a checkpoint at a step boundary, and change the mixture there."
        )
    restored.continue_with(consumed, weights, blend, reason)
    return restored, consumed, into
