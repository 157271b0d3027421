"""Tokens/s and peak memory of `midtrain pretrain` vs `litgpt pretrain`: same model, data, batch, precision.

    python benchmarks/pretrain.py [--model logits|tiny|pythia-160m] [--rounds 3] [--steps 30] [--device cpu|cuda]

Models: ``logits`` (default) is logits-heavy like the paper's Pythia models: 2 layers x 128 wide,
vocabulary 50,304, sequence 255, micro-batch 4, so the output layer and the loss dominate a step;
``tiny`` is 4 layers x 128 with a 4,096 vocabulary; any litgpt model name is taken as it is.

Both commands compile the model (litgpt always does; midtrain gets ``compile: true``), train on the
same ShardedMixedDataset shards (litgpt uses it as its ``data:``) with one optimizer step per
micro-batch and log every step. A step's time is the wall time between two consecutive log
records of the run (litgpt: the ``time`` column of its CSV log; midtrain: ``step_time`` in
``metrics.jsonl``), so data loading counts alike. The first ``--warmup`` steps (start-up,
compilation) are dropped; each run gives its median step time. Runs alternate (litgpt first in
even rounds, midtrain first in odd ones) so a noisy machine affects both alike. Peak memory is that
of the steps after the warm-up (``measure.py``): peak RSS on CPU, ``torch.cuda.max_memory_allocated``
on a GPU. On a GPU add ``--precision bf16-mixed``; midtrain's MFU is printed when the device's peak
FLOP/s is known.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import yaml
from lightning.fabric.utilities.throughput import get_available_flops
from measure import peak_mb, print_table, run_module

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repo root: tests/ holds the shard writer
from tests.synthetic import write_tree  # noqa: E402

MODELS = {
    "tiny": ({"name": "bench-tiny", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256,
              "vocab_size": 4096, "padded_vocab_size": 4096}, 256, 8),
    "logits": ({"name": "bench-logits", "n_layer": 2, "n_head": 4, "n_embd": 128, "block_size": 256,
                "vocab_size": 50_304, "padded_vocab_size": 50_304}, 255, 4),
}  # fmt: skip


def write_configs(root: Path, args: argparse.Namespace) -> tuple[Path, Path, int, int]:
    """The two YAML configs, the sequence length and the micro-batch size."""
    if args.model in MODELS:
        model_config, seq, batch = MODELS[args.model]
        model = {"model_config": model_config}
        vocab = min(model_config["vocab_size"], 50_000)
    else:
        model, seq, batch, vocab = {"model_name": args.model}, args.seq_len, 8, 50_000
    seq = args.seq_len or seq
    batch = args.micro_batch_size or batch
    write_tree(root / "data", {"1": 4_000_000, "c1": 1_000_000}, vocab_size=vocab, chunk_tokens=1 << 20)
    write_tree(root / "val", {"1": 200_000}, vocab_size=vocab)
    data = {"class_path": "midtrain.data.ShardedMixedDataset",
            "init_args": {"data_path": str(root / "data"), "val_data_path": str(root / "val" / "1"),
                          "mix_weights_str": "main:0.8,code:0.2", "num_workers": 2}}
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4, "weight_decay": 0.1,
                                                                  "betas": [0.9, 0.95]}}
    common = {**model, "precision": args.precision, "devices": 1, "data": data, "optimizer": optimizer}
    litgpt_cfg = {**common, "out_dir": str(root / "litgpt"), "resume": False, "logger_name": "csv",
                  "model_name": model.get("model_name", "pythia-14m"),  # litgpt requires a name; model_config wins
                  "train": {"global_batch_size": batch, "micro_batch_size": batch, "max_seq_length": seq,
                            "max_tokens": args.steps * batch * seq, "log_interval": 1, "save_interval": None,
                            "lr_warmup_steps": 2, "min_lr": 3e-5},
                  "eval": {"interval": 10**9, "max_iters": 1, "initial_validation": False,
                           "final_validation": False}}
    midtrain_cfg = {**common, "out_dir": str(root / "midtrain"), "accelerator": args.device, "compile": True,
                    "train": {"global_batch_size": batch, "micro_batch_size": batch, "max_seq_length": seq,
                              "max_steps": args.steps, "log_interval": 1, "save_interval": None,
                              "lr_warmup_steps": 2, "min_lr": 3e-5},
                    "eval": {"interval": 10**9, "final_validation": False}}  # fmt: skip
    paths = root / "litgpt.yaml", root / "midtrain.yaml"
    paths[0].write_text(yaml.safe_dump(litgpt_cfg))
    paths[1].write_text(yaml.safe_dump(midtrain_cfg))
    return paths[0], paths[1], seq, batch


def run_litgpt(cfg: Path, out_dir: Path, args: argparse.Namespace) -> tuple[list[float], dict[str, float]]:
    """Per-step wall times (from the CSV log's ``time`` column) and peak memory of one `litgpt pretrain` run."""
    shutil.rmtree(out_dir, ignore_errors=True)
    log_glob = str(out_dir / "logs/csv/version_0/metrics.csv")
    _, peak = run_module("litgpt", ["pretrain", "--config", str(cfg)], "litgpt pretrain", log_glob,
                         after=args.warmup + 1, threads=args.threads)  # header + warm-up rows
    with open(log_glob) as f:
        elapsed = [float(r["time"]) for r in csv.DictReader(f) if r.get("time")]
    return [b - a for a, b in zip(elapsed, elapsed[1:])][args.warmup :], peak


def run_midtrain(
    cfg: Path, out_dir: Path, args: argparse.Namespace
) -> tuple[list[float], list[float], dict[str, float]]:
    """Per-step wall times, MFU values and peak memory of one `midtrain pretrain` run."""
    shutil.rmtree(out_dir, ignore_errors=True)
    metrics = out_dir / "metrics.jsonl"
    _, peak = run_module("midtrain", ["pretrain", "--config", str(cfg)], "midtrain pretrain", str(metrics),
                         after=args.warmup, threads=args.threads)
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "step_time" in r][args.warmup :]
    return [r["step_time"] for r in rows], [r["mfu"] for r in rows if "mfu" in r], peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="logits")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--seq_len", type=int, default=None, help="default: the model preset's (2048 for names)")
    parser.add_argument("--micro_batch_size", type=int, default=None)
    parser.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS of both runs (default: unset)")
    args = parser.parse_args()
    if args.model not in MODELS and args.seq_len is None:
        args.seq_len = 2048
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        litgpt_cfg, midtrain_cfg, seq, batch = write_configs(root, args)
        tokens_per_step = batch * seq
        rows: dict[str, list[tuple[float, tuple[float, float]]]] = {"litgpt pretrain": [], "midtrain pretrain": []}
        mfus: list[float] = []
        for r in range(args.rounds):
            for name in (["litgpt", "midtrain"] if r % 2 == 0 else ["midtrain", "litgpt"]):
                if name == "litgpt":
                    times, peak = run_litgpt(litgpt_cfg, root / "litgpt", args)
                else:
                    times, mfu, peak = run_midtrain(midtrain_cfg, root / "midtrain", args)
                    mfus += mfu
                rows[f"{name} pretrain"].append((tokens_per_step / statistics.median(times), peak_mb(peak)))
                print(f"round {r}: {name} {tokens_per_step / statistics.median(times):,.0f} tokens/s, "
                      f"peak {peak_mb(peak)[0]:,.0f} MiB (+{peak_mb(peak)[1]:,.0f})", flush=True)
        print_table(
            f"model {args.model}, {args.device}, {args.precision}, micro-batch {batch} x {seq} tokens, compiled, "
            f"{args.steps} steps (first {args.warmup} dropped), {args.rounds} rounds",
            rows, "tokens/s", "litgpt pretrain",
        )  # fmt: skip
        if mfus:
            print(f"midtrain MFU (median of its logged mfu) = {statistics.median(mfus):.3f}")
        if args.device == "cuda":  # one formula for both: tokens/s x model FLOPs per token / device peak FLOP/s
            per_token = model_flops_per_token(litgpt_cfg, seq, batch)
            peak = get_available_flops(torch.device("cuda"), torch.bfloat16 if "bf16" in args.precision else
                                       torch.float32)  # fmt: skip
            for name, values in rows.items():
                speed = statistics.median(v for v, _ in values)
                print(f"{name}: MFU = {speed * per_token / peak:.3f}" if peak else f"{name}: device peak unknown")


def model_flops_per_token(cfg: Path, seq: int, batch: int) -> float:
    """Forward + backward FLOPs per token of the benchmarked model (midtrain's own MFU formula)."""
    from litgpt.config import Config

    from midtrain.train.pretrain import _flops_per_batch

    raw = yaml.safe_load(cfg.read_text())
    config = Config(**raw["model_config"]) if "model_config" in raw else Config.from_name(raw["model_name"])
    return _flops_per_batch(config, batch, seq) / (batch * seq)


if __name__ == "__main__":
    main()
