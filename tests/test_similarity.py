"""midtrain.eval.similarity on real litdata token shards and a tokenizer trained on the fly."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from midtrain.data.shards import discover_shards
from midtrain.errors import MidtrainError
from midtrain.eval.similarity import (
    cosine,
    js_divergence,
    resolve_source,
    sample_texts,
    sample_windows,
    similarity,
)
from midtrain.prepare.writer import write_token_shard

COMMON = [f"the{i}" for i in range(8)]  # shared: frequent in code, rare in prose
PROSE = [f"prose{i}" for i in range(60)]
CODE = [f"code{i}" for i in range(60)]
ALIEN = [f"alien{i}" for i in range(40)]  # disjoint from everything else
SMALL = {"sample_docs": 150, "window_tokens": 32, "n": 2, "max_n": 3}


def make_docs(vocab: list[str], count: int, seed: int) -> list[str]:
    """Documents of Zipf-distributed words from ``vocab``."""
    rng = np.random.default_rng(seed)
    probs = 1.0 / np.arange(1, len(vocab) + 1)
    probs /= probs.sum()
    return [" ".join(rng.choice(vocab, size=int(rng.integers(30, 80)), p=probs)) for _ in range(count)]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sim")
    prose = [make_docs(PROSE + COMMON, 150, seed) for seed in (1, 2)]
    code = make_docs(COMMON + CODE, 150, 3)
    target = make_docs(COMMON + CODE, 120, 4)
    alien = make_docs(ALIEN, 60, 5)

    tokenizer = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    tokenizer.train_from_iterator([*prose[0], *prose[1], *code, *target, *alien], trainer)
    tok_dir = root / "corpus" / "tokenizer"
    tok_dir.mkdir(parents=True)
    tokenizer.save(str(tok_dir / "tokenizer.json"))

    def shard(name: str, docs: list[str]) -> None:
        ids = [np.array(tokenizer.encode(d).ids) for d in docs]
        write_token_shard(root / "corpus" / name, ids, chunk_tokens=2000, dtype=torch.uint16)

    shard("1", prose[0])
    shard("2", prose[1])
    shard("c1", code)
    (root / "sft.jsonl").write_text(
        "".join(json.dumps({"instruction": d[:40], "output": d[40:]}) + "\n" for d in target)
    )
    (root / "sft_copy.jsonl").write_text((root / "sft.jsonl").read_text())
    (root / "alien.json").write_text(json.dumps([{"text": d} for d in alien]))
    (root / "prose_txt").mkdir()
    for i, d in enumerate(prose[0][:40]):
        (root / "prose_txt" / f"{i}.txt").write_text(d)
    notok = root / "notok"
    notok.mkdir()
    write_token_shard(notok / "1", [np.arange(100)], dtype=torch.uint16)
    return {
        "root": root,
        "corpus": root / "corpus",
        "tok": tok_dir,
        "sft": root / "sft.jsonl",
        "sft_copy": root / "sft_copy.jsonl",
        "alien": root / "alien.json",
        "prose_txt": root / "prose_txt",
        "notok": notok,
    }


def test_metric_functions_on_known_vectors():
    assert cosine({"a": 1.0}, {"a": 1.0}) == pytest.approx(1.0)
    assert cosine({"a": 1.0}, {"b": 1.0}) == 0.0
    assert cosine({"a": 0.5, "b": 0.5}, {"a": 1.0}) == pytest.approx(1 / math.sqrt(2))
    assert js_divergence({"a": 1.0}, {"b": 1.0}) == pytest.approx(1.0)
    assert js_divergence({"a": 0.5, "b": 0.5}, {"a": 0.5, "b": 0.5}) == pytest.approx(0.0)
    # JS(p, m) for p = [1, 0], q = [0.5, 0.5] in bits
    expected = 0.5 * math.log2(1 / 0.75) + 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25))
    assert js_divergence({"a": 1.0}, {"a": 0.5, "b": 0.5}) == pytest.approx(expected)


def test_corpus_with_itself_is_maximal(world):
    # two spellings of the same shard selection, and two copies of the same SFT file: sampled independently
    corpus = world["corpus"]
    res = similarity(a=[f"{corpus}:main", str(world["sft"])], b=[f"{corpus}/:main", str(world["sft_copy"])], **SMALL)
    same = [r for r in res["rows"] if ("sft" in r["a"]) == ("sft" in r["b"])]
    assert len(same) == 2
    for row in same:
        assert row["ngram_cosine"] == pytest.approx(1.0)
        assert row["ngram_cosine_avg"] == pytest.approx(1.0)
        assert row["token_cosine"] == pytest.approx(1.0)
        assert row["token_js"] == pytest.approx(0.0, abs=1e-12)
        assert row["vocab_overlap"] == pytest.approx(1.0)
    cross = [r for r in res["rows"] if r not in same]
    assert all(0 < r["ngram_cosine_avg"] < 0.9 and 0 < r["token_js"] < 1 for r in cross)


def test_disjoint_vocabularies_are_minimal(world, tmp_path):
    out = tmp_path / "res.json"
    res = similarity(a=str(world["prose_txt"]), b=str(world["alien"]), tokenizer_dir=world["tok"], out=out, **SMALL)
    (row,) = res["rows"]
    assert row["ngram_cosine"] == 0.0 and row["ngram_cosine_avg"] == 0.0
    assert row["token_cosine"] == 0.0
    assert row["token_js"] == pytest.approx(1.0)
    assert row["vocab_overlap"] == 0.0
    saved = json.loads(out.read_text())
    assert saved["rows"][0]["token_js"] == pytest.approx(1.0) and saved["mode"] == "pairs"


def test_text_sources_without_tokenizer_skip_token_metrics(world, capsys):
    res = similarity(a=str(world["prose_txt"]), b=str(world["sft"]), **SMALL)
    (row,) = res["rows"]
    assert row["token_js"] is None and 0 < row["ngram_cosine_avg"] < 1
    assert "token metrics skipped" in capsys.readouterr().out


def test_sampling_is_deterministic_by_seed(world):
    shards = discover_shards(world["corpus"])
    first = sample_windows(shards, 40, 32, seed=0)
    again = sample_windows(shards, 40, 32, seed=0)
    other = sample_windows(shards, 40, 32, seed=1)
    assert len(first) == 40 and all(w.shape == (32,) for w in first)
    assert all(np.array_equal(x, y) for x, y in zip(first, again))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other))

    sft = resolve_source(str(world["sft"]))
    assert sample_texts(sft, 30, seed=7) == sample_texts(sft, 30, seed=7)
    assert sample_texts(sft, 30, seed=7) != sample_texts(sft, 30, seed=8)
    assert len(sample_texts(sft, 10_000, seed=7)) == 120  # fewer documents than asked: all of them

    a = similarity(a=f"{world['corpus']}:main", b=str(world["sft"]), seed=3, **SMALL)["rows"][0]
    b = similarity(a=f"{world['corpus']}:main", b=str(world["sft"]), seed=3, **SMALL)["rows"][0]
    assert a == b


def test_mixture_weight_moves_similarity_monotonically(world, tmp_path):
    results = []
    for w in (0.0, 0.25, 0.5, 0.75, 1.0):
        res = similarity(
            a=str(world["corpus"]), b=str(world["sft"]), mixture=f"main:{1 - w},code:{w}", base="main", **SMALL
        )
        mixed = res["rows"][-1]
        assert mixed["a"].startswith("mixture(")
        results.append((mixed, res["proximity_advantage"]))
    scores = [m["ngram_cosine_avg"] for m, _ in results]
    token_js = [m["token_js"] for m, _ in results]
    advantage = [adv["ngram_cosine_avg"] for _, adv in results]
    js_advantage = [adv["token_js"] for _, adv in results]
    assert scores == sorted(scores) and scores[0] < scores[-1]
    assert token_js == sorted(token_js, reverse=True) and token_js[0] > token_js[-1]
    assert advantage == sorted(advantage) and advantage[0] == pytest.approx(0.0, abs=1e-12)
    assert js_advantage == sorted(js_advantage) and js_advantage[-1] > 0
    # components are reported too, and the code shard is closer to the code-like SFT set than main
    names = [r["a"] for r in res["rows"]]
    assert names[:2] == [f"{world['corpus']}:main", f"{world['corpus']}:code"]
    assert res["rows"][1]["ngram_cosine_avg"] > res["rows"][0]["ngram_cosine_avg"]


def test_matrix_mode_writes_heatmap_and_csv(world, tmp_path):
    png, out = tmp_path / "plots" / "heat.png", tmp_path / "matrix.csv"
    sources = [f"{world['corpus']}:main", f"{world['corpus']}:code", str(world["sft"])]
    res = similarity(a=sources, heatmap=png, out=out, **SMALL)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    matrix = np.array(res["matrix"]["ngram_cosine_avg"])
    assert matrix.shape == (3, 3) and np.allclose(np.diag(matrix), 1.0) and np.allclose(matrix, matrix.T)
    assert np.allclose(np.diag(res["matrix"]["token_js"]), 0.0, atol=1e-12)
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3 and {"a", "b", "ngram_cosine", "token_js"} <= set(rows[0])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"a": "missing/dir", "b": "x.jsonl"}, "does not exist"),
        ({"a": "{corpus}:math", "b": "{sft}"}, "no shard of type or ID 'math'"),
        ({"a": "{notok}", "b": "{sft}"}, "tokenizer_dir"),
        ({"a": "{sft}", "b": "{corpus}", "mixture": "main:0.5,code:0.5"}, "must be one data_path"),
        ({"a": "{corpus}", "b": "{sft}", "mixture": "main:0.5,math:0.5"}, "no shard of type or ID 'math'"),
        ({"a": "{corpus}", "b": "{sft}", "mixture": "main:0.5,code"}, "malformed"),
        ({"a": "{sft}"}, "at least two sources"),
        ({"a": "{sft}", "b": "{alien}", "tokenizer_dir": "{sft}"}, "not a tokenizer directory"),
        ({"a": "{corpus}:main", "b": "{sft}", "window_tokens": 100_000}, "smaller window_tokens"),
        ({"a": "{sft}", "b": "{alien}", "text_key": "body", "n": 0}, "n must be >= 1"),
        ({"a": "{sft}", "b": "{alien}", "out": "res.txt"}, ".json or .csv"),
        ({"a": "{sft}", "b": "{alien}", "heatmap": "h.png"}, "matrix mode only"),
    ],
)
def test_user_errors_name_the_problem(world, kwargs, message):
    paths = {k: str(v) for k, v in world.items()}
    kwargs = {k: v.format(**paths) if isinstance(v, str) else v for k, v in kwargs.items()}
    with pytest.raises(MidtrainError, match=message.replace("(", r"\(").replace(".", r"\.")):
        similarity(**{"sample_docs": 20, **kwargs})


def test_records_without_text_fields_are_an_error(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q"}) + "\n")
    with pytest.raises(MidtrainError, match="neither 'text' nor any of"):
        similarity(a=str(bad), b=str(bad))


def _cli(*args: str) -> subprocess.CompletedProcess:
    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [repo, os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "midtrain", "similarity", *args, *[f"--{k}={v}" for k, v in SMALL.items()]]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)


@pytest.mark.slow
def test_cli_mixture_form_with_a_data_path(world, tmp_path):
    """The mixture form parsed from the command line: components, the mixture row and its advantage in --out."""
    out = tmp_path / "sim.json"
    proc = _cli("--a", str(world["corpus"]), "--b", str(world["sft"]), "--mixture", "main:0.8,code:0.2",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    written = json.loads(out.read_text())
    assert [r["a"] for r in written["rows"]][-1].startswith("mixture(")
    assert written["proximity_advantage"]["ngram_cosine_avg"] > 0  # code pulls the mixture toward the code-like set


@pytest.mark.slow
def test_cli_mixture_form_of_the_readme(world, tmp_path):
    """``--a DATA_PATH:main --b SFT --mixture main:0.8,code:0.2``, as README's command table writes it."""
    out = tmp_path / "sim.json"
    proc = _cli("--a", f"{world['corpus']}:main", "--b", str(world["sft"]), "--mixture", "main:0.8,code:0.2",
                "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    written = json.loads(out.read_text())
    assert [r["a"] for r in written["rows"]][-1].startswith("mixture(")
    assert written["proximity_advantage"]["ngram_cosine_avg"] > 0
