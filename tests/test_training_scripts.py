"""training_scripts/ and util_scripts/ without SLURM: bash -n, dry runs, requeue on exit 75, collect_runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # spawns the sbatch scripts in subprocesses

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "training_scripts"
SHELL = sorted(SCRIPTS.glob("*.sbatch")) + sorted(SCRIPTS.glob("*.sh")) + sorted((REPO / "util_scripts").glob("*.sh"))
TIMING = sorted((REPO / "midtrain_configs/ablations/timing").glob("*.yaml"))


@pytest.fixture
def env(tmp_path: Path) -> dict:
    """A site file with MIDTRAIN_ROOT in tmp_path, stub srun/scontrol on PATH, MIDTRAIN_CMD a stub."""
    bin_ = tmp_path / "bin"
    bin_.mkdir()
    (bin_ / "scontrol").write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/scontrol.log\n')
    (bin_ / "srun").write_text('#!/usr/bin/env bash\nwhile [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')
    stub = bin_ / "midtrain-stub"
    stub.write_text(f'#!/usr/bin/env bash\necho "$@" >> {tmp_path}/midtrain.log\nexit "${{STUB_EXIT:-0}}"\n')
    for f in bin_.iterdir():
        f.chmod(0o755)
    site = tmp_path / "site.sh"
    site.write_text(f'SITE_SBATCH_ARGS=(--partition=p --account=a)\nPRETRAIN_SBATCH_ARGS=(--nodes=2)\n'
                    f'MIDTRAIN_ROOT={tmp_path}/root\nMIDTRAIN_LOG_DIR={tmp_path}/logs\nsite_activate() {{ :; }}\n')
    (tmp_path / "root").mkdir()
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MIDTRAIN_", "DRY_RUN"))}
    return {**clean, "PATH": f"{bin_}:{os.environ['PATH']}", "MIDTRAIN_SITE": str(site),
            "MIDTRAIN_CMD": str(stub), "TMP": str(tmp_path)}


def bash(script: str, *args: str, env: dict, **extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(SCRIPTS / script), *args], env={**env, **extra}, cwd=REPO,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("path", SHELL, ids=lambda p: p.name)
def test_bash_syntax(path: Path):
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
    text = path.read_text()
    if path.name not in ("site.example.sh", "lib.sh"):
        assert "set -euo pipefail" in text


def test_pretrain_sbatch_has_signal_and_requeue():
    text = (SCRIPTS / "pretrain.sbatch").read_text()
    assert "#SBATCH --signal=USR1@120" in text and "#SBATCH --requeue" in text
    assert "scontrol" in (SCRIPTS / "lib.sh").read_text()


def test_dry_run_array_over_three_configs(env, tmp_path):
    lst = tmp_path / "three.txt"
    paths = [str(p.relative_to(REPO)) for p in (REPO / "midtrain_configs/pretrain").glob("pythia-*.yaml")][:3]
    lst.write_text("# three pretraining runs\n" + "\n".join(paths) + "\n")
    # devices and nodes come from the sbatch request (site file), never from the submitting shell's SLURM_*
    site = Path(env["MIDTRAIN_SITE"])
    request = "PRETRAIN_SBATCH_ARGS=(-N 2 --gpus-per-node=a100:4)"
    site.write_text(site.read_text().replace("PRETRAIN_SBATCH_ARGS=(--nodes=2)", request))
    out = bash("pretrain.sbatch", "--dry-run", str(lst), env=env, SLURM_NNODES="7", SLURM_GPUS_ON_NODE="3",
               SLURM_JOB_ID="99")
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("[task")]
    assert len(lines) == 3
    for i, (line, path) in enumerate(zip(lines, paths)):  # a list file keeps its order
        assert line.startswith(f"[task {i}] srun")
        assert f"--config {REPO / path} " in line
        assert "pretrain" in line and "--devices 4 --num_nodes 2" in line and "--resume auto" in line
    for i, path in enumerate(paths):  # inside the array: only this task's command
        one = bash("pretrain.sbatch", "--dry-run", str(lst), env=env, SLURM_ARRAY_TASK_ID=str(i))
        assert one.stdout.count("[task") == 1 and str(REPO / path) in one.stdout
    bad = bash("pretrain.sbatch", "--dry-run", str(lst), env=env, SLURM_ARRAY_TASK_ID="3")
    assert bad.returncode != 0 and "only 3 configs" in bad.stderr


def test_glob_is_sorted_and_overrides_pass_through(env):
    out = bash("pretrain.sbatch", "--dry-run", "midtrain_configs/ablations/timing/*.yaml", "--", "--train.log_interval",
               "7", env=env)
    assert out.returncode == 0, out.stderr
    lines = [line for line in out.stdout.splitlines() if line.startswith("[task")]
    assert [line.split("--config ")[1].split()[0] for line in lines] == [str(p) for p in TIMING]
    assert all(line.endswith("--train.log_interval 7") for line in lines)


def test_midtraining_first_start_uses_its_start_checkpoint_then_resume_auto(env, tmp_path):
    cfg = str(TIMING[0])
    first = bash("pretrain.sbatch", "--dry-run", cfg, env=env)
    assert "--resume auto" not in first.stdout  # --resume auto would start from scratch (empty out_dir)
    out_dir = next(line.split(":", 1)[1].strip() for line in TIMING[0].read_text().splitlines()
                   if line.startswith("out_dir:"))
    ckpt = tmp_path / "root" / out_dir / "step-00030000"
    ckpt.mkdir(parents=True)
    assert "--resume auto" not in bash("pretrain.sbatch", "--dry-run", cfg, env=env).stdout  # incomplete
    (ckpt / "COMPLETE").write_text("{}")
    assert "--resume auto" in bash("pretrain.sbatch", "--dry-run", cfg, env=env).stdout  # requeued: continue


def test_exit_75_requeues(env, tmp_path):
    cfg = str(REPO / "midtrain_configs/pretrain/pythia-70m.yaml")
    other = str(REPO / "midtrain_configs/pretrain/pythia-160m.yaml")
    out = bash("pretrain.sbatch", cfg, other, env=env, STUB_EXIT="75", SLURM_JOB_ID="4243", SLURM_ARRAY_JOB_ID="4242",
               SLURM_ARRAY_TASK_ID="1")
    assert out.returncode == 0, out.stderr
    # exactly this array task: the array's job ID alone would requeue every task of the array
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "4242_1"]
    ran = (tmp_path / "midtrain.log").read_text()
    assert ran.startswith(f"pretrain --config {other} --devices 1 --num_nodes 1 --resume auto")
    assert not list((tmp_path / "logs").glob(".preempted-*"))  # the marker is consumed


def test_other_failures_do_not_requeue(env, tmp_path):
    cfg = str(REPO / "midtrain_configs/pretrain/pythia-70m.yaml")
    out = bash("pretrain.sbatch", cfg, env=env, STUB_EXIT="3", SLURM_JOB_ID="1")
    assert out.returncode == 3
    assert not (tmp_path / "scontrol.log").exists()
    ok = bash("pretrain.sbatch", cfg, env=env, SLURM_JOB_ID="1")
    assert ok.returncode == 0 and not (tmp_path / "scontrol.log").exists()


def test_finetune_and_evaluate_dry_run(env, tmp_path):
    out = bash("finetune.sbatch", "--dry-run", "midtrain_configs/finetune", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count("[task") == len(list((REPO / "midtrain_configs/finetune").glob("*.yaml")))
    assert " finetune --config " in out.stdout
    ev = tmp_path / "eval.yaml"
    ev.write_text("out_dir: out/eval\n")
    out = bash("evaluate.sbatch", "--dry-run", str(ev), "--", "--batch_size", "8", env=env)
    assert out.returncode == 0 and f"evaluate --config {ev} --batch_size 8" in out.stdout


def test_submit_dry_run_uses_site_settings(env):
    out = bash("submit.sh", "pretrain", "--dry-run", "midtrain_configs/ablations/timing", env=env)
    assert out.returncode == 0, out.stderr
    first = out.stdout.splitlines()[0]
    assert first.startswith(f"sbatch --partition=p --account=a --nodes=2 --array=0-{len(TIMING) - 1} ")
    assert "--dry-run" not in first and out.stdout.count("[task") == len(TIMING)


def test_missing_site_file_is_a_clear_error(env, tmp_path):
    out = bash("pretrain.sbatch", "--dry-run", str(TIMING[0]), env=env, MIDTRAIN_SITE=str(tmp_path / "nope.sh"))
    assert out.returncode != 0 and "site.example.sh" in out.stderr


@pytest.mark.parametrize("script", ["collect_runs.py", "generate_paper_configs.py"])
def test_python_util_help(script):
    cmd = [sys.executable, str(REPO / "util_scripts" / script), "--help"]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0 and "usage" in out.stdout


def test_convert_help_and_checks(tmp_path):
    script = str(REPO / "util_scripts/convert_for_hf.sh")
    out = subprocess.run(["bash", script, "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "convert_from_litgpt" in out.stdout and '"model"' in out.stdout
    (tmp_path / "step-00000010").mkdir()
    out = subprocess.run(["bash", script, str(tmp_path / "step-00000010"), str(tmp_path / "hf")],
                         capture_output=True, text=True)
    assert out.returncode == 2 and "not a complete midtrain checkpoint" in out.stderr


def test_collect_runs(tmp_path):
    run = tmp_path / "out/pythia-70m/midtrain/code20-from6k"
    run.mkdir(parents=True)
    (run / "summary.json").write_text(json.dumps({"step": 100, "max_steps": 100, "tokens_seen": 5000,
                                                  "tokens_by_type": {"main": 4000, "code": 1000}}))
    (run / "metrics.jsonl").write_text(
        '{"step": 50, "val/c4/loss": 3.5}\n{"step": 100, "val/c4/loss": 3.25, "val/code/loss": 2.0}\n{"step": 1')
    unfinished = tmp_path / "out/pythia-70m/pretrain"
    unfinished.mkdir(parents=True)
    (unfinished / "metrics.jsonl").write_text('{"step": 10, "loss": 9.0}\n')
    (tmp_path / "out/eval.csv").write_text("checkpoint,set,loss\nckpt-a,c4,3.1\n")
    csv_out, md_out = tmp_path / "runs.csv", tmp_path / "runs.md"
    cmd = [sys.executable, str(REPO / "util_scripts/collect_runs.py"), str(tmp_path / "out"),
           "--csv", str(csv_out), "--markdown", str(md_out)]
    out = subprocess.run(cmd, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    import csv

    rows = {r["run"]: r for r in csv.DictReader(csv_out.open())}
    mid = rows["pythia-70m/midtrain/code20-from6k"]
    assert (mid["step"], mid["val/c4/loss"], mid["val/code/loss"], mid["tokens/code"]) == ("100", "3.25", "2.0", "1000")
    assert rows["pythia-70m/pretrain"]["step"] == "unfinished"
    assert rows["eval.csv"]["loss"] == "3.1" and rows["eval.csv"]["source"] == "evaluate"
    assert "| pythia-70m/midtrain/code20-from6k | run | 100 |" in md_out.read_text()
    empty = subprocess.run([sys.executable, cmd[1], str(tmp_path / "runs.md").rsplit("/", 1)[0] + "/out/pythia-70m/x"],
                           capture_output=True, text=True)
    assert empty.returncode != 0


def task(env: dict, tmp_path: Path, *command: str) -> tuple[subprocess.CompletedProcess, Path]:
    marker = tmp_path / "logs/.preempted-1"
    marker.parent.mkdir(exist_ok=True)
    cmd = ["bash", str(SCRIPTS / "task.sh"), f"--repo={REPO}", f"--site={env['MIDTRAIN_SITE']}", f"--marker={marker}",
           "--", *command]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60, start_new_session=True)
    return out, marker


def test_task_turns_preemption_into_a_clean_end_of_the_step(env, tmp_path):
    """srun --kill-on-bad-exit kills sibling ranks when one exits non-zero: a preempted task exits 0 + marker."""
    out, marker = task(env, tmp_path, "bash", "-c", "exit 75")
    assert out.returncode == 0 and marker.exists()
    assert "midtrain-sbatch: task 0 started" in out.stderr  # what tests/test_slurm.py waits for before signalling
    marker.unlink()
    out, marker = task(env, tmp_path, "bash", "-c", "exit 3")
    assert out.returncode == 3 and not marker.exists()
    # SIGUSR1 to the whole task before midtrain installed its handler: nothing to save, clean requeue
    out, marker = task(env, tmp_path, "bash", "-c", "kill -USR1 0; sleep 5")
    assert out.returncode == 0 and marker.exists() and "before midtrain installed its handler" in out.stderr


def test_task_sets_the_environment_up_itself(env, tmp_path):
    """--export=NONE: the task sees none of the batch shell's environment; site_activate runs inside it."""
    site = Path(env["MIDTRAIN_SITE"])
    site.write_text(site.read_text().replace("site_activate() { :; }",
                                             f'site_activate() {{ export PATH="{tmp_path}/bin:$PATH"; }}'))
    bare = {k: v for k, v in env.items() if k not in ("PATH", "MIDTRAIN_CMD")}
    out, _ = task(bare, tmp_path, "midtrain-stub", "pretrain", "x")
    assert out.returncode == 0, out.stderr
    assert (tmp_path / "midtrain.log").read_text().split() == ["pretrain", "x"]
    assert os.getcwd() != str(tmp_path / "root")


def test_batch_shell_forwards_a_b_signal_to_the_step(env, tmp_path):
    """--signal=B:USR1@..: only the batch shell is signalled; it forwards to the step instead of dying."""
    stub = tmp_path / "bin/midtrain-stub"
    stub.write_text(f'#!/usr/bin/env bash\nsleep 30 & s=$!\ntrap "kill $s; exit 75" USR1\n'
                    f"echo started >> {tmp_path}/midtrain.log\nwait\n")
    cfg = str(REPO / "midtrain_configs/pretrain/pythia-70m.yaml")
    proc = subprocess.Popen(["bash", str(SCRIPTS / "pretrain.sbatch"), cfg], cwd=REPO, text=True,
                            env={**env, "SLURM_JOB_ID": "31"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "midtrain.log"
    for _ in range(300):  # the stub writes it once its trap is set; the batch shell forwards from then on
        if log.exists():
            break
        time.sleep(0.1)
    os.kill(proc.pid, signal.SIGUSR1)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "forwarding it to the job step" in err
    assert (tmp_path / "scontrol.log").read_text().split() == ["requeue", "31"]


def test_sbatch_copy_finds_the_repository_by_absolute_path(env, tmp_path):
    """SLURM runs a copy of the script from its spool directory, from wherever the job was submitted."""
    copy = tmp_path / "spool/slurm_script"
    copy.parent.mkdir()
    copy.write_text((SCRIPTS / "pretrain.sbatch").read_text())
    cfg = str(REPO / "midtrain_configs/pretrain/pythia-70m.yaml")
    run = {**env, "SLURM_SUBMIT_DIR": str(tmp_path)}
    out = subprocess.run(["bash", str(copy), f"--repo={REPO}", "--dry-run", cfg], env=run, cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 0 and f"--config {cfg}" in out.stdout, out.stderr
    out = subprocess.run(["bash", str(copy), "--dry-run", cfg], env=run, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 2 and "cannot find training_scripts/lib.sh" in out.stderr


def test_submit_freezes_the_config_list_in_the_job_log_dir(env, tmp_path):
    """A glob is expanded once at submission: a config added later never shifts the tasks."""
    (tmp_path / "bin/sbatch").write_text(f'#!/usr/bin/env bash\necho "$@" > {tmp_path}/sbatch.log\necho 77\n')
    (tmp_path / "bin/sbatch").chmod(0o755)
    cfgs = tmp_path / "cfgs"
    cfgs.mkdir()
    for name in ("b", "c"):
        (cfgs / f"{name}.yaml").write_text(f"out_dir: out/{name}\n")
    out = subprocess.run(["bash", str(SCRIPTS / "submit.sh"), "pretrain", f"{cfgs}/*.yaml", "--", "--x", "1"],
                         env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    job = tmp_path / "logs/pretrain-77"
    assert "logs/pretrain-77" in out.stdout and (job / "job_id").read_text().strip() == "77"
    assert (job / "configs.txt").read_text().split() == [str(cfgs / "b.yaml"), str(cfgs / "c.yaml")]
    args = (tmp_path / "sbatch.log").read_text().split()
    assert "--parsable" in args and "--array=0-1" in args and f"--output={job.resolve()}/%A_%a.out" in args
    (cfgs / "a.yaml").write_text("out_dir: out/a\n")  # sorts first: would have become task 0
    script_args = args[args.index(str(SCRIPTS / "pretrain.sbatch")) + 1:]
    for i, name in enumerate("bc"):
        ran = bash("pretrain.sbatch", *script_args, env=env, SLURM_JOB_ID=str(80 + i), SLURM_ARRAY_TASK_ID=str(i))
        assert ran.returncode == 0, ran.stderr
        assert f"--config {cfgs / name}.yaml" in (tmp_path / "midtrain.log").read_text().splitlines()[-1]


@pytest.mark.parametrize(("signal_arg", "code", "said"), [
    ("--signal=B:USR1@60", 0, "reaches only the batch shell"),
    ("--signal=TERM@60", 2, "handle SIGUSR1"),
])
def test_submit_checks_the_signal(env, signal_arg, code, said):
    site = Path(env["MIDTRAIN_SITE"])
    request = f"PRETRAIN_SBATCH_ARGS=({signal_arg})"
    site.write_text(site.read_text().replace("PRETRAIN_SBATCH_ARGS=(--nodes=2)", request))
    out = bash("submit.sh", "pretrain", "--dry-run", str(TIMING[0]), env=env)
    assert out.returncode == code and said in out.stderr


@pytest.mark.parametrize(("time_arg", "warned"), [("--time=00:02:00", True), ("-t 3", True), ("--time=1-00", False),
                                                  ("--time=10:00", False)])
def test_submit_warns_when_the_time_limit_barely_exceeds_the_signal_lead(env, time_arg, warned):
    """--time=00:02:00 with USR1@120: signalled right at the start of every attempt, the run crawls."""
    site = Path(env["MIDTRAIN_SITE"])
    site.write_text(site.read_text().replace("PRETRAIN_SBATCH_ARGS=(--nodes=2)", f"PRETRAIN_SBATCH_ARGS=({time_arg})"))
    out = bash("submit.sh", "pretrain", "--dry-run", str(TIMING[0]), env=env)
    assert out.returncode == 0, out.stderr
    assert ("requeued about" in out.stderr) == warned
