"""The data order: which sample a run consumes at global index ``g``, as a pure function of ``g``.

* **Global index.** Sample ``g = step * G + position`` in that step's global batch of ``G``. Rank
  ``r`` of ``R`` takes positions ``[r*G/R, (r+1)*G/R)`` of each step, as consecutive micro-batches
  (:class:`RankSlice`). Nothing here depends on ranks, loader workers or prefetching.
* **Generations.** A generation is a run of indices under one mixture, from ``start`` on. Within
  it, the source of ``g`` depends only on the weights and ``g - start``:
  ``blend: exact`` (default) interleaves the sources so that every prefix of the generation is
  within ``1 - 1/(2S-2)`` samples of the realised shares ``q / P`` (:func:`integer_shares`: the asked
  weights themselves when they are fractions with a denominator up to ``2**20``) (:class:`ExactBlend`);
  ``blend: random`` draws sources i.i.d., keyed by ``(seed, generation)``, with counts before any index
  from a tree of keyed splits (:class:`RandomBlend`).
* **Per-source order.** Counting over the whole run, the ``k``-th sample a source serves is
  ``perm_e[k mod n]`` of its epoch ``e = k div n`` (:class:`SourceOrder`); a source that leaves the
  mixture and comes back continues at its ``k`` (each generation records every source's ``k`` at
  its start).

Everything is computed vectorised per block of indices with numpy and cached.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from functools import lru_cache
from heapq import heappop, heappush

import numpy as np

from midtrain.errors import MidtrainError

BLENDS = ("exact", "random")
MAX_PERIOD = 1 << 20
"""Exact blend: weights are realised as integer counts per period of at most this many samples."""
CHUNK_WINDOW = 4
"""Per-source order: samples are shuffled within windows of this many (shuffled) chunks."""
RANDOM_BLOCK = 1 << 16
"""Random blend: a block of this many indices is one leaf of the count tree (its sequence drawn at once)."""
RANDOM_SEGMENT = 1 << 29
"""Random blend: independent segments of this many indices, each a binary tree of blocks (numpy's
hypergeometric draws need populations below 10**9)."""
RANDOM_LEVELS = (RANDOM_SEGMENT // RANDOM_BLOCK).bit_length() - 1


def _key(*parts: object) -> list[int]:
    """A numpy seed sequence entropy from strings and ints (stable across processes and machines)."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]


def layout_fingerprint(chunk_dims: tuple[int, ...] | list[int]) -> str:
    """Fingerprint of a shard's chunk layout (token count of every chunk, in order)."""
    return hashlib.sha256(",".join(map(str, chunk_dims)).encode()).hexdigest()[:16]


# ---- blends ----------------------------------------------------------------------------------


def integer_shares(weights: list[float]) -> tuple[np.ndarray, int]:
    """Weights as integer counts ``q`` per period ``P``.

    ``q / P`` equals the normalised weights when they are fractions with a common denominator up to
    :data:`MAX_PERIOD` (0.8, 1/3, decimals of up to 6 places); otherwise ``P = MAX_PERIOD`` and ``q`` are the
    nearest counts (largest remainders), each share off by at most ``1 / P``, so a prefix of ``t`` samples is
    within ``1 + t * |q/P - w|`` of the asked share. A weight below ``1 / MAX_PERIOD`` is an error.
    """
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w <= 0):
        raise MidtrainError(f"Blend weights must be finite and > 0, got {weights}.")
    w = w / w.sum()
    if w.min() < 1 / MAX_PERIOD:
        raise MidtrainError(
            f"blend: exact realises weights as counts per {MAX_PERIOD} samples; a normalised weight of "
            f"{w.min():.3g} is below 1/{MAX_PERIOD}. Raise it or use blend: random."
        )
    fracs = [Fraction(float(x)).limit_denominator(1_000_000) for x in w]
    period = math.lcm(*(f.denominator for f in fracs))
    if sum(fracs) == 1 and period <= MAX_PERIOD and all(abs(float(f) - x) < 1e-12 for f, x in zip(fracs, w)):
        return np.array([int(f * period) for f in fracs], dtype=np.int64), period
    period = MAX_PERIOD
    raw = w * period
    q = np.maximum(np.floor(raw).astype(np.int64), 1)
    rest = period - int(q.sum())
    order = np.argsort(-(raw - np.floor(raw)), kind="stable")
    while rest != 0:  # largest remainders first (or take back from the largest counts)
        for i in order if rest > 0 else np.argsort(-q, kind="stable"):
            if rest == 0:
                break
            if rest > 0:
                q[i] += 1
                rest -= 1
            elif q[i] > 1:
                q[i] -= 1
                rest += 1
    return q, period


@lru_cache(maxsize=16)
def _exact_period(q: tuple[int, ...]) -> np.ndarray:
    """One period of the exact interleave for integer shares ``q`` (Tijdeman's earliest-deadline rule).

    Slot ``t`` (1-based) may serve source ``s``'s next sample (its ``c``-th) once ``t >= (c + d) / w``
    and should serve it by ``(c + 1 - d) / w``, with ``d = 1 / (2S - 2)``; among released sources the
    earliest deadline goes first. Every prefix then holds each source within ``1 - d`` samples of
    ``w * t`` (Tijdeman 1980, the chairman assignment problem), and after ``P`` slots exactly ``q``.
    """
    n_src, period = len(q), sum(q)
    dtype = np.uint8 if n_src <= 256 else np.int32  # the period travels to every loader worker: keep it small
    if n_src == 1:
        return np.zeros(period, dtype=dtype)
    k = 2 * n_src - 2  # d = 1 / k; all thresholds scaled by k * q_s to stay in integers
    out = np.empty(period, dtype=dtype)
    count = [0] * n_src
    pending: list[tuple[int, int]] = []  # (release slot, source)
    ready: list[tuple[float, int]] = []  # (deadline, source)
    for s in range(n_src):
        heappush(pending, (-(-period // (k * q[s])), s))  # ceil(P * 1 / (k q_s))
    for t in range(1, period + 1):
        while pending and pending[0][0] <= t:
            _, s = heappop(pending)
            heappush(ready, (period * ((count[s] + 1) * k - 1) / (q[s] * k), s))
        _, s = heappop(ready)
        out[t - 1] = s
        count[s] += 1
        if count[s] < q[s]:
            heappush(pending, (-(-period * (count[s] * k + 1) // (k * q[s])), s))
    return out


class ExactBlend:
    """Every prefix of the generation holds each source within ``1 - 1/(2S-2)`` samples of its realised share
    (see :func:`integer_shares` for how close that is to the asked weights)."""

    def __init__(self, weights: list[float]) -> None:
        self.q, self.period = integer_shares(weights)
        self.sequence = _exact_period(tuple(int(x) for x in self.q))
        self.rank = np.empty(self.period, dtype=np.int32)  # occurrences of sequence[i] in sequence[:i]
        for s in range(len(self.q)):
            where = np.flatnonzero(self.sequence == s)
            self.rank[where] = np.arange(len(where))

    def assign(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Source of each relative index ``n`` and how many samples that source served before it."""
        cycle, p = np.divmod(n, self.period)
        src = self.sequence[p].astype(np.int64)
        return src, cycle * self.q[src] + self.rank[p].astype(np.int64)

    def counts(self, n: int) -> np.ndarray:
        """Samples per source among relative indices ``[0, n)``."""
        cycle, p = divmod(int(n), self.period)
        return cycle * self.q + np.bincount(self.sequence[:p], minlength=len(self.q))


class RandomBlend:
    """Sources drawn i.i.d. with the weights, keyed by ``(seed, generation)``; counts before any index in
    a time that does not grow with it.

    Indices fall into independent segments of :data:`RANDOM_SEGMENT` (each one's counts a keyed
    multinomial); a segment is a binary tree down to blocks of :data:`RANDOM_BLOCK`, each node's counts
    split between its halves by a keyed multivariate hypergeometric draw keyed by
    ``(seed, generation, segment, level, node)``, and a block's own sequence is a keyed permutation of
    its labels given its counts. This is exactly the law of i.i.d. draws; the counts before ``n`` are a
    running sum over the segments before it (cached, one multinomial per 2**29 indices) plus one
    root-to-leaf path.
    """

    def __init__(self, weights: list[float], seed: int, generation: int) -> None:
        w = np.asarray(weights, dtype=np.float64)
        if w.ndim != 1 or not len(w) or not np.all(np.isfinite(w)) or np.any(w <= 0):
            raise MidtrainError(f"Blend weights must be finite and > 0, got {weights}.")
        self.p = w / w.sum()
        self.key = (seed, generation)
        self._segment_sum = (0, np.zeros(len(w), dtype=np.int64))  # (j, counts before segment j), a running sum
        self._blocks: OrderedDict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = OrderedDict()

    def _segment(self, j: int) -> np.ndarray:
        return np.random.default_rng(_key("segment", *self.key, j)).multinomial(RANDOM_SEGMENT, self.p).astype(np.int64)

    def _before_segment(self, j: int) -> np.ndarray:
        at, total = self._segment_sum
        if at > j:
            at, total = 0, np.zeros_like(total)
        for i in range(at, j):
            total = total + self._segment(i)
        self._segment_sum = (j, total)
        return total

    def _block(self, b: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Block ``b``: its sources, each one's count before it within the block, and the counts before the block."""
        if b not in self._blocks:
            j, leaf = divmod(b, RANDOM_SEGMENT // RANDOM_BLOCK)
            before = self._before_segment(j).copy()
            counts, size, node = self._segment(j), RANDOM_SEGMENT, 0
            for level in range(RANDOM_LEVELS):
                half = size // 2
                rng = np.random.default_rng(_key("split", *self.key, j, level, node))
                left = rng.multivariate_hypergeometric(counts, half, method="marginals").astype(np.int64)
                go_right = (leaf >> (RANDOM_LEVELS - 1 - level)) & 1
                if go_right:
                    before += left
                    counts = counts - left
                else:
                    counts = left
                size, node = half, 2 * node + go_right
            labels = np.repeat(np.arange(len(self.p), dtype=np.int64), counts)
            src = np.random.default_rng(_key("block", *self.key, b)).permutation(labels)
            first = np.concatenate([[0], np.cumsum(counts)[:-1]])
            order = np.argsort(src, kind="stable")
            rank = np.empty(RANDOM_BLOCK, dtype=np.int64)
            rank[order] = np.arange(RANDOM_BLOCK) - first[src[order]]
            self._blocks[b] = (src, rank, before)
            if len(self._blocks) > 8:
                self._blocks.popitem(last=False)
        return self._blocks[b]

    def assign(self, n: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        src = np.empty(len(n), dtype=np.int64)
        before = np.empty(len(n), dtype=np.int64)
        blocks, offsets = np.divmod(n, RANDOM_BLOCK)
        for b in np.unique(blocks).tolist():
            sel = blocks == b
            bsrc, brank, bstart = self._block(b)
            src[sel] = bsrc[offsets[sel]]
            before[sel] = bstart[src[sel]] + brank[offsets[sel]]
        return src, before

    def counts(self, n: int) -> np.ndarray:
        b, p = divmod(int(n), RANDOM_BLOCK)
        bsrc, _, bstart = self._block(b)
        return bstart + np.bincount(bsrc[:p], minlength=len(self.p))


# ---- per-source order --------------------------------------------------------------------------


class SourceOrder:
    """Epoch permutations of one source's samples, with chunk locality.

    Epoch ``e`` shuffles the chunk order, cuts it into windows of :data:`CHUNK_WINDOW` chunks and
    shuffles the samples inside each window; sample ids are litdata's (chunk by chunk, in index order).
    """

    def __init__(self, source_id: str, samples_per_chunk: tuple[int, ...], seed: int) -> None:
        self.id = source_id
        self.per_chunk = np.asarray(samples_per_chunk, dtype=np.int64)
        self.first = np.concatenate([[0], np.cumsum(self.per_chunk)[:-1]])
        self.samples = int(self.per_chunk.sum())
        if self.samples == 0:
            raise MidtrainError(f"Source {source_id} has no samples of this sequence length.")
        self.seed = seed
        self._epochs: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._windows: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()

    def _epoch(self, e: int) -> tuple[np.ndarray, np.ndarray]:
        """Chunk order of epoch ``e`` and the first position of each window."""
        if e not in self._epochs:
            chunks = np.random.default_rng(_key("chunks", self.seed, self.id, e)).permutation(len(self.per_chunk))
            sizes = np.add.reduceat(self.per_chunk[chunks], np.arange(0, len(chunks), CHUNK_WINDOW))
            self._epochs[e] = (chunks, np.concatenate([[0], np.cumsum(sizes)[:-1]]))
            if len(self._epochs) > 4:
                self._epochs.popitem(last=False)
        return self._epochs[e]

    def _window(self, e: int, w: int) -> np.ndarray:
        """Sample ids of window ``w`` of epoch ``e``, in serving order."""
        if (e, w) not in self._windows:
            chunks = self._epoch(e)[0][w * CHUNK_WINDOW : (w + 1) * CHUNK_WINDOW]
            ids = np.concatenate([np.arange(self.first[c], self.first[c] + self.per_chunk[c]) for c in chunks])
            self._windows[(e, w)] = np.random.default_rng(_key("window", self.seed, self.id, e, w)).permutation(ids)
            if len(self._windows) > 16:
                self._windows.popitem(last=False)
        return self._windows[(e, w)]

    def chunk_of(self, ids: np.ndarray) -> np.ndarray:
        """The chunk holding each sample id."""
        return np.searchsorted(self.first, ids, side="right") - 1

    def lookup(self, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Epoch and sample id of the ``k``-th samples this source serves (``k`` counted over the whole run)."""
        epoch, pos = np.divmod(np.asarray(k, dtype=np.int64), self.samples)
        ids = np.empty(len(pos), dtype=np.int64)
        for e in np.unique(epoch).tolist():
            sel = np.flatnonzero(epoch == e)
            starts = self._epoch(e)[1]
            win = np.searchsorted(starts, pos[sel], side="right") - 1
            for w in np.unique(win).tolist():
                hit = sel[win == w]
                ids[hit] = self._window(e, w)[pos[hit] - starts[w]]
        return epoch, ids


# ---- the order of a run --------------------------------------------------------------------------


@dataclass
class Generation:
    """Indices from ``start`` on under one mixture; ``k`` = every known source's count at ``start``."""

    start: int
    weights: dict[str, float]
    blend: str = "exact"
    k: dict[str, int] = field(default_factory=dict)
    reason: str = "start"

    def to_json(self) -> dict:
        return {"start": self.start, "weights": self.weights, "blend": self.blend, "k": self.k, "reason": self.reason}

    @classmethod
    def from_json(cls, raw: dict) -> Generation:
        return cls(int(raw["start"]), {str(s): float(w) for s, w in raw["weights"].items()}, str(raw["blend"]),
                   {str(s): int(v) for s, v in raw["k"].items()}, str(raw.get("reason", "")))


class DataOrder:
    """Generations plus per-source orders: ``lookup(g)`` says source, epoch and sample id of indices ``g``."""

    def __init__(self, seed: int, samples_per_chunk: dict[str, tuple[int, ...]], generations: list[Generation]):
        self.seed = int(seed)
        self.samples_per_chunk = dict(samples_per_chunk)
        self.generations: list[Generation] = []
        self._blends: dict[int, ExactBlend | RandomBlend] = {}
        self._orders: dict[str, SourceOrder] = {}
        for gen in generations:
            self._append(gen)

    def _append(self, gen: Generation) -> None:
        if gen.blend not in BLENDS:
            raise MidtrainError(f"data.blend must be one of {BLENDS}, got {gen.blend!r}.")
        if self.generations and gen.start < self.generations[-1].start:
            raise MidtrainError(f"Generation starts must increase: {gen.start} after {self.generations[-1].start}.")
        if self.generations and self.generations[-1].start == gen.start:
            self.generations.pop()  # replaced before it served anything
            self._blends.pop(len(self.generations), None)
        self.generations.append(gen)

    def add_generation(self, start: int, weights: dict[str, float], blend: str = "exact", reason: str = "") -> None:
        """A new mixture from index ``start`` on; every source keeps its count ``k``."""
        k = self.k_at(start) if self.generations else {}
        self._append(Generation(int(start), dict(weights), blend, k, reason))

    def continue_with(self, start: int, weights: dict[str, float], blend: str = "exact", reason: str = "") -> bool:
        """The mixture in force from index ``start`` on: a new generation only when it differs from the newest
        (weights or blend), so an unchanged stage or resume continues the same interleave. True if one was added.
        The one rule of training (resumes, stage switches) and of ``midtrain inspect``."""
        if self.generations:
            last = self.generations[-1]
            if last.weights == dict(weights) and last.blend == blend:
                return False
        self.add_generation(start, weights, blend, reason)
        return True

    def blend(self, i: int) -> ExactBlend | RandomBlend:
        if i not in self._blends:
            gen = self.generations[i]
            weights = list(gen.weights.values())
            self._blends[i] = ExactBlend(weights) if gen.blend == "exact" else RandomBlend(weights, self.seed, i)
        return self._blends[i]

    def source(self, source_id: str) -> SourceOrder:
        if source_id not in self._orders:
            if source_id not in self.samples_per_chunk:
                raise MidtrainError(f"Source {source_id} is in the data order but not among the shards found.")
            self._orders[source_id] = SourceOrder(source_id, self.samples_per_chunk[source_id], self.seed)
        return self._orders[source_id]

    def generation_at(self, g: int) -> int:
        starts = [gen.start for gen in self.generations]
        i = int(np.searchsorted(starts, g, side="right")) - 1
        if i < 0:
            raise MidtrainError(f"Index {g} precedes the first generation (start {starts[0]}).")
        return i

    def k_at(self, g: int) -> dict[str, int]:
        """Every known source's count of served samples before index ``g``."""
        i = self.generation_at(g)
        gen = self.generations[i]
        k = {s: int(v) for s, v in gen.k.items()}
        for s, n in zip(gen.weights, self.blend(i).counts(g - gen.start).tolist()):
            k[s] = k.get(s, 0) + int(n)
        return k

    def lookup(self, g: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
        """For indices ``g`` inside one generation: that generation, and per index the source (position in its
        weights), the source's epoch and the sample id inside the source."""
        g = np.asarray(g, dtype=np.int64)
        i = self.generation_at(int(g.min()))
        if i + 1 < len(self.generations) and g.max() >= self.generations[i + 1].start:
            raise MidtrainError("A block of indices must not cross a generation boundary.")
        gen = self.generations[i]
        src, before = self.blend(i).assign(g - gen.start)
        epoch = np.empty(len(g), dtype=np.int64)
        ids = np.empty(len(g), dtype=np.int64)
        for s, sid in enumerate(gen.weights):
            sel = np.flatnonzero(src == s)
            if len(sel):
                epoch[sel], ids[sel] = self.source(sid).lookup(gen.k.get(sid, 0) + before[sel])
        return i, src, epoch, ids


@dataclass(frozen=True)
class RankSlice:
    """Which global indices rank ``rank`` of ``world`` reads: its share of each step, in micro-batches."""

    global_batch: int
    world: int
    rank: int
    micro_batch: int

    def __post_init__(self) -> None:
        per_rank, rem = divmod(self.global_batch, self.world)
        if rem or per_rank % self.micro_batch or not 0 <= self.rank < self.world:
            raise MidtrainError(
                f"A global batch of {self.global_batch} sequences must split into {self.world} rank(s) x whole "
                f"micro-batches of {self.micro_batch}."
            )

    @property
    def micro_batches_per_step(self) -> int:
        return self.global_batch // (self.world * self.micro_batch)

    def indices(self, start: int, j: int | np.ndarray) -> np.ndarray:
        """Global indices of this rank's micro-batch ``j`` (or one row per entry of an array ``j``), counted from
        global index ``start`` (a step boundary)."""
        step, m = np.divmod(np.asarray(j, dtype=np.int64), self.micro_batches_per_step)
        first = start + step * self.global_batch + self.rank * (self.global_batch // self.world) + m * self.micro_batch
        return first[..., None] + np.arange(self.micro_batch, dtype=np.int64)


@dataclass
class RunOrder:
    """A run's data order from optimizer step ``step`` on, whose first sample is global index ``index``: a fresh
    run has ``index = step * global_batch``; a resume continues at the checkpoint's consumed index whatever the
    global batch was before. Later steps advance by ``global_batch`` each."""

    order: DataOrder
    step: int
    index: int
    global_batch: int

    def index_of(self, step: int) -> int:
        """Global index of the first sample of (0-based) optimizer step ``step``."""
        if step < self.step:
            raise MidtrainError(f"Step {step + 1} was trained before step {self.step + 1}, where this order begins.")
        return self.index + (step - self.step) * self.global_batch
