"""`midtrain finetune` end to end on CPU: a real pretrained tiny checkpoint, litgpt's JSON SFT module, replay."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import set_dotted
from litgpt.config import Config
from litgpt.generate.base import main as litgpt_generate
from litgpt.model import GPT
from litgpt.prompts import PromptStyle
from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint as convert_from_litgpt
from litgpt.tokenizer import Tokenizer

from midtrain.cli import run
from midtrain.config.schedules import LRSchedule
from midtrain.data.replay import Replay, spread
from midtrain.data.sft import SFTOrder
from midtrain.data.sharded_mixed import ValWindows
from midtrain.errors import MidtrainError
from midtrain.rundir import find_latest, read_train_state
from midtrain.train.runtime import EXIT_PREEMPTED
from tests.synthetic import write_tree

SEQ = 64
MODEL = {"name": "tiny-ft", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": SEQ, "vocab_size": 256,
         "padded_vocab_size": 256}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run far faster on one thread (two threads on a busy 2-core box spin-wait)."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


def _records(n: int, offset: int) -> list[dict]:
    out = []
    for k in range(offset, offset + n):
        a, b = k % 7, (3 * k) % 5
        out.append({"instruction": f"what is {a} plus {b} ?", "input": "" if k % 3 else f"say {a}",
                    "output": f"the answer is {a + b} ."})
    return out


def _tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    tok = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [PromptStyle.from_name("alpaca").apply(r["instruction"], **r) + r["output"] for r in _records(40, 0)]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(directory / "tokenizer.json"))
    config = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
              "tokenizer_class": "PreTrainedTokenizerFast"}
    (directory / "tokenizer_config.json").write_text(json.dumps(config))


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """Pretraining shards, a tokenizer, a 2-step pretrained checkpoint (via `midtrain pretrain`), SFT JSON files."""
    root = tmp_path_factory.mktemp("ft")
    write_tree(root / "data", {"1": 30_000, "c1": 20_000}, vocab_size=256, chunk_tokens=2_500)
    write_tree(root / "val", {"1": 3_000}, vocab_size=256, chunk_tokens=2_500)
    (root / "tok").mkdir()
    _tokenizer(root / "tok")
    cfg = {
        "model_config": MODEL, "out_dir": str(root / "pre"), "precision": "32-true",
        "compile": False, "accelerator": "cpu",
        "devices": 1, "tokenizer_dir": str(root / "tok"),
        "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(root / "data"), "mix_weights_str": "main:1", "num_workers": 0}},
        "train": {"max_steps": 2, "global_batch_size": 4, "micro_batch_size": 4, "save_interval": None},
        "eval": {"final_validation": False},
    }
    (root / "pre.yaml").write_text(yaml.safe_dump(cfg))
    run("pretrain", ["--config", str(root / "pre.yaml")])
    (root / "sft").mkdir()
    (root / "sft" / "train.json").write_text(json.dumps(_records(12, 0)))
    (root / "sft" / "val.json").write_text(json.dumps(_records(5, 100)))
    return {"root": root, "ckpt": find_latest(root / "pre"), "sft": root / "sft", "tok": root / "tok"}


def finetune_config(world: dict[str, Path], out: Path, ratio: float | None = 0.25, **overrides) -> Path:
    cfg = {
        "checkpoint_dir": str(world["ckpt"]),
        "out_dir": str(out),
        "precision": "32-true", "compile": False,
        "accelerator": "cpu",
        "data": {"class_path": "litgpt.data.JSON",
                 "init_args": {"json_path": str(world["sft"]), "mask_prompt": True, "num_workers": 0}},
        "train": {"max_steps": 6, "global_batch_size": 8, "micro_batch_size": 2, "lr_warmup_steps": 1,
                  "save_interval": None, "max_seq_length": SEQ},
        "eval": {"interval": 3, "max_samples": 8},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
    }
    if ratio is not None:
        cfg["replay"] = {"ratio": ratio, "data": {"data_path": str(world["root"] / "data"), "mix_weights_str":
                                                  "main:0.5,code:0.5", "num_workers": 0,
                                                  "val_data_path": {"c4": str(world["root"] / "val" / "1")}}}
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def finetune(cfg: Path, *args: str) -> None:
    run("finetune", ["--config", str(cfg), *args])


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def by_step(out: Path, key: str) -> dict[int, float]:
    """``step -> value`` of ``key`` in metrics.jsonl; a step logged twice fails the test."""
    steps = [r["step"] for r in rows(out) if key in r]
    assert len(steps) == len(set(steps)), f"{key}: steps logged more than once: {steps}"
    return {r["step"]: r[key] for r in rows(out) if key in r}


def val_loss(weights: Path, shard: Path, max_samples: int) -> float:
    """Token-mean loss of the model in ``weights`` (one of our checkpoints) on a validation shard, by hand."""
    model = GPT(Config(**MODEL))
    model.load_state_dict(torch.load(weights / "lit_model.pth", weights_only=True)["model"])
    total, count = 0.0, 0
    with torch.no_grad():
        windows = ValWindows(shard, SEQ + 1, max_samples, masked=False)
        for i in range(len(windows)):
            window = windows[i].long()
            total += F.cross_entropy(model(window[None, :-1])[0], window[1:], reduction="sum").item()
            count += SEQ
    return total / count


def test_replay_fraction_is_exact_every_step_and_forgetting_sets_are_logged(world, tmp_path):
    out = tmp_path / "r25"
    finetune(finetune_config(world, out))
    train_rows = [r for r in rows(out) if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    # 2 of 8 sequences per step come from the shards (in a micro-batch of their own)
    assert all(r["replay_fraction"] == 0.25 and r["replay_sequences"] == 2 and r["sft_sequences"] == 6
               for r in train_rows)
    assert all("train/replay/loss" in r and "train/sft/loss" in r for r in train_rows)
    assert train_rows[-1]["tokens/replay"] == 6 * 2 * SEQ  # every replay token is scored
    state = read_train_state(find_latest(out))
    assert state["sft"] == {"consumed": 36, "epoch": 3.0, "train_samples": 12}
    assert state["replay"]["loader"]["consumed"] == 6 * 2  # the replay stream advanced 2 per step
    assert sum(state["replay"]["tokens_by_source"].values()) == 6 * 2 * SEQ
    val_steps = {name: sorted(by_step(out, f"val/{name}/loss")) for name in ("sft", "c4")}
    assert val_steps == {"sft": [3, 6], "c4": [3, 6]}
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["val"]) == {"sft", "c4"} and summary["replay_sequences_per_step"] == 2


def test_ratio_zero_equals_plain_sft(world, tmp_path):
    zero, plain = tmp_path / "zero", tmp_path / "plain"
    finetune(finetune_config(world, zero, ratio=0.0))
    finetune(finetune_config(world, plain, ratio=None, val_data_path={"c4": str(world["root"] / "val" / "1")}))
    assert by_step(zero, "loss") == by_step(plain, "loss")
    assert by_step(zero, "val/c4/loss") == by_step(plain, "val/c4/loss")
    assert all(r["replay_fraction"] == 0.0 for r in rows(zero) if "loss" in r)


@pytest.mark.parametrize("mask_prompt", [True, False])
def test_first_step_loss_is_the_token_mean_over_response_tokens(world, tmp_path, mask_prompt):
    """The step-1 loss (one step = all 12 training records) equals a hand computation with the start weights."""
    out = tmp_path / "mask"
    finetune(finetune_config(world, out, ratio=None, **{"train.global_batch_size": 12, "train.max_steps": 1,
                                                        "train.lr_warmup_steps": 0,
                                                        "data.init_args.mask_prompt": mask_prompt}))
    model = GPT(Config(**MODEL))
    model.load_state_dict(torch.load(world["ckpt"] / "lit_model.pth", weights_only=True)["model"])
    tok, style = Tokenizer(world["tok"]), PromptStyle.from_name("alpaca")
    total, count = 0.0, 0
    with torch.no_grad():
        for r in json.loads((world["sft"] / "train.json").read_text()):
            prompt = tok.encode(style.apply(r["instruction"], **r))
            ids = torch.cat([prompt, tok.encode(r["output"], bos=False, eos=True)]).long()
            losses = F.cross_entropy(model(ids[None, :-1])[0], ids[1:], reduction="none")
            scored = losses[len(prompt) - 1 :] if mask_prompt else losses
            total, count = total + scored.sum().item(), count + len(scored)
    assert by_step(out, "loss")[1] == pytest.approx(total / count, rel=1e-5)


def test_interrupted_finetune_with_replay_resumes_exactly(world, tmp_path, monkeypatch):
    """Stopped at step 2 (max_additional_steps), preempted at step 4 (SIGUSR1), finished: same losses."""
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    finetune(finetune_config(world, whole))
    cfg = finetune_config(world, parts)
    finetune(cfg, "--train.max_additional_steps", "2")  # stops in the middle of the SFT data's first epoch
    assert read_train_state(find_latest(parts))["step"] == 2

    lr = LRSchedule.lr

    def lr_with_signal(schedule: LRSchedule, step: int, *args):
        if step == 3:  # the signal arrives during step 4; the run checkpoints after it and exits for a requeue
            os.kill(os.getpid(), signal.SIGUSR1)
        return lr(schedule, step, *args)

    monkeypatch.setattr(LRSchedule, "lr", lr_with_signal)
    with pytest.raises(SystemExit) as exit_info:
        finetune(cfg, "--resume", "auto")
    assert exit_info.value.code == EXIT_PREEMPTED
    assert read_train_state(find_latest(parts))["reason"] == "preempted"
    monkeypatch.setattr(LRSchedule, "lr", lr)
    finetune(cfg, "--resume", "auto")
    got, expected = by_step(parts, "loss"), by_step(whole, "loss")
    assert sorted(got) == list(range(1, 7))
    assert got == pytest.approx(expected, rel=1e-6, abs=1e-7)
    assert by_step(parts, "val/c4/loss")[6] == pytest.approx(by_step(whole, "val/c4/loss")[6], rel=1e-6)
    assert read_train_state(find_latest(parts))["replay"] == read_train_state(find_latest(whole))["replay"]


def test_layout_order_and_bad_input(world, tmp_path):
    assert spread(3, 2) == [2, 1] and spread(2, 4) == [1, 1, 0, 0] and sum(spread(7, 3)) == 7
    order = SFTOrder(5, seed=1)
    first, second = order.take(0, 5), order.take(5, 5)
    assert sorted(first) == sorted(second) == list(range(5)) and first != second  # epochs: fresh permutations
    assert order.take(3, 4) == first[3:] + second[:2] and SFTOrder(5, seed=1).take(7, 3) == second[2:]
    with pytest.raises(MidtrainError, match=r"must be in \[0, 1\)"):
        Replay(ratio=1.0).build()
    with pytest.raises(MidtrainError, match="needs replay.data"):
        Replay(ratio=0.5).build()
    with pytest.raises(MidtrainError, match="whole number"):
        Replay(ratio=0.3, data={"data_path": str(world["root"] / "data"), "mix_weights_str": "main:1"}
               ).sequences_per_step(8, 1)
    out = tmp_path / "bad"
    with pytest.raises(MidtrainError, match="does not exist"):
        finetune(finetune_config(world, out, checkpoint_dir=str(tmp_path / "nope")))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "lit_model.pth").write_bytes(b"")
    with pytest.raises(MidtrainError, match="no model_config.yaml"):
        finetune(finetune_config(world, out, checkpoint_dir=str(broken)))
    with pytest.raises(MidtrainError, match="whole number"):
        finetune(finetune_config(world, out, ratio=0.3))
    with pytest.raises(MidtrainError, match="exactly one of train.max_steps or epochs"):
        finetune(finetune_config(world, out), "--epochs", "2")
    with pytest.raises(MidtrainError, match=r"must be in \[0, 1\)"):
        finetune(finetune_config(world, out, ratio=1.5))
    with pytest.raises(MidtrainError, match="No SFT training sample keeps a scored response token"):
        finetune(finetune_config(world, out, **{"train.max_seq_length": 8}))


def test_epochs_run_dir_and_litgpt_format_checkpoints(world, tmp_path):
    """``epochs`` sets the length; a run directory and a litgpt-format copy give the same start weights."""
    ours = tmp_path / "ours"
    finetune(finetune_config(world, ours, ratio=None, checkpoint_dir=str(world["root"] / "pre")),
             "--train.max_steps", "null", "--epochs", "1.5")
    assert sorted(by_step(ours, "loss")) == [1, 2, 3]  # ceil(1.5 epochs x 12 samples / 8 per step)
    lit = tmp_path / "litgpt_ckpt"  # litgpt's layout: plain state dict, model_config.yaml, tokenizer
    lit.mkdir()
    torch.save(torch.load(world["ckpt"] / "lit_model.pth", weights_only=True)["model"], lit / "lit_model.pth")
    for name in ("model_config.yaml", "tokenizer.json", "tokenizer_config.json"):
        (lit / name).write_bytes((world["ckpt"] / name).read_bytes())
    theirs = tmp_path / "theirs"
    finetune(finetune_config(world, theirs, ratio=None, checkpoint_dir=str(lit)),
             "--train.max_steps", "null", "--epochs", "1.5")
    assert by_step(theirs, "loss") == by_step(ours, "loss")


@pytest.mark.slow  # spawns processes
def test_two_process_ddp_gives_the_same_losses(world, tmp_path):
    """Loss = mean over the step's scored tokens on all ranks, so 2 processes train exactly like 1; both start
    from the checkpoint's weights, loaded after ``fabric.setup`` through the strategy (the path FSDP takes)."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    sgd = {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}}, "train.max_norm": None,
           "eval.initial_validation": True}
    finetune(finetune_config(world, single, ratio=0.0, **sgd))  # SGD: a wrongly scaled gradient would show
    proc = subprocess.run([sys.executable, "-m", "midtrain", "finetune", "--config",
                           str(finetune_config(world, ddp, ratio=0.0, devices=2, **sgd))],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "no-op" not in proc.stdout + proc.stderr  # torch's warning when weights go into a meta-device model
    source = val_loss(world["ckpt"], world["root"] / "val" / "1", max_samples=8)
    assert by_step(ddp, "val/c4/loss")[0] == pytest.approx(source, rel=1e-5)
    assert by_step(single, "val/c4/loss")[0] == pytest.approx(source, rel=1e-5)
    assert by_step(ddp, "loss") == pytest.approx(by_step(single, "loss"), rel=1e-5)
    assert by_step(ddp, "val/sft/loss") == pytest.approx(by_step(single, "val/sft/loss"), rel=1e-5)
    assert by_step(ddp, "val/c4/loss") == pytest.approx(by_step(single, "val/c4/loss"), rel=1e-5)
    state = read_train_state(find_latest(ddp))
    assert state["world_size"] == 2 and state["sft"]["consumed"] == 6 * 8
    # with replay, each of the 2 processes takes ratio x global batch / 2 sequences per step
    replay = Replay(ratio=0.25, data={"data_path": str(world["root"] / "data"), "mix_weights_str": "main:1"})
    assert replay.sequences_per_step(8, 2) == 2
    with pytest.raises(MidtrainError, match="divisible by the 2 process"):
        Replay(ratio=0.125, data=replay.data).sequences_per_step(8, 2)


def test_final_dir_opens_in_litgpt_generate_and_convert_from_litgpt(world, tmp_path, capsys):
    """The run ends with litgpt's ``final/``: plain weights, model_config.yaml, the tokenizer, its own config.json."""
    tok = tmp_path / "tok"  # a tokenizer dir that, like a Hugging Face model dir, also holds that model's config.json
    shutil.copytree(world["tok"], tok)
    (tok / "config.json").write_text(json.dumps({"architectures": ["SomeOtherModel"], "hidden_size": 4096}))
    out = tmp_path / "run"
    finetune(finetune_config(world, out, ratio=None, tokenizer_dir=str(tok), **{"train.max_steps": 2}))
    final = out / "final"
    assert sorted(p.name for p in final.iterdir()) == [
        "COMPLETE", "config.json", "hyperparameters.yaml", "lit_model.pth", "model_config.yaml", "tokenizer.json",
        "tokenizer_config.json"]
    for checkpoint in (final, find_latest(out)):  # config.json is the model's own (midtrain.train.hf_config)
        assert json.loads((checkpoint / "config.json").read_text())["architectures"] != ["SomeOtherModel"]
    weights = torch.load(final / "lit_model.pth", weights_only=True)
    last = torch.load(find_latest(out) / "lit_model.pth", weights_only=True)["model"]
    assert weights.keys() == last.keys() and all(torch.equal(weights[k], last[k]) for k in weights)

    capsys.readouterr()
    litgpt_generate(final, prompt="what is 1 plus 2 ?", max_new_tokens=4, precision="32-true")
    assert "what is 1 plus 2" in capsys.readouterr().out
    convert_from_litgpt(final, tmp_path / "hf")
    hf = torch.load(tmp_path / "hf" / "model.pth", weights_only=True)
    assert torch.equal(hf["gpt_neox.embed_in.weight"], weights["transformer.wte.weight"])


def test_shards_prepared_with_another_tokenizer_are_refused(world, tmp_path):
    data = tmp_path / "data"
    texts = tmp_path / "texts.jsonl"
    texts.write_text("".join(json.dumps({"text": f"{r['instruction']} {r['output']}"}) + "\n"
                             for r in _records(300, 0)))
    run("prepare", ["--inputs", str(texts), "--type", "main", "--data_path", str(data),
                    "--tokenizer_dir", str(world["tok"]), "--num_workers", "0"])
    other = tmp_path / "other_tok"  # the same vocabulary, but it adds no BOS: other token IDs for the same text
    shutil.copytree(world["tok"], other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    replay = {"replay.data.data_path": str(data), "replay.data.mix_weights_str": "main:1",
              "replay.data.val_data_path": None}
    with pytest.raises(MidtrainError, match=f"Tokenizer mismatch: shard {data / '1'} was prepared with tokenizer"):
        finetune(finetune_config(world, tmp_path / "ft", tokenizer_dir=str(other), **replay))
    with pytest.raises(MidtrainError, match=r"was trained with tokenizer .*, this run uses .*other_tok"):
        finetune(finetune_config(world, tmp_path / "ft", ratio=None, tokenizer_dir=str(other)))
    pre = {"model_config": MODEL, "out_dir": str(tmp_path / "pre"), "precision": "32-true", "compile": False,
           "accelerator": "cpu", "devices": 1, "tokenizer_dir": str(other),
           "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                    "init_args": {"data_path": str(data), "mix_weights_str": "main:1", "num_workers": 0}},
           "train": {"max_steps": 1, "global_batch_size": 2, "micro_batch_size": 2}}
    (tmp_path / "pre.yaml").write_text(yaml.safe_dump(pre))
    with pytest.raises(MidtrainError, match="Tokenizer mismatch"):
        run("pretrain", ["--config", str(tmp_path / "pre.yaml")])
    assert not (tmp_path / "pre").exists() and not (tmp_path / "ft").exists()
    run("pretrain", ["--config", str(tmp_path / "pre.yaml"), "--tokenizer_dir", str(world["tok"])])  # the right one
    assert read_train_state(find_latest(tmp_path / "pre"))["tokenizer"]["fingerprint"] == json.loads(
        (data / "1" / "prepare.json").read_text())["tokenizer"]["fingerprint"]


@pytest.mark.slow  # spawns processes
def test_two_process_replay_takes_each_ranks_share(world, tmp_path):
    """replay.ratio 0.25 of a global batch of 8 on 2 processes: 1 replay sequence per rank and step, 2 in all, the
    same sequences a single process takes; every rank taking the full 2 would train on 4."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    sgd = {"optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 1.0}}, "train.max_norm": None}
    finetune(finetune_config(world, single, **sgd))
    proc = subprocess.run([sys.executable, "-m", "midtrain", "finetune", "--config",
                           str(finetune_config(world, ddp, devices=2, **sgd))],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    state = read_train_state(find_latest(ddp))
    assert state["world_size"] == 2 and state["replay"]["loader"]["consumed"] == 6 * 2
    assert sum(state["replay"]["tokens_by_source"].values()) == 6 * 2 * SEQ
    assert [r["tokens/replay"] for r in rows(ddp) if "loss" in r][-1] == 6 * 2 * SEQ
    assert by_step(ddp, "loss") == pytest.approx(by_step(single, "loss"), rel=1e-5)
    assert by_step(ddp, "val/c4/loss") == pytest.approx(by_step(single, "val/c4/loss"), rel=1e-5)


def test_resume_with_another_tokenizer_dir_is_refused(world, tmp_path):
    """A fine-tuning resume checks its own checkpoint's tokenizer (check_compatible): not a silent run."""
    other = tmp_path / "other_tok"  # the same vocabulary, but no BOS: other token IDs for the same text
    shutil.copytree(world["tok"], other)
    config = json.loads((other / "tokenizer_config.json").read_text())
    (other / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": False}))
    out = tmp_path / "ft"
    cfg = finetune_config(world, out, ratio=None, **{"eval.interval": 100})
    finetune(cfg, "--train.max_additional_steps", "2")
    metrics = (out / "metrics.jsonl").read_text()
    with pytest.raises(MidtrainError, match=r"step-00000002 was trained with another tokenizer"):
        finetune(cfg, "--tokenizer_dir", str(other))
    assert (out / "metrics.jsonl").read_text() == metrics and find_latest(out) == out / "step-00000002"
