"""Provenance from the data order: `midtrain inspect --step N` and the planned-epochs table match what is read."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml
from litdata import StreamingDataset, TokensLoader

from midtrain.cli import run
from midtrain.data import ShardedMixedDataset
from midtrain.errors import MidtrainError
from midtrain.inspect_mixture import epochs_by_step, plan, step_provenance
from tests.synthetic import write_tree

SEQ = 16
STAGES = [{"at_step": 3, "mix_weights_str": "main:0.2,math:0.8"}]


def connected(tree: Path, micro: int = 8) -> ShardedMixedDataset:
    dm = ShardedMixedDataset(data_path=tree, mix_weights_str="main:0.5,code:0.5", num_workers=0, stages=STAGES)
    dm.connect(batch_size=micro, max_seq_length=SEQ, with_source=True, global_batch_size=8)
    return dm


def read_steps(dm: ShardedMixedDataset, steps: int) -> list[list[tuple[str, int]]]:
    """(source, first token) of every sample of steps 1..steps, through the training loader (stage switch included)."""
    out = []
    loader = dm.train_dataloader(0)
    it = iter(loader)
    for step in range(steps):
        if step == STAGES[0]["at_step"]:
            state = loader.state_dict()
            loader = dm.train_dataloader(step)
            loader.load_state_dict(state)
            it = iter(loader)
        batch = next(it)
        out.append([(loader.sources[s].id, t) for s, t in zip(batch["source"].tolist(),
                                                              batch["input_ids"][:, 0].tolist())])
    return out


def test_step_provenance_names_the_samples_the_loader_serves(tree):
    dm = connected(tree)
    served = read_steps(dm, 5)
    paths = {s.id: s.path for s in dm.shards}
    for step in (1, 3, 4, 5):  # before and after the stage switch at step 3 (steps count from 1)
        rows = step_provenance(dm, step, world_size=2)
        assert [r.rank for r in rows] == [0] * 4 + [1] * 4
        expected = []
        for r in rows:
            ds = StreamingDataset(str(paths[r.source]), item_loader=TokensLoader(block_size=SEQ + 1))
            expected.append((r.source, int(ds[r.index][0])))
        assert expected == served[step - 1]


def test_planned_epochs_are_the_counts_the_loader_reads(tree):
    dm = connected(tree)
    served = Counter(sid for step in read_steps(dm, 6) for sid, _ in step)
    rows = plan(dm, max_steps=6)
    planned = Counter()
    for r in rows:
        planned[r.shard_id] += r.planned_tokens // SEQ
    assert +planned == served
    samples = {s.id: s.samples(SEQ + 1) for s in dm.shards}
    assert epochs_by_step(dm, 6) == {sid: served[sid] / samples[sid] for sid in served}


def test_inspect_cli_prints_the_step(tree, tmp_path, capsys):
    cfg = {
        "model_config": {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": SEQ,
                         "vocab_size": 1 << 26, "padded_vocab_size": 1 << 26},  # the tree's counting ids
        "devices": 2,
        "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(tree), "mix_weights_str": "main:0.5,code:0.5", "stages": STAGES}},
        "train": {"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 2},
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run("inspect", ["--config", str(tmp_path / "run.yaml"), "--step", "4"])
    out = capsys.readouterr().out
    assert "step 4: global indices 24 to 31 on 2 process(es)" in out
    table = out.split("position")[1].splitlines()[1:9]
    assert [line.split()[1] for line in table] == ["0"] * 4 + ["1"] * 4
    assert {line.split()[2] for line in table} <= {"main/1", "main/2", "m1"}  # stage 1's sources
    assert "epochs read by the end of step 4" in out


def test_a_stage_with_the_previous_weights_adds_no_generation_in_plan_or_training(tree):
    same = [{"at_step": 3, "mix_weights_str": "main:0.5,code:0.5"}]
    dm = ShardedMixedDataset(data_path=tree, mix_weights_str="main:0.5,code:0.5", num_workers=0, stages=same)
    dm.connect(batch_size=8, max_seq_length=SEQ, with_source=True, global_batch_size=8)
    assert len(dm.order().order.generations) == 1
    loader = dm.train_dataloader(0)
    it = iter(loader)
    for _ in range(3):
        next(it)
    loader = dm.train_dataloader(3, loader.state_dict())  # the training loop's stage switch
    assert len(loader.state_dict()["generations"]) == 1
    batch = next(iter(loader))
    served = [loader.sources[s].id for s in batch["source"].tolist()]
    assert served == [r.source for r in step_provenance(dm, 4)]


def test_a_mid_step_checkpoint_refuses_a_mixture_change(tree):
    def loader(mix: str):
        dm = ShardedMixedDataset(data_path=tree, mix_weights_str=mix, num_workers=0)
        dm.connect(batch_size=4, max_seq_length=SEQ, with_source=True, global_batch_size=8)
        return dm.train_dataloader(0)

    first = loader("main:0.5,code:0.5")
    next(iter(first))  # one of the step's two micro-batches
    state = first.state_dict()
    assert state["into_step"][0] == 1
    with pytest.raises(MidtrainError, match="unfinished optimizer step"):
        loader("main:0.2,math:0.8").load_state_dict(state)
    same = loader("main:0.5,code:0.5")
    same.load_state_dict(state)  # the same mixture finishes the step
    assert same.served == 1


def test_inspect_counts_a_shard_without_a_window_as_zero_epochs(tmp_path):
    root = write_tree(tmp_path / "data", {"1": 4_000, "c1": 3_000, "q1": 10}, chunk_tokens=1_700)
    dm = ShardedMixedDataset(data_path=root, mix_weights_str="main:0.5,code:0.5", num_workers=0)
    dm.connect(batch_size=8, max_seq_length=SEQ, with_source=True, global_batch_size=8)
    rows = {r.shard_id: r for r in plan(dm, max_steps=4)}
    assert rows["q1"].epochs == 0 and rows["q1"].planned_tokens == 0
    assert rows["main/1"].planned_tokens + rows["c1"].planned_tokens == 4 * 8 * SEQ
    assert set(epochs_by_step(dm, 4)) == {"main/1", "c1"}
