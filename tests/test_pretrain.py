"""`midtrain pretrain` end to end on CPU: a tiny litgpt model, real shards, real checkpoints."""

from __future__ import annotations

import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import set_dotted

from midtrain.cli import run
from midtrain.errors import MidtrainError
from midtrain.rundir import find_latest, read_train_state
from midtrain.train.runtime import EXIT_PREEMPTED
from tests.synthetic import write_tree

MODEL = {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 512,
         "padded_vocab_size": 512}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    write_tree(root / "data", {"1": 60_000, "2": 30_000, "c1": 20_000, "m1": 8_000}, chunk_tokens=3_300)
    write_tree(root / "val", {"1": 4_000, "2": 4_000}, chunk_tokens=3_300)
    return root


def config(corpus: Path, out: Path, workers: int = 0, **overrides) -> Path:
    cfg = {
        "model_config": MODEL,
        "out_dir": str(out),
        "precision": "32-true", "compile": False,
        "accelerator": "cpu",
        "devices": 1,
        "data": {
            "class_path": "midtrain.data.ShardedMixedDataset",
            "init_args": {
                "data_path": str(corpus / "data"),
                "val_data_path": {"a": str(corpus / "val" / "1"), "b": str(corpus / "val" / "2")},
                "mix_weights_str": "main:0.7,code:0.3",
                "num_workers": workers,
            },
        },
        "train": {"max_steps": 8, "global_batch_size": 8, "micro_batch_size": 4, "save_interval": 4,
                  "lr_warmup_steps": 2, "min_lr": 1e-5},
        "eval": {"interval": 100, "max_samples": 24, "final_validation": True},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003, "weight_decay": 0.1}},
    }
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    path = out.parent / f"{out.name}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg))
    return path


def pretrain(cfg: Path, *args: str) -> None:
    run("pretrain", ["--config", str(cfg), *args])


def records(out: Path, key: str = "loss") -> dict[int, float]:
    """``step -> value`` of ``key`` in metrics.jsonl; a step logged twice fails the test."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if key in r]
    assert len(steps) == len(set(steps)), f"{key}: steps logged more than once: {steps}"
    return {r["step"]: r[key] for r in rows if key in r}


@pytest.mark.parametrize("workers", [0, 2])
def test_interrupted_run_gives_the_same_losses(corpus, tmp_path, workers):
    whole = tmp_path / "whole"
    pretrain(config(corpus, whole, workers))
    parts = tmp_path / "parts"
    cfg = config(corpus, parts, workers)
    pretrain(cfg, "--train.max_additional_steps", "3")  # stops at step 3, checkpoint "end"
    assert read_train_state(find_latest(parts))["step"] == 3
    pretrain(cfg, "--train.max_additional_steps", "5")  # counted from the branch point (step 0): 3 -> 5
    assert read_train_state(find_latest(parts))["step"] == 5
    pretrain(cfg)  # 5 -> 8
    expected, got = records(whole), records(parts)
    assert sorted(got) == list(range(1, 9))
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-6)
    assert records(parts, "lr") == records(whole, "lr")
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["tokens_seen"] == 8 * 8 * 32
    assert summary["tokens_by_source"] == json.loads((whole / "summary.json").read_text())["tokens_by_source"]


def test_stages_equal_resume_with_new_mixture(corpus, tmp_path):
    staged = tmp_path / "staged"
    pretrain(config(corpus, staged, 2, **{"data.init_args.stages": [{"at_step": 4, "mix_weights_str":
                                                                     "main:0.6,math:0.4"}]}))
    first = tmp_path / "first"
    pretrain(config(corpus, first, 2), "--train.max_additional_steps", "4")
    second = tmp_path / "second"  # midtraining into a new out_dir, from the other run's checkpoint
    pretrain(config(corpus, second, 2, **{"data.init_args.mix_weights_str": "main:0.6,math:0.4"}),
             "--resume", str(find_latest(first)))
    s_staged = json.loads((staged / "summary.json").read_text())
    s_second = json.loads((second / "summary.json").read_text())
    assert s_staged["tokens_by_source"] == s_second["tokens_by_source"]
    assert s_staged["tokens_by_type"]["math"] > 0 and "code" in s_staged["tokens_by_type"]
    losses = {**records(first), **records(second)}
    assert losses == pytest.approx(records(staged), rel=1e-5, abs=1e-6)
    history = json.loads((second / "mixture_history.json").read_text())
    assert history[-1]["step"] == 4 and history[-1]["reason"].startswith("resume from")
    assert [h["reason"] for h in json.loads((staged / "mixture_history.json").read_text())] == ["start", "stage"]


def test_per_source_metrics_and_validation_sets(corpus, tmp_path):
    out = tmp_path / "run"
    pretrain(config(corpus, out, **{"eval.interval": 4, "eval.initial_validation": True}))
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if "loss" in r]
    assert all("train/main/loss" in r and "tokens/main" in r for r in train_rows)
    assert train_rows[-1]["tokens/main"] + train_rows[-1]["tokens/code"] == 8 * 8 * 32
    val_steps = [r["step"] for r in rows if "val/a/loss" in r and "val/b/ppl" in r]
    assert val_steps == [0, 4, 8]


def test_max_additional_steps_and_resume_errors(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = config(corpus, out)
    pretrain(cfg, "--train.max_additional_steps", "2")
    assert max(records(out)) == 2
    with pytest.raises(MidtrainError, match="different model"):
        pretrain(cfg, "--resume", "auto", "--model_config.n_embd", "64")
    with pytest.raises(MidtrainError, match="used max_seq_length 32, this run 16"):
        pretrain(cfg, "--resume", "auto", "--train.max_seq_length", "16")


def test_resume_auto_skips_a_half_written_checkpoint(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = config(corpus, out)
    pretrain(cfg, "--train.max_additional_steps", "4")
    # what a kill -9 in the middle of writing step 6 leaves behind (tests/test_checkpoints.py kills for real)
    (out / ".tmp-step-00000006").mkdir()
    (out / ".tmp-step-00000006" / "lit_model.pth").write_bytes(b"partial")
    broken = out / "step-00000006"
    broken.mkdir()
    (broken / "lit_model.pth").write_bytes(b"partial")
    pretrain(cfg, "--resume", "auto")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == list(range(1, 9))  # 1-4, then resumed at 4: 5-8
    assert read_train_state(find_latest(out))["step"] == 8


def _cli(cfg: Path, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "midtrain", "pretrain", "--config", str(cfg), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen)


@pytest.mark.slow  # spawns processes
def test_preemption_signal_checkpoints_and_exits_for_requeue(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = config(corpus, out, **{"train.max_steps": 400, "train.save_interval": None})
    proc = _cli(cfg)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step 3/"):
            proc.send_signal(signal.SIGUSR1)
            break
    rest, _ = proc.communicate(timeout=120)
    assert proc.returncode == EXIT_PREEMPTED, "".join(lines) + rest
    latest = find_latest(out)
    state = read_train_state(latest)
    assert state["reason"] == "preempted" and 3 <= state["step"] < 400


@pytest.mark.slow  # spawns processes
def test_two_process_ddp_starts_from_initial_weights(corpus, tmp_path):
    """2 processes (DDP over gloo) from another run's ``final/``: the weights are loaded after ``fabric.setup``
    through the strategy (the path FSDP takes), so the step-0 validation loss equals the source's last one."""
    small = {"train.micro_batch_size": 2, "train.max_steps": 4, "eval.initial_validation": True}
    source = tmp_path / "source"
    pretrain(config(corpus, source, **small))
    ddp = tmp_path / "ddp"
    cfg = config(corpus, ddp, devices=2, initial_checkpoint_dir=str(source / "final"), **small)
    proc = _cli(cfg)
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    assert "no-op" not in output  # torch's warning when weights are copied into a meta-device model
    assert records(ddp, "lr") == records(source, "lr")
    for name in ("a", "b"):
        trained, fresh = records(source, f"val/{name}/loss")[4], records(source, f"val/{name}/loss")[0]
        assert abs(trained - fresh) > 1e-3  # the comparison below can tell loaded weights from a fresh init
        assert records(ddp, f"val/{name}/loss")[0] == pytest.approx(trained, rel=1e-5)
    state = read_train_state(find_latest(ddp))
    assert state["world_size"] == 2 and state["loader"]["consumed"] == 4 * 8  # one state for all ranks
    assert state["branch_point"] == {"step": 0, "checkpoint": None, "initial_weights": str(source / "final")}
    assert json.loads((ddp / "summary.json").read_text())["tokens_seen"] == 4 * 8 * 32


def test_requeue_counts_from_the_branch_point_and_a_finished_run_trains_nothing(corpus, tmp_path, capsys):
    source = tmp_path / "source"
    pretrain(config(corpus, source, **{"train.max_steps": 12}), "--train.max_additional_steps", "6")
    out = tmp_path / "branch"  # midtraining from the source's step 6, 4 more steps, in one config
    cfg = config(corpus, out, resume=str(source / "step-00000006"), **{
        "train.max_steps": 12, "train.max_additional_steps": 4, "train.save_interval": 2})
    pretrain(cfg)
    assert read_train_state(find_latest(out))["step"] == 10
    assert json.loads((out / "branch_point.json").read_text())["step"] == 6
    first, first_val = records(out), records(out, "val/a/loss")
    assert sorted(first) == [7, 8, 9, 10] and sorted(first_val) == [10]

    # killed after logging step 10 but before its checkpoint: the requeue continues at 8 and ends at 10, not 12
    shutil.rmtree(out / "step-00000010")
    shutil.rmtree(out / "final")
    (out / "summary.json").unlink()
    pretrain(cfg)
    assert read_train_state(find_latest(out))["step"] == 10
    assert records(out) == pytest.approx(first, rel=1e-5, abs=1e-6)  # each step once, the same losses
    assert records(out, "val/a/loss") == pytest.approx(first_val, rel=1e-5)

    # the finished run submitted again trains nothing, writes nothing, and says so
    metrics, checkpoint_time = (out / "metrics.jsonl").read_text(), (out / "step-00000010").stat().st_mtime_ns
    capsys.readouterr()
    pretrain(cfg)
    assert "already finished at step 10" in capsys.readouterr().out
    assert (out / "metrics.jsonl").read_text() == metrics
    assert (out / "step-00000010").stat().st_mtime_ns == checkpoint_time
    with pytest.raises(MidtrainError, match="already holds checkpoints .*resume is false"):
        pretrain(cfg, "--resume", "false")


def _kill_during_the_step_6_save(cfg: dict, ready: Path) -> None:
    """Run ``cfg`` in a forked child and SIGKILL it once its step-6 save reached the rename."""
    ready.unlink(missing_ok=True)
    child = multiprocessing.get_context("fork").Process(
        target=_pretrain_until_rename, args=(cfg, ".tmp-step-00000006", ready)
    )
    child.start()
    deadline = time.monotonic() + 120
    while not ready.exists():
        assert child.is_alive() and time.monotonic() < deadline, "the child did not reach the step-6 save"
        time.sleep(0.05)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL


def _pretrain_until_rename(cfg: Path, paused: str, ready: Path) -> None:
    """Child process: the pretrain command, stopped just before ``paused`` is renamed into place (until killed)."""
    real_replace = os.replace

    def replace(src, dst):
        if Path(src).name == paused:
            ready.touch()
            time.sleep(120)
            os._exit(3)  # not killed: the test fails on the exit code
        real_replace(src, dst)

    os.replace = replace
    try:
        pretrain(cfg)
    finally:
        os._exit(4)


def test_kill_9_during_a_checkpoint_write_then_the_same_command(corpus, tmp_path):
    whole = tmp_path / "whole"
    pretrain(config(corpus, whole))
    out, ready = tmp_path / "run", tmp_path / "ready"
    cfg = config(corpus, out, **{"train.save_interval": 2, "train.keep_last_checkpoints": 2})
    _kill_during_the_step_6_save(cfg, ready)
    assert find_latest(out) == out / "step-00000004" and (out / ".tmp-step-00000006").is_dir()

    pretrain(cfg)  # the same command
    assert sorted(records(out)) == list(range(1, 9))  # steps 5 and 6 logged again, each once
    assert records(out) == pytest.approx(records(whole), rel=1e-5, abs=1e-6)
    assert records(out, "val/a/loss") == pytest.approx(records(whole, "val/a/loss"), rel=1e-5)
    # keep_last_checkpoints: 2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("step-", ".tmp"))) == [
        "step-00000006", "step-00000008"]


def test_token_accounting_survives_resume_between_log_steps(corpus, tmp_path):
    out = tmp_path / "run"
    cfg = config(corpus, out, **{"train.log_interval": 3, "train.save_interval": 4})
    pretrain(cfg, "--train.max_additional_steps", "5")  # checkpoints at 4 and 5; logs at 3 and 5
    assert read_train_state(out / "step-00000004")["tokens_seen"] == 4 * 8 * 32
    pretrain(cfg, "--resume", str(out / "step-00000004"), "--out_dir", str(tmp_path / "other"))
    assert json.loads((tmp_path / "other" / "summary.json").read_text())["tokens_seen"] == 8 * 8 * 32


def _bpe_tokenizers(root: Path) -> tuple[Path, Path]:
    """Two tokenizer dirs that differ only in ``add_bos_token``: other token IDs for the same text."""
    from midtrain.demo.corpus import train_bpe_tokenizer

    tok = train_bpe_tokenizer([f"text number {i} of the corpus" for i in range(200)], root / "tok", vocab_size=300)
    other = root / "other_tok"
    shutil.copytree(tok, other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": not config.get(
        "add_bos_token", False)}))
    return tok, other


@pytest.mark.slow
def test_resume_with_another_tokenizer_dir_is_refused_through_the_cli(corpus, tmp_path):
    """README: a resume with another --tokenizer_dir is an error (runtime.check_compatible), not a silent run."""
    tok, other = _bpe_tokenizers(tmp_path)
    out = tmp_path / "run"
    cfg = config(corpus, out, tokenizer_dir=str(tok))
    pretrain(cfg, "--train.max_additional_steps", "2")
    metrics = (out / "metrics.jsonl").read_text()
    proc = _cli(cfg, "--tokenizer_dir", str(other))
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0, output
    assert "Tokenizer mismatch" in output and f"{out / 'step-00000002'} was trained" in output
    assert (out / "metrics.jsonl").read_text() == metrics and find_latest(out) == out / "step-00000002"
    pretrain(cfg)  # the same tokenizer resumes
    assert read_train_state(find_latest(out))["step"] == 8


def test_crash_between_renames_then_a_crashed_save_keeps_the_previous_checkpoint(corpus, tmp_path):
    """A kill between the two renames of a re-save leaves only ``.old-step-N`` (tests/test_checkpoints.py kills there
    for real); the run resumes from it, and a second kill, before its next save's rename, must not lose it."""
    whole = tmp_path / "whole"
    pretrain(config(corpus, whole))
    out, ready = tmp_path / "run", tmp_path / "ready"
    cfg = config(corpus, out, **{"train.save_interval": 2, "train.keep_last_checkpoints": 1})
    pretrain(cfg, "--train.max_additional_steps", "4")
    assert sorted(p.name for p in out.glob("step-*")) == ["step-00000004"]
    (out / "step-00000004").rename(out / ".old-step-00000004")  # the first rename of a re-save of step 4
    (out / ".tmp-step-00000004").mkdir()  # its complete new copy, never renamed into place: the kill
    assert find_latest(out) == out / ".old-step-00000004"

    _kill_during_the_step_6_save(cfg, ready)
    assert find_latest(out) == out / ".old-step-00000004"  # the save of step 6 cleaned up, but kept this one

    pretrain(cfg)  # the same command: from step 4 again
    assert read_train_state(find_latest(out))["step"] == 8
    assert records(out) == pytest.approx(records(whole), rel=1e-5, abs=1e-6)
    assert find_latest(out) == out / "step-00000008" and not list(out.glob(".tmp-*"))


class _RunsCode:
    """Unpickling this runs a shell command: what a pickled (non-weights) checkpoint file may hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.slow
def test_a_pickled_checkpoint_is_refused_and_never_run(corpus, tmp_path):
    """Resume and initial_checkpoint_dir read lit_model.pth with weights_only=True: pickled code is an error."""
    import torch

    out, marker = tmp_path / "run", tmp_path / "code-ran"
    cfg = config(corpus, out)
    pretrain(cfg, "--train.max_additional_steps", "2")
    ckpt = find_latest(out)
    state = torch.load(ckpt / "lit_model.pth", weights_only=True)
    torch.save({**state, "extra": _RunsCode(marker)}, ckpt / "lit_model.pth")
    initial = tmp_path / "initial"
    initial.mkdir()
    torch.save({"model": _RunsCode(marker)}, initial / "lit_model.pth")
    for cfg_, args, culprit in ((cfg, (), ckpt / "lit_model.pth"),
                                (config(corpus, tmp_path / "fresh"), ("--initial_checkpoint_dir", str(initial)),
                                 initial / "lit_model.pth")):
        proc = _cli(cfg_, *args)
        output, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2, output
        assert f"Cannot read {culprit} as tensors and plain data (weights_only=True)" in output, output
        assert "Traceback" not in output
    assert not marker.exists()  # the pickled command never ran
