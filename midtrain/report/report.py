"""``midtrain report``: PNG plots and a markdown summary of one or more run directories.

Reads what ``midtrain pretrain`` / ``finetune`` write into a run directory: ``metrics.jsonl``
(training rows with ``loss``, ``train/<type>/loss``, ``tokens/<type>``; validation rows with
``val/<set>/loss``), ``mixture_history.json`` and, once the run finished, ``summary.json``.
Missing data skips the plot or table that needs it, with a note in ``report.md``; only a call
where no run directory is readable is an error. The readers (:func:`read_metrics`,
:func:`final_val_losses`, ...) are meant for reuse by other code.
"""

from __future__ import annotations

import glob
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from midtrain.errors import MidtrainError
from midtrain.report.plots import Series, plot_forgetting, plot_training, plot_val_set
from midtrain.rundir import METRICS_FILE, MIXTURE_HISTORY_FILE, SUMMARY_FILE, read_eval_rows, read_json, read_metrics

_VAL_KEY = re.compile(r"val/(.+)/loss")
_TRAIN_KEY = re.compile(r"train/(.+)/loss")
_TOKENS_KEY = re.compile(r"tokens/(.+)")


# ------------------------------------------------------------------------------------- readers
def series(rows: list[dict], key: str, default: float | None = None) -> Series:
    """(steps, values) of ``key``, sorted by step; a step logged twice (a resumed run) keeps its last value.

    Rows without ``key`` are left out, or give ``default`` when one is set.
    """
    by_step = {
        int(r["step"]): float(r[key] if r.get(key) is not None else default)
        for r in rows
        if r.get(key) is not None or default is not None
    }
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def keys_matching(rows: list[dict], pattern: re.Pattern) -> list[str]:
    """The first groups of ``pattern`` over all row keys (e.g. validation set names), sorted."""
    return sorted({m.group(1) for r in rows for k in r if (m := pattern.fullmatch(k))})


def final_val_losses(run_dir: Path | str, rows: list[dict] | None = None) -> dict[str, float]:
    """The last logged validation loss of every set of a run (the final validation when there is one)."""
    rows = read_metrics(run_dir) if rows is None else rows
    final: dict[str, float] = {}
    for row in rows:
        for key, value in row.items():
            if (m := _VAL_KEY.fullmatch(key)) and value is not None:
                final[m.group(1)] = float(value)
    return final


def read_mixture_history(run_dir: Path | str) -> list[dict]:
    """``mixture_history.json`` of a run (empty when absent)."""
    return read_json(Path(run_dir) / MIXTURE_HISTORY_FILE, [])


def switch_steps(history: list[dict]) -> list[int]:
    """Steps at which the mixture changed (stages and resumes with a new mixture; not the start)."""
    return [int(h["step"]) for h in history if h.get("reason") != "start"]


def read_summary(run_dir: Path | str) -> dict | None:
    """``summary.json`` of a finished run, or None."""
    return read_json(Path(run_dir) / SUMMARY_FILE)


@dataclass
class Run:
    """One run directory, read once."""

    path: Path
    label: str
    rows: list[dict]
    history: list[dict] = field(default_factory=list)
    summary: dict | None = None

    @property
    def train_rows(self) -> list[dict]:
        return [r for r in self.rows if "loss" in r]

    def tokens_by_type(self) -> dict[str, int]:
        """From ``summary.json``, else the last training row's cumulative ``tokens/<type>``."""
        if self.summary and self.summary.get("tokens_by_type"):
            return {k: int(v) for k, v in self.summary["tokens_by_type"].items()}
        last = self.train_rows[-1] if self.train_rows else {}
        return {m.group(1): int(v) for k, v in last.items() if (m := _TOKENS_KEY.fullmatch(k))}


def load_runs(runs: list[str] | str, labels: list[str] | None = None) -> tuple[list[Run], list[str]]:
    """Readable runs (globs expanded) and notes about the paths that are not; error if none is readable."""
    patterns = [runs] if isinstance(runs, str) else list(runs)
    paths = [Path(p) for pattern in patterns for p in sorted(glob.glob(os.path.expanduser(pattern))) or [pattern]]
    notes, found = [], []
    for path in dict.fromkeys(paths):
        if not (path / METRICS_FILE).is_file():
            notes.append(f"Skipped {path}: no {METRICS_FILE} (not a run directory, or the run has not logged yet).")
        elif not (rows := read_metrics(path)):
            notes.append(f"Skipped {path}: {METRICS_FILE} is empty.")
        else:
            found.append((path, rows))
    if not found:
        raise MidtrainError(f"No readable run directory among {patterns}: " + " ".join(notes))
    if labels is not None and len(labels) != len(found):
        raise MidtrainError(f"{len(labels)} labels for {len(found)} runs ({[str(p) for p, _ in found]}).")
    names = labels or _unique_labels([p for p, _ in found])
    return [
        Run(path, name, rows, read_mixture_history(path), read_summary(path))
        for (path, rows), name in zip(found, names)
    ], notes


def _unique_labels(paths: list[Path]) -> list[str]:
    """Directory names, with as many parent parts as it takes to tell them apart."""
    for depth in range(1, max(len(p.resolve().parts) for p in paths) + 1):
        labels = ["/".join(p.resolve().parts[-depth:]) for p in paths]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "run"


# --------------------------------------------------------------------------------------- plots
def val_plots(runs: list[Run], sets: list[str], out: Path) -> dict[str, Path]:
    """One figure per validation set, one line per run that logged it."""
    written = {}
    for name in sets:
        curves = {r.label: series(r.rows, f"val/{name}/loss") for r in runs}
        curves = {label: s for label, s in curves.items() if s[0]}
        if curves:
            switches = {r.label: switch_steps(r.history) for r in runs}
            written[name] = plot_val_set(name, curves, switches, out / f"val_{_slug(name)}.png")
    return written


def training_plot(run: Run, out: Path) -> Path | None:
    """Training loss (all and per type) and tokens per type of one run; None when it logged no training."""
    rows = run.train_rows
    if not rows:
        return None
    loss = {"all": series(rows, "loss")}
    loss.update({t: series(rows, f"train/{t}/loss") for t in keys_matching(rows, _TRAIN_KEY)})
    tokens = {t: series(rows, f"tokens/{t}", default=0) for t in keys_matching(rows, _TOKENS_KEY)}
    return plot_training(run.label, loss, tokens, switch_steps(run.history), out / f"train_{_slug(run.label)}.png")


def forgetting_points(runs: list[Run], in_domain: str, general: str) -> dict[str, tuple[float, float]]:
    """(final in-domain loss, final pretraining-set loss) of each run that has both."""
    points = {}
    for run in runs:
        final = final_val_losses(run.path, run.rows)
        if in_domain in final and general in final:
            points[run.label] = (final[in_domain], final[general])
    return points


def choose_general(runs: list[Run], in_domain: str, general: str | None) -> tuple[str | None, str]:
    """The pretraining set for the scatter: ``general`` or the only other set all runs logged; and a note."""
    if general is not None:
        return general, f"Forgetting set: `{general}` (given)."
    common = set.intersection(*(set(final_val_losses(r.path, r.rows)) for r in runs)) - {in_domain}
    if len(common) == 1:
        (only,) = common
        return only, f"Forgetting set: `{only}` (the only other validation set of every run)."
    return None, f"No forgetting scatter: pass --general, one of {sorted(common) or 'none (no common set)'}."


# ------------------------------------------------------------------------------------ markdown
def _table(header: list[str], rows: list[list[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]


def _fmt_loss(value: float | None) -> str:
    return "—" if value is None else f"{value:.4f}"


def run_section(run: Run, sets: list[str], train_png: Path | None, out: Path) -> list[str]:
    """Markdown for one run: status, final validation losses, tokens per type, mixture history."""
    last_step = max((int(r["step"]) for r in run.rows), default=0)
    summary = run.summary or {}
    status = f"finished at step {summary['step']} of {summary['max_steps']}" if summary else f"step {last_step}"
    lines = [f"## Run `{run.label}`", "", f"`{run.path}`: {status}."]
    if summary.get("train_seconds") is not None:
        lines[-1] += f" Training time {summary['train_seconds']:.1f} s."
    final = final_val_losses(run.path, run.rows)
    lines += ["", "**Final validation loss**", ""]
    if final:
        rows = [[s, f"{final[s]:.4f}", f"{math.exp(min(final[s], 700)):.2f}"] for s in sets if s in final]
        lines += _table(["set", "loss", "ppl"], rows)
    else:
        lines.append("_No validation rows logged._")
    tokens = run.tokens_by_type()
    lines += ["", "**Tokens seen per type**", ""]
    total = sum(tokens.values())
    if tokens:
        rows = [[t, f"{n:,}", f"{n / total:.1%}" if total else "—"] for t, n in sorted(tokens.items())]
        lines += _table(["type", "tokens", "share"], [*rows, ["**all**", f"{total:,}", "100%"]])
    else:
        lines.append("_No token counts logged._")
    lines += ["", "**Mixture history**", ""]
    if run.history:
        rows = [[h["step"], h.get("reason", ""), f"`{h.get('to', '')}`"] for h in run.history]
        lines += _table(["step", "reason", "mixture"], rows)
    else:
        lines.append("_No mixture_history.json._")
    if train_png is not None:
        lines += ["", f"![training {run.label}]({train_png.relative_to(out)})"]
    return [*lines, ""]


# ------------------------------------------------------------------------------------- command
def report(
    runs: list[str] | str,
    out: Path = Path("report"),
    val_sets: list[str] | None = None,
    in_domain: str = "sft",
    general: str | None = None,
    labels: list[str] | None = None,
    evals: list[str] | str | None = None,
) -> Path:
    """Plots and a markdown summary (``report.md``) of one or more run directories.

    Args:
        runs: Run directories or globs (``'runs/*'``); several: ``--runs '[a, b]'`` or ``--runs a --runs+ b``.
        out: Output directory for the PNGs and ``report.md``.
        val_sets: Validation sets to plot and tabulate; default: every set any run logged.
        in_domain: The in-domain set of the forgetting scatter (x axis), e.g. ``sft`` or ``code``.
        general: The pretraining set of the forgetting scatter (y axis), e.g. ``c4``; default: the only
            other validation set every run logged.
        labels: Names for the runs in plots and tables, in the order of the runs; default: directory names.
        evals: Evaluate CSVs (globs) whose benchmark rows (``midtrain evaluate --tasks``) get a section.

    Returns:
        The path of ``report.md``.
    """
    loaded, notes = load_runs(runs, labels)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    logged = sorted({s for r in loaded for s in keys_matching(r.rows, _VAL_KEY)})
    sets = logged if val_sets is None else list(val_sets)
    notes += [f"Validation set `{s}` was not logged by any run; skipped." for s in sets if s not in logged]
    sets = [s for s in sets if s in logged]
    if not sets:
        notes.append("No validation rows in any run: no validation plots.")

    val_pngs = val_plots(loaded, sets, out)
    train_pngs = {r.label: training_plot(r, out) for r in loaded}
    notes += [f"Run `{label}` logged no training rows: no training plot." for label, p in train_pngs.items() if not p]
    general, general_note = choose_general(loaded, in_domain, general)
    points = forgetting_points(loaded, in_domain, general) if general else {}
    scatter = plot_forgetting(points, in_domain, general, out / "forgetting.png") if points else None
    if general and not points:
        general_note = f"No forgetting scatter: no run logged both `{in_domain}` and `{general}`."

    lines = ["# midtrain report", "", "Runs: " + ", ".join(f"`{r.label}` ({r.path})" for r in loaded), ""]
    lines += ["## Final validation loss", ""]
    lines += _table(["run", *sets], [[r.label, *_final_cells(r, sets)] for r in loaded]) + [""]
    lines += ["## Validation loss over steps", "", "Dashed lines: mixture switches (stage or resume).", ""]
    lines += [f"![validation {name}]({png.relative_to(out)})" for name, png in val_pngs.items()] + [""]
    lines += ["## Forgetting vs in-domain", "", general_note, ""]
    if scatter is not None:
        lines += [f"![forgetting]({scatter.relative_to(out)})", ""]
        rows = [[label, f"{x:.4f}", f"{y:.4f}"] for label, (x, y) in points.items()]
        lines += _table(["run", f"{in_domain} (in-domain)", f"{general} (pretraining)"], rows) + [""]
    if evals:
        files = [Path(p) for g in ([evals] if isinstance(evals, str) else evals) for p in sorted(glob.glob(g))]
        lines += benchmark_section({r.label: r.path for r in loaded}, files)
    for run in loaded:
        lines += run_section(run, sets, train_pngs[run.label], out)
    if notes:
        lines += ["## Notes", "", *[f"- {n}" for n in notes], ""]
    path = out / "report.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    count = len(val_pngs) + sum(p is not None for p in train_pngs.values()) + (scatter is not None)
    print(f"report: wrote {path} and {count} plots.")
    return path


def _final_cells(run: Run, sets: list[str]) -> list[str]:
    final = final_val_losses(run.path, run.rows)
    return [_fmt_loss(final.get(s)) for s in sets]


def benchmark_section(runs: dict[str, Path], csv_files: list[Path]) -> list[str]:
    """Markdown for ``report``: each run's latest benchmark scores, and score vs step with several checkpoints.

    A row belongs to the run whose directory holds its checkpoint (``<run>/step-*`` or ``<run>/final``).
    """
    owner = {path.resolve(): label for label, path in runs.items()}
    scores: dict[tuple[str, str, str], dict[str, dict]] = {}  # (run, set, metric) -> {checkpoint: row}
    for row in (r for f in csv_files for r in read_eval_rows(f) if r["metric"]):
        label = owner.get(Path(row["checkpoint"]).resolve().parent)
        if label is not None:
            scores.setdefault((label, row["set"], row["metric"]), {})[row["checkpoint"]] = row
    if not scores:
        return ["## Benchmarks", "", "_No benchmark rows (`midtrain evaluate --tasks`) for these runs._", ""]

    def order(row: dict) -> tuple[bool, int]:  # final/ (no step) counts as the latest
        return (row["step"] == "", int(row["step"] or 0))

    def cell(row: dict) -> str:
        return row["value"] + (f" ± {row['stderr']}" if row["stderr"] else "")

    latest = [[*key, cell(r := max(by_ckpt.values(), key=order)), Path(r["checkpoint"]).name]
              for key, by_ckpt in sorted(scores.items())]  # fmt: skip
    lines = ["## Benchmarks", "", "Latest checkpoint of each run (value ± stderr, lm-eval-harness).", ""]
    lines += _table(["run", "benchmark", "metric", "score", "checkpoint"], latest) + [""]
    steps = sorted({int(r["step"]) for by_ckpt in scores.values() for r in by_ckpt.values() if r["step"]})
    if len(steps) > 1:
        over = [[*key, *(next((r["value"] for r in by_ckpt.values() if r["step"] == str(s)), "—") for s in steps)]
                for key, by_ckpt in sorted(scores.items())]  # fmt: skip
        lines += ["**Score vs step**", "", *_table(["run", "benchmark", "metric", *map(str, steps)], over), ""]
    return lines
