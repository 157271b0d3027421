"""A new user's first hour (issue 26): README examples run as written on the tiny demo corpus, errors name the fix."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from midtrain.cli import main
from midtrain.demo.corpus import build_demo_corpus, train_bpe_tokenizer
from midtrain.eval.efficiency import efficiency
from midtrain.rundir import write_eval_rows

pytestmark = pytest.mark.slow  # spawns CLI / training / DDP / SLURM processes (make test-fast skips it)

REPO = Path(__file__).resolve().parents[1]
MODEL = {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 32, "block_size": 128, "vocab_size": 1024,
         "padded_vocab_size": 1024}


def run_yaml(root: Path, **extra) -> dict:
    cfg = {
        "model_config": MODEL, "out_dir": "out/pre", "precision": "32-true", "compile": False, "accelerator": "cpu",
        "devices": 1, "tokenizer_dir": "data/demo/tokenizer",
        "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                 "init_args": {"data_path": "data/demo", "mix_weights_str": "main:1.0", "num_workers": 0}},
        "train": {"max_steps": 4, "global_batch_size": 4, "micro_batch_size": 4, "max_seq_length": 32,
                  "save_interval": 2, "lr_warmup_steps": 1},
        "eval": {"interval": 0, "max_samples": 4},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.01}},
    }
    cfg.update(extra)
    return cfg


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """A working directory with the tiny demo corpus at data/demo and a 4-step pretraining run at out/pre."""
    root = tmp_path_factory.mktemp("newuser")
    build_demo_corpus(root / "data" / "demo", seed=0, scale=0.05, vocab_size=1024)
    (root / "pre.yaml").write_text(yaml.safe_dump(run_yaml(root)))
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(["pretrain", "--config", "pre.yaml"])
    finally:
        os.chdir(cwd)
    return root


def cli(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "midtrain", *args], cwd=root, capture_output=True, text=True,
                          env=env, timeout=600)


def in_dir(root: Path, capsys, *args: str) -> tuple[int, str, str]:
    """``midtrain ARGS`` in-process in ``root``: (exit status, stdout, stderr)."""
    cwd = os.getcwd()
    os.chdir(root)
    try:
        main(list(args))
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    finally:
        os.chdir(cwd)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_readme_similarity_example_runs_as_written(demo):
    done = cli(demo, "similarity", "--a", "data/demo:main", "--b", "data/demo/sft/code_sft.json",
               "--mixture", "main:0.8,code:0.2")
    assert done.returncode == 0, done.stderr
    assert "base(main:1)" in done.stdout and "mixture(main:0.8,code:0.2)" in done.stdout
    assert "proximity advantage" in done.stdout


def test_evaluate_keeps_scored_rows_and_names_the_sequence_length(demo, capsys):
    out = demo / "eval_short.csv"
    code, _, err = in_dir(demo, capsys, "evaluate", "--checkpoints", "out/pre/step-00000004", "--out", str(out),
                          "--val", "main=data/demo/val/main", "--val+", "code_sft=data/demo/sft/code_sft_val.json",
                          "--tokenizer_dir", "data/demo/tokenizer", "--max_seq_length", "8", "--accelerator", "cpu")
    assert code == 2
    assert "scored no tokens" in err and "sequence length" in err and "--max_seq_length " in err
    suggested = int(err.split("--max_seq_length ")[1].split(".")[0].split()[0])
    assert 8 < suggested <= 128
    rows = list(csv.DictReader(out.open()))
    assert [r["set"] for r in rows] == ["main"]  # the finished row was written before the error
    code, _, err = in_dir(demo, capsys, "evaluate", "--checkpoints", "out/pre/step-00000004", "--out", str(out),
                          "--val", "main=data/demo/val/main", "--val+", "code_sft=data/demo/sft/code_sft_val.json",
                          "--tokenizer_dir", "data/demo/tokenizer", "--max_seq_length", str(suggested),
                          "--accelerator", "cpu")
    assert code == 0, err
    assert [r["set"] for r in csv.DictReader(out.open())] == ["main", "code_sft"]


def test_inspect_reports_what_pretrain_refuses(demo, capsys, tmp_path):
    other = train_bpe_tokenizer(["some other text entirely"] * 50, tmp_path / "tok", vocab_size=300)
    for extra, expected in (
        ({"resume": "out/nowhere/step-00000010", "out_dir": "out/fresh"}, "nowhere"),
        ({"tokenizer_dir": str(other), "out_dir": "out/fresh"}, "Tokenizer mismatch"),
    ):
        cfg = tmp_path / "x.yaml"
        cfg.write_text(yaml.safe_dump(run_yaml(demo, **extra)))
        code, out, err = in_dir(demo, capsys, "inspect", "--config", str(cfg))
        assert code == 0 and "stage 0 from step 0" in out, err  # the plan, then what pretrain refuses
        assert "WARNING: " in out and expected in out and "`midtrain pretrain` stops here" in out, out
        code, _, err = in_dir(demo, capsys, "pretrain", "--config", str(cfg))
        assert code == 2 and expected in err, err


def snapshot(directory: Path) -> dict[str, bytes | None]:
    return {str(p.relative_to(directory)): p.read_bytes() if p.is_file() else None for p in directory.rglob("*")}


def test_refused_resume_leaves_the_run_directory_byte_identical(demo, capsys, tmp_path):
    shutil.copytree(demo / "out" / "pre", demo / "out" / "copy")
    (demo / "out/copy/metrics.jsonl").open("a").write(json.dumps({"step": 99, "loss": 1.0}) + "\n")  # a later row
    shutil.rmtree(demo / "out/copy/step-00000004")
    before = snapshot(demo / "out" / "copy")
    code, _, err = in_dir(demo, capsys, "pretrain", "--config", "pre.yaml", "--out_dir", "out/copy",
                          "--data.init_args.seed", "7")
    assert code == 2 and "data.seed changed" in err, err
    assert snapshot(demo / "out" / "copy") == before


def test_discoverability(demo, capsys, tmp_path):
    code, out, _ = in_dir(demo, capsys, "inspect", "--help")
    assert code == 0 and "--step" in out and "repeat_warning" in out
    fork = tmp_path / "fork.yaml"
    fork.write_text(yaml.safe_dump({"model_name": "pythia-70m", "out_dir": "out/f", "train": {"max_iters": 10_000_000},
                                    "data": {"class_path": "litgpt.data.ShardedMixedDataset",
                                             "init_args": {"data_path": "data/demo",
                                                           "mix_weights_str": "main:1.0"}}}))
    code, out, err = in_dir(demo, capsys, "migrate", "--config", str(fork))
    assert code == 0, err
    assert "max_steps: 61035" in out
    code, _, err = in_dir(demo, capsys, "inspect", "--config", "pre.yaml",
                          "--data.init_args.literal_weights_str", "main/1:1.0")
    assert code == 2 and "--data.init_args.mix_weights_str null" in err, err


def test_missing_data_names_the_command_that_builds_it(tmp_path, capsys):
    cfg = run_yaml(tmp_path)
    (tmp_path / "x.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = in_dir(tmp_path, capsys, "inspect", "--config", "x.yaml")
    assert code == 2 and "midtrain prepare demo --data_path data/demo" in err and "make demo" not in err, err


def test_evaluate_csv_feeds_efficiency_through_run_summaries(tmp_path):
    """evaluate's CSV (no target_tokens/method columns) + each run's summary.json -> the efficiency fit."""
    rows = []
    for ratio in (0.0, 0.25):
        for tokens in (1000, 2000, 4000, 8000):
            run = tmp_path / f"sft-r{ratio}-{tokens}"
            (run / "final").mkdir(parents=True)
            (run / "summary.json").write_text(json.dumps({"replay_ratio": ratio,
                                                          "tokens": {"sft_tokens": tokens, "replay_tokens": 0}}))
            loss = 2.0 + 30.0 / tokens**0.5 - (0.05 if ratio else 0.0)
            rows.append({"checkpoint": str(run / "final"), "step": "", "tokens_seen": "", "set": "sft",
                         "loss": f"{loss:.6f}", "ppl": "", "n_tokens": 100})
    write_eval_rows(tmp_path / "eval.csv", rows)
    result = efficiency(tmp_path / "eval.csv")
    assert result["baseline"] == "baseline" and result["fit"]["points"] == 4
    replay = [r for r in result["rows"] if r["method"] == "replay_0.25"]
    assert len(replay) == 4 and all(r["multiplier"] > 1 for r in replay)
