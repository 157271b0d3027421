"""``midtrain demo``: both papers' experiment designs on one CPU in minutes, with no download.

1. build the demo corpus (stdlib code, bundled docs prose, generated math), its tokenizer and a
   code SFT set whose every example scores (``midtrain.demo.corpus``), the SFT data directories and a
   local multiple-choice benchmark task from the SFT validation set (``write_choice_task``);
2. write the demo's experiment file (``<out>/demo.yaml``) and run it with ``midtrain experiment run``'s
   executor (``midtrain.experiment.local``): pretrain a tiny GPT on general prose (``base``, 300 steps,
   run as segments that stop at steps 75 and 150); branch at step 150 into midtraining with 20% code
   (``code20``), 50% code (``code50``) and continued pretraining on 100% code (``cpt``), and at step 75
   into 20% code (``code20-early``, the timing ablation); every branch trains to the same last step.
   Every branch (and ``base``, the prose-only run) is fine-tuned on the code SFT set with 2 seeds; for
   replay data efficiency (the replay paper's design) ``base`` is also fine-tuned on 1/4 and 1/2 of the
   SFT set without and with 25% prose replay, and on all of it with replay. Every SFT run consumes the
   same number of target sequences (smaller sets repeat more epochs; replay comes on top) and is
   evaluated by ``midtrain evaluate`` on the one SFT validation set and on held-out prose (forgetting)
   as soon as it ends;
3. ``midtrain evaluate``: every branch's ``final/`` on the same sets (before SFT), and the plain SFT runs
   on the benchmark task (lm-eval, offline, ``--include_path``; the validation examples whose answer fits);
4. ``midtrain efficiency``: fit loss(x) = A / x^B + C to the runs without replay, multiplier of replay;
5. write the report: plots, budgets beside losses, the SFT table, the fit, benchmarks, the claims.

Every run is a generated config under ``<out>/experiment/configs/`` (``midtrain <command> --config``
reruns it), its output in ``<out>/experiment/logs/<node>.log``.
"""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from midtrain.cli import run
from midtrain.demo import claims as C
from midtrain.errors import MidtrainError
from midtrain.rundir import SUMMARY_FILE, read_eval_rows, read_json

MODEL = {"name": "demo-tiny", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128,
         "vocab_size": 4096, "padded_vocab_size": 4096, "bias": True}
BASE = "base"
"""The base run's end: prose only from step 0 to ``max_steps`` (the experiment's ``base``)."""
MIDTRAIN, CPT, EARLY, HEAVY = "code20", "cpt", "code20-early", "code50"
MIXES = {BASE: "main:1", MIDTRAIN: "main:0.8,code:0.2", HEAVY: "main:0.5,code:0.5", CPT: "code:1",
         EARLY: "main:0.8,code:0.2"}  # fmt: skip
REPLAY_RATIO = 0.25
SFT_BATCH = 16
SEEDS = (42, 43)
SFT_SET = "code"
EFFICIENCY_BRANCH = BASE
TASK = "demo_mc"
"""The demo's benchmark: multiple choice over candidate answers of the SFT validation set."""
TASK_METRIC = "acc"


@dataclass(frozen=True)
class SFTRun:
    """One fine-tuning run of the demo (a finetune node of its experiment)."""

    node: str
    branch: str
    ratio: float
    seed: int
    examples: int
    dir: Path
    eval_csv: Path

    @property
    def method(self) -> str:
        return f"replay-{self.ratio:g}" if self.ratio else "sft"


class Progress:
    """``[demo i/N]`` lines; each phase's wall and CPU seconds (its own and its child processes') are kept."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.timings = total, 0, []
        self._start = time.perf_counter()
        self._open: tuple[str, float, float] | None = None

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def phase(self, text: str) -> None:
        self.end()
        self.index += 1
        print(f"\n[demo {self.index}/{self.total}] {text}", flush=True)
        self._open = (text, time.perf_counter(), self._cpu())

    def end(self) -> None:
        if self._open is not None:
            text, wall, cpu = self._open
            wall, cpu = time.perf_counter() - wall, self._cpu() - cpu
            self.timings.append((self.index, text, wall, cpu))
            print(f"[demo {self.index}/{self.total}] done: {wall:.0f} s wall, {cpu:.0f} s CPU", flush=True)
            self._open = None

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self._start


def _write(path: Path, cfg: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _pretrain_config(corpus: Path, max_steps: int) -> dict:
    """The base run's config; the experiment sets out_dir, resume, the segments' ends and each branch's mixture."""
    return {
        "model_config": MODEL,
        "precision": "32-true", "compile": False,
        "accelerator": "cpu",
        "devices": 1,
        "tokenizer_dir": str(corpus / "tokenizer"),
        "data": {"class_path": "midtrain.data.ShardedMixedDataset", "init_args": {
            "data_path": str(corpus), "mix_weights_str": MIXES[BASE], "num_workers": 0,
            "val_data_path": {"main": str(corpus / "val" / "main"), "code": str(corpus / "val" / "code")}}},
        "train": {"max_steps": max_steps, "global_batch_size": 16, "micro_batch_size": 16,
                  "save_interval": None, "log_interval": 25, "lr_warmup_fraction": 0.05, "min_lr": 1e-4},
        "eval": {"interval": 100, "max_samples": 64},
        "optimizer": {"class_path": "torch.optim.AdamW",
                      "init_args": {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]}},
    }


def _finetune_config(corpus: Path, sft: dict) -> dict:
    """SFT on a data directory (train.json: the run's target examples; val.json: the demo's one SFT validation set).

    The experiment sets checkpoint_dir, out_dir, seed, json_path, replay and each set's ``epochs``.
    """
    return {
        "precision": "32-true", "compile": False,
        "accelerator": "cpu",
        "data": {"class_path": "litgpt.data.JSON", "init_args": {
            "json_path": None, "mask_prompt": True, "prompt_style": sft["prompt_style"], "num_workers": 0}},
        "val_data_path": {"main": str(corpus / "val" / "main")},
        "train": {"global_batch_size": SFT_BATCH, "micro_batch_size": SFT_BATCH,
                  "max_seq_length": sft["max_seq_length"], "save_interval": None, "log_interval": 16,
                  "lr_warmup_fraction": 0.1, "min_lr": 1e-5},
        "eval": {"interval": 16, "max_samples": 64},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.0}},
    }


def _set_name(x: int, full: int) -> str:
    return SFT_SET if x == full else f"{SFT_SET}-x{x}"


def demo_experiment(out: Path, corpus: Path, sft: dict, data_dirs: dict[int, Path], branch_step: int,
                    early_step: int, max_steps: int, sft_sequences: int, sft_seeds: int) -> Path:  # fmt: skip
    """Write the demo's experiment file (and the base configs it names) into ``out``; return its path."""
    full = max(data_dirs)
    configs = out / "configs"
    pretrain = _write(configs / "pretrain.yaml", _pretrain_config(corpus, max_steps))
    finetune = _write(configs / "finetune.yaml", _finetune_config(corpus, sft))

    def epochs(x: int) -> dict:
        return {"epochs": sft_sequences / x}

    sets: dict[str, object] = {SFT_SET: {"path": str(data_dirs[full]), "replay": [0], "seeds": list(SEEDS[:sft_seeds]),
                                         "overrides": epochs(full)}}  # fmt: skip
    for x in sorted(data_dirs):  # replay data efficiency: base on nested subsets, without and with replay
        ratios = [REPLAY_RATIO] if x == full else [0, REPLAY_RATIO]
        sets[f"{SFT_SET}-x{x}"] = {"path": str(data_dirs[x]), "branches": [EFFICIENCY_BRANCH], "replay": ratios,
                                   "seeds": [SEEDS[0]], "overrides": epochs(x)}  # fmt: skip
    steps = {MIDTRAIN: branch_step, HEAVY: branch_step, CPT: branch_step, EARLY: early_step}
    exp = {
        "name": "demo",
        "root": str(out / "experiment"),
        "base": {"config": str(pretrain)},
        "branches": {name: {"at_step": step, "mixture": MIXES[name]} for name, step in steps.items()},
        "finetune": {"config": str(finetune), "sets": sets,
                     "replay_data": {"data_path": str(corpus), "mix_weights_str": MIXES[BASE], "num_workers": 0}},
        "evaluate": {"val": {"sft": str(corpus / sft["val"]), "main": str(corpus / "val" / "main")},
                     "options": {"max_samples": 64, "prompt_style": sft["prompt_style"],
                                 "max_seq_length": sft["max_seq_length"], "accelerator": "cpu"}},
    }
    return _write(out / "demo.yaml", exp)


def _short_answers(corpus: Path, sft: dict, path: Path) -> Path:
    """The SFT validation records whose answer fits in half the sequence length (lm-eval refuses answers longer
    than the model's context), as a JSON file for ``write_choice_task``."""
    from litgpt.tokenizer import Tokenizer

    tokenizer = Tokenizer(corpus / "tokenizer")
    records = json.loads((corpus / sft["val"]).read_text(encoding="utf-8"))
    short = [r for r in records if len(tokenizer.encode(r["output"])) <= sft["max_seq_length"] // 2]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(short, indent=1), encoding="utf-8")
    print(f"benchmark {TASK}: {len(short)} of {len(records)} SFT validation examples (answers of at most "
          f"{sft['max_seq_length'] // 2} tokens), 4 choices each")
    return path


def _sft_runs(p, data_dirs: dict[int, Path]) -> list[SFTRun]:  # p: midtrain.experiment.generate.Plan
    full = max(data_dirs)
    sizes = {_set_name(x, full): x for x in data_dirs} | {f"{SFT_SET}-x{full}": full}
    evals = {n.deps[0]: n.out for n in p.nodes if n.kind == "evaluate"}
    return [SFTRun(n.name, n.params["target"], n.params["ratio"], n.params["seed"], sizes[n.params["set"]], n.out,
                   evals[n.name]) for n in p.nodes if n.kind == "finetune"]  # fmt: skip


def demo(
    out: Path = Path("demo_out"),
    branch_step: int = 150,
    early_step: int | None = None,
    max_steps: int = 300,
    sft_sequences: int = 512,
    efficiency_fractions: list[float] | None = None,
    sft_seeds: int = 2,
    processes: int | None = None,
    seed: int = 0,
) -> Path:
    """Run both papers' experiment designs end to end on CPU and write ``<out>/report/report.md``.

    Args:
        out: Output directory (corpus, experiment file and its runs, logs, evaluation CSVs, report).
        branch_step: Optimizer step at which the branches leave the base pretraining run.
        early_step: The earlier branch step of the timing ablation (default ``branch_step // 2``).
        max_steps: Total pretraining steps of every branch (the LR schedule spans all of them).
        sft_sequences: Target (SFT) sequences every fine-tuning run consumes; replay sequences come on top.
        efficiency_fractions: Fractions of the SFT training set for the replay data-efficiency runs
            (default ``[0.25, 0.5, 1.0]``; at least 3).
        sft_seeds: SFT seeds of the plain (no replay) runs of every branch, 1 or 2; the second shows the noise.
        processes: Runs at once, each in its own process (default: min(2, CPU cores)).
        seed: Seed of the demo corpus.
    """
    from midtrain.demo.corpus import build_demo_corpus
    from midtrain.eval.benchmarks import write_choice_task
    from midtrain.experiment.generate import check_unchanged, plan
    from midtrain.experiment.local import run_local
    from midtrain.experiment.spec import load
    from midtrain.rundir import FINAL_DIR, checkpoint_name

    fractions = sorted(set(efficiency_fractions or [0.25, 0.5, 1.0]))
    if len(fractions) < 3 or not all(0 < f <= 1 for f in fractions):
        raise MidtrainError(f"efficiency_fractions needs >= 3 distinct fractions in (0, 1], got {fractions}.")
    if sft_seeds not in (1, 2):
        raise MidtrainError(f"sft_seeds must be 1 or 2, got {sft_seeds}.")
    early_step = early_step or branch_step // 2
    if not 0 < early_step < branch_step < max_steps:
        raise MidtrainError(f"need 0 < early_step < branch_step < max_steps, got {early_step}, {branch_step}, "
                            f"{max_steps}.")
    processes = processes or min(2, os.cpu_count() or 1)
    if processes < 1:
        raise MidtrainError(f"processes must be >= 1, got {processes}.")
    out = Path(out)
    for stale in ("report", "sft_data", "configs", "tasks", "demo.yaml", "eval.csv", "before_sft.csv",
                  "benchmarks.csv", "efficiency.csv", "efficiency.json"):  # fmt: skip
        if (out / stale).exists():  # the demo's own outputs of an earlier run
            print(f"removing {out / stale} from an earlier demo run")
            shutil.rmtree(out / stale) if (out / stale).is_dir() else (out / stale).unlink()
    progress = Progress(5)

    progress.phase(f"building the demo corpus in {out / 'corpus'}")
    info = build_demo_corpus(out / "corpus", seed=seed)
    corpus, sft = Path(info["data_path"]), info["sft"]
    print(f"corpus: shards {info['shards']}; code SFT {sft['examples']} train / {sft['val_examples']} val examples")
    data_dirs, scored = _sft_data(corpus, sft, out / "sft_data", fractions, seed)
    print(f"SFT samples that score: {scored['text']}")
    write_choice_task(_short_answers(corpus, sft, out / "tasks" / f"{TASK}_source.json"), out / "tasks", TASK,
                      prompt_style=sft["prompt_style"])  # fmt: skip
    exp_file = demo_experiment(out, corpus, sft, data_dirs, branch_step, early_step, max_steps, sft_sequences,
                               sft_seeds)  # fmt: skip

    p = plan(load(exp_file))
    root = p.exp.root
    try:
        check_unchanged(p)  # an earlier demo with the same settings: its finished runs are kept, not rerun
    except MidtrainError:
        print(f"removing {root}: an earlier demo ran with other settings")
        shutil.rmtree(root)
    sft_runs = _sft_runs(p, data_dirs)
    progress.phase(f"midtrain experiment run {exp_file} --jobs {processes}: {len(p.nodes)} nodes (base to step "
                   f"{max_steps} in segments; branches {', '.join(f'{b.name}@{b.at_step}' for b in p.exp.branches)}; "
                   f"{len(sft_runs)} SFT runs, each evaluated when it ends)")
    run_local(p, processes, reuse_processes=True)

    finals = {BASE: root / "runs" / BASE / FINAL_DIR} | {b.name: root / "runs" / b.name / FINAL_DIR
                                                         for b in p.exp.branches}  # fmt: skip
    starts = {BASE: root / "runs" / BASE / checkpoint_name(branch_step)}
    starts |= {b.name: root / "runs" / BASE / checkpoint_name(b.at_step) for b in p.exp.branches}
    progress.phase(f"midtrain evaluate: the branches before SFT on the same sets; the plain SFT runs on the {TASK} "
                   "benchmark (lm-eval, offline)")
    from midtrain.eval.losses import evaluate

    val = {"sft": str(corpus / sft["val"]), "main": str(corpus / "val" / "main")}
    evaluate([str(f) for f in finals.values()], val=val, out=out / "before_sft.csv", max_samples=64,
             accelerator="cpu", prompt_style=sft["prompt_style"], max_seq_length=sft["max_seq_length"])
    full = max(data_dirs)
    scored_runs = [j for j in sft_runs if j.examples == full and not j.ratio]  # the ones the claims compare
    evaluate([str(j.dir / FINAL_DIR) for j in scored_runs], out=out / "benchmarks.csv", accelerator="cpu",
             tasks=TASK, include_path=out / "tasks")

    progress.phase("midtrain efficiency: fitting loss(x) = A / x^B + C to the plain SFT runs of "
                   f"{EFFICIENCY_BRANCH}, multiplier of replay")
    losses = _read_losses(out / "before_sft.csv", finals) | {
        j.node: v for j in sft_runs for v in _read_losses(j.eval_csv, {j.node: j.dir / FINAL_DIR}).values()}
    scores = _read_scores(out / "benchmarks.csv", {j.node: j.dir / FINAL_DIR for j in sft_runs})
    report_dir = out / "report"
    eff_runs = [j for j in sft_runs if j.branch == EFFICIENCY_BRANCH and j.seed == SEEDS[0]]
    eff_csv = _efficiency_csv(out / "efficiency.csv", eff_runs, losses)
    efficiency, eff_error = None, None
    try:
        efficiency = run("efficiency", [
            "--results", str(eff_csv), "--x_col", "target_examples", "--baseline", "sft", "--set_name", "sft",
            "--out", str(out / "efficiency.json"), "--plot", str(report_dir / "efficiency.png")])  # fmt: skip
    except MidtrainError as err:
        eff_error = str(err)
        print(f"efficiency fit failed: {err}")

    progress.phase("writing the report")
    from midtrain.report.report import report

    main_runs = [j for j in sft_runs if j.examples == full and not j.ratio]
    report_runs = [root / "runs" / BASE, *(root / "runs" / b.name for b in p.exp.branches), *(j.dir for j in main_runs)]
    report_md = Path(report([str(r) for r in report_runs], out=report_dir, in_domain="sft", general="main",
                            evals=[str(out / "benchmarks.csv")]))  # fmt: skip
    budgets = {name: C.branch_budget(finals[name].parent, starts[name]) for name in finals}
    claims = _claims(sft_runs, losses, scores, efficiency, eff_error, early_step, branch_step, full)
    progress.end()
    sections = _demo_sections(sft, scored, sft_sequences, budgets, sft_runs, losses, scores, efficiency, eff_error,
                              progress, processes, claims, exp_file, full)  # fmt: skip
    with report_md.open("a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(sections) + "\n")
    print("\n" + "\n".join(C.claims_markdown(claims)))
    print("phase timings: " + "; ".join(f"{i} {wall:.0f} s ({cpu:.0f} s CPU)" for i, _, wall, cpu in progress.timings))
    print(f"\ndemo finished in {progress.elapsed:.0f} s; report: {report_md}")
    return report_md


# ------------------------------------------------------------------------------------ SFT data
def _amount(fraction: float, full: int) -> int:
    return max(SFT_BATCH, round(fraction * full))


def _sft_data(corpus: Path, sft: dict, root: Path, fractions: list[float], seed: int) -> tuple[dict[int, Path], dict]:
    """Per amount of target data, a litgpt JSON directory: nested subsets of the training examples, one val.json.

    Also measures which samples score at least one token at the fine-tuning sequence length.
    """
    from litgpt.data.base import SFTDataset
    from litgpt.prompts import PromptStyle
    from litgpt.tokenizer import Tokenizer

    from midtrain.data.sft import scored_fraction

    train = json.loads((corpus / sft["train"]).read_text(encoding="utf-8"))
    val_text = (corpus / sft["val"]).read_text(encoding="utf-8")
    order = list(range(len(train)))
    random.Random(seed).shuffle(order)
    dirs = {}
    for x in sorted({_amount(f, len(train)) for f in fractions}):
        d = root / f"x{x}"
        d.mkdir(parents=True, exist_ok=True)
        (d / "train.json").write_text(json.dumps([train[i] for i in sorted(order[:x])], indent=1) + "\n")
        (d / "val.json").write_text(val_text)  # byte for byte the file `evaluate` scores
        dirs[x] = d
    tokenizer, style = Tokenizer(corpus / "tokenizer"), PromptStyle.from_name(sft["prompt_style"])
    result = {}
    for name, records in (("train", train), ("val", json.loads(val_text))):
        data = SFTDataset(records, tokenizer, style, sft["max_seq_length"] + 1, mask_prompt=True)
        tokens = [int((data[i]["labels"][1:] != -100).sum()) for i in range(len(data))]
        result[name] = {"fraction": scored_fraction(data), "n": len(data), "min_tokens": min(tokens),
                        "mean_tokens": sum(tokens) / len(tokens)}
    result["text"] = ", ".join(
        f"{k} {v['fraction']:.1%} of {v['n']} (scored tokens per sample: min {v['min_tokens']}, "
        f"mean {v['mean_tokens']:.1f})" for k, v in result.items()
    ) + f" at max_seq_length {sft['max_seq_length']}, prompt style {sft['prompt_style']}"
    return dirs, result


# ------------------------------------------------------------------------------------ results
def _read_losses(csv_path: Path, checkpoints: dict[str, Path]) -> dict[str, dict[str, float]]:
    """``{label: {set: loss}}`` from an evaluate CSV (its loss rows; benchmark rows have a metric and no loss)."""
    by_path = {str(p.resolve()): label for label, p in checkpoints.items()}
    losses: dict[str, dict[str, float]] = {}
    for row in read_eval_rows(csv_path):
        label = by_path.get(str(Path(row["checkpoint"]).resolve()))
        if label is not None and not row["metric"]:
            losses.setdefault(label, {})[row["set"]] = float(row["loss"])
    missing = [label for label in checkpoints if label not in losses]
    if missing:
        raise MidtrainError(f"evaluate wrote no loss rows for {missing} in {csv_path}.")
    return losses


def _read_scores(csv_path: Path, checkpoints: dict[str, Path]) -> dict[str, float]:
    """``{label: score}``: the benchmark's ``TASK_METRIC`` from an evaluate CSV."""
    by_path = {str(p.resolve()): label for label, p in checkpoints.items()}
    return {by_path[str(Path(r["checkpoint"]).resolve())]: float(r["value"]) for r in read_eval_rows(csv_path)
            if str(Path(r["checkpoint"]).resolve()) in by_path and r["set"] == TASK
            and r["metric"] == TASK_METRIC}  # fmt: skip


def _efficiency_csv(path: Path, jobs: list[SFTRun], losses: dict) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["checkpoint", "set", "loss", "target_examples", "method"])
        writer.writeheader()
        for job in jobs:
            writer.writerow({"checkpoint": str(job.dir), "set": "sft", "loss": losses[job.node]["sft"],
                             "target_examples": job.examples, "method": job.method})  # fmt: skip
    return path


def _summary(job: SFTRun) -> dict:
    return read_json(job.dir / SUMMARY_FILE)


def _claims(runs: list[SFTRun], losses: dict, scores: dict[str, float], efficiency: dict | None,
            eff_error: str | None, early: int, branch_step: int, full: int) -> list[C.Claim]:  # fmt: skip
    """The papers' claims this demo tests, with this run's numbers (plain SFT on the full set; every seed)."""

    def plain(branch: str, key: str) -> list[float]:
        return [losses[j.node][key] for j in runs if j.branch == branch and not j.ratio and j.examples == full]

    def score(branch: str) -> list[float]:
        return [scores[j.node] for j in runs if j.branch == branch and not j.ratio and j.examples == full
                and j.node in scores]  # fmt: skip

    rows = [
        C.lower_loss_claim("Midtraining (20% code) beats the base model in-domain after SFT (code SFT loss)",
                           f"{C.LIU_2025}: midtrained models reach lower SFT loss than pretraining alone; largest "
                           "gains for code and math", (MIDTRAIN, BASE), plain(MIDTRAIN, "sft"),
                           plain(BASE, "sft")),
        C.lower_loss_claim("Midtraining beats continued pretraining (100% code) in-domain after SFT",
                           f"{C.LIU_2025}: midtraining consistently outperforms continued pretraining in-domain "
                           "(code, math)", (MIDTRAIN, CPT), plain(MIDTRAIN, "sft"), plain(CPT, "sft")),
        C.lower_loss_claim("Midtraining forgets less than continued pretraining (prose loss after SFT)",
                           f"{C.LIU_2025}: midtraining consistently forgets less general (C4) data than continued "
                           "pretraining", (MIDTRAIN, CPT), plain(MIDTRAIN, "main"), plain(CPT, "main")),
        C.lower_loss_claim(f"Starting midtraining earlier (step {early} vs {branch_step}, same 20% code) gives a "
                           "lower in-domain loss after SFT",
                           f"{C.LIU_2025}: earlier introduction of code (20k vs 30k-50k of 61k steps) helps more "
                           "in-domain", (EARLY, MIDTRAIN), plain(EARLY, "sft"), plain(MIDTRAIN, "sft")),
        C.spread_claim("Timing matters more than the mixture weight: the SFT loss moves more between start steps "
                       f"({early} vs {branch_step}, 20% code) than between weights (20% vs 50% code at {branch_step})",
                       f"{C.LIU_2025}: the start step changes downstream results more than the midtraining "
                       "percentage", {f"{EARLY}": plain(EARLY, "sft"), MIDTRAIN: plain(MIDTRAIN, "sft")},
                       {MIDTRAIN: plain(MIDTRAIN, "sft"), HEAVY: plain(HEAVY, "sft")}),
    ]  # fmt: skip
    multipliers = None
    if efficiency is not None:
        multipliers = {r["x"]: r["multiplier"] for r in efficiency["rows"] if r["method"] != efficiency["baseline"]}
    rows.append(C.multiplier_claim(
        f"Replaying {REPLAY_RATIO:.0%} generic data in SFT improves target data efficiency (multiplier > 1)",
        f"{C.KOTHA_2026}: up to 1.87x for fine-tuning; 150M models, 4M target tokens", multipliers, eff_error))
    rows.append(C.higher_score_claim(
        f"Midtraining (20% code) beats the base model on the {TASK} benchmark after SFT ({TASK_METRIC})",
        f"{C.LIU_2025}: midtraining gains carry over to downstream benchmarks in the target domain",
        (MIDTRAIN, BASE), score(MIDTRAIN), score(BASE)))
    rows.append(C.not_run(
        "Replay of generic data during midtraining improves target data efficiency",
        f"{C.KOTHA_2026}: up to 2.06x for midtraining",
        "the fit needs midtraining runs at several amounts of target (code) data with and without replay; "
        "that is 6 more pretraining branches and their SFT, over the 10-minute budget"))
    return rows


# ------------------------------------------------------------------------------------ report
def _demo_sections(sft: dict, scored: dict, sft_sequences: int, budgets: dict, runs: list[SFTRun], losses: dict,
                   scores: dict[str, float], efficiency: dict | None, eff_error: str | None, progress: Progress,
                   processes: int, claims: list[C.Claim], exp_file: Path, full: int) -> list[str]:  # fmt: skip
    lines = ["# Demo: both papers' designs at CPU scale", "",
             f"Every run below is a node of the experiment file `{exp_file}` (`midtrain experiment plan` shows "
             "the graph; `midtrain experiment run` reruns what is missing).", "",
             "## Branch budgets beside their losses", "",
             "Every branch trains to the same last step (the paper's and the fork's design: the mixture and the "
             "start change, the end does not). Losses: the one SFT validation set "
             f"(`{sft['val']}`, {sft['val_examples']} examples) and held-out prose (`val/main`), by "
             f"`midtrain evaluate`; after SFT: mean over the SFT seeds on all {full} examples.",
             ""]  # fmt: skip
    rows = []
    for branch, tokens in budgets.items():
        total = sum(tokens.values())
        code = tokens.get("code", 0)
        after = [j for j in runs if j.branch == branch and not j.ratio and j.examples == full]
        sft_loss = C.mean([losses[j.node]["sft"] for j in after]) if after else None
        main_loss = C.mean([losses[j.node]["main"] for j in after]) if after else None
        rows.append([branch, MIXES[branch], f"{total:,}", f"{code:,} ({code / total:.0%})" if total else "0",
                     f"{losses[branch]['sft']:.4f} / {losses[branch]['main']:.4f}",
                     "—" if sft_loss is None else f"{sft_loss:.4f} / {main_loss:.4f}"])  # fmt: skip
    lines += C.markdown_table(["branch", "mixture", "tokens after branch point", "of them code",
                               "before SFT: SFT / prose loss", "after SFT: SFT / prose loss"], rows)  # fmt: skip
    lines += ["", "## SFT runs", "",
              f"Every SFT sample scores: {scored['text']}. Fine-tuning validates on the same file `evaluate` "
              "scores (`val.json` of each data directory is a byte copy of it); the two SFT loss columns "
              f"compare them. Benchmark: `{TASK}` ({TASK_METRIC}), multiple choice over the SFT validation set's "
              "answers, through lm-eval (`midtrain evaluate --tasks`).", ""]  # fmt: skip
    rows, worst = [], 0.0
    for job in runs:
        summary = _summary(job)
        own = summary["val"].get("sft")
        worst = max(worst, abs(own - losses[job.node]["sft"])) if own is not None else worst
        rows.append([job.node, f"{job.ratio:g}", job.seed, job.examples, f"{summary['epochs']:.2f}",
                     summary["step"], f"{summary['tokens']['sft_tokens']:,}", f"{summary['tokens']['replay_tokens']:,}",
                     f"{losses[job.node]['sft']:.4f}", "—" if own is None else f"{own:.4f}",
                     f"{losses[job.node]['main']:.4f}", f"{scores[job.node]:.3f}" if job.node in scores else "—"])
    lines += C.markdown_table(["run", "replay", "seed", "target examples", "epochs", "steps",
                               "SFT tokens scored", "replay tokens", "SFT loss (evaluate)",
                               "SFT loss (fine-tuning's final validation)", "prose loss", TASK], rows)  # fmt: skip
    lines += ["", f"Largest difference between the two SFT loss columns: {worst:.2e}.", ""]
    lines += ["## Replay data efficiency", "",
              f"The base run fine-tuned on nested subsets of the SFT set, each run consuming {sft_sequences} "
              "target sequences (so smaller sets repeat more epochs), without (`sft`, the fitted baseline) and "
              f"with {REPLAY_RATIO:.0%} prose replay on top. `midtrain efficiency` fits loss(x) = A / x^B + C to the "
              "baseline and inverts it at each replay run's loss: multiplier = effective x / x.", ""]  # fmt: skip
    if efficiency is not None:
        fit = efficiency["fit"]
        lines += [f"Fit: loss(x) = {fit['A']:.6g} / x^{fit['B']:.4g} + {fit['C']:.4g} (rmse {fit['rmse']:.3g}, "
                  f"{fit['points']} points)."
                  + (" Three points determine the three parameters exactly, so the rmse says nothing about how "
                     "well the law describes these runs; more amounts of target data would test it."
                     if fit["points"] == 3 else ""), ""]  # fmt: skip
        lines += C.markdown_table(["method", "target examples x", "loss", "fit at x", "effective x", "multiplier"],
                                  [[r["method"], f"{r['x']:g}", f"{r['loss']:.4f}", f"{r['fit_loss']:.4f}",
                                    f"{r['effective_x']:.4g}", C.times(r["multiplier"])] for r in efficiency["rows"]])
        lines += [*[f"- {n}" for n in efficiency["notes"]], "", f"![data efficiency]({'efficiency.png'})", ""]
    else:
        lines += [f"The fit failed: {eff_error}", ""]
    lines += ["## Timings", "",
              f"Per phase: wall seconds and CPU seconds (the demo's process and the runs it started, {processes} at "
              f"once, one process each). The report phase is not included. Wall time well above CPU time / "
              f"{processes} means other processes shared the cores; per node, see the experiment's logs.", ""]
    lines += C.markdown_table(["phase", "what", "wall s", "CPU s"],
                              [[i, text, f"{wall:.0f}", f"{cpu:.0f}"] for i, text, wall, cpu in progress.timings])
    lines += ["", "## The papers' claims", ""] + C.claims_markdown(claims)
    return lines
