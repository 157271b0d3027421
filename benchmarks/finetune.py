"""Tokens/s and peak memory of `midtrain finetune` vs `litgpt finetune_full`, and replay 0.25 vs 0.

    python benchmarks/finetune.py [--rounds 2] [--steps 12] [--device cpu|cuda] [--compile default|true|false]

All runs fine-tune the same checkpoint (the logits-heavy model of ``benchmarks/pretrain.py``:
2 layers x 128, vocabulary 50,304, with a word-level tokenizer) on the same JSON SFT data
(instructions with responses of 5 to 150 words, so micro-batches need padding), with the same
global batch, micro-batch, sequence length, optimizer and data workers:

  litgpt finetune_full           litgpt's full fine-tuning (it does not compile)
  midtrain finetune replay 0     plain SFT
  midtrain finetune replay 0.25  a quarter of every step's sequences from pretraining shards

A step's time: litgpt's ``iter time`` summed over the micro-batches of the step (its timer starts
before the batch is fetched), midtrain's ``step_time``. The first ``--warmup`` steps are dropped,
each run gives its median step time. Tokens per step are the SFT sample tokens of a step on
average (every run sees the same samples per step) plus, with replay, the replay rows' tokens.
Runs rotate their order every round. Peak memory is that of the steps after the warm-up
(``measure.py``). ``--compile`` passes ``compile`` to midtrain (``default``: its own default).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from litgpt.config import Config
from litgpt.data import JSON
from litgpt.model import GPT
from litgpt.prompts import PromptStyle
from litgpt.tokenizer import Tokenizer
from litgpt.utils import save_config
from measure import peak_mb, print_table, run_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests/ holds the shard writer
from tests.synthetic import write_tree  # noqa: E402

MODEL = {"name": "bench-logits", "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 512,
         "vocab_size": 50_304, "padded_vocab_size": 50_304}  # fmt: skip
WORDS = [f"w{i}" for i in range(400)]


def sft_records(n: int, seed: int) -> list[dict]:
    rng = random.Random(seed)
    return [
        {"instruction": " ".join(rng.choices(WORDS, k=rng.randint(3, 20))), "input": "",
         "output": " ".join(rng.choices(WORDS, k=rng.randint(5, 150)))}
        for _ in range(n)
    ]  # fmt: skip


def write_checkpoint(directory: Path, records: list[dict]) -> None:
    """A litgpt-format checkpoint: random weights, model_config.yaml, a word-level tokenizer."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import models, pre_tokenizers, trainers

    directory.mkdir(parents=True)
    tok = HFTokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    style = PromptStyle.from_name("alpaca")
    texts = [style.apply(r["instruction"], **r) + r["output"] for r in records]
    tok.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=["<unk>", "<s>", "</s>"]))
    tok.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(
        json.dumps({"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True,
                    "tokenizer_class": "PreTrainedTokenizerFast"})
    )  # fmt: skip
    config = Config(**MODEL)
    torch.manual_seed(0)
    torch.save(GPT(config).state_dict(), directory / "lit_model.pth")
    save_config(config, directory)


def mean_sample_tokens(sft_dir: Path, checkpoint: Path, seq: int) -> float:
    data = JSON(json_path=sft_dir, num_workers=0)
    data.connect(tokenizer=Tokenizer(checkpoint), batch_size=1, max_seq_length=seq)
    data.setup()
    train = data.train_dataloader().dataset
    return statistics.fmean(len(train[i]["input_ids"]) for i in range(len(train)))


def write_configs(root: Path, args: argparse.Namespace) -> dict[str, Path]:
    data = {"class_path": "litgpt.data.JSON",
            "init_args": {"json_path": str(root / "sft"), "mask_prompt": True, "num_workers": args.workers}}
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-4, "weight_decay": 0.0}}
    common = {"checkpoint_dir": str(root / "base"), "precision": args.precision, "devices": 1, "data": data,
              "optimizer": optimizer}
    batch = {"global_batch_size": args.global_batch_size, "micro_batch_size": args.micro_batch_size,
             "max_seq_length": args.seq_len, "max_steps": args.steps, "log_interval": 1, "save_interval": None,
             "lr_warmup_steps": 2}
    configs = {"litgpt finetune_full": {
        **common, "out_dir": str(root / "out-litgpt"), "logger_name": "csv",
        "train": {**batch, "epochs": 1000},
        "eval": {"interval": 10**9, "max_iters": 1, "initial_validation": False, "final_validation": False},
    }}  # fmt: skip
    for ratio in (0.0, 0.25):
        cfg = {**common, "out_dir": str(root / f"out-midtrain-{ratio}"), "accelerator": args.device, "train": batch,
               "eval": {"interval": 10**9, "final_validation": False, "max_samples": 8}}  # fmt: skip
        if ratio:
            cfg["replay"] = {"ratio": ratio, "data": {"data_path": str(root / "shards"), "mix_weights_str": "main:1",
                                                      "num_workers": args.workers}}  # fmt: skip
        if args.compile != "default":
            cfg["compile"] = args.compile == "true"
        configs[f"midtrain finetune replay {ratio:g}"] = cfg
    paths = {}
    for i, (name, cfg) in enumerate(configs.items()):
        paths[name] = root / f"config-{i}.yaml"
        paths[name].write_text(yaml.safe_dump(cfg))
    return paths


def run_litgpt(cfg: Path, out_dir: Path, args: argparse.Namespace) -> tuple[list[float], dict[str, float]]:
    """Per-step times (sum of litgpt's per-micro-batch ``iter time``) and peak memory of one run."""
    shutil.rmtree(out_dir, ignore_errors=True)
    accum = args.global_batch_size // args.micro_batch_size
    stdout, peak = run_module(
        "litgpt", ["finetune_full", "--config", str(cfg)], "litgpt finetune_full",
        str(out_dir / "logs/csv/version_0/metrics.csv"), after=args.warmup * accum + 1, threads=args.threads,
    )  # fmt: skip
    iters = [float(t) / 1000 for t in re.findall(r"iter time: ([\d.]+) ms", stdout)]
    steps = [sum(iters[i : i + accum]) for i in range(0, len(iters) - accum + 1, accum)]
    return steps[args.warmup :], peak


def run_midtrain(cfg: Path, out_dir: Path, args: argparse.Namespace) -> tuple[list[float], dict[str, float]]:
    shutil.rmtree(out_dir, ignore_errors=True)
    metrics = out_dir / "metrics.jsonl"
    _, peak = run_module("midtrain", ["finetune", "--config", str(cfg)], "midtrain finetune", str(metrics),
                         after=args.warmup, threads=args.threads)  # fmt: skip
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    return [r["step_time"] for r in rows if "step_time" in r][args.warmup :], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--seq_len", type=int, default=256)
    parser.add_argument("--global_batch_size", type=int, default=16)
    parser.add_argument("--micro_batch_size", type=int, default=4)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--compile", choices=("default", "true", "false"), default="default")
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of every run (default: unset)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        records = sft_records(512, seed=0)
        (root / "sft").mkdir()
        (root / "sft" / "train.json").write_text(json.dumps(records))
        (root / "sft" / "val.json").write_text(json.dumps(sft_records(32, seed=1)))
        write_checkpoint(root / "base", records)
        write_tree(root / "shards", {"1": 2_000_000}, vocab_size=50_000, chunk_tokens=1 << 18)
        sft_tokens = mean_sample_tokens(root / "sft", root / "base", args.seq_len)
        paths = write_configs(root, args)
        rows: dict[str, list[tuple[float, tuple[float, float]]]] = {name: [] for name in paths}
        for r in range(args.rounds):
            names = list(paths)
            names = names[r % len(names) :] + names[: r % len(names)]
            for name in names:
                out_dir = Path(yaml.safe_load(paths[name].read_text())["out_dir"])
                if name.startswith("litgpt"):
                    times, peak = run_litgpt(paths[name], out_dir, args)
                    n_replay = 0
                else:
                    times, peak = run_midtrain(paths[name], out_dir, args)
                    n_replay = round(float(name.rsplit(" ", 1)[1]) * args.global_batch_size)
                tokens = (args.global_batch_size - n_replay) * sft_tokens + n_replay * args.seq_len
                rows[name].append((tokens / statistics.median(times), peak_mb(peak)))
                memory, growth = peak_mb(peak)
                print(f"round {r}: {name}: {rows[name][-1][0]:,.1f} tokens/s, median step "
                      f"{statistics.median(times):.3f} s, peak {memory:,.0f} MiB (+{growth:,.0f})", flush=True)
        print_table(
            f"{args.device}, {args.precision}, global batch {args.global_batch_size}, micro-batch "
            f"{args.micro_batch_size}, max_seq_length {args.seq_len}, SFT sample {sft_tokens:.1f} tokens on average, "
            f"{args.steps} steps (first {args.warmup} dropped), {args.rounds} rounds, midtrain compile: {args.compile}",
            rows, "tokens/s", "litgpt finetune_full",
        )  # fmt: skip


if __name__ == "__main__":
    main()
