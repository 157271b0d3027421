"""``midtrain demo``: both papers' experiment designs on one CPU in minutes, with no download.

1. build the demo corpus (stdlib code, bundled docs prose, generated math), its tokenizer and a
   code SFT set whose every example scores (``midtrain.demo.corpus``);
2. pretrain a tiny GPT on general prose (``main``) up to the branch step;
3. branch from that checkpoint into (a) the base mixture unchanged, (b) midtraining with 20% code,
   (c) continued pretraining on 100% code (the midtraining paper's baseline); all three train the
   same number of tokens after the branch point, to the same ``max_steps``. As each branch ends,
   fine-tune every branch on the code SFT set, without and with 25% prose replay; every SFT run
   consumes the same number of target sequences (replay comes on top), repeating its target data
   for several epochs; for replay data efficiency (the replay paper's design) also fine-tune the
   base branch on 1/4 and 1/2 of the SFT set, with and without replay; a second SFT seed of the
   plain runs shows the noise; every run is evaluated by ``midtrain evaluate`` when it ends, on the
   one SFT validation set (the file fine-tuning validates on) and on held-out prose (forgetting);
4. ``midtrain efficiency``: fit loss(x) = A / x^B + C to the runs without replay, multiplier of replay;
5. write the report: plots, budgets beside losses, the SFT table, the fit, and the papers' claims.

Every run is a real config written to ``<out>/configs/``, run through the ``midtrain`` CLI's code
path. Runs are scheduled on ``processes`` worker processes with one torch thread each (on a model
this small, intra-op threads gain little and cost a lot on a loaded machine) as soon as the run
they start from is done; their output goes to ``<out>/logs/<run>.log``, and each start and end prints a
progress line with wall and CPU time.
"""

from __future__ import annotations

import csv
import json
import multiprocessing
import os
import random
import shutil
import time
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from contextlib import redirect_stderr, redirect_stdout
from dataclasses import dataclass
from pathlib import Path

import yaml

from midtrain.cli import run
from midtrain.demo import claims as C
from midtrain.errors import MidtrainError
from midtrain.rundir import SUMMARY_FILE, read_json
from midtrain.rundir import read_eval_rows as read_rows
from midtrain.rundir import write_eval_rows as write_rows

MODEL = {"name": "demo-tiny", "n_layer": 4, "n_head": 4, "n_embd": 128, "block_size": 128,
         "vocab_size": 4096, "padded_vocab_size": 4096, "bias": True}
BRANCHES = {"base": "main:1", "midtrain": "main:0.8,code:0.2", "cpt": "code:1"}
REPLAY_RATIO = 0.25
SFT_BATCH = 16
SEEDS = (42, 43)
EFFICIENCY_BRANCH = "base"


@dataclass(frozen=True)
class SFTRun:
    """One fine-tuning run of the demo."""

    branch: str
    ratio: float
    seed: int
    examples: int
    dir: Path

    @property
    def method(self) -> str:
        return f"replay-{self.ratio:g}" if self.ratio else "sft"


class Progress:
    """``[demo i/N]`` lines; each phase's wall and CPU seconds (its own and its worker runs') are printed and kept."""

    def __init__(self, total: int) -> None:
        self.total, self.index, self.timings = total, 0, []
        self._start = time.perf_counter()
        self._open: tuple[str, float, float] | None = None
        self.worker_cpu = 0.0

    def phase(self, text: str) -> None:
        self.end()
        self.index += 1
        print(f"\n[demo {self.index}/{self.total}] {text}", flush=True)
        self._open, self.worker_cpu = (text, time.perf_counter(), time.process_time()), 0.0

    def step(self, i: int, n: int, text: str) -> None:
        print(f"[demo {self.index}/{self.total}] ({i}/{n}) {text}", flush=True)

    def end(self) -> None:
        if self._open is not None:
            text, wall, cpu = self._open
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu + self.worker_cpu
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


def _pretrain_config(corpus: Path, out_dir: Path, mix: str, max_steps: int, resume: Path | None,
                     save_interval: int | None = None) -> dict:  # fmt: skip
    return {
        "model_config": MODEL,
        "out_dir": str(out_dir),
        "precision": "32-true", "compile": False,
        "accelerator": "cpu",
        "devices": 1,
        "tokenizer_dir": str(corpus / "tokenizer"),
        "resume": str(resume) if resume else False,
        "data": {"class_path": "midtrain.data.ShardedMixedDataset", "init_args": {
            "data_path": str(corpus), "mix_weights_str": mix, "num_workers": 0,
            "val_data_path": {"main": str(corpus / "val" / "main"), "code": str(corpus / "val" / "code")}}},
        "train": {"max_steps": max_steps, "global_batch_size": 16, "micro_batch_size": 16,
                  "save_interval": save_interval, "log_interval": 25, "lr_warmup_fraction": 0.05, "min_lr": 1e-4},
        "eval": {"interval": 100, "max_samples": 64},
        "optimizer": {"class_path": "torch.optim.AdamW",
                      "init_args": {"lr": 3e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]}},
    }


def _finetune_config(corpus: Path, sft: dict, data_dir: Path, checkpoint: Path, job: SFTRun, epochs: float) -> dict:
    """SFT on ``data_dir`` (train.json: the run's target examples; val.json: the demo's one SFT validation set)."""
    cfg = {
        "checkpoint_dir": str(checkpoint),
        "out_dir": str(job.dir),
        "precision": "32-true", "compile": False,
        "accelerator": "cpu",
        "seed": job.seed,
        "data": {"class_path": "litgpt.data.JSON", "init_args": {
            "json_path": str(data_dir), "mask_prompt": True, "prompt_style": sft["prompt_style"], "num_workers": 0}},
        "val_data_path": {"main": str(corpus / "val" / "main")},
        "epochs": epochs,
        "train": {"global_batch_size": SFT_BATCH, "micro_batch_size": SFT_BATCH,
                  "max_seq_length": sft["max_seq_length"], "save_interval": None, "log_interval": 16,
                  "lr_warmup_fraction": 0.1, "min_lr": 1e-5},
        "eval": {"interval": 16, "max_samples": 64},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 1e-3, "weight_decay": 0.0}},
    }
    if job.ratio:
        cfg["replay"] = {"ratio": job.ratio,
                         "data": {"data_path": str(corpus), "mix_weights_str": "main:1", "num_workers": 0}}
    return cfg


@dataclass
class Job:
    """CLI commands one worker process runs in order (train, then evaluate), after the jobs named in ``after``."""

    name: str
    what: str
    commands: list[tuple[str, list[str]]]
    after: tuple[str, ...] = ()


def _run_job(commands: list[tuple[str, list[str]]], log: str, threads: int) -> tuple[float, float]:
    """In a worker process: run ``commands`` with output to ``log``; return (wall, CPU) seconds."""
    import torch

    torch.set_num_threads(threads)
    warnings.filterwarnings("ignore", message=r".*The epoch parameter in `scheduler.step\(\)`.*")
    wall, cpu = time.perf_counter(), time.process_time()
    with open(log, "w", encoding="utf-8") as f, redirect_stdout(f), redirect_stderr(f):
        for command, args in commands:
            print(f"$ midtrain {command} {' '.join(args)}", flush=True)
            run(command, args)
    return time.perf_counter() - wall, time.process_time() - cpu


def _run_jobs(pool: ProcessPoolExecutor, processes: int, threads: int, jobs: list[Job], logs: Path,
              progress: Progress) -> dict[str, tuple[float, float]]:  # fmt: skip
    """Run ``jobs`` on the pool, at most ``processes`` at once, each as soon as the jobs it depends on are done.

    Ready jobs start in list order. A failing job stops the demo with its log's path.
    """
    logs.mkdir(parents=True, exist_ok=True)
    pending, running, timings = list(jobs), {}, {}
    while pending or running:
        for job in [j for j in pending if set(j.after) <= set(timings)][: processes - len(running)]:
            pending.remove(job)
            running[pool.submit(_run_job, job.commands, str(logs / f"{job.name}.log"), threads)] = job
            progress.step(len(timings), len(jobs), f"start {job.name}: {job.what}")
        if not running:
            raise MidtrainError(f"demo jobs {[j.name for j in pending]} wait for jobs that do not exist.")
        finished, _ = wait(running, return_when=FIRST_COMPLETED)
        for future in finished:
            job = running.pop(future)
            try:
                timings[job.name] = future.result()
            except BaseException as err:
                for other in running:
                    other.cancel()
                raise MidtrainError(f"demo job {job.name} failed ({err}); its output: {logs / job.name}.log") from err
            wall, cpu = timings[job.name]
            progress.worker_cpu += cpu
            progress.step(len(timings), len(jobs), f"done {job.name} in {wall:.0f} s ({cpu:.0f} s CPU)")
    return timings


def demo(
    out: Path = Path("demo_out"),
    branch_step: int = 200,
    max_steps: int = 400,
    sft_sequences: int = 768,
    efficiency_fractions: list[float] | None = None,
    sft_seeds: int = 2,
    timing_ablation: bool = False,
    processes: int | None = None,
    seed: int = 0,
) -> Path:
    """Run both papers' experiment designs end to end on CPU and write ``<out>/report/report.md``.

    Args:
        out: Output directory (corpus, configs, runs, logs, evaluation CSVs, report).
        branch_step: Optimizer step at which the branches leave the base pretraining run.
        max_steps: Total pretraining steps of every branch (the LR schedule spans all of them).
        sft_sequences: Target (SFT) sequences every fine-tuning run consumes; replay sequences come on top.
        efficiency_fractions: Fractions of the SFT training set for the replay data-efficiency runs
            (default ``[0.25, 0.5, 1.0]``; at least 3).
        sft_seeds: SFT seeds of the plain (no replay) runs of every branch, 1 or 2; the second shows the noise.
        timing_ablation: Also midtrain from ``branch_step // 2`` (the paper's timing ablation; adds minutes).
        processes: Runs trained at once, each in its own single-threaded process (default: min(2, CPU cores)).
        seed: Seed of the demo corpus.
    """
    from midtrain.demo.corpus import build_demo_corpus
    from midtrain.rundir import checkpoint_name, find_latest

    fractions = sorted(set(efficiency_fractions or [0.25, 0.5, 1.0]))
    if len(fractions) < 3 or not all(0 < f <= 1 for f in fractions):
        raise MidtrainError(f"efficiency_fractions needs >= 3 distinct fractions in (0, 1], got {fractions}.")
    if sft_seeds not in (1, 2):
        raise MidtrainError(f"sft_seeds must be 1 or 2, got {sft_seeds}.")
    cores = os.cpu_count() or 1
    processes = processes or min(2, cores)
    if processes < 1:
        raise MidtrainError(f"processes must be >= 1, got {processes}.")
    threads = max(1, cores // processes)
    out = Path(out)
    for stale in ("runs", "report", "sft_data", "configs", "logs", "eval", "eval.csv", "efficiency.csv",
                  "efficiency.json"):  # fmt: skip
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

    configs, runs, logs, evals = out / "configs", out / "runs", out / "logs", out / "eval"
    early = branch_step // 2 if timing_ablation else None
    evaluate_args = ["--val", f"sft={corpus / sft['val']}", "--val", f"main={corpus / 'val' / 'main'}",
                     "--max_samples", "64", "--prompt_style", sft["prompt_style"],
                     "--max_seq_length", str(sft["max_seq_length"])]  # fmt: skip

    def evaluate(name: str) -> tuple[str, list[str]]:
        return "evaluate", ["--checkpoints", str(runs / name), "--out", str(evals / f"{name}.csv"), *evaluate_args]

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(processes, mp_context=ctx) as pool:
        progress.phase(f"pretraining on general prose (main) up to step {branch_step}")
        base_cfg = _write(configs / "pretrain.yaml",
                          _pretrain_config(corpus, runs / "pretrain", "main:1", max_steps, None, save_interval=early))
        job = Job("pretrain", f"main:1, steps 0-{branch_step}",
                  [("pretrain", ["--config", str(base_cfg), "--train.max_additional_steps", str(branch_step)])])
        timings = _run_jobs(pool, processes, threads, [job], logs, progress)
        branch_ckpt = find_latest(runs / "pretrain")
        starts = {name: branch_ckpt for name in BRANCHES}
        if early:
            starts["midtrain-early"] = runs / "pretrain" / checkpoint_name(early)
        mixes = {**BRANCHES, **({"midtrain-early": BRANCHES["midtrain"]} if early else {})}

        full = sft["examples"]
        main_jobs = [SFTRun(b, r, SEEDS[0], full, runs / f"{b}-{'sft-replay' if r else 'sft'}")
                     for b in mixes for r in (0.0, REPLAY_RATIO)]  # fmt: skip
        amounts = sorted({_amount(f, full) for f in fractions} - {full})
        eff_jobs = [SFTRun(EFFICIENCY_BRANCH, r, SEEDS[0], x, runs / f"{EFFICIENCY_BRANCH}-{_tag(r)}-x{x}")
                    for x in amounts for r in (0.0, REPLAY_RATIO)]  # fmt: skip
        seed_jobs = [SFTRun(b, 0.0, SEEDS[1], full, runs / f"{b}-sft-seed{SEEDS[1]}")
                     for b in mixes] if sft_seeds == 2 else []  # fmt: skip
        sft_jobs = main_jobs + eff_jobs + seed_jobs

        jobs = []
        for name, mix in mixes.items():
            cfg = _write(configs / f"{name}.yaml", _pretrain_config(corpus, runs / name, mix, max_steps, starts[name]))
            jobs.append(Job(name, f"branch {mix} from {starts[name].name} to step {max_steps}",
                            [("pretrain", ["--config", str(cfg)]), evaluate(name)]))
        for job in sft_jobs:
            epochs = sft_sequences / job.examples
            cfg = _finetune_config(corpus, sft, data_dirs[job.examples], runs / job.branch, job, epochs)
            path = _write(configs / f"{job.dir.name}.yaml", cfg)
            what = (f"SFT of {job.branch} on {job.examples} examples x {epochs:.2f} epochs"
                    + (f" + {job.ratio:.0%} prose replay" if job.ratio else "") + f", seed {job.seed}")
            jobs.append(Job(job.dir.name, what, [("finetune", ["--config", str(path)]), evaluate(job.dir.name)],
                            after=(job.branch,)))
        progress.phase(
            f"{len(jobs)} runs on {processes} processes: {len(mixes)} branches from step {branch_step} "
            f"({', '.join(f'{k}={v}' for k, v in mixes.items())}); SFT of every branch without and with "
            f"{REPLAY_RATIO:.0%} replay; replay data efficiency on {EFFICIENCY_BRANCH} at {amounts + [full]} "
            f"examples; {'a second SFT seed; ' if seed_jobs else ''}each run evaluated when it ends")
        timings |= _run_jobs(pool, processes, threads, jobs, logs, progress)

    progress.phase("midtrain efficiency: fitting loss(x) = A / x^B + C to the plain SFT runs of "
                   f"{EFFICIENCY_BRANCH}, multiplier of replay")
    checkpoints = {name: find_latest(runs / name) for name in mixes}
    checkpoints |= {j.dir.name: find_latest(j.dir) for j in sft_jobs}
    csv_path = _merge_csv([evals / f"{name}.csv" for name in checkpoints], out / "eval.csv")
    losses = _read_losses(csv_path, checkpoints)
    report_dir = out / "report"
    eff_runs = [j for j in main_jobs if j.branch == EFFICIENCY_BRANCH] + eff_jobs
    eff_csv = _efficiency_csv(out / "efficiency.csv", eff_runs, losses, checkpoints)
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

    report_runs = [runs / "pretrain", *(runs / n for n in mixes), *(j.dir for j in main_jobs)]
    report_md = Path(report([str(p) for p in report_runs], out=report_dir, in_domain="sft", general="main"))
    budgets = {name: C.branch_budget(runs / name, starts[name]) for name in mixes}
    claims = _claims(main_jobs, seed_jobs, losses, efficiency, eff_error, early, branch_step)
    progress.end()
    sections = _demo_sections(sft, scored, sft_sequences, budgets, main_jobs + seed_jobs, eff_runs, losses,
                              efficiency, eff_error, progress, timings, processes, threads, claims)  # fmt: skip
    with report_md.open("a", encoding="utf-8") as f:
        f.write("\n" + "\n".join(sections) + "\n")
    print("\n" + "\n".join(C.claims_markdown(claims)))
    print("phase timings: " + "; ".join(f"{i} {wall:.0f} s ({cpu:.0f} s CPU)" for i, _, wall, cpu in progress.timings))
    print(f"\ndemo finished in {progress.elapsed:.0f} s; report: {report_md}")
    return report_md


def _tag(ratio: float) -> str:
    return "sft-replay" if ratio else "sft"


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
def _merge_csv(parts: list[Path], out: Path) -> Path:
    """Concatenate the per-run evaluate CSVs (same columns) into one."""
    write_rows(out, [row for part in parts for row in read_rows(part)])
    return out


def _read_losses(csv_path: Path, checkpoints: dict[str, Path]) -> dict[str, dict[str, float]]:
    """``{label: {set: loss}}`` from the evaluate CSV."""
    by_path = {str(p.resolve()): label for label, p in checkpoints.items()}
    losses: dict[str, dict[str, float]] = {}
    for row in read_rows(csv_path):
        if row["checkpoint"] in by_path:
            losses.setdefault(by_path[row["checkpoint"]], {})[row["set"]] = float(row["loss"])
    missing = [label for label in checkpoints if label not in losses]
    if missing:
        raise MidtrainError(f"evaluate wrote no rows for {missing} in {csv_path}.")
    return losses


def _efficiency_csv(path: Path, jobs: list[SFTRun], losses: dict, checkpoints: dict[str, Path]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=["checkpoint", "set", "loss", "target_examples", "method"])
        writer.writeheader()
        for job in jobs:
            writer.writerow({"checkpoint": str(checkpoints[job.dir.name]), "set": "sft",
                             "loss": losses[job.dir.name]["sft"], "target_examples": job.examples,
                             "method": job.method})  # fmt: skip
    return path


def _summary(job: SFTRun) -> dict:
    return read_json(job.dir / SUMMARY_FILE)


def _claims(main_jobs: list[SFTRun], seed_jobs: list[SFTRun], losses: dict, efficiency: dict | None,
            eff_error: str | None, early: int | None, branch_step: int) -> list[C.Claim]:  # fmt: skip
    """The papers' claims this demo tests, with this run's numbers (plain SFT; every seed)."""

    def plain(branch: str, key: str) -> list[float]:
        return [losses[j.dir.name][key] for j in main_jobs + seed_jobs if j.branch == branch and not j.ratio]

    rows = [
        C.lower_loss_claim("Midtraining (20% code) beats the base model in-domain after SFT (code SFT loss)",
                           f"{C.LIU_2025}: midtrained models reach lower SFT loss than pretraining alone; largest "
                           "gains for code and math", ("midtrain", "base"), plain("midtrain", "sft"),
                           plain("base", "sft")),
        C.lower_loss_claim("Midtraining beats continued pretraining (100% code) in-domain after SFT",
                           f"{C.LIU_2025}: midtraining consistently outperforms continued pretraining in-domain "
                           "(code, math)", ("midtrain", "cpt"), plain("midtrain", "sft"), plain("cpt", "sft")),
        C.lower_loss_claim("Midtraining forgets less than continued pretraining (prose loss after SFT)",
                           f"{C.LIU_2025}: midtraining consistently forgets less general (C4) data than continued "
                           "pretraining", ("midtrain", "cpt"), plain("midtrain", "main"), plain("cpt", "main")),
    ]  # fmt: skip
    multipliers = None
    if efficiency is not None:
        multipliers = {r["x"]: r["multiplier"] for r in efficiency["rows"] if r["method"] != efficiency["baseline"]}
    rows.append(C.multiplier_claim(
        f"Replaying {REPLAY_RATIO:.0%} generic data in SFT improves target data efficiency (multiplier > 1)",
        f"{C.KOTHA_2026}: up to 1.87x for fine-tuning (2.06x for midtraining); 150M models, 4M target tokens",
        multipliers, eff_error))
    timing = "Starting midtraining earlier gives a lower in-domain loss after SFT"
    timing_paper = f"{C.LIU_2025}: earlier introduction of code (20k vs 30k-50k of 61k steps) helps more in-domain"
    if early:
        rows.append(C.lower_loss_claim(timing, timing_paper, (f"from step {early}", f"from step {branch_step}"),
                                       plain("midtrain-early", "sft"), plain("midtrain", "sft")))
    else:
        rows.append(C.not_run(timing, timing_paper,
                              "it adds a branch and its SFT (over the 10-minute budget); "
                              "`midtrain demo --timing_ablation true` runs it"))
    return rows


# ------------------------------------------------------------------------------------ report
def _demo_sections(sft: dict, scored: dict, sft_sequences: int, budgets: dict, sft_jobs: list[SFTRun],
                   eff_runs: list[SFTRun], losses: dict, efficiency: dict | None, eff_error: str | None,
                   progress: Progress, timings: dict[str, tuple[float, float]], processes: int, threads: int,
                   claims: list[C.Claim]) -> list[str]:  # fmt: skip
    lines = ["# Demo: both papers' designs at CPU scale", "",
             "## Branch budgets beside their losses", "",
             "Every branch trains the same number of tokens after the branch point (the paper's and the fork's "
             "design: the mixture changes, the length does not). Losses: the one SFT validation set "
             f"(`{sft['val']}`, {sft['val_examples']} examples) and held-out prose (`val/main`), by "
             "`midtrain evaluate`.",
             ""]  # fmt: skip
    rows = []
    for branch, tokens in budgets.items():
        total = sum(tokens.values())
        code = tokens.get("code", 0)
        after = {r: losses.get(f"{branch}-{'sft-replay' if r else 'sft'}", {}) for r in (0.0, REPLAY_RATIO)}
        rows.append([branch, f"{total:,}", f"{code:,} ({code / total:.0%})" if total else "0",
                     f"{losses[branch]['sft']:.4f} / {losses[branch]['main']:.4f}",
                     *(f"{a['sft']:.4f} / {a['main']:.4f}" if a else "—" for a in after.values())])  # fmt: skip
    lines += C.markdown_table(["branch", "tokens after branch point", "of them code",
                               "before SFT: SFT / prose loss", "after SFT: SFT / prose loss",
                               f"after SFT + {REPLAY_RATIO:.0%} replay: SFT / prose loss"], rows)  # fmt: skip
    lines += ["", "## SFT runs", "",
              f"Every SFT sample scores: {scored['text']}. Fine-tuning validates on the same file `evaluate` "
              "scores (`val.json` of each data directory is a byte copy of it); the last two loss columns "
              "compare them.", ""]  # fmt: skip
    rows, worst = [], 0.0
    for job in sft_jobs + [j for j in eff_runs if j not in sft_jobs]:
        summary = _summary(job)
        own = summary["val"].get("sft")
        worst = max(worst, abs(own - losses[job.dir.name]["sft"])) if own is not None else worst
        rows.append([job.dir.name, job.branch, f"{job.ratio:g}", job.seed, job.examples, f"{summary['epochs']:.2f}",
                     summary["step"], f"{summary['tokens']['sft_tokens']:,}", f"{summary['tokens']['replay_tokens']:,}",
                     f"{losses[job.dir.name]['sft']:.4f}", "—" if own is None else f"{own:.4f}",
                     f"{losses[job.dir.name]['main']:.4f}"])  # fmt: skip
    lines += C.markdown_table(["run", "branch", "replay", "seed", "target examples", "epochs", "steps",
                               "SFT tokens scored", "replay tokens", "SFT loss (evaluate)",
                               "SFT loss (fine-tuning's final validation)", "prose loss"], rows)  # fmt: skip
    lines += ["", f"Largest difference between the two SFT loss columns: {worst:.2e}.", ""]
    lines += ["## Replay data efficiency", "",
              f"The base branch fine-tuned on nested subsets of the SFT set, each run consuming {sft_sequences} "
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
              f"Per phase: wall seconds and CPU seconds (the demo's process and its {processes} worker process(es), "
              f"which train with {threads} torch thread(s) each). The report phase is not included. Wall time well "
              f"above CPU time / {processes} means other processes shared the cores.", ""]  # fmt: skip
    lines += C.markdown_table(["phase", "what", "wall s", "CPU s"],
                              [[i, text, f"{wall:.0f}", f"{cpu:.0f}"] for i, text, wall, cpu in progress.timings])
    lines += ["", "Per run (train, then evaluate, in one worker process):", ""]
    lines += C.markdown_table(["run", "wall s", "CPU s"],
                              [[name, f"{wall:.0f}", f"{cpu:.0f}"] for name, (wall, cpu) in timings.items()])
    lines += ["", "## The papers' claims", ""] + C.claims_markdown(claims)
    return lines
