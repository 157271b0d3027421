"""`submit.sh evaluate --tasks` on the real local SLURM: one array task per checkpoint, each writing its own part
CSV, and one merge job after the array adding the rows to the CSV once; a preempted task is requeued and a
resubmission adds no row. Skipped (or an error with MIDTRAIN_REQUIRE_SLURM=1) as tests/test_slurm.py says.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import yaml

from midtrain.eval.benchmarks import write_choice_task
from tests.test_benchmarks import world  # noqa: F401  (the tiny trained run: step-2, step-4, final)
from tests.test_slurm import REPO, Cluster, assert_ok, preempt_and_requeue, task_started, wait_done, wait_until

pytestmark = pytest.mark.slow


def write_site(root: Path) -> Path:
    site = root / "site-bench.sh"
    site.write_text(
        "SITE_SBATCH_ARGS=(--export=NONE)\n"
        "EVALUATE_SBATCH_ARGS=(--nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --time=00:15:00)\n"
        f"MIDTRAIN_ROOT={root}\nMIDTRAIN_LOG_DIR={root}/logs\n"
        "site_activate() {\n"
        f'    export PATH="{Path(sys.executable).parent}:$PATH" PYTHONPATH="{REPO}" OMP_NUM_THREADS=1 '
        "TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1\n"
        "}\n"
    )
    return site


def rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def submit_and_wait(
    cluster: Cluster, site: Path, config: Path, overrides: tuple[str, ...], preempt: bool, checkpoints: list[str]
) -> str:
    job = cluster.submit(site, "evaluate", str(config), overrides=overrides)
    job_dir = cluster.root / "logs" / f"evaluate-{job}"
    items = (job_dir / "configs.txt").read_text().splitlines()
    assert [Path(i.split("\t")[1]).name for i in items] == checkpoints
    merge = (job_dir / "merge_job_id").read_text().strip()
    cluster.jobs.append(merge)
    if preempt:  # the preemption signal once the task's step runs: evaluate finishes its task (or never started)
        wait_until("task.sh's start", lambda: task_started(cluster, f"{job}_1"), cluster, f"{job}_1")
        preempt_and_requeue(cluster, f"{job}_1", restarts=1)
    for i in range(len(checkpoints)):
        assert_ok(cluster, f"{job}_{i}", restarts=int(preempt and i == 1))
    done = wait_done(cluster, f"{merge}_0")
    assert (done["JobState"], done["ExitCode"]) == ("COMPLETED", "0:0"), (job_dir / f"merge-{merge}_0.out").read_text()
    return job


def merge_log(root: Path, job: str) -> str:
    job_dir = root / "logs" / f"evaluate-{job}"
    return (job_dir / f"merge-{(job_dir / 'merge_job_id').read_text().strip()}_0.out").read_text()


def test_array_over_checkpoints_merges_rows_once(world, tmp_path_factory):  # noqa: F811
    root = tmp_path_factory.mktemp("bench_slurm")
    cluster = Cluster(root)
    try:
        tasks = root / "tasks"
        write_choice_task(world["sft"], tasks, "local_choice")
        config = root / "bench.yaml"
        config.write_text(yaml.safe_dump({
            "checkpoints": [str(world["run"] / "step-*"), str(world["run"] / "final")], "out": "eval/bench.csv",
            "accelerator": "cpu", "batch_size": 4}))  # fmt: skip
        overrides = ("--tasks", "local_choice", "--include_path", str(tasks), "--limit", "6")
        site = write_site(root)
        out = root / "eval/bench.csv"

        first = submit_and_wait(cluster, site, config, overrides, True, ["final", "step-00000002", "step-00000004"])
        got = rows(out)
        keys = [(Path(r["checkpoint"]).name, r["set"], r["metric"]) for r in got]
        assert sorted(keys) == sorted(
            (c, "local_choice", m) for c in ("final", "step-00000002", "step-00000004") for m in ("acc", "acc_norm"))
        assert all(r["value"] and r["stderr"] for r in got)
        assert not list(out.parent.glob("bench.part-*.csv"))  # merged, then deleted
        log = cluster.log(f"{first}_1")
        assert f"requeueing job {first}_1" in log and f"--part {first}_1" in log

        final = ("--checkpoints", str(world["run"] / "final"))  # a resubmission (one task is enough): nothing new
        again = submit_and_wait(cluster, site, config, (*overrides, *final), False, ["final"])
        assert rows(out) == got
        assert merge_log(root, first).count(": 6 new row(s)") == 1 and ": 0 new row(s)" in merge_log(root, again)
    finally:
        cluster.cancel_all()
