"""Tokens/s of `midtrain pretrain` vs `litgpt pretrain`: same model, data, batch and precision, interleaved.

    python benchmarks/pretrain.py [--rounds 3] [--steps 30] [--device cpu|cuda] [--model tiny|pythia-160m]

Both commands train the same litgpt model on the same ShardedMixedDataset shards (litgpt uses
it as its ``data:``), one optimizer step per micro-batch (no gradient accumulation, so litgpt's
per-iteration time and midtrain's per-step time measure the same work). The first
``--warmup`` steps of each run are dropped (start-up, compilation); the table shows the median
steady-state step time per run, the median over rounds, and the ratio midtrain / litgpt. On a
GPU add ``--precision bf16-mixed``; MFU is printed when the device's peak FLOP/s is known.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from midtrain.data.synthetic import write_tree

TINY = {"name": "bench", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 256, "vocab_size": 4096,
        "padded_vocab_size": 4096}


def write_configs(root: Path, args: argparse.Namespace) -> tuple[Path, Path]:
    model = {"model_config": TINY} if args.model == "tiny" else {"model_name": args.model}
    seq = TINY["block_size"] if args.model == "tiny" else args.seq_len
    vocab = TINY["padded_vocab_size"] if args.model == "tiny" else 50_000
    write_tree(root / "data", {"1": 4_000_000, "c1": 1_000_000}, vocab_size=vocab, chunk_tokens=1 << 20)
    write_tree(root / "val", {"1": 200_000}, vocab_size=vocab)
    data = {"class_path": "midtrain.data.ShardedMixedDataset",
            "init_args": {"data_path": str(root / "data"), "val_data_path": str(root / "val" / "1"),
                          "mix_weights_str": "main:0.8,code:0.2", "num_workers": 2}}
    optimizer = {"class_path": "torch.optim.AdamW", "init_args": {"lr": 3e-4, "weight_decay": 0.1,
                                                                  "betas": [0.9, 0.95]}}
    batch = args.micro_batch_size
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
                    "eval": {"interval": 10**9, "final_validation": False}}
    paths = root / "litgpt.yaml", root / "midtrain.yaml"
    paths[0].write_text(yaml.safe_dump(litgpt_cfg))
    paths[1].write_text(yaml.safe_dump(midtrain_cfg))
    return paths


def run_litgpt(cfg: Path, warmup: int) -> list[float]:
    out = subprocess.run([sys.executable, "-m", "litgpt", "pretrain", "--config", str(cfg)], capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"litgpt pretrain failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    times = [float(m) / 1000 for m in re.findall(r"iter time: ([\d.]+) ms", out.stdout)]
    return times[warmup:]


def run_midtrain(cfg: Path, out_dir: Path, warmup: int) -> tuple[list[float], list[float]]:
    metrics = out_dir / "metrics.jsonl"
    metrics.unlink(missing_ok=True)
    out = subprocess.run([sys.executable, "-m", "midtrain", "pretrain", "--config", str(cfg)], capture_output=True,
                         text=True)
    if out.returncode:
        raise SystemExit(f"midtrain pretrain failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
    rows = [json.loads(line) for line in metrics.read_text().splitlines()]
    rows = [r for r in rows if "step_time" in r][warmup:]
    return [r["step_time"] for r in rows], [r["mfu"] for r in rows if "mfu" in r]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--precision", default="32-true")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq_len", type=int, default=2048)
    parser.add_argument("--micro_batch_size", type=int, default=8)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        litgpt_cfg, midtrain_cfg = write_configs(root, args)
        seq = TINY["block_size"] if args.model == "tiny" else args.seq_len
        tokens_per_step = args.micro_batch_size * seq
        rows: dict[str, list[float]] = {"litgpt": [], "midtrain": []}
        mfus: list[float] = []
        for r in range(args.rounds):
            for name in (["litgpt", "midtrain"] if r % 2 == 0 else ["midtrain", "litgpt"]):
                if name == "litgpt":
                    times = run_litgpt(litgpt_cfg, args.warmup)
                else:
                    times, mfu = run_midtrain(midtrain_cfg, root / "midtrain", args.warmup)
                    mfus += mfu
                rows[name].append(tokens_per_step / statistics.median(times))
        print(f"\nmodel {args.model}, {args.device}, {args.precision}, micro-batch {args.micro_batch_size} x {seq} "
              f"tokens, {args.steps} steps (first {args.warmup} dropped), {args.rounds} rounds")
        print(f"{'command':<10} {'tokens/s':>12}   rounds")
        for name, values in rows.items():
            print(f"{name:<10} {statistics.median(values):>12,.0f}   " + ", ".join(f"{v:,.0f}" for v in values))
        ratio = statistics.median(rows["midtrain"]) / statistics.median(rows["litgpt"])
        print(f"midtrain / litgpt = {ratio:.3f}")
        if mfus:
            print(f"midtrain MFU (median) = {statistics.median(mfus):.3f}")


if __name__ == "__main__":
    main()
