"""Bad configs through the real CLI (``python -m midtrain ...`` in a subprocess): each ends with exit status
2 and a few lines on stderr naming the culprit: no traceback, no usage dump.

All cases run in one subprocess (see ``DRIVER``: importing torch and litgpt costs seconds per process);
a few more run as separate ``python -m midtrain`` processes. Every case is its own test.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.synthetic import write_tree

pytestmark = pytest.mark.slow  # spawns the CLI in a subprocess

REPO = Path(__file__).resolve().parents[1]
TINY_MODEL = {
    "name": "tiny", "block_size": 64, "vocab_size": 256, "padded_vocab_size": 256,
    "n_layer": 1, "n_head": 2, "n_embd": 16, "rotary_percentage": 0.25, "parallel_residual": True, "bias": True,
}  # fmt: skip


def base(root: Path) -> dict:
    return {
        "model_config": dict(TINY_MODEL),
        "out_dir": str(root / "out"),
        "data": {
            "class_path": "midtrain.data.ShardedMixedDataset",
            "init_args": {"data_path": str(root / "data"), "mix_weights_str": "main:0.8,code:0.2", "num_workers": 0},
        },
        "train": {"max_steps": 10, "global_batch_size": 8, "micro_batch_size": 2, "max_seq_length": 32},
        "devices": 1,
        "accelerator": "cpu",
    }


def data(key: str, value: object) -> dict:
    return {"data": {"init_args": {key: value}}}


def merge(cfg: dict, patch: dict) -> dict:
    out = copy.deepcopy(cfg)
    for key, value in patch.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        elif value is DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


DROP = object()

# name -> (config patch or None for none, extra CLI args, culprit strings expected in stderr, command)
CASES: dict[str, tuple[dict | None, list[str], list[str], str]] = {
    "missing_data_path": (data("data_path", DROP), [], ["data_path is not set"], "inspect"),
    "data_path_absent": (data("data_path", "/nonexistent/shards"), [], ["/nonexistent/shards", "does not exist"],
                         "inspect"),
    "literal_id_typo": ({"data": {"init_args": {"mix_weights_str": None, "literal_weights_str": "main/1:0.5,c9:0.5"}}},
                        [], ["'c9'", "c1"], "inspect"),
    "negative_weight": (data("mix_weights_str", "main:1.2,code:-0.2"), [], ["'code'", ">= 0"], "inspect"),
    "corrupt_index": ({}, [], ["Corrupt index.json", "m1"], "inspect"),
    "shard_dirs_1_and_01": ({}, [], ["'01'", "main/1"], "inspect"),
    "unrecognised_shard_dir": ({}, [], ["'code1'", "shard_types"], "inspect"),
    "divide_by_tokens_literal": (
        {"data": {"init_args": {"mix_weights_str": None, "literal_weights_str": "main/1:1", "divide_by_tokens": True}}},
        [], ["divide_by_tokens", "literal"], "inspect"),
    "multipliers_weighted": (data("proportional_multipliers", {"code": 2.0}), [], ["proportional_multipliers"],
                             "inspect"),
    "stage_after_max_steps": (data("stages", [{"at_step": 10, "mix_weights_str": "main:1"}]), [],
                              ["data.stages[0].at_step=10", "max_steps=10"], "inspect"),
    "batch_not_multiple": ({}, ["--devices", "3"], ["global_batch_size=8", "devices (3)", "use e.g. 6, 12"],
                           "inspect"),
    "seq_len_over_block": ({"train": {"max_seq_length": 100}}, [], ["max_seq_length=100", "block_size is 64"],
                           "inspect"),
    "unknown_top_level": ({"bogus_option": 1}, [], ["bogus_option: unknown option"], "inspect"),
    "train_key_typo": ({"train": {"max_step": 5}}, [], ["train.max_step", "did you mean 'max_steps'"], "inspect"),
    "data_key_typo": (data("mix_weight_str", "main:1"), [], ["data.init_args.mix_weight_str",
                                                             "did you mean 'mix_weights_str'"], "inspect"),
    "logger_choice": ({"logger_name": "mlflow"}, [], ["logger_name", "'mlflow'", "tensorboard"], "inspect"),
    "strategy_choice": ({}, ["--strategy", "deepspeed"], ["strategy", "'deepspeed'", "fsdp"], "inspect"),
    "wrong_type": ({}, ["--train.micro_batch_size", "two"], ["train.micro_batch_size", "expected int", "'two'"],
                   "inspect"),
    "fork_config": ({"train": {"max_iters": 10000000, "lr_scheduler": "cosine"}}, [],
                    ["research fork", "midtrain migrate"], "inspect"),
    "model_name_typo": ({"model_config": DROP, "model_name": "pythia-70"}, [], ["'pythia-70'", "pythia-70m"],
                        "inspect"),
    "two_modes": (data("proportional_sampling", True), [], ["exactly one mixture mode"], "inspect"),
    "no_mode": (data("mix_weights_str", DROP), [], ["No mixture given"], "inspect"),
    "resume_missing": ({"resume": "/nonexistent/run/step-00000100"}, [], ["resume path", "does not exist"],
                       "pretrain"),
    "type_without_shards": (data("mix_weights_str", "main:0.9,instruct:0.1"), [], ["'instruct'", "types present"],
                            "inspect"),
    "unknown_type": (data("mix_weights_str", "main:0.9,kode:0.1"), [], ["'kode'", "shard_types"], "inspect"),
    "val_path_missing": (data("val_data_path", "/nonexistent/val"), [], ["/nonexistent/val"], "inspect"),
    "wrong_data_class": ({"data": {"class_path": "litgpt.data.TinyLlama", "init_args": DROP}}, [],
                         ["data.class_path", "ShardedMixedDataset"], "inspect"),
    "epochs_in_pretrain": ({"train": {"epochs": 2}}, [], ["train.epochs", "max_steps"], "inspect"),
    "max_tokens_and_steps": ({"train": {"max_tokens": 10_000}}, [], ["train.max_steps", "max_tokens", "not both"],
                             "inspect"),
    "negative_workers": (data("num_workers", -1), [], ["num_workers", ">= 0"], "inspect"),
    "initial_checkpoint_missing": ({"initial_checkpoint_dir": "/nonexistent/ckpt"}, [],
                                   ["initial_checkpoint_dir", "lit_model.pth"], "pretrain"),
    "pretrain_batch_before_weights": ({}, ["--train.global_batch_size", "7"], ["global_batch_size=7"], "pretrain"),
    "yaml_syntax": (None, [], ["not valid YAML", "line"], "inspect"),
    "config_file_missing": (None, [], ["--config", "no such file"], "inspect"),
    "required_option_missing": (None, [], ["--checkpoint_dir is required"], "finetune"),
}


def layout(name: str, root: Path) -> None:
    """The shard tree of one case: the shared layout plus the case's defect."""
    write_tree(root / "data", {"1": 3_000, "2": 3_000, "c1": 2_000, "m1": 1_000}, vocab_size=256, chunk_tokens=500)
    if name == "corrupt_index":
        (root / "data/m1/index.json").write_text("{not json")
    if name == "shard_dirs_1_and_01":
        write_tree(root / "data", {"01": 1_000}, chunk_tokens=500)
    if name == "unrecognised_shard_dir":
        write_tree(root / "data", {"code1": 1_000}, chunk_tokens=500)


# Runs ``python -m midtrain ARGS`` for many argument lists in one interpreter (torch and litgpt are imported
# once, not once per case): the module's ``__main__`` runs as it does from the shell, stdout and stderr are
# captured, and an escaping exception is recorded with its traceback, as the shell would show it.
DRIVER = """
import contextlib, io, json, os, runpy, sys, traceback
cases, target = json.load(open(sys.argv[1])), sys.argv[2]
results = {}
for name, (cwd, argv) in cases.items():
    out, err, code = io.StringIO(), io.StringIO(), 0
    os.chdir(cwd)
    sys.argv = ["midtrain", *argv]
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            runpy.run_module("midtrain", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        except BaseException:
            traceback.print_exc(file=err)
            code = 1
    results[name] = {"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()}
json.dump(results, open(target, "w"))
"""


def run_cli_cases(cases: dict[str, tuple[Path, list[str]]], work: Path) -> dict[str, dict]:
    """``{name: {returncode, stdout, stderr}}`` of ``python -m midtrain ARGS`` run in ``cwd`` for each case."""
    spec, result = work / "cases.json", work / "results.json"
    spec.write_text(json.dumps({k: (str(cwd), argv) for k, (cwd, argv) in cases.items()}))
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", DRIVER, str(spec), str(result)], capture_output=True, text=True,
                          env=env, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return json.loads(result.read_text())


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    cases = {}
    for name, (patch, extra, _, command) in CASES.items():
        root = tmp_path_factory.mktemp(name)
        layout(name, root)
        config = root / "config.yaml"
        if name == "yaml_syntax":
            config.write_text("train:\n  max_steps: [1, 2\n")
        elif name == "required_option_missing":
            config.write_text(yaml.safe_dump({"out_dir": str(root / "out")}))
        elif name != "config_file_missing":
            config.write_text(yaml.safe_dump(merge(base(root), patch)))
        cases[name] = (root, [command, "--config", str(config), *extra])
    results = run_cli_cases(cases, tmp_path_factory.mktemp("driver"))
    return {name: {**result, "cwd": str(cases[name][0])} for name, result in results.items()}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_config_fails_in_a_few_lines(name: str, results):
    code, stderr = results[name]["returncode"], results[name]["stderr"]
    assert code == 2, f"{name}: exit {code}\n{results[name]['stdout']}\n{stderr}"
    lines = [ln for ln in stderr.splitlines() if ln.strip()]
    assert 1 <= len(lines) <= 3, f"{name}: {len(lines)} lines:\n{stderr}"
    assert "Traceback" not in stderr and "usage:" not in stderr, stderr
    assert lines[0].startswith(f"midtrain {CASES[name][3]}: error: "), stderr
    for culprit in CASES[name][2]:
        assert culprit in stderr, f"{name}: {culprit!r} not in:\n{stderr}"
    assert "Does not validate against any of the Union subtypes" not in stderr


def test_each_case_is_refused_by_its_own_check(results):
    """No two cases end in the same error: each exercises a check of its own (paths of the case masked)."""
    firsts = {}
    for name, result in results.items():
        first = result["stderr"].strip().splitlines()[0] if result["stderr"].strip() else ""
        firsts[name] = first.replace(str(Path(result["cwd"])), "ROOT")
    repeated = {n: f for n, f in firsts.items() if list(firsts.values()).count(f) > 1}
    assert len(CASES) >= 20 and not repeated, repeated


def test_wandb_logger_needs_its_extra_or_logs_offline(tmp_path):
    """``logger_name: wandb``: without the extra, one line naming it; with it (WANDB_MODE=offline, no network)
    the run logs its training scalars into a local wandb run under out_dir/logs."""
    import importlib.util

    write_tree(tmp_path / "data", {"1": 3_000, "c1": 2_000}, vocab_size=TINY_MODEL["vocab_size"], chunk_tokens=500)
    patch = {"logger_name": "wandb", "precision": "32-true", "compile": False, "train": {"max_steps": 2}}
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(merge(base(tmp_path), patch)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
           "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    out = subprocess.run([sys.executable, "-m", "midtrain", "pretrain", "--config", str(config)], cwd=tmp_path,
                         capture_output=True, text=True, env=env, timeout=300)  # fmt: skip
    if importlib.util.find_spec("wandb") is None:
        assert out.returncode == 2 and len(out.stderr.strip().splitlines()) == 1, out.stderr
        assert "needs the wandb package" in out.stderr and "pip install 'midtrain[wandb]'" in out.stderr
        return
    assert out.returncode == 0, out.stdout + out.stderr
    runs = sorted((tmp_path / "out/logs/wandb").glob("offline-run-*/run-*.wandb"))
    assert runs, sorted(p.name for p in (tmp_path / "out/logs").rglob("*"))
    records = runs[0].read_bytes()  # wandb's own record file: the logged keys are stored as text
    assert b"train/main/loss" in records and b"tokens_per_sec_per_device" in records
    assert "step 2/2 | loss" in (runs[0].parent / "files/output.log").read_text()


def test_tiny_config_before_demo_data_says_how_to_build_it(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    config = REPO / "midtrain_configs/tiny/pretrain.yaml"
    out = subprocess.run([sys.executable, "-m", "midtrain", "inspect", "--config", str(config)],
                         capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)  # fmt: skip
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert "midtrain prepare demo --data_path data/demo" in out.stderr and "make demo" not in out.stderr


def test_help_prints_usage_and_unknown_command_is_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    helped = subprocess.run([sys.executable, "-m", "midtrain", "migrate", "--help"], capture_output=True, text=True,
                            env=env, timeout=300)  # fmt: skip
    assert helped.returncode == 0 and "usage:" in helped.stdout and "--pretrain_dir" in helped.stdout
    typo = subprocess.run([sys.executable, "-m", "midtrain", "pretrian"], capture_output=True, text=True, env=env,
                          timeout=300)  # fmt: skip
    assert typo.returncode == 2 and typo.stderr.count("\n") == 1 and "did you mean 'pretrain'" in typo.stderr


def test_index_json_fields_are_checked(tmp_path):
    """A shard whose index.json lacks token counts is named (not a token shard), via the same discovery path."""
    from midtrain.data.shards import discover_shards
    from midtrain.errors import MidtrainError

    write_tree(tmp_path, {"1": 1_000}, chunk_tokens=500)
    index = json.loads((tmp_path / "1/index.json").read_text())
    for chunk in index["chunks"]:
        chunk.pop("dim")
    (tmp_path / "1/index.json").write_text(json.dumps(index))
    with pytest.raises(MidtrainError, match="no integer 'dim'"):
        discover_shards(tmp_path)
