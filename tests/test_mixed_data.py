"""ShardedMixedDataset on real litdata shards: shares, cycling, independence, resume, bad input."""

from __future__ import annotations

import json
import shutil
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch

from midtrain.data import ShardedMixedDataset
from midtrain.data.mixture import MixtureSpec, resolve_mixture
from midtrain.data.shards import discover_shards
from midtrain.errors import MidtrainError
from tests.synthetic import write_shard, write_tree

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


@pytest.mark.parametrize(
    "mix",
    [
        {"mix_weights_str": "main:0.6,code:0.3,math:0.1"},
        {"literal_weights_str": "main/1:0.5,q1:0.25,c2:0.25"},
        {"proportional_sampling": True},
    ],
    ids=["weighted", "literal", "proportional"],
)
def test_exact_blend_holds_every_source_within_one_sample(tree, mix):
    dm = make(tree, workers=2, batch=64, **mix)
    ids, _ = draw(dm.train_dataloader(), batches=40)  # 2,560 samples
    n = len(ids)
    for row in dm.mixture.rows:
        # proportional weights are irregular: realised as counts per 2**20 samples
        assert abs(Counter(ids).get(row.shard.id, 0) - row.weight * n) < 1 + n / 2**20, (row.shard.id, row.weight)


def test_random_blend_within_sampling_error(tree):
    dm = make(tree, workers=2, batch=64, mix_weights_str="main:0.6,code:0.3,math:0.1", blend="random")
    ids, _ = draw(dm.train_dataloader(), batches=320)  # 20,480 samples
    counts = Counter(ids)
    assert set(counts) == {r.shard.id for r in dm.mixture.active}
    for row in dm.mixture.active:
        sigma = (row.weight * (1 - row.weight) / len(ids)) ** 0.5
        assert abs(counts.get(row.shard.id, 0) / len(ids) - row.weight) < 4 * sigma, (row.shard.id, row.weight)


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


def sample_ids(loader, batches: int) -> list[tuple[str, int]]:
    """(source ID, first token) of every sample of the next ``batches`` batches (counting shards: unique)."""
    out = []
    for k, batch in enumerate(loader):
        out += [(loader.sources[s].id, t) for s, t in zip(batch["source"].tolist(), batch["input_ids"][:, 0].tolist())]
        if k + 1 == batches:
            break
    return out


def test_batches_are_identical_tensors_at_0_1_3_workers(tree):
    mix = {"mix_weights_str": "main:0.5,code:0.3,math:0.2"}
    runs = []
    for workers in (0, 1, 3):
        loader = make(tree, workers=workers, batch=8, **mix).train_dataloader()
        batches = []
        for k, batch in enumerate(loader):
            batches.append(batch)
            if k == 11:
                break
        runs.append(batches)
    for other in runs[1:]:
        for a, b in zip(runs[0], other):
            assert torch.equal(a["input_ids"], b["input_ids"]) and torch.equal(a["source"], b["source"])


@pytest.mark.parametrize("posix_fast", ["0", "1"])
def test_every_sample_once_per_epoch_on_both_read_paths(tmp_path, monkeypatch, posix_fast):
    """Uneven chunks (1700, 1700, 40 tokens) and more workers than chunks: each epoch serves all 202 samples."""
    monkeypatch.setenv("LITDATA_POSIX_FAST", posix_fast)
    write_shard(tmp_path / "1", 3_440, chunk_tokens=1_700, sequential_from=0)
    write_shard(tmp_path / "c1", 1_000, chunk_tokens=300, sequential_from=10**7)
    loader = make(tmp_path, workers=4, batch=7, literal_weights_str="main/1:0.5,c1:0.5").train_dataloader()
    served = [tok for sid, tok in sample_ids(loader, batches=58) if sid == "main/1"]  # 406 samples, 203 main
    assert len(served) == 203
    epoch1, epoch2 = served[:202], served[202:]
    assert sorted(epoch1) == [17 * i for i in range(202)]  # every sample of the shard once, none skipped
    assert epoch2[0] in epoch1  # the second epoch starts only then


@pytest.mark.parametrize(("before", "after"), [((2, 8), (3, 4)), ((0, 4), (2, 8))])
def test_resume_onto_other_workers_and_micro_batch_is_exact(tree, before, after):
    mix = {"mix_weights_str": "main:0.5,code:0.3,math:0.2"}

    def loader(workers: int, micro: int):
        dm = ShardedMixedDataset(data_path=tree, num_workers=workers, **mix)
        dm.connect(batch_size=micro, max_seq_length=SEQ, with_source=True, global_batch_size=8)
        return dm.train_dataloader()

    reference = loader(*before)
    expected = sample_ids(reference, batches=20 * 8 // before[1])
    first = loader(*before)
    head = sample_ids(first, batches=7 * 8 // before[1])  # 7 steps
    state = json.loads(json.dumps(first.state_dict()))  # what a checkpoint stores
    assert state["consumed"] == 56 and state["into_step"] is None
    resumed = loader(*after)
    resumed.load_state_dict(state)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tail = sample_ids(resumed, batches=13 * 8 // after[1])
    assert head + tail == expected
    import midtrain  # its own directory: torch's warnings in a .venv inside a clone named "midtrain" do not count

    package = Path(midtrain.__file__).resolve().parent
    assert not [w for w in caught if Path(w.filename).resolve().is_relative_to(package)]  # an exact change: no warning


def test_sources_that_leave_and_return_continue_a_b_a(tree):
    def stage(mix: str, state: dict | None):
        loader = make(tree, workers=0, batch=16, mix_weights_str=mix).train_dataloader()
        if state is not None:
            loader.load_state_dict(state)
        return loader

    a = stage("main:0.5,code:0.5", None)
    first = sample_ids(a, batches=20)
    b = stage("math:1", a.state_dict())
    middle = sample_ids(b, batches=5)
    a2 = stage("main:0.5,code:0.5", b.state_dict())
    again = sample_ids(a2, batches=20)
    assert {sid for sid, _ in middle} == {"m1"}
    code_before = [t for sid, t in first if sid == "c1"]
    code_after = [t for sid, t in again if sid == "c1"]
    c1_samples = next(s for s in discover_shards(tree) if s.id == "c1").samples(SEQ + 1)
    assert len(code_before) + len(code_after) <= c1_samples  # still c1's first epoch
    assert set(code_before).isdisjoint(code_after)  # continued where it stopped, no repeat
    generations = a2.state_dict()["generations"]
    assert [g["start"] for g in generations] == [0, 320, 400]
    assert generations[1]["k"] == {"main/1": 80, "main/2": 80, "c1": 80, "c2": 80}  # exact: 320 / 4 each
    assert generations[2]["k"] == {**generations[1]["k"], "m1": 80}


@pytest.mark.parametrize(
    ("change", "message"),
    [("seed", "data.seed changed"), ("seq", "sequence length changed"), ("shard", "Shard c1 changed")],
)
def test_resume_checks_seed_shards_and_sequence_length(tree, change, message):
    first = make(tree, batch=8, mix_weights_str="main:0.5,code:0.5").train_dataloader()
    sample_ids(first, batches=3)
    state = json.loads(json.dumps(first.state_dict()))
    if change == "shard":
        shutil.rmtree(tree / "c1")
        write_shard(tree / "c1", 12_000, chunk_tokens=1_000, sequential_from=0)  # same tokens, other chunks
    dm = ShardedMixedDataset(data_path=tree, num_workers=0, mix_weights_str="main:0.5,code:0.5",
                             seed=7 if change == "seed" else 42)
    dm.connect(batch_size=8, max_seq_length=SEQ * 2 if change == "seq" else SEQ, with_source=True)
    with pytest.raises(MidtrainError, match=message):
        dm.train_dataloader().load_state_dict(state)


def test_stock_loop_rejects_stages_and_needs_a_validation_set(tree):
    dm = ShardedMixedDataset(data_path=tree, mix_weights_str="main:1", num_workers=0,
                             stages=[{"at_step": 5, "mix_weights_str": "code:1"}])
    dm.connect(batch_size=4, max_seq_length=SEQ)
    with pytest.raises(MidtrainError, match="midtrain pretrain"):
        dm.train_dataloader()
    with pytest.raises(MidtrainError, match="needs a validation set"):
        dm.val_dataloader()


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
    assert torch.equal(windows[3]["input_ids"], windows.dataset[windows.indices[3]][:-1])
    plain = next(iter(dm.val_dataloader()))
    assert isinstance(plain, torch.Tensor) and plain.shape == (4, SEQ + 1)


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


def test_shards_of_int32_and_uint16_tokens_train_together(tree):
    from midtrain.prepare.writer import write_token_shard

    write_token_shard(tree / "c3", [torch.arange(30_000, 34_000)], chunk_tokens=1_700, dtype=torch.uint16)
    dm = make(tree, workers=0, batch=16, literal_weights_str="main/1:0.5,c3:0.5")
    seen, loader = Counter(), dm.train_dataloader()
    for k, batch in enumerate(loader):
        assert batch["input_ids"].dtype == torch.int32  # one dtype for every batch
        for s, row in zip(batch["source"].tolist(), batch["input_ids"]):
            sid = loader.sources[s].id
            seen[sid] += 1
            low, high = (30_000, 34_000) if sid == "c3" else (10_000_000, 10_040_000)  # counting tokens per shard
            assert torch.equal(row - row[0], torch.arange(SEQ + 1, dtype=torch.int32)) and low <= row[0] < high
        if k == 3:
            break
    assert seen == {"main/1": 32, "c3": 32}


def test_resume_after_a_type_rename_reads_the_same_samples(tmp_path):
    root = write_tree(tmp_path / "d", {"1": 8_000, "c1": 6_000, "pm1": 6_000}, chunk_tokens=1_700, sequential=True)
    mix = {"literal_weights_str": "main/1:0.5,pm1:0.3,c1:0.2"}

    def loader(type_name: str):
        dm = ShardedMixedDataset(data_path=root, num_workers=0, shard_types={type_name: "pm"}, **mix)
        dm.connect(batch_size=8, max_seq_length=SEQ, with_source=True)
        return dm.train_dataloader()

    assert [s.id for s in loader("aaa").sources] != [s.id for s in loader("zzz").sources]  # other positions
    expected = sample_ids(loader("aaa"), batches=12)
    first = loader("aaa")
    head = sample_ids(first, batches=5)
    resumed = loader("zzz")
    resumed.load_state_dict(json.loads(json.dumps(first.state_dict())))
    assert head + sample_ids(resumed, batches=7) == expected


def test_old_random_order_checkpoint_is_refused_exact_one_continues(tree):
    for blend in ("random", "exact"):
        first = make(tree, batch=8, mix_weights_str="main:0.5,code:0.5", blend=blend).train_dataloader()
        expected = sample_ids(first, batches=6)
        state = {**json.loads(json.dumps(first.state_dict())), "version": 2, "consumed": 24}
        resumed = make(tree, batch=8, mix_weights_str="main:0.5,code:0.5", blend=blend).train_dataloader()
        if blend == "random":
            with pytest.raises(MidtrainError, match="older midtrain whose random order"):
                resumed.load_state_dict(state)
        else:
            resumed.load_state_dict(state)
            assert sample_ids(resumed, batches=3) == expected[24:]
