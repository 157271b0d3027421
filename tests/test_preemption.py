"""Preemption without SLURM: a signal before the first step, during `midtrain evaluate`, and time across attempts.

The handler is installed when the process starts (``midtrain.cli.main``); these tests install it the
same way, signal their own process, and run the commands in-process on a tiny model and real shards.
"""

from __future__ import annotations

import csv
import json
import os
import signal
from pathlib import Path

import pytest
import yaml

from midtrain import preemption
from midtrain.cli import run
from midtrain.rundir import find_latest, read_train_state
from tests.synthetic import write_tree

MODEL = {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 512,
         "padded_vocab_size": 512}


@pytest.fixture
def clean_signal():
    """Install the start-up handler as ``midtrain.cli.main`` does; restore the default action afterwards."""
    preemption.install()
    yield
    preemption.uninstall()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_tree(root / "data", {"1": 20_000, "c1": 8_000}, chunk_tokens=2_000)
    write_tree(root / "val", {"1": 2_000, "c1": 2_000}, chunk_tokens=1_000)
    return root


def config(corpus: Path, out: Path) -> Path:
    cfg = {
        "model_config": MODEL, "out_dir": str(out), "precision": "32-true", "accelerator": "cpu", "devices": 1,
        "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(corpus / "data"), "mix_weights_str": "main:0.5,code:0.5"}},
        "train": {"max_steps": 6, "global_batch_size": 4, "micro_batch_size": 4, "save_interval": 3,
                  "lr_warmup_steps": 1, "log_interval": 1},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def logged_steps(out: Path) -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["step"] for line in lines if "loss" in json.loads(line)]


@pytest.mark.slow
def test_signal_before_the_first_step_checkpoints_and_requeues(corpus, tmp_path, clean_signal):
    """SLURM's signal can arrive while the process still imports or builds the model: not fatal, not lost."""
    out = tmp_path / "run"
    cfg = config(corpus, out)
    os.kill(os.getpid(), signal.SIGUSR1)  # before `pretrain` even parses its config
    assert preemption.requested()
    with pytest.raises(SystemExit) as exit_info:
        run("pretrain", ["--config", str(cfg)])
    assert exit_info.value.code == preemption.EXIT_PREEMPTED
    first = read_train_state(find_latest(out))
    assert (first["step"], first["reason"]) == (1, "preempted")
    assert not preemption.requested()  # the command acted on it; the requeued run starts clean
    run("pretrain", ["--config", str(cfg), "--resume", "auto"])
    assert logged_steps(out) == [1, 2, 3, 4, 5, 6]  # each step once across the two attempts
    summary = json.loads((out / "summary.json").read_text())
    end = read_train_state(find_latest(out))
    # training time of both attempts: the first attempt's seconds are carried in its checkpoint
    assert end["train_seconds"] > first["train_seconds"] > 0
    assert summary["train_seconds"] == pytest.approx(end["train_seconds"], abs=0.5)


def test_evaluate_finishes_the_row_then_exits_for_requeue(corpus, tmp_path, clean_signal):
    """evaluate.sbatch asks for SIGUSR1: evaluate writes the rows it has, exits 75; the rerun skips them."""
    out = tmp_path / "run"
    run("pretrain", ["--config", str(config(corpus, out)), "--train.max_steps", "3"])
    csv_path = tmp_path / "eval.csv"
    args = ["--checkpoints", str(out / "step-*"), "--out", str(csv_path), "--batch_size", "4", "--max_samples", "8",
            "--val", f"main={corpus / 'val/1'}", "--val+", f"code={corpus / 'val/c1'}"]
    os.kill(os.getpid(), signal.SIGUSR1)
    with pytest.raises(SystemExit) as exit_info:
        run("evaluate", args)
    assert exit_info.value.code == preemption.EXIT_PREEMPTED
    with open(csv_path, newline="") as f:
        first = list(csv.DictReader(f))
    assert len(first) == 1  # the row being scored when the signal came, no more
    rows = run("evaluate", args)
    assert len(rows) == 2 and rows[0] == first[0]
    assert sorted(r["set"] for r in rows) == ["code", "main"]


def test_no_preemption_signal_restores_the_default_action(corpus, tmp_path, clean_signal):
    """``preemption_signal: null``: the run asked for no handler, so SIGUSR1 keeps its default (terminate)."""
    out = tmp_path / "run"
    run("pretrain", ["--config", str(config(corpus, out)), "--preemption_signal", "null", "--train.max_steps", "2"])
    assert signal.getsignal(signal.SIGUSR1) == signal.SIG_DFL


@pytest.mark.slow
def test_a_process_with_shielded_loader_workers_still_alive_exits(tmp_path):
    """Workers started inside ``shielded`` never get multiprocessing's exit-time SIGTERM; the exit must not hang."""
    script = tmp_path / "leak.py"
    script.write_text(
        "import torch\n"
        "from torch.utils.data import DataLoader\n"
        "from midtrain.preemption import shielded_iter\n"
        "class Loader:  # as MixedLoader: __iter__ is a generator, so the workers start at the first item\n"
        "    def __iter__(self):\n"
        "        yield from DataLoader(list(range(64)), batch_size=2, num_workers=2)\n"
        "kept = shielded_iter(Loader())\n"
        "print(next(kept).tolist(), flush=True)  # the loader is never exhausted nor closed\n"
    )
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])})
    assert done.returncode == 0 and done.stdout.strip() == "[0, 1]", done.stdout + done.stderr
