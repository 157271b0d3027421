"""``midtrain experiment``: experiment files, the run graph, generated configs, the changed-config guard,
and ``run`` of midtrain_configs/experiments/tiny.yaml end to end on this machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from midtrain.errors import MidtrainError
from midtrain.experiment.generate import check_unchanged, plan, write
from midtrain.experiment.spec import load
from midtrain.experiment.status import render, states

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "midtrain_configs/experiments"
TINY = EXPERIMENTS / "tiny.yaml"


@pytest.fixture
def repo_cwd(monkeypatch):
    monkeypatch.chdir(REPO)  # experiment files name configs relative to the working directory


def tiny_copy(tmp_path: Path, **changes) -> Path:
    """tiny.yaml with its root in ``tmp_path`` and top-level ``changes``."""
    spec = yaml.safe_load(TINY.read_text())
    spec["root"] = str(tmp_path / "exp")
    spec.update(changes)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def test_tiny_graph_names_and_dependencies(repo_cwd):
    p = plan(load(TINY))
    deps = {n.name: (n.kind, n.deps) for n in p.nodes}
    assert deps["base-to10"] == ("pretrain", ())
    assert deps["base-to20"] == ("pretrain", ("base-to10",))
    assert deps["base"] == ("pretrain", ("base-to20",))
    assert deps["code20-at10"] == ("branch", ("base-to10",))  # waits for its segment, not the whole base run
    assert deps["code20-at20"] == ("branch", ("base-to20",))
    ft = "code20-at10/sft-code-replay0.25-seed42"
    assert deps[ft] == ("finetune", ("code20-at10",))
    assert deps[f"{ft}/eval"] == ("evaluate", (ft,))
    assert deps["report"][1] == ("code20-at10/sft-code-replay0-seed42/eval", f"{ft}/eval")
    order = [n.name for n in p.nodes]
    assert all(order.index(d) < order.index(n) for n, (_, ds) in deps.items() for d in ds)


def test_tiny_generated_configs(repo_cwd):
    p = plan(load(TINY))
    c = p.configs
    root = "out/experiments/tiny"
    assert c["base-to10"]["train"]["max_additional_steps"] == 10  # the segment ends with a checkpoint at 10
    assert c["base-to20"]["train"]["max_additional_steps"] == 20
    assert "max_additional_steps" not in c["base"]["train"] and c["base"]["train"]["max_steps"] == 40
    assert {c[n]["out_dir"] for n in ("base-to10", "base-to20", "base")} == {f"{root}/runs/base"}
    assert c["base"]["resume"] == "auto"
    branch = c["code20-at20"]
    assert branch["resume"] == f"{root}/runs/base/step-00000020"
    assert branch["data"]["init_args"]["mix_weights_str"] == "main:0.8,code:0.2"
    assert branch["train"]["max_steps"] == 40  # same LR horizon as the base run
    ft = c["code20-at10/sft-code-replay0.25-seed42"]
    assert ft["checkpoint_dir"] == f"{root}/runs/code20-at10/final"
    assert ft["out_dir"] == f"{root}/sft/code20-at10/sft-code-replay0.25-seed42"
    assert ft["replay"]["ratio"] == 0.25 and ft["replay"]["data"]["data_path"] == "data/demo"
    assert ft["seed"] == 42 and ft["train"]["max_steps"] == 10
    assert "replay" not in c["code20-at10/sft-code-replay0-seed42"]
    ev = c["code20-at10/sft-code-replay0-seed42/eval"]
    assert ev["checkpoints"] == [f"{root}/sft/code20-at10/sft-code-replay0-seed42/final"]
    assert ev["out"] == f"{root}/eval/code20-at10/sft-code-replay0-seed42.csv"
    assert c["report"]["in_domain"] == "sft" and f"{root}/runs/base" in c["report"]["runs"]


def test_generated_configs_are_plain_run_configs(repo_cwd, tmp_path):
    """Each generated config passes the pretrain/finetune schema check the CLI runs first."""
    from midtrain.cli import COMMANDS, _load, _prepare_args

    p = plan(load(tiny_copy(tmp_path)))
    write(p)
    for node in p.nodes:
        fn = _load(COMMANDS[node.command][0])
        _prepare_args(node.command, fn, ["--config", str(node.config)])  # raises on an unknown field
        assert node.config.read_text().startswith("# GENERATED")


def test_idempotent_write_and_changed_config_refused(repo_cwd, tmp_path):
    p = plan(load(tiny_copy(tmp_path)))
    write(p)
    write(plan(load(tiny_copy(tmp_path))))  # the same file again: fine
    branch = p.node("code20-at20").out
    record = json.loads(branch.with_name(branch.name + ".experiment.json").read_text())
    assert record["node"] == "code20-at20" and len(record["sha256"]) == 64
    spec = yaml.safe_load(TINY.read_text())
    spec["branches"]["code20-at20"]["mixture"] = "main:0.5,code:0.5"
    changed = tiny_copy(tmp_path, branches=spec["branches"])
    check_unchanged(plan(load(changed)))  # not started yet: a change is fine
    (branch / "step-00000030").mkdir(parents=True)  # now it has run
    with pytest.raises(MidtrainError, match=r"node code20-at20 already ran .*mix_weights_str.*main:0.5,code:0.5"):
        write(plan(load(changed)))


@pytest.mark.parametrize("edit, message", [
    (lambda s: s.update(colour=1), r"colour: unknown field"),
    (lambda s: s["branches"]["code20-at10"].update(at_step=0), r"branches.code20-at10.at_step: expected a positive"),
    (lambda s: s["branches"]["code20-at10"].update(at_step=41), r"at_step: 41 is after the base run's end"),
    (lambda s: s["branches"]["code20-at10"].update(mixtur="x"),
     r"branches.code20-at10.mixtur: unknown field .*mixture"),
    (lambda s: s["finetune"].update(branches=["nope"]), r"finetune.branches: 'nope' is not a branch; valid: base"),
    (lambda s: s["finetune"].update(replay=[1.5]), r"finetune.replay: replay ratios must be numbers in \[0, 1\)"),
    (lambda s: s["report"].update(claims=["magic"]), r"report.claims: unknown claim 'magic'; valid: midtrain_vs_base"),
    (lambda s: s["base"].update(run="out/x"), r"base: give exactly one of config"),
    (lambda s: s.pop("base"), r"base: required"),
])
def test_bad_experiment_files_fail_in_one_line(repo_cwd, tmp_path, edit, message):
    spec = yaml.safe_load(TINY.read_text())
    edit(spec)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(spec))
    with pytest.raises(MidtrainError, match=message) as err:
        plan(load(path))
    assert "\n" not in str(err.value) and str(path) in str(err.value)


@pytest.mark.parametrize("name", ["paper-pythia-70m", "paper-pythia-160m", "paper-pythia-410m", "paper-pythia-1b",
                                  "replay-study"])
def test_paper_experiment_files_plan(repo_cwd, name):
    start = time.perf_counter()
    p = plan(load(EXPERIMENTS / f"{name}.yaml"))
    text = render(p, states(p))
    assert time.perf_counter() - start < 30
    kinds = [n.kind for n in p.nodes]
    assert text.count("\n") > len(p.nodes) and kinds.count("report") == 1
    if name == "paper-pythia-70m":  # 15 branches + base, x 4 SFT tasks x 2 replay ratios, each evaluated
        assert kinds.count("branch") == 15 and kinds.count("finetune") == 16 * 4 * 2 == kinds.count("evaluate")
        seg = {n.name: n.deps for n in p.nodes if n.kind == "pretrain"}
        assert list(seg) == ["base-to6k", "base-to20k", "base-to30k", "base-to40k", "base-to50k", "base-to56k", "base"]
        assert p.node("code20-from20k").deps == ("base-to20k",)
    if name == "replay-study":
        assert kinds.count("finetune") == 3 * 4 and all(n.deps == () for n in p.nodes if n.kind == "finetune")


@pytest.mark.slow
def test_cli_plan_prints_the_graph_and_runs_nothing(tmp_path):
    path = tiny_copy(tmp_path)
    out = subprocess.run([sys.executable, "-m", "midtrain", "experiment", "plan", str(path)], cwd=REPO,
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert out.returncode == 0, out.stderr
    assert "base-to10" in out.stdout and "14 nodes: 14 not submitted" not in out.stdout
    assert "10 nodes: 10 not submitted" in out.stdout
    assert not (tmp_path / "exp").exists()
    bad = subprocess.run([sys.executable, "-m", "midtrain", "experiment", "plan", str(tmp_path / "none.yaml")],
                         cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr


@pytest.mark.slow
def test_run_tiny_locally(tmp_path):
    """``run`` of tiny.yaml from a working directory with the demo corpus: every node done; again: nothing to do."""
    from test_slurm import short_sft_set

    from midtrain.demo.corpus import build_demo_corpus

    build_demo_corpus(tmp_path / "data/demo", scale=0.05)
    short_sft_set(tmp_path)
    (tmp_path / "midtrain_configs").symlink_to(REPO / "midtrain_configs")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "midtrain", "experiment"]
    file = "midtrain_configs/experiments/tiny.yaml"
    out = subprocess.run([*cmd, "run", file, "--jobs", "2", "--reuse_processes"], cwd=tmp_path, capture_output=True,
                         text=True, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    st = json.loads(subprocess.run([*cmd, "status", file, "--json"], cwd=tmp_path, capture_output=True, text=True,
                                   env=env).stdout)
    assert {s["state"] for s in st} == {"done"} and len(st) == 10
    runs = tmp_path / "out/experiments/tiny/runs"
    rows = [json.loads(x) for x in (runs / "base/metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in rows) == 40
    summary = json.loads((runs / "code20-at20/summary.json").read_text())
    assert summary["branch_point"]["step"] == 20 and summary["step"] == 40
    again = subprocess.run([*cmd, "run", file], cwd=tmp_path, capture_output=True, text=True, env=env)
    assert again.returncode == 0 and "10 done, 0 to run" in again.stdout
