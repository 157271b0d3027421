"""Benchmarks of checkpoints: HF config.json round trip, `midtrain evaluate --tasks` on local lm-eval tasks.

Needs the ``eval`` extra (lm-eval, transformers); runs offline: the tasks are YAML + JSON written here.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import shutil
import signal
from pathlib import Path

import pytest
import torch
import yaml
from litgpt.config import Config
from litgpt.model import GPT
from litgpt.prompts import PromptStyle
from litgpt.scripts.convert_lit_checkpoint import convert_lit_checkpoint

from midtrain import preemption
from midtrain.cli import run
from midtrain.demo.corpus import train_bpe_tokenizer
from midtrain.errors import MidtrainError
from midtrain.eval.benchmarks import HF_DIR, write_choice_task
from midtrain.preemption import EXIT_PREEMPTED
from midtrain.train.hf_config import HF_CONFIG_FILE, UnsupportedFamily, hf_config, hf_config_json
from tests.synthetic import write_tree

pytestmark = pytest.mark.slow  # spawns CLI / training / DDP / SLURM processes (make test-fast skips it)

transformers = pytest.importorskip("transformers")
pytest.importorskip("lm_eval")
os.environ["HF_HUB_OFFLINE"] = "1"  # nothing may come from the hub
os.environ["HF_DATASETS_OFFLINE"] = "1"

SEQ = 64
PYTHIA = {"name": "tiny-pythia", "n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": SEQ, "vocab_size": 400,
          "padded_vocab_size": 512, "rotary_percentage": 0.5, "rope_base": 500, "parallel_residual": True}
WORDS = ["apple", "banana", "cherry", "plum", "seven", "three", "add", "sum", "list", "sort", "red", "blue"]


def sft_records(n: int = 12) -> list[dict]:
    return [{"instruction": f"name {WORDS[i % 12]}", "input": "", "output": f"{WORDS[(i + 5) % 12]} {WORDS[i % 7]}"}
            for i in range(n)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    """A tiny Pythia-style run trained through the CLI: step-00000002, step-00000004 and final/, with a tokenizer."""
    root = tmp_path_factory.mktemp("bench")
    write_tree(root / "data", {"1": 20_000}, chunk_tokens=2_000)
    style = PromptStyle.from_name("alpaca")
    texts = [style.apply(r["instruction"], **r) + r["output"] for r in sft_records()] * 20
    tokenizer = train_bpe_tokenizer(texts, root / "tokenizer", vocab_size=400)
    (tokenizer / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 7}))  # must not be copied
    sft = root / "sft_val.json"
    sft.write_text(json.dumps(sft_records()))
    cfg = {
        "model_config": PYTHIA, "out_dir": str(root / "run"), "precision": "32-true", "compile": False,
        "accelerator": "cpu", "devices": 1, "tokenizer_dir": str(tokenizer),
        "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(root / "data"), "mix_weights_str": "main:1"}},
        "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 4, "save_interval": 2,
                  "lr_warmup_steps": 1},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
    }  # fmt: skip
    (root / "run.yaml").write_text(yaml.safe_dump(cfg))
    run("pretrain", ["--config", str(root / "run.yaml")])
    return {"root": root, "run": root / "run", "sft": sft}


def litgpt_logits(checkpoint: Path, idx: torch.Tensor) -> torch.Tensor:
    model = GPT(Config.from_file(checkpoint / "model_config.yaml"))
    state = torch.load(checkpoint / "lit_model.pth", weights_only=False)
    model.load_state_dict(state.get("model", state))
    with torch.no_grad():
        return model.eval()(idx)


def hf_logits(converted: Path, idx: torch.Tensor) -> torch.Tensor:
    model = transformers.AutoModelForCausalLM.from_pretrained(str(converted), dtype=torch.float32)
    with torch.no_grad():
        return model.eval()(idx).logits


def test_final_converts_to_transformers_with_the_litgpt_logits(world, tmp_path):
    final = world["run"] / "final"
    for checkpoint in (final, world["run"] / "step-00000002"):
        written = json.loads((checkpoint / HF_CONFIG_FILE).read_text())
        assert written["model_type"] == "gpt_neox" and written["hidden_size"] == 32  # ours, not the tokenizer's
        assert written["rotary_pct"] == 0.5 and written["rotary_emb_base"] == 500 and written["vocab_size"] == 512
    converted = tmp_path / "hf"
    convert_lit_checkpoint(final, converted)  # what `litgpt convert_from_litgpt final hf` runs
    shutil.copyfile(final / HF_CONFIG_FILE, converted / HF_CONFIG_FILE)
    torch.save(torch.load(converted / "model.pth", weights_only=False), converted / "pytorch_model.bin")
    idx = torch.randint(0, 400, (2, 17), generator=torch.Generator().manual_seed(0))
    diff = (hf_logits(converted, idx) - litgpt_logits(final, idx)).abs().max().item()
    assert diff <= 1e-4


def test_llama_style_round_trip_and_refusal(tmp_path):
    config = Config(name="tiny-llama", n_layer=2, n_head=4, n_query_groups=2, n_embd=32, block_size=32,
                    vocab_size=100, padded_vocab_size=128, norm_class_name="RMSNorm", mlp_class_name="LLaMAMLP",
                    intermediate_size=48, parallel_residual=False, rotary_percentage=1.0, bias=False)  # fmt: skip
    torch.manual_seed(0)
    model = GPT(config)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    torch.save(model.state_dict(), ckpt / "lit_model.pth")
    (ckpt / "model_config.yaml").write_text(yaml.safe_dump(dataclasses.asdict(config)))
    convert_lit_checkpoint(ckpt, tmp_path / "hf")
    (tmp_path / "hf" / HF_CONFIG_FILE).write_text(hf_config_json(config))
    torch.save(torch.load(tmp_path / "hf" / "model.pth"), tmp_path / "hf" / "pytorch_model.bin")
    idx = torch.randint(0, 100, (1, 9), generator=torch.Generator().manual_seed(1))
    assert (hf_logits(tmp_path / "hf", idx) - litgpt_logits(ckpt, idx)).abs().max().item() <= 1e-4
    with pytest.raises(UnsupportedFamily, match=r"^No HF config.json for model 'odd': mlp GemmaMLP"):
        hf_config(Config(name="odd", mlp_class_name="GemmaMLP", norm_class_name="RMSNorm"))
    with pytest.raises(UnsupportedFamily, match="its own"):
        hf_config(Config(name="phi-tiny"))


def write_completion_task(directory: Path) -> str:
    """A loglikelihood task: is the continuation the model's greedy one (acc) and its perplexity."""
    docs = [{"context": f"{WORDS[i]} {WORDS[i + 1]}", "continuation": f" {WORDS[i + 2]}"} for i in range(6)]
    (directory / "local_next.json").write_text(json.dumps(docs))
    spec = {"task": "local_next", "dataset_path": "json", "test_split": "test", "output_type": "loglikelihood",
            "dataset_kwargs": {"data_files": {"test": str((directory / "local_next.json").resolve())}},
            "doc_to_text": "{{context}}", "doc_to_target": "{{continuation}}", "target_delimiter": "",
            "metric_list": [
                {"metric": "acc", "aggregation": "mean", "higher_is_better": True},
                {"metric": "perplexity", "aggregation": "perplexity", "higher_is_better": False}]}  # fmt: skip
    (directory / "local_next.yaml").write_text(yaml.safe_dump(spec))
    return "local_next"


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_evaluate_tasks_writes_metric_rows_once(world, tmp_path):
    tasks = tmp_path / "tasks"
    choice = write_choice_task(world["sft"], tasks, "local_choice")
    docs = json.loads((tasks / "local_choice.json").read_text())
    assert choice.is_file() and len(docs) == 12 and all(len(d["choices"]) == 4 for d in docs)
    assert all(d["choices"][d["label"]] == r["output"] for d, r in zip(docs, sft_records()))
    completion = write_completion_task(tasks)
    out = tmp_path / "eval.csv"
    args = ["--checkpoints", str(world["run"] / "step-*"), "--out", str(out), "--tasks", f"local_choice,{completion}",
            "--include_path", str(tasks), "--num_fewshot", "1", "--accelerator", "cpu",
            "--batch_size", "4"]  # fmt: skip
    run("evaluate", args)
    rows = read_csv(out)
    got = {(Path(r["checkpoint"]).name, r["set"], r["metric"]) for r in rows}
    for step in ("step-00000002", "step-00000004"):
        for metric in ("acc", "acc_norm"):
            assert (step, "local_choice:1shot", metric) in got
        assert (step, "local_next:1shot", "acc") in got and (step, "local_next:1shot", "perplexity") in got
    for row in rows:
        assert 0.0 <= float(row["value"]) <= 1.0 or row["metric"] == "perplexity"
        assert row["step"] in ("2", "4") and not row["loss"]
    assert all(row["stderr"] for row in rows if row["metric"] == "acc")
    weights = world["run"] / "step-00000002" / HF_DIR / "pytorch_model.bin"
    stamp = weights.stat().st_mtime_ns
    run("evaluate", args)  # rerun: nothing new, the conversion reused
    assert read_csv(out) == rows and weights.stat().st_mtime_ns == stamp
    assert json.loads((weights.parent / HF_CONFIG_FILE).read_text())["model_type"] == "gpt_neox"
    report = run("report", ["--runs", str(world["run"]), "--out", str(tmp_path / "report"), "--evals", str(out)])
    text = report.read_text()
    latest = {(r["set"], r["metric"]): r for r in rows if r["step"] == "4"}["local_choice:1shot", "acc"]
    assert f"| run | local_choice:1shot | acc | {latest['value']} ± {latest['stderr']} | step-00000004 |" in text
    assert "**Score vs step**" in text and "| run | benchmark | metric | 2 | 4 |" in text


def test_preemption_finishes_the_task_and_exits_75(world, tmp_path):
    tasks = tmp_path / "tasks"
    write_choice_task(world["sft"], tasks, "local_choice")
    completion = write_completion_task(tasks)
    out = tmp_path / "eval.csv"
    args = ["--checkpoints", str(world["run"] / "final"), "--out", str(out), "--tasks", f"local_choice,{completion}",
            "--include_path", str(tasks), "--limit", "4", "--accelerator", "cpu"]  # fmt: skip
    preemption.install("SIGUSR1")
    try:
        os.kill(os.getpid(), signal.SIGUSR1)
        with pytest.raises(SystemExit) as exit_info:
            run("evaluate", args)
        assert exit_info.value.code == EXIT_PREEMPTED
        assert {r["set"] for r in read_csv(out)} == {"local_choice"}  # the first task finished and was written
    finally:
        preemption.clear()
        preemption.uninstall("SIGUSR1")
    run("evaluate", args)
    assert {r["set"] for r in read_csv(out)} == {"local_choice", completion}


def test_bad_task_input_is_a_clear_error(world, tmp_path):
    args = ["--checkpoints", str(world["run"] / "final"), "--out", str(tmp_path / "e.csv"), "--accelerator", "cpu"]
    with pytest.raises(MidtrainError, match="Unknown lm-eval task"):
        run("evaluate", [*args, "--tasks", "no_such_task_here", "--include_path", str(tmp_path)])
    with pytest.raises(MidtrainError, match="not a directory"):
        run("evaluate", [*args, "--tasks", "x", "--include_path", str(tmp_path / "nowhere")])
