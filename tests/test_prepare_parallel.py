"""Parallel preparation: concurrent `midtrain prepare` runs into one data_path each take their own shard name."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from midtrain.data.shards import discover_shards
from midtrain.demo.corpus import train_bpe_tokenizer
from midtrain.errors import MidtrainError
from midtrain.prepare.manifests import reserve_shard_name

pytestmark = pytest.mark.slow  # spawns CLI / training / DDP / SLURM processes (make test-fast skips it)

DOCS = [f"def f{i}(x):\n    return x * {i} + {i % 7}\n" for i in range(120)]


def test_four_concurrent_prepares_give_four_shards(tmp_path):
    tok = train_bpe_tokenizer(DOCS, tmp_path / "tok", vocab_size=300)
    data = tmp_path / "corpus"
    parts = []
    for i in range(4):
        part = tmp_path / f"part{i}.jsonl"
        part.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS[i * 30 : (i + 1) * 30]))
        parts.append(part)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    procs = [
        subprocess.Popen([sys.executable, "-m", "midtrain", "prepare", "--inputs", str(p), "--type", "code",
                          "--data_path", str(data), "--tokenizer_dir", str(tok), "--num_workers", "0"],
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for p in parts
    ]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    shards = discover_shards(data)
    assert sorted(s.id for s in shards) == ["c1", "c2", "c3", "c4"]
    inputs = {json.loads((data / s.id / "prepare.json").read_text())["inputs"][0]["path"] for s in shards}
    assert inputs == {str(p) for p in parts}  # none lost, none twice
    assert not [p for p in data.iterdir() if p.name.startswith(".")]  # reservations and temp dirs gone


def test_a_reserved_name_is_skipped_and_an_explicit_one_refused(tmp_path):
    table = {"code": "c"}
    with reserve_shard_name(tmp_path, "code", table, None) as first:
        with reserve_shard_name(tmp_path, "code", table, None) as second:
            assert (first, second) == ("c1", "c2")
        with pytest.raises(MidtrainError, match="c1 .*already exists"):
            with reserve_shard_name(tmp_path, "code", table, "c1"):
                pass
    assert not list(tmp_path.iterdir())


def test_submit_prepare_runs_an_array_over_the_parts(tmp_path):
    repo = Path(__file__).resolve().parents[1]
    for i in range(3):
        (tmp_path / f"part{i}.jsonl").write_text("{}\n")
    site = tmp_path / "site.sh"
    site.write_text(f"MIDTRAIN_ROOT={tmp_path}\nMIDTRAIN_LOG_DIR={tmp_path}/logs\nsite_activate() {{ :; }}\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MIDTRAIN_", "DRY_RUN"))}
    out = subprocess.run(
        ["bash", str(repo / "training_scripts/submit.sh"), "prepare", "--dry-run", str(tmp_path / "part*.jsonl"),
         "--", "--type", "code", "--data_path", "D", "--tokenizer_dir", "T"],
        env={**env, "MIDTRAIN_SITE": str(site)}, capture_output=True, text=True, timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "--array=0-2" in out.stdout
    for i in range(3):
        assert (f"[task {i}] " in out.stdout
                and f"prepare --inputs {tmp_path}/part{i}.jsonl --type code --data_path D" in out.stdout)
