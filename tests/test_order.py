"""The data order as pure functions: blends, per-source epochs, generations, rank slices."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from midtrain.data.order import (
    RANDOM_BLOCK,
    RANDOM_SEGMENT,
    DataOrder,
    ExactBlend,
    Generation,
    RandomBlend,
    RankSlice,
    SourceOrder,
)
from midtrain.errors import MidtrainError


def prefix_counts(src: np.ndarray, n_sources: int) -> np.ndarray:
    onehot = np.zeros((len(src), n_sources), dtype=np.int64)
    onehot[np.arange(len(src)), src] = 1
    return onehot.cumsum(axis=0)


@pytest.mark.parametrize(
    "weights",
    [
        [0.9, 0.1],
        [0.75, 0.25],
        [0.97, 0.01, 0.02],
        [0.6, 0.3, 0.05, 0.05],
        [0.5, 0.2, 0.1, 0.1, 0.05, 0.05],
        [0.88, 0.02, 0.02, 0.02, 0.02, 0.02, 0.01, 0.01],
        [1 / 3, 1 / 7, 1 - 1 / 3 - 1 / 7],
    ],
)
def test_exact_blend_every_prefix_within_one_sample(weights):
    blend = ExactBlend(weights)
    n = 30_000
    src, before = blend.assign(np.arange(n))
    counts = prefix_counts(src, len(weights))
    target = np.asarray(weights) / sum(weights) * np.arange(1, n + 1)[:, None]
    assert np.abs(counts - target).max() < 1.0
    assert np.array_equal(before, counts[np.arange(n), src] - 1)  # k within the generation
    assert np.array_equal(blend.counts(n), counts[-1])
    assert np.array_equal(blend.counts(12_345), counts[12_344])


def test_exact_blend_irregular_weights_keep_within_one_sample_of_realised_shares():
    weights = [0.123456789, 0.3, 0.576543211]  # no small denominator: counts per 2**20 samples
    blend = ExactBlend(weights)
    src, _ = blend.assign(np.arange(40_000))
    shares = blend.q / blend.period
    assert np.abs(shares - np.asarray(weights)).max() <= 1 / blend.period
    target = shares * np.arange(1, 40_001)[:, None]
    assert np.abs(prefix_counts(src, 3) - target).max() < 1.0


def test_random_blend_within_sampling_error_and_keyed():
    weights = [0.6, 0.25, 0.1, 0.05]
    n = 40_000
    blend = RandomBlend(weights, seed=5, generation=0)
    src, before = blend.assign(np.arange(n))
    shares = np.bincount(src, minlength=4) / n
    sigma = np.sqrt(np.asarray(weights) * (1 - np.asarray(weights)) / n)
    assert np.all(np.abs(shares - weights) < 4 * sigma)
    assert np.array_equal(before, prefix_counts(src, 4)[np.arange(n), src] - 1)
    again, _ = RandomBlend(weights, seed=5, generation=0).assign(np.arange(70_000, 70_100))
    assert np.array_equal(again, blend.assign(np.arange(70_000, 70_100))[0])  # random access = sequential
    other, _ = RandomBlend(weights, seed=5, generation=1).assign(np.arange(n))
    assert not np.array_equal(other, src)


def random_weight_vectors(count: int, seed: int = 2024) -> list[list[int]]:
    """Integer weight vectors of 2-64 sources with heavy-tailed sizes (period = their sum, at most a few
    thousand), plus the vector on which a smooth weighted round-robin strays 1.147 samples."""
    rng = np.random.default_rng(seed)
    vectors = [[1, 334, 115, 410, 1, 1, 5, 52, 3, 81]]
    while len(vectors) < count:
        n = int(rng.integers(2, 65))
        w = np.maximum(1, (rng.pareto(0.8, n) * rng.integers(1, 40)).astype(np.int64))
        if w.sum() <= 6000:
            vectors.append(w.tolist())
    return vectors


@pytest.mark.parametrize("chunk", range(4))
def test_exact_blend_property_every_prefix_within_tijdeman_bound(chunk):
    """Seeded property test: 200 random weight vectors (plus the regression vector), every prefix of the
    infinite sequence (one full period covers them all: the deviation is periodic), within ``1 - 1/(2S-2)``."""
    for weights in random_weight_vectors(204)[chunk::4]:
        blend = ExactBlend(weights)
        w = np.asarray(weights, dtype=np.float64) / sum(weights)
        period = blend.period
        assert period == sum(weights) // np.gcd.reduce(weights)  # exact: integer weights are realised exactly
        src, before = blend.assign(np.arange(period))
        counts = prefix_counts(src, len(weights))
        deviation = np.abs(counts - w * np.arange(1, period + 1)[:, None]).max()
        bound = 1 - 1 / (2 * len(weights) - 2)
        assert deviation <= bound + 1e-9, (weights, deviation, bound)
        assert np.array_equal(counts[-1], blend.q)
        assert np.array_equal(before, counts[np.arange(period), src] - 1)


def test_random_blend_counts_equal_a_brute_force_count():
    weights = [0.5, 0.3, 0.15, 0.05]
    blend = RandomBlend(weights, seed=3, generation=2)
    n = 3 * RANDOM_BLOCK + 1234
    src, before = blend.assign(np.arange(n))
    counts = prefix_counts(src, 4)
    assert np.array_equal(before, counts[np.arange(n), src] - 1)
    for m in [0, 1, 17, RANDOM_BLOCK - 1, RANDOM_BLOCK, RANDOM_BLOCK + 1, 2 * RANDOM_BLOCK + 999, n]:
        assert np.array_equal(blend.counts(m), counts[m - 1] if m else np.zeros(4)), m
    # across a segment boundary: counts and per-index counts agree with a brute-force count of the window
    lo = RANDOM_SEGMENT - 5_000
    window, wbefore = blend.assign(np.arange(lo, lo + 10_000))
    running = blend.counts(lo) + prefix_counts(window, 4)
    assert np.array_equal(blend.counts(lo + 10_000), running[-1])
    assert np.array_equal(wbefore, running[np.arange(10_000), window] - 1)


@pytest.mark.parametrize("n", [10**4, 10**5, 10**6, 10**7, 10**8, 10**9])
def test_random_blend_shares_within_four_sigma(n):
    weights = np.array([0.6, 0.25, 0.1, 0.04, 0.01])
    for seed in range(3):
        counts = RandomBlend(list(weights), seed=seed, generation=0).counts(n)
        assert counts.sum() == n
        sigma = np.sqrt(n * weights * (1 - weights))
        assert np.all(np.abs(counts - n * weights) < 4 * sigma), (n, seed, counts)


LOOKUP_AT = [5, 70_000, RANDOM_SEGMENT + 3, 1_200_000_000 - 1, 7 * RANDOM_SEGMENT + RANDOM_BLOCK * 77 + 5]


def _lookups(blend: RandomBlend) -> list:
    src, before = blend.assign(np.array(LOOKUP_AT))
    return [src.tolist(), before.tolist(), blend.counts(LOOKUP_AT[-1]).tolist()]


@pytest.mark.slow
def test_random_blend_lookups_identical_across_processes_and_cold_or_warm_caches():
    weights = [0.4, 0.3, 0.2, 0.1]
    cold = _lookups(RandomBlend(weights, seed=11, generation=1))
    warm = RandomBlend(weights, seed=11, generation=1)
    warm.assign(np.arange(9 * RANDOM_SEGMENT, 9 * RANDOM_SEGMENT + 100))  # caches far past every lookup
    warm.counts(3 * RANDOM_SEGMENT + 17)
    assert _lookups(warm) == cold
    per_index = [RandomBlend(weights, seed=11, generation=1).assign(np.array([g]))[0][0] for g in LOOKUP_AT]
    assert per_index == cold[0]
    code = (
        "import json, numpy as np; from midtrain.data.order import RandomBlend; "
        f"b = RandomBlend({weights}, seed=11, generation=1); s, k = b.assign(np.array({LOOKUP_AT})); "
        f"print(json.dumps([s.tolist(), k.tolist(), b.counts({LOOKUP_AT[-1]}).tolist()]))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout
    assert json.loads(out) == cold
    assert _lookups(RandomBlend(weights, seed=11, generation=2)) != cold


def test_source_order_serves_every_sample_once_per_epoch_with_chunk_locality():
    per_chunk = (100, 100, 3, 100, 57, 100, 100, 1, 100, 100)
    order = SourceOrder("main/1", per_chunk, seed=1)
    n = sum(per_chunk)
    epoch, ids = order.lookup(np.arange(3 * n))
    for e in range(3):
        part = ids[e * n : (e + 1) * n]
        assert np.array_equal(epoch[e * n : (e + 1) * n], np.full(n, e))
        assert sorted(part.tolist()) == list(range(n))
    assert not np.array_equal(ids[:n], ids[n : 2 * n])  # a new permutation each epoch
    # chunk locality: the first 4 chunks' worth of positions come from at most 4 chunks
    chunk_of = np.repeat(np.arange(len(per_chunk)), per_chunk)
    assert len(set(chunk_of[ids[:150]].tolist())) <= 4
    same = SourceOrder("main/1", per_chunk, seed=1).lookup(np.array([5, 1234, 600, 7]))
    assert np.array_equal(same[1], ids[[5, 1234, 600, 7]])


def test_generations_carry_every_source_position_a_b_a():
    layouts = {"a": (50, 50), "b": (40,), "c": (30,)}
    order = DataOrder(0, layouts, [Generation(0, {"a": 0.5, "b": 0.5})])
    order.add_generation(60, {"c": 1.0}, reason="B")
    order.add_generation(100, {"a": 0.5, "b": 0.5}, reason="A again")
    assert order.generations[1].k == {"a": 30, "b": 30}
    assert order.generations[2].k == {"a": 30, "b": 30, "c": 40}
    served: dict[str, list[int]] = {"a": [], "b": [], "c": []}
    for lo, hi in ((0, 60), (60, 100), (100, 200)):
        gen, src, epoch, ids = order.lookup(np.arange(lo, hi))
        names = list(order.generations[gen].weights)
        for s, e, i in zip(src.tolist(), epoch.tolist(), ids.tolist()):
            served[names[s]].append((e, i))
    assert served["a"] == [(0, i) for i in SourceOrder("a", (50, 50), 0).lookup(np.arange(80))[1].tolist()]
    assert len(set(served["a"])) == 80  # still a's first epoch: nothing repeated across its absence
    assert [e for e, _ in served["b"]] == [0] * 40 + [1] * 40  # b (40 samples) finished epoch 0, then epoch 1
    assert order.k_at(200) == {"a": 80, "b": 80, "c": 40}
    with pytest.raises(MidtrainError, match="generation boundary"):
        order.lookup(np.arange(55, 65))


def test_rank_slices_cover_each_step_once():
    seen = []
    for world, micro in ((1, 8), (2, 2), (4, 1)):
        got = []
        for rank in range(world):
            layout = RankSlice(global_batch=8, world=world, rank=rank, micro_batch=micro)
            got += np.concatenate([layout.indices(16, j) for j in range(3 * layout.micro_batches_per_step)]).tolist()
        seen.append(sorted(got))
    assert seen[0] == seen[1] == seen[2] == list(range(16, 40))
    with pytest.raises(MidtrainError, match="split into 3 rank"):
        RankSlice(global_batch=8, world=3, rank=0, micro_batch=1)


def test_decimal_weights_are_exact_and_too_small_ones_refused():
    blend = ExactBlend([0.123456, 0.3, 0.576544])  # six decimal places: realised exactly
    asked = np.array([123456, 300000, 576544])
    assert np.array_equal(blend.q * 1_000_000, asked * blend.period)
    with pytest.raises(MidtrainError, match="below 1/1048576"):
        ExactBlend([1e-7, 1 - 1e-7])
