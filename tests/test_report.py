"""`midtrain report` from real tiny runs: PNGs, report.md tables, mixture switches, forgetting scatter."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from midtrain.cli import run
from midtrain.demo import claims
from midtrain.errors import MidtrainError
from midtrain.report.report import final_val_losses, read_metrics, series, switch_steps
from tests.synthetic import write_tree

MODEL = {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 32, "vocab_size": 512,
         "padded_vocab_size": 512}
PNG = b"\x89PNG\r\n\x1a\n"


def pretrain(root: Path, name: str, **data: object) -> Path:
    out = root / name
    cfg = {
        "model_config": MODEL, "out_dir": str(out), "precision": "32-true",
        "compile": False, "accelerator": "cpu", "devices": 1,
        "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(root / "data"), "mix_weights_str": "main:0.8,code:0.2",
                               "val_data_path": {"main": str(root / "val" / "1"), "code": str(root / "val" / "c1")},
                               **data}},
        "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 4, "save_interval": 100,
                  "lr_warmup_steps": 1},
        "eval": {"interval": 2, "max_samples": 8, "final_validation": True},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
    }
    (root / f"{name}.yaml").write_text(yaml.safe_dump(cfg))
    run("pretrain", ["--config", str(root / f"{name}.yaml")])
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> tuple[Path, Path]:
    """A baseline run and a run that switches to a code-heavy mixture at step 2."""
    root = tmp_path_factory.mktemp("report")
    write_tree(root / "data", {"1": 20_000, "c1": 8_000}, chunk_tokens=2_000)
    write_tree(root / "val", {"1": 2_000, "c1": 2_000}, chunk_tokens=1_000)
    base = pretrain(root, "base")
    mid = pretrain(root, "mid", stages=[{"at_step": 2, "mix_weights_str": "main:0.2,code:0.8"}])
    return base, mid


def test_report_writes_plots_and_markdown(runs, tmp_path):
    base, mid = runs
    out = tmp_path / "report"
    md = run("report", ["--runs", f"[{base}, {mid}]", "--out", str(out), "--in_domain", "code"])
    names = {p.name for p in out.glob("*.png")}
    assert names == {"val_main.png", "val_code.png", "train_base.png", "train_mid.png", "forgetting.png"}
    for png in out.glob("*.png"):
        assert png.read_bytes()[:8] == PNG and png.stat().st_size > 5_000
    text = md.read_text()
    final = {r.name: final_val_losses(r) for r in runs}
    assert f"| base | {final['base']['code']:.4f} | {final['base']['main']:.4f} |" in text  # sets sorted: code, main
    assert f"| mid | {final['mid']['code']:.4f} | {final['mid']['main']:.4f} |" in text
    assert "Forgetting set: `main` (the only other validation set of every run)." in text
    assert "| 2 | stage | `weighted main:0.2,code:0.8` |" in text and text.count("| 0 | start |") == 2
    assert "![forgetting](forgetting.png)" in text and "![training mid](train_mid.png)" in text
    tokens = json.loads((mid / "summary.json").read_text())["tokens_by_type"]
    assert f"| code | {tokens['code']:,} |" in text


def test_readers_on_a_real_run(runs):
    base, mid = runs
    assert switch_steps(json.loads((mid / "mixture_history.json").read_text())) == [2]
    assert switch_steps(json.loads((base / "mixture_history.json").read_text())) == []
    rows = read_metrics(mid)
    steps, losses = series(rows, "val/code/loss")
    assert steps == [2, 4] and final_val_losses(mid)["code"] == losses[-1]
    assert series(rows, "loss")[0] == [1, 2, 3, 4]
    # the code share of the tokens grows after the switch at step 2 (a type is logged once it has tokens)
    code, main = (dict(zip(*series(rows, f"tokens/{t}"))) for t in ("code", "main"))
    assert code[4] - code[2] > main[4] - main[2] and code[2] < main[2]


def test_readers_tolerate_resumes_and_cut_lines(tmp_path):
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5}, {"step": 2, "loss": 2.4},
            {"step": 2, "val/x/loss": 2.6}, {"step": 3, "val/x/loss": 2.2, "final": True}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(map(json.dumps, rows)) + '\n{"step": 4, "lo')
    assert read_metrics(tmp_path) == rows
    assert series(rows, "loss") == ([1, 2], [3.0, 2.4])  # a step logged again after a resume: last wins
    assert final_val_losses(tmp_path) == {"x": 2.2}


def test_missing_data_is_skipped_with_a_note(runs, tmp_path):
    base, _ = runs
    bare = tmp_path / "bare"  # a run that has logged training rows only
    bare.mkdir()
    (bare / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 3.0, "tokens/main": 128}) + "\n")
    out = tmp_path / "report"
    md = run("report", ["--runs", f"[{base}, {bare}, {tmp_path / 'nothing'}]", "--out", str(out),
                        "--general", "main", "--val_sets", "[main, sft]"])
    text = md.read_text()
    assert "no metrics.jsonl" in text and "`sft` was not logged by any run" in text
    assert "No forgetting scatter: no run logged both `sft` and `main`." in text
    assert {p.name for p in out.glob("*.png")} == {"val_main.png", "train_base.png", "train_bare.png"}
    with pytest.raises(MidtrainError, match="No readable run directory"):
        run("report", ["--runs", str(tmp_path / "nothing"), "--out", str(out)])


# ------------------------------------------------------------------------------ the demo's claims
def test_branch_budget_counts_only_tokens_after_the_branch_point(runs, tmp_path):
    base, _ = runs
    start = base / "step-00000004"
    cfg = yaml.safe_load((base.parent / "base.yaml").read_text())
    cfg["out_dir"], cfg["resume"] = str(tmp_path / "branch"), str(start)
    cfg["train"]["max_steps"] = 6
    cfg["data"]["init_args"]["mix_weights_str"] = "code:1"
    (tmp_path / "branch.yaml").write_text(yaml.safe_dump(cfg))
    run("pretrain", ["--config", str(tmp_path / "branch.yaml")])
    budget = claims.branch_budget(tmp_path / "branch", start)
    before = json.loads((start / "train_state.json").read_text())["tokens_by_type"]
    after = json.loads((tmp_path / "branch" / "summary.json").read_text())["tokens_by_type"]
    assert before["main"] > 0 and after["main"] == before["main"]  # 100% code after the branch point
    assert budget == {"code": after["code"] - before.get("code", 0)} and budget["code"] > 0
    assert claims.branch_budget(base, None) == json.loads((base / "summary.json").read_text())["tokens_by_type"]
    with pytest.raises(MidtrainError, match="does not exist"):
        claims.branch_budget(tmp_path / "missing", start)


def test_loss_claims_follow_the_fixed_rules():
    assert claims.lower_loss_verdict([4.0], [4.1])[2] == "yes (noise not measured)"  # one seed
    assert claims.lower_loss_verdict([4.0], [3.9])[2] == "no"
    gap, noise, verdict = claims.lower_loss_verdict([4.00, 4.06], [4.05, 4.07])  # gap -0.03, noise 0.06
    assert (round(gap, 6), round(noise, 6), verdict) == (-0.03, 0.06, "no (within seed noise)")
    assert claims.lower_loss_verdict([4.00, 4.01], [4.10, 4.12])[2] == "yes"
    row = claims.lower_loss_claim("c", "p", ("mid", "base"), [4.0, 4.02], [4.2, 4.25])
    assert row.this_run == "mid 4.0100 vs base 4.2250 (mean of 2 SFT seeds): gap -0.2150; seed noise 0.0500"


def test_multiplier_claim_and_table():
    assert claims.multiplier_claim("c", "p", {60: 1.3, 120: 1.1}, None).reproduced == "yes"
    assert claims.multiplier_claim("c", "p", {60: 1.3, 120: 0.9}, None).reproduced == "partly (1 of 2)"
    assert claims.multiplier_claim("c", "p", {60: 0.7, 120: 0.9}, None).reproduced == "no"
    row = claims.multiplier_claim("c", "p", {60: float("inf")}, None)
    assert row.reproduced == "yes" and "inf" in row.this_run
    failed = claims.multiplier_claim("c", "p", None, "loss does not decrease")
    assert failed.reproduced == "no (fit failed)" and "loss does not decrease" in failed.this_run
    text = "\n".join(claims.claims_markdown([failed, claims.not_run("t", "p | q", "too slow")]))
    assert "| c | p | fit failed: loss does not decrease | **no (fit failed)** |" in text
    assert "| t | p \\| q | not run: too slow | **not tested** |" in text and "Verdict rules" in text


def test_timing_vs_weight_and_benchmark_claims_follow_the_fixed_rules():
    early, late, heavy = [3.80, 3.82], [4.00, 4.01], [4.05, 4.06]  # start steps: 0.195 apart; weights: 0.05
    row = claims.spread_claim("c", "p", {"early": early, "late": late}, {"late": late, "heavy": heavy})
    assert row.reproduced == "yes" and "= 0.1950" in row.this_run and "difference +0.1450" in row.this_run
    noisy = claims.spread_claim("c", "p", {"early": [3.8, 4.0], "late": late}, {"late": late, "heavy": heavy})
    assert noisy.reproduced == "no (within seed noise)"  # spread 0.105 - 0.05 = 0.055 < noise 0.2
    assert claims.spread_claim("c", "p", {"a": late, "b": late}, {"c": late, "d": heavy}).reproduced == "no"
    assert claims.spread_claim("c", "p", {"a": [3.8], "b": [4.0]}, {"c": [4.0], "d": [4.05]}).reproduced == \
        "yes (noise not measured)"
    assert claims.higher_score_claim("c", "p", ("mid", "base"), [0.50, 0.52], [0.30, 0.31]).reproduced == "yes"
    assert claims.higher_score_claim("c", "p", ("mid", "base"), [0.30], [0.50]).reproduced == "no"
    assert claims.higher_score_claim("c", "p", ("mid", "base"), [], [0.5]).reproduced == "not tested"
