"""Data-efficiency multipliers: fit ``loss(x) = A / x^B + C`` to baseline runs and invert it.

The replay paper measures a method (e.g. fine-tuning with replay) by how much target data the
baseline would need to reach the method's loss: fit the scaling law to the baseline's runs at
several amounts of target data ``x``, then for a method's run ``(x, loss)`` the *effective data*
is ``x_eff = (A / (loss - C))^(1/B)`` and the *multiplier* is ``x_eff / x`` (2.0 = the method is
worth twice its target data). A loss at or below the fitted asymptote ``C`` has infinite
effective data; it is reported as ``inf`` with a note, never clipped.

The fit needs no SciPy: for a fixed ``B`` the law is linear in ``A`` and ``C``, so ``A, C`` are a
bounded least-squares solve (``A > 0``, ``C >= 0``) and ``B`` is found by a log-spaced grid search
over the profiled squared error followed by a golden-section refinement. A minimum on the edge of
the ``B`` range means the data do not determine the law (flat or exploding), which is an error.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from midtrain.errors import MidtrainError
from midtrain.eval.similarity import format_table, write_results
from midtrain.rundir import SUMMARY_FILE, read_csv, read_json

B_RANGE = (1e-3, 5.0)
REDUCTIONS = ("last", "min", "mean", "error")


@dataclass(frozen=True)
class PowerLawFit:
    """``loss(x) = A / x^B + C``."""

    A: float
    B: float
    C: float
    rmse: float
    points: int

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        return self.A * np.power(x, -self.B) + self.C

    def effective_data(self, loss: float) -> float:
        """The ``x`` at which the law reaches ``loss`` (``inf`` when ``loss <= C``)."""
        if loss <= self.C:
            return math.inf
        return (self.A / (loss - self.C)) ** (1.0 / self.B)

    def formula(self) -> str:
        return f"loss(x) = {self.A:.6g} / x^{self.B:.4g} + {self.C:.4g}"


# ----------------------------------------------------------------------------------------------- fitting
def _check_points(x: np.ndarray, loss: np.ndarray) -> None:
    if x.shape != loss.shape or x.ndim != 1:
        raise MidtrainError(f"x and loss must be 1-D and of equal length, got shapes {x.shape} and {loss.shape}.")
    if not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise MidtrainError(f"The amounts of data x must be finite and > 0; got {x.tolist()}.")
    if not np.all(np.isfinite(loss)):
        raise MidtrainError(f"Losses must be finite; got {loss.tolist()}.")
    if len(np.unique(x)) < 3:
        raise MidtrainError(
            f"Fitting A / x^B + C needs baseline runs at >= 3 distinct amounts of data; got {sorted(set(x.tolist()))}."
        )
    slope = np.polyfit(np.log(x), loss, 1)[0]
    if slope >= -1e-9 * max(1.0, float(np.abs(loss).max())):
        raise MidtrainError(
            f"The baseline loss does not decrease with more data (points {list(zip(x.tolist(), loss.tolist()))}); "
            "the law A / x^B + C cannot describe it. Check the x column and the baseline method."
        )


def _solve_linear(f: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``y ≈ a f + c`` with ``a >= 0, c >= 0``: returns ``(a, c, sse)``."""
    candidates = []
    a, c = np.linalg.lstsq(np.stack([f, np.ones_like(f)], axis=1), y, rcond=None)[0]
    if a >= 0 and c >= 0:
        candidates.append((a, c))
    candidates.append((max(0.0, float(f @ y / (f @ f))), 0.0))  # on the bound c = 0
    candidates.append((0.0, max(0.0, float(y.mean()))))  # on the bound a = 0 (flat, degenerate)
    best = min(candidates, key=lambda ac: float(np.sum((ac[0] * f + ac[1] - y) ** 2)))
    return float(best[0]), float(best[1]), float(np.sum((best[0] * f + best[1] - y) ** 2))


def _golden_min(fn, lo: float, hi: float, iters: int = 80) -> float:
    ratio = (math.sqrt(5) - 1) / 2
    c, d = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fc, fd = fn(c), fn(d)
    for _ in range(iters):
        if fc < fd:
            hi, d, fd = d, c, fc
            c = hi - ratio * (hi - lo)
            fc = fn(c)
        else:
            lo, c, fc = c, d, fd
            d = lo + ratio * (hi - lo)
            fd = fn(d)
    return (lo + hi) / 2


def fit_power_law(x: Sequence[float], loss: Sequence[float], b_range: tuple[float, float] = B_RANGE) -> PowerLawFit:
    """Least-squares fit of ``A / x^B + C`` with ``A > 0``, ``B`` in ``b_range``, ``C >= 0``.

    Raises MidtrainError on fewer than 3 distinct ``x``, non-positive ``x``, non-finite loss, a loss
    that does not decrease with ``x``, or a degenerate optimum (``B`` on the edge of ``b_range``, ``A = 0``).
    """
    x, y = np.asarray(x, dtype=float), np.asarray(loss, dtype=float)
    _check_points(x, y)
    x0 = float(np.exp(np.mean(np.log(x))))  # fit in x / x0 so that x^-B stays well scaled
    u = x / x0

    def sse(log_b: float) -> float:
        return _solve_linear(np.power(u, -math.exp(log_b)), y)[2]

    grid = np.linspace(math.log(b_range[0]), math.log(b_range[1]), 241)
    errors = np.array([sse(g) for g in grid])
    i = int(np.argmin(errors))
    if i in (0, len(grid) - 1):
        edge = (
            "B -> 0 (the loss hardly changes with x, or falls linearly in log x)"
            if i == 0
            else "B hits its upper bound (the loss drops once, then stays flat)"
        )
        raise MidtrainError(
            f"The fit of A / x^B + C degenerates: {edge}; B is searched in {b_range}. Points: "
            f"{list(zip(x.tolist(), y.tolist()))}. Check the baseline's points or add runs at more amounts of data."
        )
    log_b = _golden_min(sse, grid[i - 1], grid[i + 1])
    b = math.exp(log_b)
    a_scaled, c, err = _solve_linear(np.power(u, -b), y)
    if a_scaled <= 0:
        raise MidtrainError(f"The fit of A / x^B + C degenerates to a constant (A = 0) for points {x.tolist()}.")
    return PowerLawFit(A=a_scaled * x0**b, B=b, C=c, rmse=math.sqrt(err / len(x)), points=len(x))


# ----------------------------------------------------------------------------------------------- reading
def read_rows(results: Path) -> list[dict[str, str]]:
    path = Path(results).expanduser()
    found = read_csv(path)
    if found is None:
        raise MidtrainError(f"Results file {path} does not exist.")
    rows = found[1]
    if not rows:
        raise MidtrainError(f"Results file {path} has no data rows.")
    return rows


def join_run_summaries(rows: list[dict[str, str]], x_col: str, method_col: str) -> list[dict[str, str]]:
    """Fill ``x_col`` and ``method_col`` of ``midtrain evaluate`` rows from each checkpoint's run ``summary.json``.

    ``target_tokens`` is the SFT tokens the run trained on (``tokens.sft_tokens``; another ``x_col`` is read
    from the summary by name); the method is ``baseline`` without replay, else ``replay_<ratio>``.
    """
    if not rows or "checkpoint" not in rows[0] or (x_col in rows[0] and method_col in rows[0]):
        return rows
    out = []
    for row in rows:
        path = Path(row["checkpoint"])
        summary_file = next((d / SUMMARY_FILE for d in (path.parent, path) if (d / SUMMARY_FILE).is_file()), None)
        if summary_file is None:  # not a run of ours: the CSV must carry the columns (collect_points says so)
            return rows
        summary = read_json(summary_file)
        x = summary.get(x_col, (summary.get("tokens") or {}).get("sft_tokens") if x_col == "target_tokens" else None)
        if x is None:
            raise MidtrainError(f"{summary_file} records no {x_col!r}; add that column to the CSV.")
        ratio = summary.get("replay_ratio")
        method = summary_file.parent.name if ratio is None else "baseline" if not ratio else f"replay_{ratio:g}"
        out.append({x_col: str(x), method_col: method, **row})
    return out


def _number(row: dict[str, str], col: str, line: int) -> float:
    try:
        return float(row[col])
    except (TypeError, ValueError):
        raise MidtrainError(f"Row {line}: column {col!r} holds {row[col]!r}, not a number.") from None


def _filter_set(rows: list[dict[str, str]], set_col: str, set_name: str | None) -> list[dict[str, str]]:
    if set_col not in rows[0]:
        if set_name is not None:
            raise MidtrainError(f"set_name={set_name!r} given but the results have no {set_col!r} column.")
        return rows
    sets = sorted({r[set_col] for r in rows})
    if set_name is None:
        if len(sets) > 1:
            raise MidtrainError(f"The results hold several validation sets {sets}; choose one with set_name.")
        return rows
    kept = [r for r in rows if r[set_col] == set_name]
    if not kept:
        raise MidtrainError(f"No rows with {set_col} == {set_name!r}; sets present: {sets}.")
    return kept


def collect_points(
    rows: list[dict[str, str]], x_col: str, loss_col: str, method_col: str, step_col: str, reduce: str
) -> dict[str, list[tuple[float, float]]]:
    """``{method: [(x, loss), ...]}`` with one point per (method, x); ``reduce`` resolves duplicates."""
    if reduce not in REDUCTIONS:
        raise MidtrainError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}.")
    missing = [c for c in (x_col, loss_col) if c not in rows[0]]
    if missing:
        raise MidtrainError(f"Results have no column(s) {missing}; columns are {list(rows[0])}.")
    groups: dict[tuple[str, float], list[tuple[float, float]]] = defaultdict(list)
    for line, row in enumerate(rows, start=2):
        method = row.get(method_col, "baseline")
        order = _number(row, step_col, line) if row.get(step_col) not in (None, "") else float(line)  # final/: ""
        groups[(method, _number(row, x_col, line))].append((order, _number(row, loss_col, line)))
    points: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for (method, x), values in groups.items():
        if len(values) > 1 and reduce == "error":
            raise MidtrainError(
                f"Method {method!r} has {len(values)} rows at {x_col}={x:g}; pick one per run (e.g. reduce=last "
                f"takes the largest {step_col!r})."
            )
        losses = [v for _, v in values]
        value = {"last": max(values)[1], "min": min(losses), "mean": float(np.mean(losses))}.get(reduce, losses[0])
        points[method].append((x, value))
    return {m: sorted(p) for m, p in points.items()}


def _pick_baseline(methods: Sequence[str], baseline: str | None) -> str:
    if baseline is not None:
        if baseline not in methods:
            raise MidtrainError(f"Baseline method {baseline!r} is not in the results; methods: {sorted(methods)}.")
        return baseline
    if "baseline" in methods:
        return "baseline"
    if len(methods) == 1:
        return methods[0]
    raise MidtrainError(f"Several methods {sorted(methods)} and no baseline given; name the one to fit.")


# ------------------------------------------------------------------------------------------------ runner
def multipliers(fit: PowerLawFit, points: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """One row per point: the law's loss at ``x``, the effective data and ``x_eff / x``."""
    rows = []
    for method, pts in points.items():
        for x, loss in pts:
            x_eff = fit.effective_data(loss)
            note = "loss <= C (below the fitted asymptote): infinite effective data" if math.isinf(x_eff) else ""
            rows.append(
                {
                    "method": method,
                    "x": x,
                    "loss": loss,
                    "fit_loss": float(fit.predict(x)),
                    "effective_x": x_eff,
                    "multiplier": x_eff / x,
                    "note": note,
                }
            )
    return rows


def efficiency(
    results: Path,
    x_col: str = "target_tokens",
    loss_col: str = "loss",
    method_col: str = "method",
    baseline: str | None = None,
    set_col: str = "set",
    set_name: str | None = None,
    step_col: str = "step",
    reduce: str = "last",
    out: Path | None = None,
    plot: Path | None = None,
) -> dict:
    """Fit ``loss(x) = A / x^B + C`` to a baseline's runs and report every run's data-efficiency multiplier.

    ``results`` is a CSV with one row per (run, validation set) evaluation, e.g. the output of
    ``midtrain evaluate`` (``checkpoint, step, tokens_seen, set, loss, ppl, n_tokens``): ``x_col`` (how much
    target data the run used; > 0) and ``method_col`` (e.g. ``baseline``, ``replay_0.5``) are its columns
    when present, else read from each checkpoint's run ``summary.json`` (:func:`join_run_summaries`).
    Rows of one method at the same ``x`` are the same run's checkpoints; ``reduce`` picks one.

    Args:
        results: CSV file of evaluation results.
        x_col: Column with the amount of target data of the run (> 0).
        loss_col: Column with the target (validation) loss.
        method_col: Column naming the method; when absent every row is the baseline.
        baseline: Method to fit the law to. Default: ``baseline`` if present, else the only method.
        set_col: Column naming the validation set (``set`` in ``midtrain evaluate`` output).
        set_name: Keep only rows of this validation set (required when several are present).
        step_col: Column ordering checkpoints of one run, used by ``reduce=last``.
        reduce: One point per (method, x) from several rows: ``last`` (largest ``step_col``, else the
            last row), ``min`` loss, ``mean`` loss, or ``error``.
        out: Write the per-point table to ``.csv`` or fit and table to ``.json``.
        plot: Write a PNG of the fit with all points here.

    Returns:
        ``{"baseline", "set", "fit": {A, B, C, rmse, points}, "rows": [{method, x, loss, fit_loss,
        effective_x, multiplier, note}]}``.
    """
    rows = _filter_set(join_run_summaries(read_rows(results), x_col, method_col), set_col, set_name)
    points = collect_points(rows, x_col, loss_col, method_col, step_col, reduce)
    base = _pick_baseline(list(points), baseline)
    xs, losses = zip(*points[base])
    fit = fit_power_law(xs, losses)
    table = multipliers(fit, points)
    notes = []
    if fit.C == 0.0:
        notes.append("C is at its bound 0: the points show no loss floor, so the law is a pure power law here.")
    result = {"baseline": base, "set": set_name, "x_col": x_col, "fit": asdict(fit), "rows": table, "notes": notes}
    print(render(result, fit))
    if out is not None:
        write_results(Path(out), result, table)
    if plot is not None:
        result["plot"] = str(plot_fit(fit, points, base, Path(plot), x_col, loss_col))
    return result


def render(result: dict, fit: PowerLawFit) -> str:
    where = f", set {result['set']!r}" if result["set"] else ""
    head = f"fit on {result['baseline']!r} ({fit.points} points{where}): {fit.formula()}  (rmse {fit.rmse:.3g})"
    headers = ["method", result["x_col"], "loss", "fit_loss", "effective_x", "multiplier"]
    body = [
        [r["method"], f"{r['x']:.4g}", r["loss"], r["fit_loss"], f"{r['effective_x']:.4g}", _times(r["multiplier"])]
        for r in result["rows"]
    ]
    notes = [f"note: {r['method']} at {r['x']:g}: {r['note']}" for r in result["rows"] if r["note"]]
    notes += [f"note: {n}" for n in result["notes"]]
    return "\n".join([head, format_table(headers, body), *notes])


def _times(multiplier: float) -> str:
    return f"{multiplier:.3f}x" if math.isfinite(multiplier) else "inf"


def plot_fit(
    fit: PowerLawFit, points: dict[str, list[tuple[float, float]]], baseline: str, path: Path, x_col: str, loss_col: str
) -> Path:
    """PNG of the fitted law (log x) with the baseline points and every method's points and multipliers."""
    from matplotlib.figure import Figure

    all_x = [x for pts in points.values() for x, _ in pts]
    grid = np.geomspace(min(all_x) / 1.5, max(all_x) * 1.5, 200)
    fig = Figure(figsize=(6.5, 4.5), layout="constrained")
    ax = fig.subplots()
    ax.plot(grid, fit.predict(grid), color="k", lw=1.2, label=f"fit: {fit.formula()}")
    ax.axhline(fit.C, color="k", ls=":", lw=0.8, label=f"C = {fit.C:.3g}")
    for method, pts in points.items():
        x, y = zip(*pts)
        marker = "o" if method == baseline else "s"
        ax.scatter(x, y, marker=marker, label=method, zorder=3)
        if method != baseline:
            for xi, yi in pts:
                ax.annotate(
                    _times(fit.effective_data(yi) / xi), (xi, yi), textcoords="offset points", xytext=(4, 4), fontsize=8
                )
    ax.set_xscale("log")
    ax.set_xlabel(x_col)
    ax.set_ylabel(loss_col)
    ax.set_title(f"data efficiency vs {baseline}")
    ax.legend(fontsize=7)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")
    return path
