"""Preflight refuses token ids the model cannot embed, naming the shard (issue 21, item 8)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from midtrain.cli import run
from midtrain.data.shards import load_shard
from midtrain.data.token_range import max_token_id
from midtrain.errors import MidtrainError
from midtrain.prepare.writing import read_shard_tokens
from tests.synthetic import write_shard, write_tree

MODEL = {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 16, "vocab_size": 500,
         "padded_vocab_size": 512}


def test_scan_finds_the_largest_id_once_and_prepare_json_wins(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    path = write_shard(tmp_path / "c1", 5_000, vocab_size=700, chunk_tokens=900)
    shard = load_shard("c1", "code", path)
    assert max_token_id(shard) == int(read_shard_tokens(path).max())
    assert len(list((tmp_path / "cache").rglob("*.json"))) == 1  # cached: read once
    (path / "prepare.json").write_text(json.dumps({"max_token_id": 3}))
    assert max_token_id(shard) == 3


def test_inspect_and_pretrain_name_the_shard_past_the_vocabulary(tmp_path, monkeypatch):
    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    data = write_tree(tmp_path / "data", {"1": 4_000}, vocab_size=512, chunk_tokens=1_000)
    write_shard(data / "c1", 3_000, vocab_size=600, chunk_tokens=1_000)  # ids up to 599 > 511
    top = int(np.max(read_shard_tokens(data / "c1")))
    cfg = {"model_config": MODEL, "out_dir": str(tmp_path / "out"), "accelerator": "cpu", "devices": 1,
           "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                    "init_args": {"data_path": str(data), "mix_weights_str": "main:0.5,code:0.5"}},
           "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 4}}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    for command in ("inspect", "pretrain"):
        with pytest.raises(MidtrainError, match=rf"Shard c1 .*token id {top}.*below 512"):
            run(command, ["--config", str(tmp_path / "run.yaml")])
    cfg["data"]["init_args"]["mix_weights_str"] = "main:1.0"  # c1 not sampled: no complaint
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(cfg))
    run("inspect", ["--config", str(tmp_path / "run.yaml")])
