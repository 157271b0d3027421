"""``midtrain migrate``: configs shaped like the research fork's become midtrain configs, each change printed;
litgpt's field names are translated with a note. The fork configs here are small synthetic stand-ins."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from midtrain.cli import _prepare_args, run
from midtrain.config.commands import FinetuneConfig
from midtrain.errors import MidtrainError
from midtrain.migrate import FORK_HORIZON, fork_fields, migrate
from tests.synthetic import write_tree


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """Shards whose token ids fit the smallest model here (256): inspect checks ids against the vocabulary."""
    return write_tree(tmp_path / "data", {"1": 40_000, "2": 20_000, "c1": 12_000, "m1": 3_000}, vocab_size=256,
                      chunk_tokens=1_700)  # fmt: skip

REPO = Path(__file__).resolve().parents[1]


def fork_config(data_path: str, out_dir: str, **overrides) -> dict:
    """A config with the fork's fields: a sentinel max_iters, resume + max_additional_steps, empty fields."""
    cfg = {
        "model_name": "pythia-14m",
        "model_config": None,
        "out_dir": out_dir,
        "precision": "bf16-true",
        "initial_checkpoint_dir": None,
        "resume": True,
        "data": {
            "class_path": "litgpt.data.ShardedMixedDataset",
            "init_args": {"data_path": data_path, "num_workers": 0, "mix_weights_str": "main:0.8,code:0.2"},
        },
        "train": {
            "max_iters": 10000000, "max_additional_steps": 41035, "micro_batch_size": 4, "global_batch_size": 8,
            "min_lr": "1e-6", "lr_scheduler": "cosine", "lr_warmup_fraction": 0.1,
        },
        "eval": {"interval": 1000},
        "logger_name": "wandb",
    }  # fmt: skip
    for key, value in overrides.items():
        section, _, leaf = key.rpartition("__")
        target = cfg
        for part in filter(None, section.split("__")):
            target = target[part]
        if value is KeyError:
            target.pop(leaf)
        else:
            target[leaf] = value
    return cfg


def test_branch_config_gets_an_explicit_checkpoint_and_its_own_out_dir():
    cfg = fork_config("/d/shards", "/runs/pythia_70m_pretrain", data__init_args__mix_weight=0.12)
    new, changes = migrate(cfg, "ablations/timing/p70m_code20_from20k.yaml")
    assert fork_fields(cfg) == ["train.max_iters", "train.lr_scheduler", "data.init_args.mix_weight"]
    assert fork_fields(new) == []
    assert new["resume"] == "/runs/pythia_70m_pretrain/step-00020000"  # 61035 - 41035
    assert new["out_dir"] == "/runs/p70m_code20_from20k"
    assert new["train"] == {
        "max_additional_steps": 41035, "micro_batch_size": 4, "global_batch_size": 8, "min_lr": 1e-6,
        "lr_warmup_fraction": 0.1, "max_steps": FORK_HORIZON, "lr_schedule": "cosine",
    }  # fmt: skip
    assert new["data"]["class_path"] == "midtrain.data.ShardedMixedDataset"
    assert "mix_weight" not in new["data"]["init_args"] and "model_config" not in new
    assert "initial_checkpoint_dir" not in new and new["logger_name"] == "wandb"
    text = "\n".join(changes)
    for expected in ("train.max_iters: 10000000 dropped", "train.lr_scheduler: cosine -> train.lr_schedule: cosine",
                     "data.init_args.mix_weight: 0.12 dropped (a stale field", "model_config: (empty) removed",
                     "train.max_additional_steps: 41035 kept (counted from the branch step 20000",
                     "resume: true -> /runs/pythia_70m_pretrain/step-00020000", "logger_name: wandb kept"):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_pretrain_dir_option_keeps_the_fork_out_dir_for_the_branch():
    cfg = fork_config("/d", "/runs/midtrain_code", train__max_additional_steps=5035)
    new, _ = migrate(cfg, "x.yaml", pretrain_dir="/runs/base/")
    assert new["resume"] == "/runs/base/step-00056000" and new["out_dir"] == "/runs/midtrain_code"


def test_continuation_of_the_same_run_resumes_auto_and_ends_at_max_steps():
    cfg = fork_config("/d", "/runs/base", data__init_args__mix_weights_str=KeyError, train__max_additional_steps=29035)
    new, changes = migrate(cfg, "pretrain.yaml")
    assert new["resume"] == "auto" and new["out_dir"] == "/runs/base"
    assert "max_additional_steps" not in new["train"] and new["train"]["max_steps"] == FORK_HORIZON
    assert new["data"]["init_args"]["mix_weights_str"] == "main:1.0"
    assert any("resumed at step 32000" in c for c in changes)


def test_decay_schedule_without_decay_is_constant_and_full_length_extra_steps_drop():
    cfg = fork_config("/d", "/runs/wsd", resume=False, train__lr_scheduler="decay", train__stable_steps=10000000,
                      train__max_additional_steps=FORK_HORIZON)  # fmt: skip
    new, changes = migrate(cfg, "wsd.yaml")
    assert new["train"]["lr_schedule"] == "constant" and "stable_steps" not in new["train"]
    assert "max_additional_steps" not in new["train"] and new["resume"] is False
    assert any("never decays" in c for c in changes)


def test_config_without_data_path_is_refused():
    cfg = fork_config("/d", "/runs/x")
    cfg["data"] = {"class_path": "litgpt.data.Olmo2Dataset"}
    with pytest.raises(MidtrainError, match="data.init_args.data_path is not set"):
        migrate(cfg, "olmo.yaml")


@pytest.mark.slow  # spawns processes
def test_migrate_then_inspect_through_the_cli(tree: Path, tmp_path: Path, capsys):
    """migrate in-process (as `midtrain migrate` runs it), then the migrated file through a real `midtrain inspect`."""
    fork = tmp_path / "fork.yaml"
    fork.write_text(yaml.safe_dump(fork_config(str(tree), str(tmp_path / "runs/base"), logger_name="csv",
                                               data__init_args__mix_weight=0.2)))  # fmt: skip
    out = tmp_path / "migrated.yaml"
    run("migrate", [str(fork), "-o", str(out)])
    printed = capsys.readouterr().out
    assert printed.splitlines()[0] == f"{fork}: 10 changes", printed
    assert "mix_weight: 0.2 dropped" in printed and f"wrote {out}" in printed
    assert yaml.safe_load(out.read_text())["resume"] == f"{tmp_path}/runs/base/step-00020000"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    inspected = subprocess.run([sys.executable, "-m", "midtrain", "inspect", "--config", str(out)],
                               capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    assert inspected.returncode == 0, inspected.stderr
    assert "WARNING: resume path" in inspected.stdout  # the pretraining run has not reached the branch yet
    assert "stage 0 from step 0: weighted main:0.8,code:0.2" in inspected.stdout
    with pytest.raises(MidtrainError, match=f"convert it with `midtrain migrate {fork} -o"):  # the fork file itself
        run("pretrain", ["--config", str(fork)])


def test_litgpt_field_names_are_translated_with_a_note(tree: Path, tmp_path: Path, capsys):
    cfg = {
        "model_config": {"name": "t", "block_size": 64, "vocab_size": 256, "padded_vocab_size": 256, "n_layer": 1,
                         "n_head": 2, "n_embd": 16},
        "data": {"class_path": "ShardedMixedDataset",  # a short class_path, as jsonargparse resolves it
                 "init_args": {"data_path": str(tree), "mix_weights_str": "main:1", "num_workers": 0}},
        "train": {"max_tokens": 100_000, "global_batch_size": 8, "micro_batch_size": 2, "max_seq_length": 32},
        "eval": {"max_iters": 5, "max_new_tokens": 50},
        "devices": 2, "accelerator": "cpu", "out_dir": str(tmp_path / "out"),
    }  # fmt: skip
    path = tmp_path / "litgpt.yaml"
    path.write_text(yaml.safe_dump(cfg))
    rows = run("inspect", ["--config", str(path)])
    out = capsys.readouterr().out
    steps = 100_000 // (8 * 32)
    assert f"train.max_tokens: 100,000 -> train.max_steps: {steps}" in out
    assert "eval.max_iters: 5 -> eval.max_samples: 20" in out  # 5 batches of 2 on each of 2 devices
    assert "eval.max_new_tokens dropped" in out
    assert f"run: {steps} steps (1..{steps}) x 8 sequences x 32 tokens" in out
    assert sum(r.planned_tokens for r in rows) == steps * 8 * 32


def test_litgpt_train_epochs_becomes_finetune_epochs():
    args = _prepare_args("finetune", FinetuneConfig, ["--checkpoint_dir", "ckpt", "--train.epochs", "3"])
    assert "--train.epochs" not in args
    assert yaml.safe_load(args[args.index("--config") + 1]) == {"epochs": 3}


def test_fork_mixture_spellings_become_midtrain_modes(tmp_path: Path):
    """Type names in literal mode, and a mix_config_path file in the fork's ``{weights: ...}`` format."""
    literal = fork_config("/d", "/runs/web", data__init_args__mix_weights_str=KeyError,
                          data__init_args__literal_weights_str="main:0.80,web:0.20")  # fmt: skip
    new, changes = migrate(literal, "web.yaml")
    assert new["data"]["init_args"]["mix_weights_str"] == "main:0.80,web:0.20"
    assert "literal_weights_str" not in new["data"]["init_args"] and any("names types" in c for c in changes)

    mix = tmp_path / "math_only.json"
    mix.write_text('{"weights": {"main": 0.88, "math": 0.12, "code": 0}}')
    from_file = fork_config("/d", "/runs/math", data__init_args__mix_weights_str=KeyError,
                            data__init_args__mix_config_path=str(mix))  # fmt: skip
    new, _ = migrate(from_file, "math.yaml")
    init = new["data"]["init_args"]
    assert init == {"data_path": "/d", "num_workers": 0, "mix_weights_str": "main:0.88,math:0.12,code:0"}
    assert new["resume"] == "/runs/math/step-00020000"


def test_stale_mix_weight_without_a_mode_is_a_branch_with_a_mixture_to_set():
    cfg = fork_config("/d", "/runs/math20k", data__init_args__mix_weights_str=KeyError,
                      data__init_args__mix_weight=0.12, train__max_additional_steps=1035)  # fmt: skip
    new, changes = migrate(cfg, "math20k.yaml")
    assert new["resume"] == "/runs/math20k/step-00060000"
    assert new["data"]["init_args"]["mix_weights_str"] == "main:1.0"
    assert any("the stale mix_weight 0.12 names no data type: set the mixture you meant" in c for c in changes)
