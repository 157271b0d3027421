"""training_scripts/ on a real SLURM cluster: jobs submitted with submit.sh, as a user would.

Runs when ``sbatch`` is on the PATH and a node answers (``.ci/run`` starts a one-node cluster with
``util_scripts/local_slurm.sh``; see README, "SLURM"); skipped with the reason otherwise, or an
error when ``MIDTRAIN_REQUIRE_SLURM=1`` (CI sets it once the cluster is up). The site file submits with
``--export=NONE`` from a directory outside the repository, so the environment must be set up inside
the tasks and every script path must be absolute. Preemption is ``scancel --signal=USR1`` (what
``--signal=USR1@120`` sends at the time limit); SLURM's requeue delay is skipped with
``scontrol update JobId=... StartTime=now``.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # spawns SLURM scripts in subprocesses

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / "training_scripts"
TINY = REPO / "midtrain_configs/tiny"
WAIT = 300  # seconds any one job may take on a loaded 2-core machine


def _cluster_problem() -> str | None:
    if shutil.which("sbatch") is None:
        return "no sbatch on the PATH"
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    states = out.stdout.split()
    if out.returncode != 0 or not any(s.rstrip("*~#") in ("idle", "mixed", "allocated") for s in states):
        return f"no usable node (sinfo: {out.stdout.strip() or out.stderr.strip()})"
    return None


PROBLEM = _cluster_problem()
if PROBLEM is not None:
    if os.environ.get("MIDTRAIN_REQUIRE_SLURM") == "1":
        raise RuntimeError(f"MIDTRAIN_REQUIRE_SLURM=1 but the SLURM cluster is not usable: {PROBLEM}")
    pytest.skip(f"SLURM integration tests skipped: {PROBLEM}. Start a local cluster with "
                "`sudo bash util_scripts/local_slurm.sh start` (README, SLURM).", allow_module_level=True)

_NODE = subprocess.run(["sinfo", "-h", "-o", "%G %c"], capture_output=True, text=True).stdout.split()
GPUS = 2 if "gpu:2" in _NODE[0] else 0  # local_slurm.sh's fake GPUs: --gpus-per-node as on a GPU node
CPUS = int(_NODE[1].rstrip("+"))


# ---------------------------------------------------------------------------------------------- helpers
class Cluster:
    """Submits through training_scripts/submit.sh into one MIDTRAIN_ROOT; cancels its jobs at the end."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.jobs: list[str] = []

    def site(self, name: str, ntasks: int = 1, gpus: int = 0, extra: str = "") -> Path:
        bin_dir = Path(sys.executable).parent
        resources = f"--nodes=1 --ntasks-per-node={ntasks} --cpus-per-task=1 --time=00:15:00"
        if gpus:
            resources += f" --gpus-per-node={gpus}"
        path = self.root / f"site-{name}.sh"
        path.write_text(
            "SITE_SBATCH_ARGS=(--export=NONE)\n"  # nothing of the submitting shell reaches the job
            + "".join(f"{k}_SBATCH_ARGS=({resources} {extra})\n" for k in ("PRETRAIN", "FINETUNE", "EVALUATE"))
            + f"MIDTRAIN_ROOT={self.root}\nMIDTRAIN_LOG_DIR={self.root}/logs\n"
            "site_activate() {\n"
            f'    export PATH="{bin_dir}:$PATH" PYTHONPATH="{REPO}" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false\n'
            "}\n"
        )
        return path

    def submit(self, site: Path, kind: str, *configs: str, overrides: tuple[str, ...] = ()) -> str:
        elsewhere = self.root / "elsewhere"  # not the repository, not MIDTRAIN_ROOT
        elsewhere.mkdir(exist_ok=True)
        env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MIDTRAIN_"))},
               "MIDTRAIN_SITE": str(site)}
        out = subprocess.run(["bash", str(SCRIPTS / "submit.sh"), kind, *configs, "--", *overrides], env=env,
                             cwd=elsewhere, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stdout + out.stderr
        job = re.search(rf"Submitted {kind} job (\d+)", out.stdout).group(1)
        self.jobs.append(job)
        return job

    def log(self, task: str) -> str:
        """The task's SLURM output, in the job's log directory (submit.sh links KIND-JOBID to it)."""
        job, index = task.split("_")
        found = [p / f"{job}_{index}.out" for p in (self.root / "logs").glob(f"*-{job}") if p.is_symlink()]
        return found[0].read_text() if found and found[0].exists() else f"(no log for {task})"

    def cancel_all(self) -> None:
        if self.jobs:
            subprocess.run(["scancel", *self.jobs], capture_output=True)


def state(task: str) -> dict[str, str]:
    """``scontrol show job`` of one array task (JOB_INDEX) as a dict."""
    out = subprocess.run(["scontrol", "-o", "show", "job", task], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return dict(re.findall(r"(\w+)=(\S*)", out.stdout))


ENDED = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE")


def wait_until(what: str, check, cluster: Cluster, task: str, timeout: float = WAIT, end_ok: bool = False) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if check():
            return
        if not end_ok and state(task)["JobState"] in ENDED:
            break
        time.sleep(0.3)
    pytest.fail(f"no {what} of {task}: {state(task)}\n--- log ---\n{cluster.log(task)}")


def wait_done(cluster: Cluster, task: str) -> dict[str, str]:
    wait_until("end", lambda: state(task)["JobState"] in ENDED, cluster, task, end_ok=True)
    return state(task)


def task_started(cluster: Cluster, task: str) -> bool:
    """task.sh said it started (its SIGUSR1 trap is set) in the task's first attempt, and its job step exists:
    only steps get --signal / scancel --signal, never a job without one."""
    if "midtrain-sbatch: task 0 started" not in cluster.log(task):
        return False
    out = subprocess.run(["squeue", "-h", "-s", "-o", "%i"], capture_output=True, text=True, timeout=30).stdout
    return re.search(rf"^{re.escape(task)}\.\d+$", out, re.MULTILINE) is not None


def preempt_and_requeue(cluster: Cluster, task: str, restarts: int) -> None:
    """What SLURM does at --signal=USR1@T: signal every task; then skip the requeue delay."""
    subprocess.run(["scancel", "--signal=USR1", task], check=True)
    wait_until(f"requeue #{restarts}", lambda: state(task)["JobState"] == "PENDING"
               and int(state(task)["Restarts"]) == restarts, cluster, task)
    # slurmd refuses a relaunch whose credential is from the same second as the kill ("Job N already killed,
    # do not launch batch job" -> FAILED): part of why SLURM delays requeued jobs. Skip the delay, not that.
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"JobId={task}", "StartTime=now"], check=True)


def records(out: Path) -> list[dict]:
    """Complete rows of metrics.jsonl with a training loss (a row being written is not one yet)."""
    path = out / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return [r for r in rows if "loss" in r]


def logged_steps(out: Path) -> list[int]:
    return [r["step"] for r in records(out)]


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in records(out)}


def reached_step(out: Path, step: int) -> bool:
    return any(s >= step for s in logged_steps(out))


def assert_ok(cluster: Cluster, task: str, restarts: int) -> None:
    s = wait_done(cluster, task)
    assert (s["JobState"], s["ExitCode"], int(s["Restarts"])) == ("COMPLETED", "0:0", restarts), cluster.log(task)


def short_sft_set(root: Path) -> None:
    """SFT examples short enough for the tiny model's 128-token context (the demo's, at this small scale, are not)."""
    words = ["apple", "banana", "cherry", "plum", "seven", "three", "add", "sum", "list", "sort"]
    records = [{"instruction": f"{words[i % 10]} {words[(3 * i) % 10]}", "input": "",
                "output": " ".join(words[(i + k) % 10] for k in range(1 + i % 5))} for i in range(48)]
    sft = root / "data/demo/sft"
    (sft / "code_sft.json").write_text(json.dumps(records))
    (sft / "code_sft_val.json").write_text(json.dumps(records[:8]))


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """MIDTRAIN_ROOT with the demo corpus (data/demo, small scale) and the tiny configs' layout."""
    from midtrain.demo.corpus import build_demo_corpus

    root = tmp_path_factory.mktemp("slurm_root")
    build_demo_corpus(root / "data/demo", scale=0.05)
    short_sft_set(root)
    c = Cluster(root)
    yield c
    c.cancel_all()


@pytest.fixture(scope="module")
def array(cluster):
    """An array over a glob of two tiny pretrain configs; task 1 preempted while task 0 runs on."""
    if CPUS < 2:
        pytest.skip(f"the SLURM tests need a node with 2 CPUs (two tasks at once); this one has {CPUS}")
    cfgs = cluster.root / "cfgs"
    cfgs.mkdir()
    shutil.copy(TINY / "pretrain.yaml", cfgs / "b-pretrain.yaml")
    shutil.copy(TINY / "stages.yaml", cfgs / "c-stages.yaml")
    site = cluster.site("array", extra="--hold")  # held, so the glob can change before any task starts
    job = cluster.submit(site, "pretrain", f"{cfgs}/*.yaml", overrides=("--train.log_interval", "1"))
    (cfgs / "a-late.yaml").write_text((TINY / "pretrain.yaml").read_text().replace("out/tiny/pretrain", "out/late"))
    subprocess.run(["scontrol", "release", job], check=True)
    stages = cluster.root / "out/tiny/stages"
    wait_until("task 1 training", lambda: reached_step(stages, 2), cluster, f"{job}_1")
    assert state(f"{job}_0")["JobState"] == "RUNNING"  # the sibling runs while task 1 is preempted
    preempt_and_requeue(cluster, f"{job}_1", restarts=1)
    for i in (0, 1):
        wait_done(cluster, f"{job}_{i}")
    return job


# ---------------------------------------------------------------------------------------------- tests
def test_array_runs_the_frozen_config_list_and_requeues_only_the_preempted_task(cluster, array):
    root, job = cluster.root, array
    assert_ok(cluster, f"{job}_0", restarts=0)  # untouched: never requeued, never cancelled
    assert_ok(cluster, f"{job}_1", restarts=1)
    log0, log1 = cluster.log(f"{job}_0"), cluster.log(f"{job}_1")
    assert "config 1 of 2: " in log0 and "b-pretrain.yaml" in log0 and "requeueing" not in log0
    assert "Preemption signal" not in log0
    assert "config 2 of 2: " in log1 and "c-stages.yaml" in log1
    assert f"requeueing job {job}_1" in log1 and "Resumed from out/tiny/stages/step-" in log1
    assert not (root / "out/late").exists()  # added to the glob after submission: not run, nothing shifted
    frozen = (root / "logs" / f"pretrain-{job}" / "configs.txt").read_text().split()
    assert [Path(p).name for p in frozen] == ["b-pretrain.yaml", "c-stages.yaml"]
    for run in ("pretrain", "stages"):
        assert logged_steps(root / "out/tiny" / run) == list(range(1, 41)), run  # each step once
        assert json.loads((root / "out/tiny" / run / "summary.json").read_text())["step"] == 40


def test_single_process_preempted_before_and_during_training_resumes_exactly(cluster, array):
    out = cluster.root / "out/preempt1"
    site = cluster.site("single")
    job = cluster.submit(site, "pretrain", str(TINY / "pretrain.yaml"),
                         overrides=("--out_dir", "out/preempt1", "--train.log_interval", "1"))
    task = f"{job}_0"
    # 1. as soon as its step runs: the process is still starting (imports, data, model) -> checkpoint or clean requeue
    wait_until("task.sh's start", lambda: task_started(cluster, task), cluster, task)  # its trap is set
    preempt_and_requeue(cluster, task, restarts=1)
    # 2. in the middle of training
    wait_until("training after the requeue", lambda: reached_step(out, 8), cluster, task)
    preempt_and_requeue(cluster, task, restarts=2)
    assert_ok(cluster, task, restarts=2)
    log = cluster.log(task)
    assert log.count("requeueing job") == 2 and "Preemption signal: checkpoint written" in log
    assert logged_steps(out) == list(range(1, 41))
    assert losses(out) == losses(cluster.root / "out/tiny/pretrain")  # bit-identical to the array's run
    states = [json.loads(p.read_text()) for p in sorted(out.glob("step-*/train_state.json"))]
    preempted = [s for s in states if s["reason"] == "preempted"]
    assert preempted, [s["reason"] for s in states]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 40 and summary["train_seconds"] > max(s["train_seconds"] for s in preempted) > 0


def test_two_task_job_preempted_ends_75_as_a_whole_and_resumes(cluster, array):
    """srun --kill-on-bad-exit=1 and 2 ranks: a preempted step is requeued, never FAILED with 143."""
    out = cluster.root / "out/ddp2"
    site = cluster.site("ddp", ntasks=2, gpus=GPUS)
    job = cluster.submit(site, "pretrain", str(TINY / "pretrain.yaml"),
                         overrides=("--out_dir", "out/ddp2", "--train.log_interval", "1"))
    task = f"{job}_0"
    wait_until("training", lambda: reached_step(out, 3), cluster, task)
    preempt_and_requeue(cluster, task, restarts=1)
    assert_ok(cluster, task, restarts=1)
    log = cluster.log(task)
    assert "srun --kill-on-bad-exit=1" in log and "--devices 2 --num_nodes 1" in log
    assert "Preemption signal: checkpoint written" in log and "Resumed from out/ddp2/step-" in log
    assert logged_steps(out) == list(range(1, 41))
    state_ = json.loads(sorted(out.glob("step-*/train_state.json"))[-1].read_text())
    assert state_["world_size"] == 2 and state_["step"] == 40
    single = losses(cluster.root / "out/tiny/pretrain")  # the array's uninterrupted run: same global batch, 1 process
    assert losses(out) == pytest.approx(single, rel=1e-5)


def test_finetune_and_evaluate_jobs(cluster, array):
    root = cluster.root
    ft_site, ev_site = cluster.site("finetune"), cluster.site("evaluate")
    finetune = cluster.submit(ft_site, "finetune", str(TINY / "finetune-code.yaml"), overrides=(
        "--checkpoint_dir", "out/tiny/pretrain/step-00000040", "--train.max_steps", "10"))
    checkpoints = "[out/tiny/pretrain/step-00000020,out/tiny/pretrain/step-00000040]"
    evaluate = cluster.submit(ev_site, "evaluate", str(TINY / "evaluate.yaml"),
                              overrides=("--checkpoints", checkpoints))
    task = f"{evaluate}_0"
    wait_until("task.sh's start", lambda: task_started(cluster, task), cluster, task)
    preempt_and_requeue(cluster, task, restarts=1)  # evaluate.sbatch asks for USR1: evaluate handles it
    assert_ok(cluster, task, restarts=1)
    assert_ok(cluster, f"{finetune}_0", restarts=0)
    rows = (root / "out/tiny/eval.csv").read_text().splitlines()[1:]
    keys = [tuple(r.split(",")[i] for i in (0, 3)) for r in rows]
    assert len(keys) == 8 and len(set(keys)) == 8  # 2 checkpoints x 4 sets, each row once across attempts
    summary = json.loads((root / "out/tiny/sft/midtrain-code20/code/summary.json").read_text())
    assert summary["step"] == 10 and "main" in summary["val"]


def test_rank_exiting_75_first_no_longer_fails_the_step(cluster):
    """With --kill-on-bad-exit=1, rank 0 exiting 75 first got rank 1 killed: the step ended 143 (FAILED)."""
    if CPUS < 2:
        pytest.skip(f"needs 2 CPUs for a 2-task step; the node has {CPUS}")
    done = cluster.root / "ranks"
    done.mkdir()
    late_rank = f'[ "$SLURM_PROCID" = 1 ] && sleep 3; touch {done}/rank-$SLURM_PROCID; exit 75'
    srun = ["srun", "-n2", "--cpus-per-task=1", "--kill-on-bad-exit=1"]
    bare = subprocess.run([*srun, "bash", "-c", late_rank], capture_output=True, text=True, timeout=120)
    assert bare.returncode != 75 and not (done / "rank-1").exists()  # the hazard: rank 1 killed mid-"save"
    (done / "rank-0").unlink()
    marker = cluster.root / "logs/.preempted-srun"
    task = ["bash", str(SCRIPTS / "task.sh"), f"--repo={REPO}", f"--site={cluster.site('srun')}", f"--marker={marker}"]
    wrapped = subprocess.run([*srun, *task, "--", "bash", "-c", late_rank], capture_output=True, text=True, timeout=120)
    assert wrapped.returncode == 0, wrapped.stderr  # the step ends well as a whole; the marker asks for a requeue
    assert marker.exists() and sorted(p.name for p in done.iterdir()) == ["rank-0", "rank-1"]
