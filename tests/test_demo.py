"""Pieces of ``midtrain demo`` on a small demo corpus (the full demo is not run here: it takes minutes)."""

from __future__ import annotations

import csv
import json
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pytest

from midtrain.demo.corpus import build_demo_corpus
from midtrain.demo.run import Job, Progress, _run_jobs, _sft_data
from midtrain.errors import MidtrainError

pytestmark = pytest.mark.slow  # spawns training processes (a process pool)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict:
    return build_demo_corpus(tmp_path_factory.mktemp("demo") / "corpus", seed=0, scale=0.05, vocab_size=1024)


def test_sft_data_scores_every_sample_and_shares_one_validation_set(corpus, tmp_path):
    root, sft = Path(corpus["data_path"]), corpus["sft"]
    dirs, scored = _sft_data(root, sft, tmp_path / "sft_data", [0.25, 0.5, 1.0], seed=0)
    n = sft["examples"]
    assert sorted(dirs) == sorted({max(16, round(f * n)) for f in (0.25, 0.5, 1.0)})
    subsets = [json.loads((dirs[x] / "train.json").read_text()) for x in sorted(dirs)]
    for small, large in zip(subsets, subsets[1:]):  # nested: more target data adds examples, keeps the others
        assert {json.dumps(e) for e in small} < {json.dumps(e) for e in large}
    assert len(subsets[-1]) == n
    val = (root / sft["val"]).read_bytes()
    assert all((d / "val.json").read_bytes() == val for d in dirs.values())  # the file `evaluate` scores
    for split in ("train", "val"):
        assert scored[split]["fraction"] == 1.0 and scored[split]["min_tokens"] >= 1, scored
    assert f"max_seq_length {sft['max_seq_length']}" in scored["text"]


def _efficiency_rows(path: Path) -> Path:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["target_examples", "loss", "method"])
        writer.writeheader()
        for x, loss in ((10, 3.0), (20, 2.5), (40, 2.2), (80, 2.05)):
            writer.writerow({"target_examples": x, "loss": loss, "method": "sft"})
    return path


def test_jobs_run_after_their_dependencies_and_failures_name_the_log(tmp_path, capsys):
    results = _efficiency_rows(tmp_path / "results.csv")
    first = ["--results", str(results), "--x_col", "target_examples", "--out", str(tmp_path / "first.csv")]
    # the second job reads the first job's output: it can only succeed after the first one ended
    second = ["--results", str(tmp_path / "first.csv"), "--x_col", "x", "--out", str(tmp_path / "second.json")]
    jobs = [Job("second", "reads first.csv", [("efficiency", second)], after=("first",)),
            Job("first", "fit", [("efficiency", first)])]
    with ProcessPoolExecutor(2, mp_context=get_context("spawn")) as pool:
        timings = _run_jobs(pool, 2, 1, jobs, tmp_path / "logs", Progress(1))
        assert list(timings) == ["first", "second"] and json.loads((tmp_path / "second.json").read_text())["fit"]
        assert "$ midtrain efficiency" in (tmp_path / "logs" / "first.log").read_text()
        assert "done second" in capsys.readouterr().out

        broken = [Job("broken", "no input", [("efficiency", ["--results", str(tmp_path / "nothing.csv")])])]
        with pytest.raises(MidtrainError, match=r"demo job broken failed .*does not exist.*logs/broken\.log"):
            _run_jobs(pool, 2, 1, broken, tmp_path / "logs", Progress(1))
        with pytest.raises(MidtrainError, match="wait for jobs that do not exist"):
            _run_jobs(pool, 2, 1, [Job("orphan", "", [], after=("nobody",))], tmp_path / "logs", Progress(1))
