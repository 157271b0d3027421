"""``logger_name: tensorboard`` (litgpt's default) works out of the box (wandb's missing hint: test_cli_errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from midtrain.cli import run
from tests.synthetic import write_tree

MODEL = {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": 32, "vocab_size": 256,
         "padded_vocab_size": 256}  # fmt: skip


@pytest.mark.slow  # importing tensorboard alone takes seconds
def test_tensorboard_logger_writes_the_training_scalars(tmp_path: Path, capsys):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tree = write_tree(tmp_path / "data", {"1": 4_000, "c1": 2_000}, vocab_size=256, chunk_tokens=1_000)
    cfg = {
        "model_config": MODEL, "out_dir": str(tmp_path / "run"), "precision": "32-true", "accelerator": "cpu",
        "devices": 1, "logger_name": "tensorboard",
        "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(tree), "mix_weights_str": "main:0.7,code:0.3", "num_workers": 0}},
        "train": {"max_steps": 3, "global_batch_size": 4, "micro_batch_size": 2, "save_interval": None},
        "eval": {"final_validation": False},
    }  # fmt: skip
    path = tmp_path / "tb.yaml"
    path.write_text(yaml.safe_dump(cfg))
    run("pretrain", ["--config", str(path)])
    capsys.readouterr()
    events = sorted((tmp_path / "run/logs/tensorboard").rglob("events.out.tfevents.*"))
    assert events, "no tensorboard event file"
    scalars = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"loss", "lr", "train/main/loss", "train/code/loss"} <= set(scalars), scalars
    loss = EventAccumulator(str(events[0].parent)).Reload().Scalars("loss")
    assert [e.step for e in loss] == [1, 2, 3]
