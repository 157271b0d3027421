"""`midtrain inspect --step N` for runs that did not start fresh under one mixture: a branch from another run's
checkpoint, a resume that changes the mixture and the global batch, and an earlier step of a continued run.
Each is compared with what the run itself recorded it trained (tokens per source in every step's checkpoint)."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import yaml
from conftest import set_dotted

from midtrain.cli import run
from midtrain.rundir import checkpoint_name, read_train_state
from tests.synthetic import write_tree

pytestmark = pytest.mark.slow  # spawns CLI / training / DDP / SLURM processes (make test-fast skips it)

SEQ = 16
MODEL = {"name": "tiny", "n_layer": 1, "n_head": 2, "n_embd": 16, "block_size": SEQ, "vocab_size": 512,
         "padded_vocab_size": 512}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    return write_tree(root / "data", {"1": 20_000, "2": 10_000, "c1": 8_000, "m1": 4_000}, chunk_tokens=1_700)


def config(corpus: Path, out: Path, **overrides) -> Path:
    cfg = {
        "model_config": MODEL, "out_dir": str(out), "precision": "32-true", "compile": False,
        "accelerator": "cpu", "devices": 1,
        "data": {"class_path": "midtrain.data.ShardedMixedDataset",
                 "init_args": {"data_path": str(corpus), "mix_weights_str": "main:0.7,code:0.3", "num_workers": 0}},
        "train": {"max_steps": 8, "global_batch_size": 8, "micro_batch_size": 4, "save_interval": 1,
                  "lr_warmup_steps": 1, "min_lr": 1e-5},
        "eval": {"interval": 100, "final_validation": False},
        "optimizer": {"class_path": "torch.optim.AdamW", "init_args": {"lr": 0.003}},
    }
    for key, value in overrides.items():
        set_dotted(cfg, key, value)
    path = out.parent / f"{out.name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def inspected(cfg: Path, step: int, capsys) -> Counter:
    """Samples per source that `midtrain inspect --step` says the step trains on."""
    capsys.readouterr()
    run("inspect", ["--config", str(cfg), "--step", str(step)])
    out = capsys.readouterr().out
    lines = out.split(f"{'position':>8}")[1].splitlines()[1:]
    rows = [line.split() for line in lines if line.split() and line.split()[0].isdigit()]
    return Counter(r[2] for r in rows)


def trained(before: Path, after: Path) -> Counter:
    """Samples per source trained between two checkpoints (their ``tokens_by_source``)."""
    a, b = read_train_state(before)["tokens_by_source"], read_train_state(after)["tokens_by_source"]
    return +Counter({sid: (n - a.get(sid, 0)) // SEQ for sid, n in b.items()})


def test_inspect_a_branch_and_its_earlier_steps(corpus, tmp_path, capsys):
    base = tmp_path / "base"
    run("pretrain", ["--config", str(config(corpus, base)), "--train.max_additional_steps", "3"])
    branch = tmp_path / "branch"
    cfg = config(corpus, branch, **{
        "resume": str(base / checkpoint_name(3)),
        "data.init_args.mix_weights_str": "main:0.6,code:0.3,math:0.1",
        "data.init_args.stages": [{"at_step": 6, "mix_weights_str": "main:0.5,math:0.5"}],
    })
    before = {n: inspected(cfg, n, capsys) for n in range(4, 9)}  # the dry run, before the branch trains
    capsys.readouterr()
    run("inspect", ["--config", str(cfg)])
    out = capsys.readouterr().out
    assert "run: 5 steps (4..8)" in out and "continues" in out
    run("pretrain", ["--config", str(cfg)])
    steps = {3: base / checkpoint_name(3), **{n: branch / checkpoint_name(n) for n in range(4, 9)}}
    got = {n: trained(steps[n - 1], steps[n]) for n in range(4, 9)}
    assert before == got
    assert sum(got[n]["m1"] for n in (4, 5, 6)) and not got[7]["c1"] + got[8]["c1"]  # math, then no code
    # the finished run, asked about its own earlier steps: read from the checkpoint before each
    assert {n: inspected(cfg, n, capsys) for n in (4, 6, 8)} == {n: got[n] for n in (4, 6, 8)}


def test_inspect_after_a_resume_that_changes_the_mixture_and_the_global_batch(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    run("pretrain", ["--config", str(config(corpus, out)), "--train.max_additional_steps", "3"])
    cfg = config(corpus, out, **{
        "data.init_args.mix_weights_str": "main:0.5,code:0.25,math:0.25",
        "train.global_batch_size": 16, "train.max_steps": 6,
    })
    before = {n: inspected(cfg, n, capsys) for n in range(4, 7)}
    assert sum(before[4].values()) == 16
    run("pretrain", ["--config", str(cfg)])
    got = {n: trained(out / checkpoint_name(n - 1), out / checkpoint_name(n)) for n in range(4, 7)}
    assert before == got
    # and the steps before the change, from the run's own checkpoints
    first = {n: trained(out / checkpoint_name(n - 1), out / checkpoint_name(n)) for n in (2, 3)}
    assert {n: inspected(cfg, n, capsys) for n in (2, 3)} == first
