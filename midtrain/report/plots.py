"""Matplotlib figures for ``midtrain report`` (object API on the Agg canvas: no pyplot, no global state)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

Series = tuple[list[int], list[float]]


def _figure(ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(6.4 * ncols, 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, ncols, squeeze=False)[0])
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    return fig, axes


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


def mark_switches(ax: Axes, steps: Sequence[int], color: str | None = None, label: str | None = None) -> None:
    """Dashed vertical lines at mixture switches, each annotated with its step."""
    for i, step in enumerate(steps):
        ax.axvline(step, color=color or "grey", linestyle="--", linewidth=1, alpha=0.7, label=label if i == 0 else None)
        ax.annotate(f"switch @{step}", (step, 1), xycoords=("data", "axes fraction"), fontsize=7, rotation=90,
                    ha="right", va="top", color=color or "grey")  # fmt: skip


def plot_val_set(name: str, curves: dict[str, Series], switches: dict[str, list[int]], path: Path) -> Path:
    """Validation loss of one set over steps: one line per run, that run's mixture switches dashed."""
    fig, (ax,) = _figure()
    for label, (steps, losses) in curves.items():
        (line,) = ax.plot(steps, losses, marker="o", markersize=3, label=label)
        mark_switches(ax, switches.get(label, []), color=line.get_color())
    ax.set(title=f"validation loss: {name}", xlabel="optimizer step", ylabel="loss")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_training(
    label: str, loss: dict[str, Series], tokens: dict[str, Series], switches: list[int], path: Path
) -> Path:
    """Training loss (overall and per source type) and cumulative tokens per type over steps."""
    fig, (left, right) = _figure(2)
    colors = {name: f"C{i}" for i, name in enumerate(sorted(set(loss) | set(tokens) - {"all"}))} | {"all": "black"}
    for name, (steps, values) in loss.items():
        left.plot(steps, values, label=name, color=colors[name], linewidth=2 if name == "all" else 1)
    for name, (steps, values) in tokens.items():
        right.plot(steps, values, label=name, color=colors[name])
    left.set(title=f"{label}: training loss", xlabel="optimizer step", ylabel="loss")
    right.set(title=f"{label}: tokens seen per type", xlabel="optimizer step", ylabel="tokens")
    for ax in (left, right):
        mark_switches(ax, switches, label="mixture switch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    return _save(fig, path)


def plot_forgetting(points: dict[str, tuple[float, float]], in_domain: str, general: str, path: Path) -> Path:
    """Final in-domain loss (x) against final pretraining-set loss (y), one labelled point per run."""
    fig, (ax,) = _figure()
    for label, (x, y) in points.items():
        ax.scatter([x], [y], s=40)
        ax.annotate(label, (x, y), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.xaxis.set_major_locator(MaxNLocator())
    ax.set(
        title="forgetting vs in-domain (final values)",
        xlabel=f"in-domain loss: {in_domain} (lower is better)",
        ylabel=f"pretraining-set loss: {general} (lower = less forgetting)",
    )
    ax.grid(alpha=0.3)
    return _save(fig, path)
