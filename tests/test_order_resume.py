"""Exact resume onto another topology, through the real CLI and through the stock ``litgpt pretrain`` loop.

Each run is real: a tiny litgpt model on CPU, real litdata shards, real checkpoints, 2 DDP processes
over gloo where the topology says so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml

from midtrain.cli import run
from midtrain.rundir import read_train_state
from tests.synthetic import write_tree

pytestmark = pytest.mark.slow  # spawns training subprocesses (2-process DDP)

MODEL = {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 512,
         "padded_vocab_size": 512}
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCHDYNAMO_DISABLE": "1",
       "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_tree(root / "data", {"1": 30_000, "2": 12_000, "c1": 9_000}, chunk_tokens=2_000)
    write_tree(root / "val", {"1": 3_000}, chunk_tokens=2_000)
    return root


def midtrain_config(corpus: Path, out: Path, devices: int, workers: int, micro: int) -> Path:
    cfg = {
        "model_config": MODEL, "out_dir": str(out), "precision": "32-true", "accelerator": "cpu", "devices": devices,
        "compile": False,  # eager everywhere (the 2-process runs disable dynamo): comparable at rel 1e-5
        "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(corpus / "data"), "mix_weights_str": "main:0.7,code:0.3",
                               "num_workers": workers}},
        "train": {"max_steps": 6, "global_batch_size": 8, "micro_batch_size": micro, "save_interval": 3,
                  "lr_warmup_steps": 2, "min_lr": 1e-5},
        "eval": {"interval": 100, "final_validation": False},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, "weight_decay": 0.1}},
    }
    path = out.parent / f"{out.name}-{devices}x{workers}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def pretrain(cfg: Path, *args: str, processes: int = 1) -> None:
    if processes == 1:
        run("pretrain", ["--config", str(cfg), *args])
        return
    proc = subprocess.run([sys.executable, "-m", "midtrain", "pretrain", "--config", str(cfg), *args], env=ENV,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "topology" not in proc.stdout.lower()  # nothing to warn about: the order does not depend on it


def losses(out: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_onto_another_topology_gives_the_same_losses(corpus, tmp_path):
    """Steps 1-2 on 1 process x 2 workers, 3-4 on 2 DDP processes x 3 workers, 5-6 on 1 x 2 again (both
    directions of the switch) give the losses of 6 uninterrupted steps."""
    whole = tmp_path / "whole"
    pretrain(midtrain_config(corpus, whole, 1, 2, 4))
    parts = tmp_path / "parts"
    pretrain(midtrain_config(corpus, parts, 1, 2, 4), "--train.max_additional_steps", "2")
    pretrain(midtrain_config(corpus, parts, 2, 3, 2), "--resume", "auto", "--train.max_additional_steps", "2",
             processes=2)
    pretrain(midtrain_config(corpus, parts, 1, 2, 4), "--resume", "auto")
    expected, got = losses(whole), losses(parts)
    assert sorted(got) == sorted(expected) == list(range(1, 7))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got[step], expected[step])
    for step in ("step-00000003", "step-00000006"):  # the same samples, source by source
        by_source = read_train_state(parts / step)["tokens_by_source"]
        assert by_source == read_train_state(whole / step)["tokens_by_source"] and sum(by_source.values()) > 0


STOCK = textwrap.dedent(
    """
    import os
    import sys
    from pathlib import Path

    import lightning as L
    from lightning.fabric.strategies import DDPStrategy
    from litgpt.args import EvalArgs, TrainArgs
    from litgpt.config import Config
    from litgpt.pretrain import main

    from midtrain.data import ShardedMixedDataset

    corpus, out = Path(os.environ["STOCK_CORPUS"]), Path(os.environ["STOCK_OUT"])
    steps, resume = int(os.environ["STOCK_STEPS"]), os.environ["STOCK_RESUME"] or False
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=DDPStrategy(process_group_backend="gloo"),
                      precision="32-true")
    fabric.launch()
    sys.argv[1:] = ["tiny"]  # litgpt's checkpoint writer re-parses the command line as `litgpt pretrain`'s
    data = ShardedMixedDataset(data_path=corpus / "data", val_data_path=str(corpus / "val" / "1"),
                               mix_weights_str="main:0.7,code:0.3", num_workers=1)
    train = TrainArgs(save_interval=2, log_interval=1, global_batch_size=8, micro_batch_size=2,
                      max_tokens=steps * 8 * 32, max_seq_length=32, lr_warmup_steps=0, min_lr=3e-3, max_norm=1.0)
    main(fabric=fabric, devices=2, seed=42, initial_checkpoint_dir=None, resume=resume and Path(resume),
         config=Config(**%s), data=data, out_dir=out, tokenizer_dir=None, tokenizer=None, train=train,
         eval=EvalArgs(interval=1000, max_iters=1, initial_validation=False, final_validation=False),
         optimizer={"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-3}})
    """
) % repr(MODEL)


def test_stock_litgpt_pretrain_two_processes_resume_exactly(corpus, tmp_path):
    """litgpt's own loop (its ``main``: setup_dataloaders, fabric.save/load of the loader, CycleIterator) over
    2 DDP processes: resumed from step 2 of a 4-step run, it ends with the same weights.
    (The litgpt CLI itself picks FSDP for 2 devices, which Fabric allows on GPUs only.)"""
    script = tmp_path / "stock.py"
    script.write_text(STOCK)

    def stock(out: Path, steps: int, resume: Path | None = None) -> None:
        env = {**ENV, "STOCK_CORPUS": str(corpus), "STOCK_OUT": str(out), "STOCK_STEPS": str(steps),
               "STOCK_RESUME": str(resume or "")}
        proc = subprocess.run([sys.executable, str(script)], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True, timeout=300)
        assert proc.returncode == 0, proc.stdout[-3000:]

    stock(tmp_path / "whole", 4)  # checkpoints at steps 2 and 4, then final/
    half = tmp_path / "whole" / "step-00000002" / "lit_model.pth"
    assert torch.load(half, weights_only=False)["train_dataloader"]["consumed"] == 2 * 8  # in litgpt's checkpoint
    stock(tmp_path / "parts", 4, resume=half)
    whole = torch.load(tmp_path / "whole" / "final" / "lit_model.pth", weights_only=False)
    parts = torch.load(tmp_path / "parts" / "final" / "lit_model.pth", weights_only=False)
    assert parts["step_count"] == whole["step_count"] == 4
    assert parts["train_dataloader"] == whole["train_dataloader"]
    for name, tensor in whole["model"].items():
        torch.testing.assert_close(parts["model"][name], tensor, rtol=1e-5, atol=1e-6)
