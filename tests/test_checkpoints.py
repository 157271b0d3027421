import json
import logging
import multiprocessing
import os
import signal
import time
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from lightning import Fabric
from litgpt.config import Config
from litgpt.model import GPT

from midtrain.errors import MidtrainError
from midtrain.rundir import find_latest, read_train_state, resolve_resume
from midtrain.train.checkpoints import load_checkpoint, prune_checkpoints, read_yaml, save_checkpoint, save_final
from midtrain.train.runtime import truncate_metrics

TINY = dict(n_layer=1, n_head=2, n_embd=16, block_size=16, vocab_size=32, padded_vocab_size=32)
TRAIN_STATE = {
    "step": 2,
    "tokens_per_source": {"main": 60, "code": 4},
    "mixture": [{"shard": "main/0", "weight": 0.9}, {"shard": "code/0", "weight": 0.1}],
    "loader": {"main/0": {"epoch": 0, "offset": 7}},
}
RUN_CONFIG = {"out_dir": Path("/runs/x"), "train": {"max_steps": 10}, "seed": 3}


def make_run(seed: int = 0, **overrides):
    fabric = Fabric(accelerator="cpu", devices=1)
    torch.manual_seed(seed)
    model = GPT(Config(**{**TINY, **overrides}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = fabric.setup(model, optimizer)
    return fabric, model, optimizer


def train_step(fabric, model, optimizer, seed: int) -> float:
    batch = torch.randint(0, 32, (2, 9), generator=torch.Generator().manual_seed(seed))
    logits = model(batch[:, :-1])
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 32), batch[:, 1:].reshape(-1))
    fabric.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    return loss.item()


def save(fabric, model, optimizer, out_dir, step, train_state=None, **kwargs):
    state = {"model": model, "optimizer": optimizer}
    return save_checkpoint(fabric, out_dir, step, state, train_state or {"step": step}, RUN_CONFIG, **kwargs)


def fake_checkpoint(path: Path, complete: bool = True) -> Path:
    """Directory with the files of a checkpoint (empty weights): enough for the resolution logic."""
    path.mkdir(parents=True)
    (path / "lit_model.pth").write_bytes(b"")
    (path / "train_state.json").write_text("{}")
    if complete:
        (path / "COMPLETE").write_text("{}")
    return path


def assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            assert_same_tensors(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


@pytest.fixture
def tokenizer_dir(tmp_path):
    directory = tmp_path / "tokenizer"
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        (directory / name).write_text(json.dumps({"name": name}))
    return directory


def test_round_trip_restores_weights_optimizer_and_train_state(tmp_path, tokenizer_dir):
    fabric, model, optimizer = make_run(seed=0)
    for seed in range(2):
        train_step(fabric, model, optimizer, seed)
    path = save(
        fabric, model, optimizer, tmp_path / "out", 2, TRAIN_STATE,
        model_config=asdict(model.config), tokenizer_dir=tokenizer_dir,
    )  # fmt: skip

    assert path == tmp_path / "out" / "step-00000002"
    assert sorted(os.listdir(tmp_path / "out")) == ["step-00000002"]
    assert sorted(os.listdir(path)) == [
        "COMPLETE", "config.json", "generation_config.json", "hyperparameters.yaml", "lit_model.pth",
        "model_config.yaml", "tokenizer.json", "tokenizer_config.json", "train_state.json",
    ]  # fmt: skip
    assert json.loads((path / "COMPLETE").read_text()) == {"step": 2}
    assert read_yaml(path) == {"out_dir": "/runs/x", "train": {"max_steps": 10}, "seed": 3}
    assert Config.from_file(path / "model_config.yaml") == model.config

    fabric2, model2, optimizer2 = make_run(seed=1)
    assert not torch.equal(model2.lm_head.weight, model.lm_head.weight)
    train_state = load_checkpoint(fabric2, path, {"model": model2, "optimizer": optimizer2})

    assert train_state == TRAIN_STATE
    assert list(train_state["loader"]) == list(TRAIN_STATE["loader"])
    assert_same_tensors(model2.state_dict(), model.state_dict())
    assert_same_tensors(optimizer2.state_dict(), optimizer.state_dict())
    # the restored run continues exactly like the original
    assert train_step(fabric2, model2, optimizer2, 5) == train_step(fabric, model, optimizer, 5)
    assert_same_tensors(model2.state_dict(), model.state_dict())


def test_checkpoint_loads_with_litgpt_tools(tmp_path):
    from litgpt.utils import load_checkpoint as litgpt_load_checkpoint

    fabric, model, optimizer = make_run(seed=0)
    path = save(fabric, model, optimizer, tmp_path, 1)
    fresh = GPT(Config(**TINY))
    litgpt_load_checkpoint(fabric, fresh, path / "lit_model.pth")
    assert_same_tensors(fresh.state_dict(), model.state_dict())


def test_save_final_writes_a_plain_litgpt_model(tmp_path, tokenizer_dir):
    out_dir = tmp_path / "out"
    fabric, model, optimizer = make_run(seed=0)
    train_step(fabric, model, optimizer, 0)
    save(fabric, model, optimizer, out_dir, 1)
    final = save_final(fabric, out_dir, model, RUN_CONFIG, asdict(model.config), tokenizer_dir)

    assert final == out_dir / "final"
    weights = torch.load(final / "lit_model.pth", weights_only=True)
    assert_same_tensors(weights, model.state_dict())  # plain state dict: no "model"/"optimizer" wrapper
    fresh = GPT(Config.from_file(final / "model_config.yaml"))
    fresh.load_state_dict(weights, strict=True)
    assert (final / "tokenizer.json").is_file()
    assert sorted(os.listdir(out_dir)) == ["final", "step-00000001"]
    assert find_latest(out_dir) == out_dir / "step-00000001"
    with pytest.raises(MidtrainError, match="missing train_state.json.*use initial_checkpoint_dir"):
        resolve_resume(final, out_dir)


def test_find_latest_picks_highest_complete_step(tmp_path, caplog):
    for step in (1, 9, 10):
        fake_checkpoint(tmp_path / f"step-{step:08d}")
    fake_checkpoint(tmp_path / "step-00000020", complete=False)  # crashed on a filesystem without atomic rename
    fake_checkpoint(tmp_path / ".tmp-step-00000030")  # interrupted save, even if its marker was written
    fake_checkpoint(tmp_path / "step-00000040-copy")
    (tmp_path / "notes.txt").write_text("")

    with caplog.at_level(logging.WARNING):
        assert find_latest(tmp_path) == tmp_path / "step-00000010"
    assert "Ignoring incomplete checkpoint" in caplog.text and "step-00000020 (missing COMPLETE)" in caplog.text
    assert ".tmp-step-00000030: an interrupted checkpoint save" in caplog.text

    fake_checkpoint(tmp_path / "step-100000000")  # more than 8 digits: compared as a number
    assert find_latest(tmp_path) == tmp_path / "step-100000000"


def test_find_latest_without_checkpoints(tmp_path):
    assert find_latest(tmp_path / "missing") is None
    assert find_latest(tmp_path) is None


def test_resolve_resume_modes(tmp_path):
    out_dir, other_run = tmp_path / "out", tmp_path / "other"
    assert resolve_resume(False, out_dir) is None
    assert resolve_resume(None, out_dir) is None
    assert resolve_resume("auto", out_dir) is None
    with pytest.raises(MidtrainError, match="resume=true but .* holds no complete checkpoint.*resume: auto"):
        resolve_resume(True, out_dir)

    latest = fake_checkpoint(out_dir / "step-00000200")
    fake_checkpoint(out_dir / "step-00000100")
    other = fake_checkpoint(other_run / "step-00000050")
    assert resolve_resume("auto", out_dir) == latest
    assert resolve_resume(True, out_dir) == latest
    assert resolve_resume(out_dir / "step-00000100", out_dir) == out_dir / "step-00000100"
    assert resolve_resume(str(other / "lit_model.pth"), out_dir) == other  # litgpt-style file path
    assert resolve_resume(other_run, out_dir) == other  # another run's directory: its newest checkpoint


def test_resolve_resume_rejects_incomplete_paths_clearly(tmp_path):
    fake_checkpoint(tmp_path / "step-00000001")
    fake_checkpoint(tmp_path / "step-00000002")
    broken = fake_checkpoint(tmp_path / "step-00000003", complete=False)

    with pytest.raises(MidtrainError) as err:
        resolve_resume(broken, tmp_path)
    assert str(err.value).startswith(
        f"{broken} is not a complete checkpoint (its save was interrupted): missing COMPLETE; "
        f"complete checkpoints in {tmp_path}: step-00000001, step-00000002."
    )
    (broken / "COMPLETE").write_text("{}")
    (broken / "train_state.json").unlink()
    with pytest.raises(MidtrainError, match="not a complete checkpoint: missing train_state.json"):
        resolve_resume(broken, tmp_path)
    with pytest.raises(MidtrainError, match=r"step-00000009 does not exist; complete checkpoints in .*step-00000002"):
        resolve_resume(tmp_path / "step-00000009", tmp_path)
    (tmp_path / "empty_run").mkdir()
    with pytest.raises(MidtrainError, match="neither a complete checkpoint nor a run directory"):
        resolve_resume(tmp_path / "empty_run", tmp_path)


def test_load_checkpoint_errors_name_the_problem(tmp_path):
    fabric, model, optimizer = make_run()
    path = save(fabric, model, optimizer, tmp_path, 1)

    other_fabric, bigger, bigger_opt = make_run(n_embd=32)
    with pytest.raises(
        MidtrainError, match=f"(?s)Checkpoint {path} does not fit the current model.*size mismatch for lm_head"
    ):
        load_checkpoint(other_fabric, path, {"model": bigger, "optimizer": bigger_opt})
    with pytest.raises(MidtrainError, match="'scheduler'"):
        load_checkpoint(fabric, path, {"model": model, "scheduler": {}})
    assert load_checkpoint(fabric, path, {"model": model, "scheduler": {}}, strict=False) == {"step": 1}

    (path / "COMPLETE").unlink()
    with pytest.raises(MidtrainError, match="missing COMPLETE"):
        load_checkpoint(fabric, path, {"model": model})


def test_unserialisable_train_state_fails_before_writing(tmp_path):
    fabric, model, optimizer = make_run()
    with pytest.raises(MidtrainError, match="train_state must be JSON-serialisable"):
        save(fabric, model, optimizer, tmp_path / "out", 1, {"sampler": object()})
    assert not (tmp_path / "out").exists()


def test_resave_replaces_and_cleans_leftovers(tmp_path):
    fabric, model, optimizer = make_run()
    save(fabric, model, optimizer, tmp_path, 1, {"mixture": "a"})
    (tmp_path / ".tmp-step-00000005").mkdir()  # left by a crash
    save(fabric, model, optimizer, tmp_path, 1, {"mixture": "b"})
    assert sorted(os.listdir(tmp_path)) == ["step-00000001"]
    assert read_train_state(tmp_path / "step-00000001") == {"mixture": "b"}


def test_prune_keeps_the_newest(tmp_path):
    for step in (1, 2, 3, 4):
        fake_checkpoint(tmp_path / f"step-{step:08d}")
    fake_checkpoint(tmp_path / "step-00000000", complete=False)
    assert prune_checkpoints(tmp_path, None) == []
    assert prune_checkpoints(tmp_path, 2) == [tmp_path / "step-00000001", tmp_path / "step-00000002"]
    assert sorted(os.listdir(tmp_path)) == ["step-00000000", "step-00000003", "step-00000004"]
    with pytest.raises(MidtrainError, match="keep_last must be >= 1"):
        prune_checkpoints(tmp_path, 0)


# --- kill -9 during a save ---------------------------------------------------------------------


def _save_then_hang(out_dir: Path, second_step: int, pause_at: str, ready: Path) -> None:
    """Child process: save step 1, then save ``second_step`` and stop at ``pause_at`` until killed."""
    torch.set_num_threads(1)
    fabric, model, optimizer = make_run()
    train_step(fabric, model, optimizer, 0)
    save(fabric, model, optimizer, out_dir, 1, {"step": 1})
    train_step(fabric, model, optimizer, 1)

    def pause() -> None:
        ready.touch()
        time.sleep(60)
        os._exit(3)  # not killed: the test fails on the exit code

    real_save, real_replace = fabric.save, os.replace

    def save_hook(path, state):
        real_save(path, state)
        if pause_at == "weights written":
            pause()

    def replace_hook(src, dst):
        if pause_at == "before rename" and Path(src).name.startswith(".tmp-"):
            pause()
        real_replace(src, dst)
        if pause_at == "between renames" and Path(dst).name.startswith(".old-"):
            pause()
        if pause_at == "after rename" and Path(src).name.startswith(".tmp-"):
            pause()

    fabric.save = save_hook
    os.replace = replace_hook
    save(fabric, model, optimizer, out_dir, second_step, {"step": second_step})
    os._exit(4)


@pytest.mark.parametrize(
    "second_step, pause_at, expected, expected_step",
    [
        (2, "weights written", "step-00000001", 1),
        (2, "before rename", "step-00000001", 1),
        (2, "after rename", "step-00000002", 2),
        (1, "between renames", ".old-step-00000001", 1),  # re-saving step 1: the old copy is still found
    ],
)
def test_kill_9_during_save_resumes_from_last_complete(tmp_path, second_step, pause_at, expected, expected_step):
    out_dir, ready = tmp_path / "out", tmp_path / "ready"
    child = multiprocessing.get_context("fork").Process(
        target=_save_then_hang, args=(out_dir, second_step, pause_at, ready)
    )
    child.start()
    deadline = time.monotonic() + 60
    while not ready.exists():
        assert child.is_alive() and time.monotonic() < deadline, f"child did not reach {pause_at!r}"
        time.sleep(0.02)
    os.kill(child.pid, signal.SIGKILL)
    child.join()
    assert child.exitcode == -signal.SIGKILL

    resumed = resolve_resume("auto", out_dir)
    assert resumed == out_dir / expected
    fabric, model, optimizer = make_run(seed=5)
    assert load_checkpoint(fabric, resumed, {"model": model, "optimizer": optimizer}) == {"step": expected_step}
    if pause_at in ("weights written", "before rename"):
        with pytest.raises(
            MidtrainError, match="tmp-step-00000002 is an interrupted checkpoint save, not a checkpoint"
        ):
            resolve_resume(out_dir / ".tmp-step-00000002", out_dir)
        # the next save cleans up the interrupted one
        save(fabric, model, optimizer, out_dir, 3)
        assert sorted(os.listdir(out_dir)) == ["step-00000001", "step-00000003"]


def test_truncate_metrics_keeps_rows_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "val/a/loss": 2.5},
            {"step": 3, "loss": 1.0}, {"step": 3, "val/a/loss": 1.5, "final": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "lo')  # a line cut by a kill
    assert truncate_metrics(path, 3) == 1
    assert truncate_metrics(path, 3, drop_final=True) == 1  # the end phase of step 3 runs again
    assert truncate_metrics(path, 2) == 1
    assert [json.loads(line) for line in path.read_text().splitlines()] == rows[:3]
    assert truncate_metrics(path, None) == 3 and path.read_text() == ""
    assert truncate_metrics(tmp_path / "missing.jsonl", 5) == 0
