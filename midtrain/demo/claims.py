"""The papers' claims, checked against one run's numbers (the end of the demo's report).

Pure functions over losses the demo measured; each claim becomes a row ``claim | paper's figure |
this run | reproduced``. The verdict rules (``VERDICT_RULES``, printed under the table) are fixed
here, before any run, and never tuned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from midtrain.errors import MidtrainError
from midtrain.rundir import SUMMARY_FILE, TRAIN_STATE_FILE, read_json

LIU_2025 = "Liu, Neubig & Xiong 2025"
KOTHA_2026 = "Kotha & Liang 2026"
VERDICT_RULES = [
    "- A loss comparison is reproduced (**yes**) when the claimed run has the lower loss (mean over SFT seeds) "
    "and the gap is larger than the SFT-seed noise (the largest difference between two seeds of one run among "
    "the runs compared; pretraining is one seed). A gap in the claimed direction but within that noise is "
    "**no (within seed noise)**, with one SFT seed only **yes (noise not measured)**; the opposite direction "
    "is **no**.",
    "- The timing-vs-weight claim is reproduced (**yes**) when the spread over start steps (the gap between the "
    "mean SFT losses of the two start steps, same mixture) exceeds the spread over mixture weights (the gap "
    "between the two weights, same start step) by more than the SFT-seed noise of the runs compared; a larger "
    "spread within that noise is **no (within seed noise)**, a smaller or equal one **no**.",
    "- A benchmark comparison follows the loss rule with the sign flipped (the claimed run has the higher "
    "score, mean over SFT seeds, by more than the seed noise of the scores).",
    "- The replay claim is reproduced (**yes**) when the data-efficiency multiplier is above 1 at every amount "
    "of target data, **partly** when at some, **no** when at none; a fit that fails is **no (fit failed)**.",
]


@dataclass(frozen=True)
class Claim:
    """One row of the claims table."""

    claim: str
    paper: str
    this_run: str
    reproduced: str


# ------------------------------------------------------------------------------------ budgets
def _tokens_by_type(path: Path, what: str) -> dict[str, int]:
    data = read_json(path)
    if data is None:
        raise MidtrainError(f"{path} does not exist; cannot state the {what}.")
    return {k: int(v) for k, v in (data.get("tokens_by_type") or {}).items()}


def branch_budget(run_dir: Path, start_checkpoint: Path | None) -> dict[str, int]:
    """Tokens per type a pretraining run trained after its branch point (``start_checkpoint``; None: from scratch).

    The difference between the run's ``summary.json`` and the start checkpoint's ``train_state.json``
    (both cumulative over the whole training history).
    """
    end = _tokens_by_type(Path(run_dir) / SUMMARY_FILE, "budget of a run that has not finished")
    start = {} if start_checkpoint is None else _tokens_by_type(Path(start_checkpoint) / TRAIN_STATE_FILE, "budget")
    after = {t: end.get(t, 0) - start.get(t, 0) for t in sorted(set(end) | set(start))}
    return {t: n for t, n in after.items() if n}


# ------------------------------------------------------------------------------------ verdicts
def seed_noise(*runs: Sequence[float]) -> float | None:
    """The largest spread (max - min) between seeds of one run among ``runs``; None when no run has 2 seeds."""
    spreads = [max(r) - min(r) for r in runs if len(r) >= 2]
    return max(spreads) if spreads else None


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def lower_loss_verdict(claimed: Sequence[float], other: Sequence[float]) -> tuple[float, float | None, str]:
    """``(gap, noise, verdict)`` for the claim "``claimed`` reaches a lower loss than ``other``"; gap < 0 agrees."""
    gap = mean(claimed) - mean(other)
    noise = seed_noise(claimed, other)
    if gap >= 0:
        return gap, noise, "no"
    if noise is None:
        return gap, noise, "yes (noise not measured)"
    if -gap <= noise:
        return gap, noise, "no (within seed noise)"
    return gap, noise, "yes"


def lower_loss_claim(claim: str, paper: str, names: tuple[str, str], claimed: Sequence[float],
                     other: Sequence[float]) -> Claim:  # fmt: skip
    """A claims-table row comparing two runs' losses (one value per SFT seed)."""
    gap, noise, verdict = lower_loss_verdict(claimed, other)
    seeds = f" (mean of {len(claimed)} SFT seeds)" if len(claimed) > 1 else " (1 SFT seed)"
    noise_text = f"; seed noise {noise:.4f}" if noise is not None else "; seed noise not measured"
    text = f"{names[0]} {mean(claimed):.4f} vs {names[1]} {mean(other):.4f}{seeds}: gap {gap:+.4f}{noise_text}"
    return Claim(claim, paper, text, verdict)


def spread_claim(claim: str, paper: str, timing: dict[str, Sequence[float]],
                 weights: dict[str, Sequence[float]]) -> Claim:  # fmt: skip
    """A row for "the loss moves more between the two ``timing`` runs than between the two ``weights`` runs".

    Each dict maps a run's name to its losses (one per SFT seed); each spread is the gap between the two
    runs' means; the verdict needs the timing spread to exceed the weight spread by more than the seed noise.
    """
    (a, la), (b, lb) = timing.items()
    (c, lc), (d, ld) = weights.items()
    t_spread, w_spread = abs(mean(la) - mean(lb)), abs(mean(lc) - mean(ld))
    diff, noise = t_spread - w_spread, seed_noise(la, lb, lc, ld)
    if diff <= 0:
        verdict = "no"
    elif noise is None:
        verdict = "yes (noise not measured)"
    else:
        verdict = "yes" if diff > noise else "no (within seed noise)"
    noise_text = f"; seed noise {noise:.4f}" if noise is not None else "; seed noise not measured"
    text = (f"start steps: |{a} {mean(la):.4f} - {b} {mean(lb):.4f}| = {t_spread:.4f}; weights: |{c} {mean(lc):.4f} "
            f"- {d} {mean(ld):.4f}| = {w_spread:.4f}; difference {diff:+.4f}{noise_text}")
    return Claim(claim, paper, text, verdict)


def higher_score_claim(claim: str, paper: str, names: tuple[str, str], claimed: Sequence[float],
                       other: Sequence[float]) -> Claim:  # fmt: skip
    """A row comparing two runs' benchmark scores (higher is better; one value per SFT seed)."""
    if not claimed or not other:
        return not_run(claim, paper, "the benchmark wrote no scores for these runs")
    gap, noise, verdict = lower_loss_verdict([-v for v in claimed], [-v for v in other])
    noise_text = f"; seed noise {noise:.3f}" if noise is not None else "; seed noise not measured"
    seeds = f" (mean of {len(claimed)} SFT seeds)" if len(claimed) > 1 else " (1 SFT seed)"
    text = f"{names[0]} {mean(claimed):.3f} vs {names[1]} {mean(other):.3f}{seeds}: gap {-gap:+.3f}{noise_text}"
    return Claim(claim, paper, text, verdict)


def multiplier_claim(claim: str, paper: str, multipliers: dict[float, float] | None, error: str | None) -> Claim:
    """A claims-table row for a data-efficiency multiplier measured at several amounts of target data."""
    if error is not None or not multipliers:
        return Claim(claim, paper, f"fit failed: {error}", "no (fit failed)")
    text = ", ".join(f"{times(m)} at x={x:g}" for x, m in sorted(multipliers.items()))
    above = sum(m > 1 for m in multipliers.values())
    verdict = "yes" if above == len(multipliers) else "no" if above == 0 else f"partly ({above} of {len(multipliers)})"
    return Claim(claim, paper, text, verdict)


def times(m: float) -> str:
    return f"{m:.2f}x" if math.isfinite(m) else "inf (below the fitted floor C)"


def not_run(claim: str, paper: str, why: str) -> Claim:
    return Claim(claim, paper, f"not run: {why}", "not tested")


# ------------------------------------------------------------------------------------ markdown
def _escape(text: str) -> str:
    return text.replace("|", "\\|")


def claims_markdown(claims: Sequence[Claim]) -> list[str]:
    """The claims table with the verdict rules under it."""
    lines = ["| claim | paper's figure | this run | reproduced |", "|---|---|---|---|"]
    lines += [f"| {_escape(c.claim)} | {_escape(c.paper)} | {_escape(c.this_run)} | **{c.reproduced}** |"
              for c in claims]  # fmt: skip
    return [*lines, "", "Verdict rules (fixed before the run, never tuned):", "", *VERDICT_RULES, ""]


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return lines + ["| " + " | ".join(_escape(str(c)) for c in row) + " |" for row in rows]
