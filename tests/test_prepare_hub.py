"""`midtrain prepare --hf_dataset`: a dataset streamed through ``datasets.load_dataset(..., streaming=True)``
into token shards, resumable. Offline: the dataset "name" is a local dataset directory, read by the same call
that reads ``allenai/c4`` from the hub.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from midtrain.demo.corpus import train_bpe_tokenizer
from midtrain.errors import MidtrainError
from midtrain.prepare import MANIFEST_NAME, prepare, read_shard_tokens
from midtrain.prepare.hub import prepare_hub

pytestmark = pytest.mark.slow  # spawns CLI / training / DDP / SLURM processes (make test-fast skips it)

pytest.importorskip("datasets")

WORDS = "the model reads code and math while a tokenizer splits text into pieces of data".split()
DOCS = [f"doc {i}: " + " ".join(WORDS[(i + j) % len(WORDS)] for j in range(3 + i % 9)) for i in range(25)]
OFFLINE = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    for key, value in OFFLINE.items():
        monkeypatch.setenv(key, value)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return train_bpe_tokenizer(DOCS * 4, tmp_path_factory.mktemp("tok"), vocab_size=300)


def _dataset(root: Path, texts: list, files: int = 2) -> Path:
    """A local dataset directory of JSONL files (what the hub serves as data files)."""
    root.mkdir(parents=True)
    per = -(-len(texts) // files)
    for f in range(files):
        with open(root / f"part-{f}.jsonl", "w") as fh:
            for i, text in enumerate(texts[f * per : (f + 1) * per], start=f * per):
                fh.write(json.dumps({"id": i, "text": text}) + "\n")
    return root


def _tokens(shards: list[Path]) -> np.ndarray:
    return np.concatenate([read_shard_tokens(s) for s in shards])


def _reference(tmp_path: Path, tok_dir: Path, docs: list[str]) -> np.ndarray:
    src = tmp_path / "ref.jsonl"
    src.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return read_shard_tokens(prepare(str(src), "main", tmp_path / "ref", tok_dir, num_workers=0))


def _ranges(shards: list[Path]) -> list[tuple[int, int]]:
    hubs = [json.loads((s / MANIFEST_NAME).read_text())["hub"] for s in shards]
    return [(h["start"], h["end"]) for h in hubs]


def test_interrupted_run_continues_without_duplicates(tmp_path, tok_dir, capsys):
    texts: list = list(DOCS)
    texts[13] = None  # a malformed record: the first run stops in the middle of its third shard
    ds = _dataset(tmp_path / "ds", texts)
    data = tmp_path / "data"
    with pytest.raises(MidtrainError, match=r"record 13: 'text' is NoneType"):
        prepare_hub(str(ds), "main", data, tok_dir, documents_per_shard=5, num_workers=0)
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == ["1", "2"]

    shards = prepare_hub(str(ds), "main", data, tok_dir, documents_per_shard=5, num_workers=0, skip_bad=True)
    assert "continuing" in capsys.readouterr().out
    assert [s.name for s in shards] == ["1", "2", "3", "4", "5"]
    assert _ranges(shards) == [(0, 5), (5, 10), (10, 15), (15, 20), (20, 25)]
    kept = [d for d in texts if d is not None]
    np.testing.assert_array_equal(_tokens(shards), _reference(tmp_path, tok_dir, kept))

    again = prepare_hub(str(ds), "main", data, tok_dir, documents_per_shard=5, num_workers=0, skip_bad=True)
    assert again == shards and "prepared up to record 25 in 5 shard(s)" in capsys.readouterr().out
    assert sorted(p.name for p in data.iterdir() if not p.name.startswith(".")) == ["1", "2", "3", "4", "5"]


def test_max_documents_then_continue_and_type_is_kept(tmp_path, tok_dir):
    ds = _dataset(tmp_path / "ds", DOCS, files=3)
    data = tmp_path / "data"
    first = prepare_hub(str(ds), "code", data, tok_dir, documents_per_shard=6, max_documents=8, num_workers=0,
                        val_tokens=10)
    assert [s.name for s in first] == ["c1", "c2"] and _ranges(first) == [(0, 6), (6, 8)]
    assert (data / "val" / "c1").is_dir() and not (data / "val" / "c2").exists()
    with pytest.raises(MidtrainError, match="as type 'code'"):
        prepare_hub(str(ds), "math", data, tok_dir, documents_per_shard=6, num_workers=0)
    shards = prepare_hub(str(ds), "code", data, tok_dir, documents_per_shard=6, num_workers=0, val_tokens=10)
    assert _ranges(shards) == [(0, 6), (6, 8), (8, 14), (14, 20), (20, 25)]
    val = read_shard_tokens(data / "val" / "c1")
    train = _tokens(shards)
    np.testing.assert_array_equal(np.concatenate([val, train]), _reference(tmp_path, tok_dir, DOCS))


def test_cli_by_name_with_text_field(tmp_path, tok_dir):
    ds = _dataset(tmp_path / "ds", DOCS)
    env = {**os.environ, **OFFLINE, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    cmd = [sys.executable, "-m", "midtrain", "prepare", "--hf_dataset", str(ds), "--split", "train",
           "--text_field", "text", "--type", "main", "--data_path", str(tmp_path / "data"),
           "--tokenizer_dir", str(tok_dir), "--documents_per_shard", "10", "--num_workers", "0"]
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["1", "2", "3"]
    manifest = json.loads((tmp_path / "data" / "3" / MANIFEST_NAME).read_text())
    assert manifest["hub"]["dataset"] == str(ds) and (manifest["hub"]["start"], manifest["hub"]["end"]) == (20, 25)

    missing = subprocess.run([*cmd[:5], str(tmp_path / "nope"), *cmd[6:]], capture_output=True, text=True, env=env,
                             timeout=300)
    assert missing.returncode == 2
    assert "Cannot open Hugging Face dataset" in missing.stderr and "Traceback" not in missing.stderr
