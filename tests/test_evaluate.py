"""`midtrain evaluate` on real checkpoints of a tiny pretraining run: CSV rows, skip-on-rerun, padding."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer

from midtrain.cli import run
from midtrain.data.sharded_mixed import ValWindows
from midtrain.demo.corpus import train_bpe_tokenizer
from midtrain.errors import MidtrainError
from midtrain.eval.losses import find_checkpoints, parse_val_sets
from midtrain.rundir import EVAL_COLUMNS as COLUMNS
from tests.synthetic import write_tree

SEQ = 64
MODEL = {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": SEQ, "vocab_size": 512,
         "padded_vocab_size": 512}
WORDS = ["apple", "banana", "cherry", "plum", "seven", "three", "add", "sum", "list", "sort"]


def sft_records(n: int = 11) -> list[dict]:
    """Examples of different lengths, so a batch needs padding; some with an input field."""
    return [
        {"instruction": f"{WORDS[i % 10]} {WORDS[(3 * i) % 10]}", "input": WORDS[i % 4] if i % 3 == 0 else "",
         "output": " ".join(WORDS[(i + k) % 10] for k in range(1 + i % 5))}
        for i in range(n)
    ]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny pretraining run with checkpoints at steps 2 and 4, each carrying a tokenizer."""
    root = tmp_path_factory.mktemp("evaluate")
    write_tree(root / "data", {"1": 20_000, "c1": 8_000}, chunk_tokens=2_000)
    write_tree(root / "val", {"1": 2_000, "c1": 2_000}, chunk_tokens=1_000)
    style = PromptStyle.from_name("alpaca")
    texts = [style.apply(r["instruction"], **r) + r["output"] for r in sft_records()] * 20
    tokenizer = train_bpe_tokenizer(texts, root / "tokenizer", vocab_size=400)
    sft = root / "sft_val.json"
    sft.write_text(json.dumps(sft_records()))
    out = root / "run"
    cfg = {
        "model_config": MODEL, "out_dir": str(out), "precision": "32-true",
        "compile": False, "accelerator": "cpu", "devices": 1,
        "tokenizer_dir": str(tokenizer),
        "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(root / "data"), "mix_weights_str": "main:0.5,code:0.5"}},
        "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 4, "save_interval": 2,
                  "lr_warmup_steps": 1},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
    }
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    run("pretrain", ["--config", str(root / "run.yaml")])
    return {"root": root, "run": out, "sft": sft, "tok": root / "val" / "1", "code": root / "val" / "c1"}


def evaluate(world: dict[str, Path], out: Path, *vals: str, extra: tuple[str, ...] = ()) -> list[dict]:
    args = ["--checkpoints", str(world["run"] / "step-*"), "--out", str(out), "--batch_size", "4"]
    for i, spec in enumerate(vals):
        args += ["--val" if i == 0 else "--val+", spec]
    return run("evaluate", [*args, *extra])


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def load(checkpoint: Path) -> GPT:
    model = GPT(Config.from_file(checkpoint / "model_config.yaml"))
    model.load_state_dict(torch.load(checkpoint / "lit_model.pth", weights_only=False)["model"])
    return model.eval()


def test_rows_for_two_checkpoints_and_two_sets(world, tmp_path):
    out = tmp_path / "eval.csv"
    evaluate(world, out, f"tok={world['tok']}", f"sft={world['sft']}", extra=("--max_samples", "20"))
    rows = read_csv(out)
    assert tuple(rows[0]) == COLUMNS
    assert [(Path(r["checkpoint"]).name, r["set"]) for r in rows] == [
        ("step-00000002", "tok"), ("step-00000002", "sft"), ("step-00000004", "tok"), ("step-00000004", "sft")]
    assert [int(r["step"]) for r in rows] == [2, 2, 4, 4]
    assert [int(r["tokens_seen"]) for r in rows] == [2 * 4 * SEQ] * 2 + [4 * 4 * SEQ] * 2
    for r in rows:
        assert math.isfinite(float(r["loss"])) and float(r["ppl"]) == pytest.approx(math.exp(float(r["loss"])), 1e-4)
    assert int(rows[0]["n_tokens"]) == 20 * SEQ  # 2,000 tokens in chunks of 1,000 -> 30 windows, 20 taken
    assert float(rows[0]["loss"]) != float(rows[2]["loss"])  # the checkpoints differ

    # the token-set row, computed directly from the checkpoint and the same 20 windows
    windows = ValWindows(world["tok"], SEQ + 1, 20, masked=False)
    x = torch.stack([windows[i] for i in range(len(windows))]).long()
    with torch.no_grad():
        logits = load(world["run"] / "step-00000004")(x[:, :-1])
    direct = F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1)).item()
    assert float(rows[2]["loss"]) == pytest.approx(direct, abs=1e-5)


def test_sft_padding_and_prompt_never_count(world, tmp_path):
    """The batched SFT row equals per-example response losses, token-weighted, computed one at a time."""
    checkpoint = world["run"] / "step-00000004"
    model, tokenizer, style = load(checkpoint), Tokenizer(checkpoint), PromptStyle.from_name("alpaca")
    loss_sum = count = 0.0
    for r in sft_records():
        prompt = tokenizer.encode(style.apply(r["instruction"], **r))
        response = tokenizer.encode(r["output"], bos=False, eos=True)
        ids = torch.cat([prompt, response]).long()
        assert len(ids) <= SEQ + 1  # no truncation, so the direct computation is exact
        with torch.no_grad():
            logits = model(ids[None, :-1])[0, len(prompt) - 1 :]
        loss_sum += F.cross_entropy(logits, ids[len(prompt) :], reduction="sum").item()
        count += len(response)
    out = tmp_path / "sft.csv"
    run("evaluate", ["--checkpoints", str(checkpoint), "--val", f"sft={world['sft']}", "--out", str(out),
                     "--batch_size", "4", "--max_samples", "null"])
    unmasked = tmp_path / "unmasked.csv"
    run("evaluate", ["--checkpoints", str(checkpoint), "--val", f"sft={world['sft']}", "--out", str(unmasked),
                     "--mask_prompt", "false"])
    (row,), (whole,) = read_csv(out), read_csv(unmasked)
    assert int(row["n_tokens"]) == count
    assert float(row["loss"]) == pytest.approx(loss_sum / count, abs=1e-5)
    assert int(whole["n_tokens"]) > count  # prompt tokens count only when not masked


def test_rerun_skips_finished_rows(world, tmp_path, capsys):
    out = tmp_path / "eval.csv"
    evaluate(world, out, f"tok={world['tok']}", f"sft={world['sft']}", extra=("--max_samples", "4"))
    first = read_csv(out)
    capsys.readouterr()
    evaluate(world, out, f"tok={world['tok']}", f"sft={world['sft']}", extra=("--max_samples", "4"))
    assert "4 rows already" in capsys.readouterr().out
    assert read_csv(out) == first
    rows = evaluate(world, out, f"tok={world['tok']}", f"sft={world['sft']}", f"code={world['code']}",
                    extra=("--max_samples", "4"))
    assert "4 rows already" in capsys.readouterr().out
    assert read_csv(out)[:4] == first and len(rows) == 6
    assert [r["set"] for r in read_csv(out)[4:]] == ["code", "code"]


def test_incomplete_checkpoints_are_skipped_with_a_note(world, tmp_path, capsys):
    run_dir = tmp_path / "run"
    shutil.copytree(world["run"] / "step-00000002", run_dir / "step-00000002")
    shutil.copytree(world["run"] / "step-00000004", run_dir / "step-00000004")
    (run_dir / "step-00000004" / "COMPLETE").unlink()
    found = find_checkpoints(str(run_dir / "step-*"))
    assert [c.step for c in found] == [2]
    assert "skipping incomplete checkpoint" in capsys.readouterr().out
    assert [c.step for c in find_checkpoints(str(run_dir))] == [2]  # a run directory means its step-* dirs


def test_bad_input_is_a_clear_error(world, tmp_path):
    with pytest.raises(MidtrainError, match="not name=PATH"):
        parse_val_sets(["c4"])
    with pytest.raises(MidtrainError, match="does not exist"):
        parse_val_sets([f"c4={tmp_path / 'nowhere'}"])
    with pytest.raises(MidtrainError, match="given twice"):
        parse_val_sets([f"a={world['tok']}", f"a={world['sft']}"])
    with pytest.raises(MidtrainError, match="No checkpoint matches"):
        find_checkpoints(str(tmp_path / "none-*"))
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "x"}]))
    with pytest.raises(MidtrainError, match="record 0 needs 'instruction' and 'output'"):
        evaluate(world, tmp_path / "e.csv", f"bad={bad}")
    # --tasks (lm-eval benchmarks) is tested end to end, offline, in test_benchmarks.py.
