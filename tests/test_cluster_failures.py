"""What goes wrong on a cluster, driven through the CLI on CPU: SIGTERM preemption, two jobs on one run
directory, a short SFT validation split on 2 processes, rank-0 resume on 2 processes, leftovers of deletes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_finetune import MODEL as FT_MODEL  # noqa: F401 - the module-scoped `world` fixture needs it there
from test_finetune import _records, finetune_config, world  # noqa: F401 - fixture

from midtrain.cli import run
from midtrain.preemption import EXIT_PREEMPTED
from midtrain.rundir import find_latest, read_train_state
from midtrain.train.checkpoints import prune_checkpoints
from tests.synthetic import write_tree

pytestmark = pytest.mark.slow  # spawns CLI / training / DDP / SLURM processes (make test-fast skips it)

MODEL = {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 512,
         "padded_vocab_size": 512}
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_tree(root / "data", {"1": 40_000, "c1": 20_000}, chunk_tokens=2_000)
    return root


def pretrain_config(corpus: Path, out: Path, **train) -> Path:
    cfg = {
        "model_config": MODEL, "out_dir": str(out), "precision": "32-true", "accelerator": "cpu", "devices": 1,
        "compile": False,
        "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(corpus / "data"), "mix_weights_str": "main:0.5,code:0.5",
                               "num_workers": 1}},
        "train": {"max_steps": 100_000, "global_batch_size": 4, "micro_batch_size": 4, "save_interval": 5,
                  "lr_warmup_steps": 1, "log_interval": 1, **train},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
    }
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def start(cfg: Path, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "midtrain", "pretrain", "--config", str(cfg), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV,
                            start_new_session=True)  # fmt: skip


def wait_for_steps(out: Path, proc: subprocess.Popen, n: int, timeout: float = 240) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        assert proc.poll() is None, proc.communicate()[0]
        if len(loss_steps(out)) >= n:
            return
        time.sleep(0.1)
    raise AssertionError(f"no {n} steps logged within {timeout} s")


def loss_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.endswith("}")]
    return [r["step"] for r in rows if "loss" in r]


def test_sigterm_checkpoints_exits_75_and_the_rerun_logs_each_step_once(corpus, tmp_path):
    """SLURM preemption: SIGTERM to every process of the job (workers too), SIGKILL after the grace time."""
    out = tmp_path / "run"
    cfg = pretrain_config(corpus, out)
    proc = start(cfg)
    wait_for_steps(out, proc, 2)
    os.killpg(proc.pid, signal.SIGTERM)  # the main process and its loader worker, as SLURM signals a job
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == EXIT_PREEMPTED, log
    assert "worker" not in log.lower() or "exited unexpectedly" not in log
    state = read_train_state(find_latest(out))
    assert state["reason"] == "preempted"
    assert "in " in log and "a checkpoint takes" in log  # the save time, printed at the first save
    stopped = state["step"]
    end = stopped + 3
    rerun = subprocess.run([sys.executable, "-m", "midtrain", "pretrain", "--config", str(cfg),
                            "--train.max_steps", str(end)], capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert loss_steps(out) == list(range(1, end + 1))  # each step once across both attempts
    assert json.loads((out / "summary.json").read_text())["step"] == end
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(r["checkpoint_seconds"] > 0 for r in rows if "checkpoint_seconds" in r)


def test_a_live_owner_refuses_a_second_start_and_a_killed_one_does_not_block(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = pretrain_config(corpus, out)
    owner = start(cfg)
    try:
        wait_for_steps(out, owner, 6)  # a checkpoint at step 5
        second = subprocess.run([sys.executable, "-m", "midtrain", "pretrain", "--config", str(cfg)],
                                capture_output=True, text=True, env=ENV, timeout=120)
        assert second.returncode == 2
        errors = [line for line in second.stderr.splitlines() if line.startswith("midtrain pretrain: error:")]
        assert len(errors) == 1 and "in use by" in errors[0] and f"pid {owner.pid}" in errors[0], second.stderr
        assert owner.poll() is None  # the owner trains on
    finally:
        os.killpg(owner.pid, signal.SIGKILL)  # no handler, no cleanup: as a node failure would leave it
        owner.communicate()
    end = read_train_state(find_latest(out))["step"] + 2
    rerun = subprocess.run([sys.executable, "-m", "midtrain", "pretrain", "--config", str(cfg),
                            "--train.max_steps", str(end)], capture_output=True, text=True, env=ENV, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    assert json.loads((out / "summary.json").read_text())["step"] == end


def test_two_processes_resume_from_rank_0s_checkpoint_and_prune_by_renaming(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = pretrain_config(corpus, out, max_steps=3, save_interval=1, keep_last_checkpoints=2, global_batch_size=8)
    for end in (3, 5):
        proc = subprocess.run([sys.executable, "-m", "midtrain", "pretrain", "--config", str(cfg), "--devices", "2",
                               "--data.init_args.num_workers", "0", "--train.max_steps", str(end)],
                              capture_output=True, text=True, env=ENV, timeout=400)  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "Resumed from" in proc.stdout + proc.stderr
    assert sorted(p.name for p in out.iterdir() if "step-" in p.name) == ["step-00000004", "step-00000005"]
    assert loss_steps(out) == [1, 2, 3, 4, 5]
    assert read_train_state(find_latest(out))["world_size"] == 2


def test_leftovers_of_interrupted_deletes_and_saves_are_cleaned_at_start(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = pretrain_config(corpus, out, max_steps=3, save_interval=1, keep_last_checkpoints=1)
    run("pretrain", ["--config", str(cfg), "--data.init_args.num_workers", "0"])
    assert [p.name for p in out.iterdir() if "step-" in p.name] == ["step-00000003"]
    (out / "step-00000001").mkdir()  # pruning renames first: a reader never sees a half-deleted step-*
    (out / "step-00000001" / "COMPLETE").write_text("{}")
    (out / ".del-step-00000002").mkdir()  # a delete killed halfway
    (out / ".del-step-00000002" / "lit_model.pth").write_bytes(b"half")
    (out / ".tmp-step-00000004").mkdir()  # a save killed halfway
    assert prune_checkpoints(out, 1) == []  # incomplete dirs are not pruned
    run("pretrain", ["--config", str(cfg), "--data.init_args.num_workers", "0", "--train.max_steps", "4"])
    names = sorted(p.name for p in out.iterdir() if "step-" in p.name)
    assert names == ["step-00000001", "step-00000004"]  # leftovers gone; the unknown incomplete dir left alone


def test_two_process_finetune_with_a_one_sample_validation_split_finishes_like_one(world, tmp_path):  # noqa: F811
    """21 SFT records, val_split_fraction 0.05: one validation sample for two ranks; the other rank pads."""
    data = tmp_path / "sft.json"
    data.write_text(json.dumps(_records(21, 0)))
    losses = {}
    for devices in (1, 2):
        out = tmp_path / f"d{devices}"
        cfg = finetune_config(world, out, ratio=None, devices=devices, **{
            "data.init_args.json_path": str(data), "data.init_args.val_split_fraction": 0.05,
            "train.max_steps": 2, "eval.initial_validation": True,
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}}})  # fmt: skip
        proc = subprocess.run([sys.executable, "-m", "midtrain", "finetune", "--config", str(cfg)],
                              capture_output=True, text=True, env=ENV, timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[devices] = {r["step"]: r["val/sft/loss"] for r in rows if "val/sft/loss" in r}
    assert sorted(losses[2]) == [0, 2]
    assert losses[2] == pytest.approx(losses[1], rel=1e-5)
