"""``midtrain experiment submit`` of midtrain_configs/experiments/tiny.yaml on a real SLURM cluster.

Skipped (or an error under ``MIDTRAIN_REQUIRE_SLURM=1``) like tests/test_slurm.py, whose cluster
check it imports. One flow: the replay fine-tune is made to fail (its replay data is missing), so its
evaluation and the report never start and ``status`` names its log; a second submit while jobs are
queued submits nothing; the fixed file resubmits exactly the failed node and its dependents; every
node ends done; the earlier branch trained its first step before the base run's last; a last submit
submits nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_slurm import short_sft_set  # noqa: F401  (its import skips this module without a cluster)

pytestmark = pytest.mark.slow  # spawns CLI / training / DDP / SLURM processes (make test-fast skips it)

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "midtrain_configs/experiments/tiny.yaml"
FAILING = "code20-at10/sft-code-replay0.25-seed42"
WAIT = 900


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    from midtrain.demo.corpus import build_demo_corpus

    root = tmp_path_factory.mktemp("exp_slurm")
    build_demo_corpus(root / "data/demo", scale=0.05)
    short_sft_set(root)
    (root / "midtrain_configs").symlink_to(REPO / "midtrain_configs")
    bin_dir = Path(sys.executable).parent
    (root / "site.sh").write_text(
        "SITE_SBATCH_ARGS=(--export=NONE)\n"
        + "".join(f"{k}_SBATCH_ARGS=(--nodes=1 --ntasks-per-node=1 --cpus-per-task=1 --time=00:20:00)\n"
                  for k in ("PRETRAIN", "FINETUNE", "EVALUATE", "REPORT"))
        + f"MIDTRAIN_ROOT={root}\nMIDTRAIN_LOG_DIR={root}/logs\n"
        "site_activate() {\n"
        f'    export PATH="{bin_dir}:$PATH" PYTHONPATH="{REPO}" OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false\n'
        "}\n"
    )
    return root


def experiment(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "MIDTRAIN_"))},
           "MIDTRAIN_SITE": str(root / "site.sh"), "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "midtrain", "experiment", *args], cwd=root, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout + out.stderr
    return out


def statuses(root: Path, file: str) -> dict[str, dict]:
    return {s["name"]: s for s in json.loads(experiment(root, "status", file, "--json").stdout)}


def wait_settled(root: Path, file: str) -> dict[str, dict]:
    end = time.monotonic() + WAIT
    while time.monotonic() < end:
        st = statuses(root, file)
        if not any(s["state"] in ("running", "pending", "waiting") for s in st.values()):
            return st
        time.sleep(5)
    pytest.fail(f"experiment still busy after {WAIT} s: {json.dumps(st, indent=1)}")


def submitted(out: subprocess.CompletedProcess) -> list[str]:
    return [line.split()[1] for line in out.stdout.splitlines() if line.startswith("submitted ")]


def first_row_time(run: Path, last: bool = False) -> float:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    return rows[-1 if last else 0]["wall_time"]


def test_submit_tiny_experiment(root):
    spec = yaml.safe_load(TINY.read_text())
    spec["finetune"]["replay_data"]["data_path"] = "data/missing"  # only the replay fine-tune reads it
    (root / "broken.yaml").write_text(yaml.safe_dump(spec))
    try:
        first = experiment(root, "submit", "broken.yaml")
        assert len(submitted(first)) == 10, first.stdout
        again = experiment(root, "submit", "broken.yaml")  # queued or running: nothing new
        assert submitted(again) == [], again.stdout

        st = wait_settled(root, "broken.yaml")
        assert st[FAILING]["state"] == "failed", st[FAILING]
        log = Path(st[FAILING]["log"])
        assert "data/missing" in log.read_text()
        for dependent in (f"{FAILING}/eval", "report"):  # never started: no log, no output
            assert st[dependent]["state"] == "not submitted", st[dependent]
            assert not Path(st[dependent]["out_dir"]).exists()
            assert not Path(st[dependent]["log"]).exists()
        text = experiment(root, "status", "broken.yaml").stdout
        assert f"{FAILING}: failed" in text and str(log) in text
        assert sum(s["state"] == "done" for s in st.values()) == 7

        runs = root / "out/experiments/tiny/runs"  # the earlier branch started while the base still trained
        assert first_row_time(runs / "code20-at10") < first_row_time(runs / "base", last=True)

        fixed = experiment(root, "submit", str(TINY.relative_to(REPO)))
        assert submitted(fixed) == [FAILING, f"{FAILING}/eval", "report"], fixed.stdout
        st = wait_settled(root, str(TINY.relative_to(REPO)))
        assert {s["state"] for s in st.values()} == {"done"}, json.dumps(st, indent=1)
        assert (root / "out/experiments/tiny/report/report.md").is_file()
        last = experiment(root, "submit", str(TINY.relative_to(REPO)))
        assert submitted(last) == [], last.stdout
    finally:
        jobs = root / "out/experiments/tiny/jobs.json"
        if jobs.is_file():
            subprocess.run(["scancel", *(j["job"] for j in json.loads(jobs.read_text()).values())],
                           capture_output=True)
