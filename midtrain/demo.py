"""``midtrain demo``: the whole method on one CPU in minutes, with no download.

1. build the demo corpus (stdlib code, bundled docs prose, generated math) and its tokenizer;
2. pretrain a tiny GPT on general prose (``main``) up to the branch step;
3. branch from that checkpoint into (a) the base mixture unchanged, (b) midtraining with 20%
   code, (c) continued pretraining on 100% code (the paper's baseline);
4. fine-tune every branch on a small code SFT set, without and with replay of prose;
5. evaluate every fine-tuned model on the SFT validation set (in-domain) and on held-out prose
   (forgetting), and
6. write the report: plots and a markdown table.

Every phase runs a real config written to ``<out>/configs/``, the same YAML a user would edit,
through the same code path as the CLI.
"""

from __future__ import annotations

import csv
import shutil
import time
from pathlib import Path

import yaml

from midtrain.cli import run

MODEL = {"name": "demo-tiny", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128,
         "vocab_size": 4096, "padded_vocab_size": 4096, "bias": True}
BRANCHES = {"base": "main:1", "midtrain": "main:0.8,code:0.2", "cpt": "code:1"}
REPLAY = {"sft": 0.0, "sft-replay": 0.25}


def _phase(i: int, total: int, text: str) -> float:
    print(f"\n[demo {i}/{total}] {text}", flush=True)
    return time.perf_counter()


def _write(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _pretrain_config(corpus: Path, out_dir: Path, mix: str, max_steps: int, resume: Path | None) -> dict:
    return {
        "model_config": MODEL,
        "out_dir": str(out_dir),
        "precision": "32-true",
        "accelerator": "cpu",
        "devices": 1,
        "tokenizer_dir": str(corpus / "tokenizer"),
        "resume": str(resume) if resume else False,
        "data": {"class_path": "midtrain.data.ShardedMixedDataset", "init_args": {
            "data_path": str(corpus), "mix_weights_str": mix, "num_workers": 0,
            "val_data_path": {"main": str(corpus / "val" / "main"), "code": str(corpus / "val" / "code")}}},
        "train": {"max_steps": max_steps, "global_batch_size": 16, "micro_batch_size": 16, "save_interval": None,
                  "log_interval": 25, "lr_warmup_fraction": 0.05, "min_lr": 1e-4},
        "eval": {"interval": 100, "max_samples": 64},
        "optimizer": {"class_path": "torch.optim.AdamW",
                      "init_args": {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]}},
    }


def _finetune_config(corpus: Path, checkpoint: Path, out_dir: Path, ratio: float, steps: int) -> dict:
    return {
        "checkpoint_dir": str(checkpoint),
        "out_dir": str(out_dir),
        "precision": "32-true",
        "accelerator": "cpu",
        "data": {"class_path": "litgpt.data.JSON", "init_args": {
            "json_path": str(corpus / "sft" / "code_sft.json"), "val_split_fraction": 0.1, "mask_prompt": True,
            "prompt_style": "alpaca", "num_workers": 0}},
        "replay": {"ratio": ratio, "data": {"data_path": str(corpus), "mix_weights_str": "main:1", "num_workers": 0}},
        "val_data_path": {"main": str(corpus / "val" / "main")},
        "train": {"max_steps": steps, "global_batch_size": 16, "micro_batch_size": 8, "max_seq_length": 128,
                  "save_interval": None, "log_interval": 10, "lr_warmup_fraction": 0.1, "min_lr": 1e-5},
        "eval": {"interval": 1000, "max_samples": 64},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.0}},
    }


def demo(out: Path = Path("demo_out"), branch_step: int = 200, max_steps: int = 400, finetune_steps: int = 60,
         seed: int = 0) -> Path:
    """Run the embedded default end to end on CPU and write ``<out>/report/report.md``.

    Args:
        out: Output directory (corpus, configs, runs, evaluation CSV, report).
        branch_step: Optimizer step at which the branches leave the base pretraining run.
        max_steps: Total pretraining steps of every branch (the LR schedule spans all of them).
        finetune_steps: Optimizer steps of each fine-tuning run.
        seed: Seed of the demo corpus.
    """
    from midtrain.data.demo_corpus import build_demo_corpus
    from midtrain.report.report import report
    from midtrain.train.checkpoints import find_latest

    out = Path(out)
    for stale in (out / "runs", out / "report", out / "eval.csv"):  # the demo's own outputs of an earlier run
        if stale.exists():
            print(f"removing {stale} from an earlier demo run")
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
    total, start = 6, time.perf_counter()
    t = _phase(1, total, f"building the demo corpus in {out / 'corpus'}")
    info = build_demo_corpus(out / "corpus", seed=seed)
    corpus = Path(info["data_path"])
    print(f"corpus ready in {time.perf_counter() - t:.0f} s: shards {info['shards']}")

    configs, runs = out / "configs", out / "runs"
    t = _phase(2, total, f"pretraining on general prose (main) up to step {branch_step}")
    base_cfg = _write(configs / "pretrain.yaml", _pretrain_config(corpus, runs / "pretrain", "main:1", max_steps, None))
    run("pretrain", ["--config", str(base_cfg), "--train.max_additional_steps", str(branch_step)])
    branch_ckpt = find_latest(runs / "pretrain")
    print(f"branch checkpoint {branch_ckpt} ({time.perf_counter() - t:.0f} s)")

    t = _phase(3, total, f"branching at step {branch_step}: " + ", ".join(f"{k}={v}" for k, v in BRANCHES.items()))
    for name, mix in BRANCHES.items():
        cfg = _write(configs / f"{name}.yaml", _pretrain_config(corpus, runs / name, mix, max_steps, branch_ckpt))
        run("pretrain", ["--config", str(cfg)])
    print(f"branches done ({time.perf_counter() - t:.0f} s)")

    t = _phase(4, total, "fine-tuning every branch on code SFT, without and with 25% prose replay")
    finetuned = []
    for name in BRANCHES:
        for tag, ratio in REPLAY.items():
            ft_dir = runs / f"{name}-{tag}"
            cfg = _write(configs / f"{name}-{tag}.yaml",
                         _finetune_config(corpus, find_latest(runs / name), ft_dir, ratio, finetune_steps))
            run("finetune", ["--config", str(cfg)])
            finetuned.append(ft_dir)
    print(f"fine-tuning done ({time.perf_counter() - t:.0f} s)")

    t = _phase(5, total, "evaluating: in-domain code SFT loss and general-prose loss (forgetting)")
    csv_path = out / "eval.csv"
    run("evaluate", ["--checkpoints", str([str(find_latest(d)) for d in finetuned]),
                     "--val", f"sft={corpus / 'sft' / 'code_sft_val.json'}", "--val", f"main={corpus / 'val' / 'main'}",
                     "--out", str(csv_path), "--max_samples", "64"])
    table = _results_table(csv_path, finetuned)
    print(table)

    _phase(6, total, "writing the report")
    report_md = Path(report([str(p) for p in [runs / "pretrain", *(runs / n for n in BRANCHES), *finetuned]],
                            out=out / "report",
                            in_domain="sft", general="main"))
    with report_md.open("a") as f:
        f.write("\n## Demo result (after SFT)\n\n" + table + "\n")
    print(f"\ndemo finished in {time.perf_counter() - start:.0f} s; report: {report_md}")
    return report_md


def _results_table(csv_path: Path, finetuned: list[Path]) -> str:
    """Markdown: per fine-tuned run, in-domain SFT loss and general-prose loss, and the paper's two checks."""
    rows = list(csv.DictReader(csv_path.open()))
    lines = ["| branch | SFT | code SFT val loss (in-domain) | prose val loss (forgetting) |", "|---|---|---|---|"]
    results: dict[tuple[str, str], dict[str, float]] = {}
    for run_dir in finetuned:
        losses = {r["set"]: float(r["loss"]) for r in rows if Path(r["checkpoint"]).parent == run_dir.resolve()}
        branch, _, tag = run_dir.name.partition("-")
        results[branch, tag] = losses
        lines.append(f"| {branch} | {tag} | {losses['sft']:.4f} | {losses['main']:.4f} |")
    lines.append("")
    for tag in REPLAY:
        mid, base, cpt = (results[b, tag] for b in ("midtrain", "base", "cpt"))
        lines.append(f"- {tag}: midtrain code loss {'<' if mid['sft'] < base['sft'] else '>='} base "
                     f"({mid['sft']:.4f} vs {base['sft']:.4f}); midtrain prose loss "
                     f"{'<' if mid['main'] < cpt['main'] else '>='} cpt ({mid['main']:.4f} vs {cpt['main']:.4f})")
    return "\n".join(lines)
