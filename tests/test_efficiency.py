"""midtrain.eval.efficiency: fitting A / x^B + C and data-efficiency multipliers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest

from midtrain.errors import MidtrainError
from midtrain.eval.efficiency import efficiency, fit_power_law

EVALUATE_COLUMNS = ["checkpoint", "step", "tokens_seen", "set", "loss", "ppl", "n_tokens"]


def law(x, a: float, b: float, c: float):
    return a / np.power(x, b) + c


def write_results(path: Path, rows: list[dict]) -> Path:
    """A CSV shaped like `midtrain evaluate` output plus `target_tokens` and `method` columns."""
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=[*EVALUATE_COLUMNS, "target_tokens", "method"])
        writer.writeheader()
        for r in rows:
            writer.writerow(
                {
                    "checkpoint": f"out/{r['method']}/{r['x']:g}/step-{r['step']}",
                    "tokens_seen": 0,
                    "ppl": math.exp(r["loss"]),
                    "n_tokens": 4096,
                    "target_tokens": r["x"],
                    "set": r.get("set", "code"),
                    "step": r["step"],
                    "loss": r["loss"],
                    "method": r["method"],
                }
            )
    return path


@pytest.mark.parametrize(
    ("a", "b", "c", "x"),
    [
        (300.0, 0.35, 1.7, np.geomspace(1e6, 1e9, 6)),  # tokens
        (8.0, 0.5, 0.9, np.array([100, 200, 400, 800, 1600])),  # examples
        (2e4, 0.8, 2.2, np.geomspace(1e5, 1e8, 4)),
        (3.0, 1.2, 0.0, np.array([10.0, 20.0, 50.0])),  # exactly three points, no floor
    ],
)
def test_fit_recovers_known_law(a, b, c, x):
    fit = fit_power_law(x, law(x, a, b, c))
    assert fit.A == pytest.approx(a, rel=1e-3)
    assert fit.B == pytest.approx(b, rel=1e-3)
    assert fit.C == pytest.approx(c, rel=1e-3, abs=1e-6)
    assert fit.effective_data(float(law(x[1], a, b, c))) == pytest.approx(x[1], rel=1e-4)


def test_fit_is_robust_to_small_noise():
    x = np.geomspace(1e6, 1e9, 10)
    rng = np.random.default_rng(0)
    y = law(x, 300.0, 0.35, 1.7) * (1 + rng.normal(0, 0.0005, x.size))
    fit = fit_power_law(x, y)
    assert fit.B == pytest.approx(0.35, rel=0.05)
    assert fit.C == pytest.approx(1.7, rel=0.05)
    assert fit.A == pytest.approx(300.0, rel=0.1)


def test_multiplier_of_points_at_2x_and_3x_data(tmp_path):
    a, b, c = 40.0, 0.3, 1.5
    xs = [1e5, 2e5, 4e5, 8e5, 1.6e6]
    rows = []
    for x in xs:
        rows.append({"method": "sft", "x": x, "step": 1000, "loss": law(x, a, b, c)})
        rows.append({"method": "sft", "x": x, "step": 500, "loss": law(x, a, b, c) + 0.5})  # earlier checkpoint
        rows.append({"method": "sft", "x": x, "step": 1000, "loss": law(x, a, b, c) + 1.0, "set": "c4"})
    for x in (2e5, 8e5):
        rows.append({"method": "replay", "x": x, "step": 1000, "loss": law(2 * x, a, b, c)})
        rows.append({"method": "midtrain", "x": x, "step": 1000, "loss": law(3 * x, a, b, c)})
    results = write_results(tmp_path / "eval.csv", rows)
    out, png = tmp_path / "eff.csv", tmp_path / "eff.png"

    res = efficiency(results, baseline="sft", set_name="code", out=out, plot=png)

    assert res["fit"]["B"] == pytest.approx(b, rel=1e-3) and res["fit"]["C"] == pytest.approx(c, rel=1e-3)
    by_method: dict[str, list[float]] = {}
    for r in res["rows"]:
        by_method.setdefault(r["method"], []).append(r["multiplier"])
    assert by_method["replay"] == pytest.approx([2.0, 2.0], rel=0.02)
    assert by_method["midtrain"] == pytest.approx([3.0, 3.0], rel=0.02)
    assert by_method["sft"] == pytest.approx([1.0] * 5, rel=1e-3)  # reduce=last took step 1000, not 500
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with out.open() as f:
        saved = list(csv.DictReader(f))
    assert len(saved) == 9 and float(saved[-1]["multiplier"]) == pytest.approx(3.0, rel=0.02)


def test_loss_below_the_asymptote_has_infinite_effective_data(tmp_path, capsys):
    rows = [{"method": "baseline", "x": x, "step": 1, "loss": law(x, 5.0, 0.5, 2.0)} for x in (10, 40, 160, 640)]
    rows.append({"method": "replay", "x": 40, "step": 1, "loss": 1.9})
    out = tmp_path / "eff.json"
    res = efficiency(write_results(tmp_path / "r.csv", rows), out=out)
    assert res["baseline"] == "baseline"
    (replay,) = [r for r in res["rows"] if r["method"] == "replay"]
    assert math.isinf(replay["multiplier"]) and "asymptote" in replay["note"]
    assert "asymptote" in capsys.readouterr().out
    saved = json.loads(out.read_text())  # strict JSON: inf is written as null
    assert saved["rows"][-1]["multiplier"] is None and saved["fit"]["B"] == pytest.approx(0.5, rel=1e-3)


def test_works_without_method_and_set_columns(tmp_path):
    path = tmp_path / "plain.csv"
    path.write_text("n_examples,val_loss\n100,3.0\n200,2.6\n400,2.35\n800,2.2\n")
    res = efficiency(path, x_col="n_examples", loss_col="val_loss")
    assert res["baseline"] == "baseline" and 0 < res["fit"]["B"] < 5


@pytest.mark.parametrize(
    ("x", "loss", "message"),
    [
        ([1e6, 1e6, 2e6, 2e6], [3.0, 3.0, 2.5, 2.5], ">= 3 distinct"),
        ([0.0, 1e6, 2e6], [3.0, 2.5, 2.3], "finite and > 0"),
        ([1e6, 2e6, 4e6], [3.0, float("nan"), 2.3], "must be finite"),
        ([1e6, 2e6, 4e6, 8e6], [2.0, 2.2, 2.4, 2.6], "does not decrease"),
        ([1e6, 2e6, 4e6, 8e6], [3.0, 3.0, 3.0, 3.0], "does not decrease"),
        ([1e6, 2e6, 4e6, 8e6, 16e6], [3.0, 3.0, 3.0, 3.0, 2.9999], "B -> 0"),
        ([1e6, 2e6, 4e6, 8e6, 16e6], [3.0, 2.0, 2.0, 2.0, 2.0], "upper bound"),
    ],
)
def test_degenerate_fits_are_errors(x, loss, message):
    with pytest.raises(MidtrainError, match=message.replace("(", r"\(")):
        fit_power_law(x, loss)


def _rows(method: str = "baseline", set_name: str = "code") -> list[dict]:
    return [
        {"method": method, "x": x, "step": 1, "loss": law(x, 5.0, 0.5, 2.0), "set": set_name} for x in (10, 40, 160)
    ]


@pytest.mark.parametrize(
    ("rows", "kwargs", "message"),
    [
        (_rows() + _rows(set_name="c4"), {}, "several validation sets"),
        (_rows(), {"set_name": "math"}, "sets present: \\['code'\\]"),
        (_rows("a") + _rows("b"), {}, "no baseline given"),
        (_rows(), {"baseline": "sft"}, "not in the results"),
        (_rows(), {"x_col": "sft_tokens"}, "no column\\(s\\) \\['sft_tokens'\\]"),
        (_rows() + _rows(), {"reduce": "error"}, "has 2 rows"),
        (_rows(), {"reduce": "median"}, "reduce must be one of"),
    ],
)
def test_bad_inputs_name_the_problem(tmp_path, rows, kwargs, message):
    with pytest.raises(MidtrainError, match=message):
        efficiency(write_results(tmp_path / "r.csv", rows), **kwargs)


def test_missing_file_and_non_numeric_values(tmp_path):
    with pytest.raises(MidtrainError, match="does not exist"):
        efficiency(tmp_path / "nope.csv")
    path = tmp_path / "bad.csv"
    path.write_text("target_tokens,loss\n100,3.0\n200,oops\n400,2.2\n")
    with pytest.raises(MidtrainError, match="Row 3: column 'loss' holds 'oops'"):
        efficiency(path)
