"""ShardedMixedDataset on real litdata shards: shares, cycling, independence, resume, bad input."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from midtrain.data import ShardedMixedDataset
from midtrain.data.mixture import MixtureSpec, resolve_mixture
from midtrain.data.shards import discover_shards
from midtrain.data.synthetic import write_shard, write_tree
from midtrain.errors import MidtrainError

SEQ = 16  # max_seq_length; samples are SEQ + 1 tokens


def make(tree: Path, workers: int = 0, batch: int = 64, **mix) -> ShardedMixedDataset:
    dm = ShardedMixedDataset(data_path=tree, num_workers=workers, **mix)
    dm.connect(batch_size=batch, max_seq_length=SEQ, with_source=True)
    return dm


def draw(loader, batches: int) -> tuple[list[str], list[int]]:
    """Source IDs and first tokens of the next ``batches`` batches."""
    ids, firsts = [], []
    for k, batch in enumerate(loader):
        ids += [loader.sources[i].id for i in batch["source"].tolist()]
        firsts += batch["input_ids"][:, 0].tolist()
        if k + 1 == batches:
            break
    return ids, firsts


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize(
    "mix",
    [
        {"mix_weights_str": "main:0.6,code:0.3,math:0.1"},
        {"literal_weights_str": "main/1:0.5,q1:0.25,c2:0.25"},
        {"proportional_sampling": True},
    ],
    ids=["weighted", "literal", "proportional"],
)
def test_realised_shares_match_weights(tree, workers, mix):
    dm = make(tree, workers=workers, **mix)
    ids, _ = draw(dm.train_dataloader(), batches=320)  # 20,480 samples
    counts = Counter(ids)
    assert len(ids) >= 20_000
    for row in dm.mixture.rows:
        assert abs(counts.get(row.shard.id, 0) / len(ids) - row.weight) <= 0.01, (row.shard.id, row.weight)


def test_proportional_is_by_tokens_not_chunks(tmp_path):
    # Big shard in 2 big chunks, small shard in 20 small chunks: chunk counts would invert the shares.
    write_shard(tmp_path / "1", 90_000, chunk_tokens=45_000, sequential_from=0)
    write_shard(tmp_path / "c1", 10_000, chunk_tokens=500, sequential_from=10**7)
    mixture = resolve_mixture(MixtureSpec(proportional_sampling=True), discover_shards(tmp_path))
    assert mixture.weights_by_id() == pytest.approx({"main/1": 0.9, "c1": 0.1})
    dm = make(tmp_path, proportional_sampling=True)
    ids, _ = draw(dm.train_dataloader(), batches=320)
    assert Counter(ids)["main/1"] / len(ids) == pytest.approx(0.9, abs=0.01)


def test_weighted_divides_equally_or_by_tokens(tree):
    shards = discover_shards(tree)
    equal = resolve_mixture(MixtureSpec(mix_weights_str="main:0.6,code:0.4"), shards).weights_by_id()
    assert equal == pytest.approx({"main/1": 0.3, "main/2": 0.3, "c1": 0.2, "c2": 0.2})
    by_tokens = resolve_mixture(MixtureSpec(mix_weights_str="main:0.6,code:0.4", divide_by_tokens=True), shards)
    assert by_tokens.weights_by_id() == pytest.approx({"main/1": 0.4, "main/2": 0.2, "c1": 0.8 / 3, "c2": 0.4 / 3})


def test_workers_draw_different_source_sequences(tree):
    dm = make(tree, workers=2, batch=32, mix_weights_str="main:0.5,code:0.5")
    by_worker: dict[int, list] = {0: [], 1: []}
    for k, batch in enumerate(dm.train_dataloader()):
        by_worker[k % 2].append(batch["source"].tolist())  # in-order loader: batch k comes from worker k % 2
        if k == 7:
            break
    assert by_worker[0] != by_worker[1]


def test_each_source_cycles_on_its_own(tree):
    """A tiny source at high weight restarts many times; the large one serves every sample once first.

    litdata splits a shard's samples between the loader workers; each worker's part must be served
    completely, without repeats, before that worker starts the shard's second epoch.
    """
    dm = make(tree, workers=2, batch=32, literal_weights_str="main/1:0.1,q1:0.9")
    big_samples = next(s for s in dm.shards if s.id == "main/1").samples(SEQ + 1)
    seen: dict[int, list[int]] = {0: [], 1: []}
    loader = dm.train_dataloader()
    for k, batch in enumerate(loader):
        for src, first in zip(batch["source"].tolist(), batch["input_ids"][:, 0].tolist()):
            if loader.sources[src].id == "main/1":
                seen[k % 2].append(first)
        if all(w["sources"]["main/1"]["epoch"] >= 2 for w in loader.worker_states.values()):
            break
    first_epoch = {}
    for w, state in loader.worker_states.items():
        assert state["sources"]["main/1"]["epoch"] == 2
        served = len(seen[w]) - state["sources"]["main/1"]["consumed"]
        first_epoch[w] = seen[w][:served]
        assert len(set(first_epoch[w])) == served  # no repeat inside the worker's epoch
        assert state["sources"]["q1"]["epoch"] > 20  # the small source restarted many times meanwhile
    assert set(first_epoch[0]).isdisjoint(first_epoch[1])
    assert len(first_epoch[0]) + len(first_epoch[1]) >= big_samples - 1  # the whole shard (drop_last: <= 1 left)


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_continues_the_stream_exactly(tree, workers):
    mix = {"mix_weights_str": "main:0.5,code:0.3,math:0.2"}
    reference = make(tree, workers=workers, batch=8, **mix).train_dataloader()
    _, expected = draw(reference, batches=60)

    first = make(tree, workers=workers, batch=8, **mix).train_dataloader()
    _, head = draw(first, batches=25)
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    resumed = make(tree, workers=workers, batch=8, **mix).train_dataloader()
    resumed.load_state_dict(state)
    _, tail = draw(resumed, batches=35)
    assert head + tail == expected


def test_mixture_change_keeps_positions_of_carried_shards(tree):
    before = make(tree, workers=2, batch=16, mix_weights_str="main:0.8,code:0.2").train_dataloader()
    ids_a, firsts_a = draw(before, batches=40)
    state = before.state_dict()
    after = make(tree, workers=2, batch=16, mix_weights_str="main:0.7,math:0.3").train_dataloader()
    after.load_state_dict(state)
    ids_b, firsts_b = draw(after, batches=40)
    assert set(ids_b) == {"main/1", "main/2", "m1"}  # code dropped, math new
    main_a = {f for i, f in zip(ids_a, firsts_a) if i.startswith("main")}
    main_b = [f for i, f in zip(ids_b, firsts_b) if i.startswith("main")]
    assert main_a.isdisjoint(main_b)  # no main sample served again after the switch
    assert after.stream.generation == 1


def test_stock_litgpt_batches_are_plain_tensors(tree):
    dm = ShardedMixedDataset(data_path=tree, mix_weights_str="main:1", num_workers=0)
    dm.connect(batch_size=4, max_seq_length=SEQ)
    batch = next(iter(dm.train_dataloader()))
    assert isinstance(batch, torch.Tensor) and batch.shape == (4, SEQ + 1)


def test_validation_windows_are_fixed_and_split_by_rank(tree):
    dm = ShardedMixedDataset(data_path=tree, mix_weights_str="main:1", val_data_path={"m": str(tree / "m1")},
                             num_workers=0)
    dm.connect(batch_size=4, max_seq_length=SEQ)
    windows = dm.val_dataloaders(max_samples=10)["m"].dataset
    assert len(windows) == 10 and windows.total_windows == 10
    assert torch.equal(windows[0], windows.dataset[0])


# ---- bad input: one clear error at construction, nothing skipped --------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"literal_weights_str": "main/1:0.5,c9:0.5"}, "shard 'c9' does not exist"),
        ({"literal_weights_str": "main:0.8,code:0.2"}, "literal mode takes shard IDs"),
        ({"mix_weights_str": "main:0.8,books:0.2"}, "no books shards exist"),
        ({"mix_weights_str": "main:0.8,cooking:0.2"}, "unknown type 'cooking'"),
        ({"mix_weights_str": "main:0.8,code:-0.2"}, "must be finite and >= 0"),
        ({"mix_weights_str": "main:0,code:0"}, "all weights are zero"),
        ({"mix_weights_str": "main:1", "proportional_sampling": True}, "exactly one mixture mode"),
        ({"mix_weights_str": "main=0.8;code=0.2"}, "malformed entry"),
        ({"mix_weights_str": "main:abc"}, "is not a number"),
        ({}, "No mixture given"),
        ({"mix_weights_str": "main:1", "val_data_path": "/nonexistent/val"}, "does not exist"),
        ({"mix_weights_str": "main:1", "stages": [{"at_step": 0, "mix_weights_str": "main:1"}]}, "increasing"),
        ({"mix_config_path": "/nonexistent/mix.json"}, "does not exist"),
    ],
)
def test_bad_mixture_input_fails_clearly(tree, kwargs, message):
    with pytest.raises(MidtrainError, match=message):
        ShardedMixedDataset(data_path=tree, **kwargs)


def test_missing_and_empty_data_path(tmp_path):
    with pytest.raises(MidtrainError, match="does not exist"):
        ShardedMixedDataset(data_path=tmp_path / "nope", mix_weights_str="main:1")
    (tmp_path / "empty" / "val").mkdir(parents=True)
    with pytest.raises(MidtrainError, match="No shards under"):
        ShardedMixedDataset(data_path=tmp_path / "empty", mix_weights_str="main:1")
    with pytest.raises(MidtrainError, match="data_path is not set"):
        ShardedMixedDataset(mix_weights_str="main:1")


def test_corrupt_or_missing_index(tree):
    (tree / "c1" / "index.json").write_text("{not json")
    with pytest.raises(MidtrainError, match="Corrupt index.json"):
        ShardedMixedDataset(data_path=tree, mix_weights_str="main:1")
    (tree / "c1" / "index.json").unlink()
    with pytest.raises(MidtrainError, match="has no index.json"):
        ShardedMixedDataset(data_path=tree, mix_weights_str="main:1")


def test_shard_too_small_for_sequence_length(tmp_path):
    write_tree(tmp_path, {"1": 5_000, "m1": 500}, chunk_tokens=20)
    dm = ShardedMixedDataset(data_path=tmp_path, mix_weights_str="main:0.5,math:0.5")
    with pytest.raises(MidtrainError, match="cannot serve a single sequence of 33 tokens"):
        dm.connect(batch_size=2, max_seq_length=32)


def test_user_shard_types_and_longest_prefix(tmp_path):
    write_tree(tmp_path, {"1": 2_000, "p1": 2_000, "pm1": 2_000, "pm2": 2_000})
    shards = discover_shards(tmp_path, {"pubmed": "pm"})
    assert {s.id: s.type for s in shards} == {"main/1": "main", "p1": "papers", "pm1": "pubmed", "pm2": "pubmed"}
    mixture = resolve_mixture(MixtureSpec(mix_weights_str={"main": 0.5, "pubmed": 0.5}), shards, {"pubmed": "pm"})
    assert mixture.weights_by_id() == pytest.approx({"main/1": 0.5, "pm1": 0.25, "pm2": 0.25})


def test_mix_config_file_yaml_and_json(tree, tmp_path):
    (tmp_path / "mix.yaml").write_text("literal_weights_str: {main/1: 0.5, q2: 0.5}\n")
    (tmp_path / "mix.json").write_text(json.dumps({"mix_weights_str": "main:0.9,qa:0.1"}))
    dm = ShardedMixedDataset(data_path=tree, mix_config_path=str(tmp_path / "mix.yaml"))
    assert dm.mixture.weights_by_id() == pytest.approx({"main/1": 0.5, "q2": 0.5})
    dm = ShardedMixedDataset(data_path=tree, mix_config_path=str(tmp_path / "mix.json"))
    assert dm.mixture.weights_by_type() == pytest.approx({"main": 0.9, "qa": 0.1})
    (tmp_path / "bad.json").write_text(json.dumps({"mix_weights": "main:1"}))
    with pytest.raises(MidtrainError, match="unknown field"):
        ShardedMixedDataset(data_path=tree, mix_config_path=str(tmp_path / "bad.json"))


@pytest.mark.parametrize("skip", [0, 1, 99, 100, 101, 250, 351])
def test_fast_forward_equals_reading(tree, skip):
    """Skipping whole chunks by litdata's interval bookkeeping lands exactly where reading would."""
    from litdata import StreamingDataset, TokensLoader

    from midtrain.data.mixed_stream import _fast_forward

    def fresh():
        ds = StreamingDataset(str(tree / "1"), item_loader=TokensLoader(block_size=SEQ + 1), shuffle=True, seed=3)
        ds.set_epoch(2)
        iter(ds)
        return ds

    read = fresh()
    for _ in range(skip):
        next(read)
    jumped = fresh()
    _fast_forward(jumped, skip)
    assert [next(read)[0].item() for _ in range(5)] == [next(jumped)[0].item() for _ in range(5)]
