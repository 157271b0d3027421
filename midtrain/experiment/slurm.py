"""``midtrain experiment submit``: every node that is neither done nor queued, as a SLURM job.

Each node is one ``training_scripts/submit.sh <command> <generated config>`` job (the site file's
resources, preemption and requeue as for any job) with ``--dependency=afterok:<its dependencies'
jobs>`` and ``--kill-on-invalid-dep=yes``: SLURM starts it when they succeed and cancels it when
one fails, so nothing of ours stays alive and no job holds a GPU while it waits. The base run is a
chain of segment jobs, each stopping at the next branch step, so a branch starts as soon as its
checkpoint exists.

Resubmitting is safe: done nodes are skipped, queued or running ones kept (their job IDs become
the dependencies), failed and cancelled ones submitted again; a queued node whose dependency is
submitted again is cancelled and submitted again behind it.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

from midtrain.errors import MidtrainError
from midtrain.experiment.generate import Plan, write
from midtrain.experiment.status import read_jobs, states, write_jobs

SCRIPTS = Path(__file__).resolve().parents[2] / "training_scripts"


def _env(site: Path | None) -> dict[str, str]:
    env = dict(os.environ)
    if site is not None:
        env["MIDTRAIN_SITE"] = str(Path(site).resolve())
    return env


def site_paths(site: Path | None) -> tuple[Path, Path]:
    """(MIDTRAIN_ROOT, MIDTRAIN_LOG_DIR) as the site file sets them."""
    script = (f'MIDTRAIN_REPO={SCRIPTS.parent}; source "$MIDTRAIN_REPO/training_scripts/lib.sh"; load_site; '
              'echo "$MIDTRAIN_ROOT"; echo "$MIDTRAIN_LOG_DIR"')
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True, env=_env(site), timeout=60)
    if out.returncode != 0:
        raise MidtrainError((out.stderr.strip().splitlines() or ["cannot read the site file"])[-1])
    root, logs = out.stdout.strip().splitlines()[-2:]
    return Path(root), Path(logs)


def _sbatch(node_command: str, config: Path, job_name: str, deps: list[str], site: Path | None) -> str:
    extra = [f"--sbatch=--job-name={job_name}"]
    if deps:
        extra += [f"--sbatch=--dependency=afterok:{':'.join(deps)}", "--sbatch=--kill-on-invalid-dep=yes"]
    cmd = ["bash", str(SCRIPTS / "submit.sh"), node_command, *extra, str(config.resolve())]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(site), timeout=120)
    found = re.search(rf"Submitted {node_command} job (\d+)", out.stdout)
    if out.returncode != 0 or not found:
        why = (out.stderr.strip().splitlines() or out.stdout.strip().splitlines() or ["no output"])[-1]
        raise MidtrainError(f"submitting {job_name} failed: {why}")
    merge = re.search(rf"Submitted {node_command} merge job (\d+)", out.stdout)  # evaluate --tasks: parts, then merge
    return (merge or found).group(1)  # dependents wait for the job that writes the node's output


def submit(p: Plan, site: Path | None = None) -> list[str]:
    """Submit what is needed; return the names of the nodes submitted now."""
    root, log_dir = site_paths(site)
    if root.resolve() != Path.cwd().resolve():
        raise MidtrainError(f"jobs run in MIDTRAIN_ROOT {root} (the site file) and the experiment's paths are "
                            f"relative to it: run `midtrain experiment submit` there, not in {Path.cwd()}.")
    write(p)
    current = {s.name: s for s in states(p)}
    records = read_jobs(p)
    ids: dict[str, str] = {}
    submitted: list[str] = []
    for node in p.nodes:
        st = current[node.name]
        if st.state == "done":
            continue
        again = [d for d in node.deps if d in submitted]
        if st.state in ("running", "pending", "waiting") and not again:
            ids[node.name] = st.job
            continue
        if st.state in ("pending", "waiting"):
            subprocess.run(["scancel", st.job], capture_output=True, timeout=60)
        deps = [ids[d] for d in node.deps if d in ids]
        job = _sbatch(node.command, node.config, f"{p.exp.name}:{node.name}", deps, site)
        ids[node.name] = job
        records[node.name] = {"executor": "slurm", "job": job,
                              "log": str(log_dir / f"{node.command}-{job}" / f"{job}_0.out")}
        write_jobs(p, records)
        submitted.append(node.name)
        print(f"submitted {node.name} ({node.kind}) as job {job}" + (f" after {', '.join(deps)}" if deps else ""),
              flush=True)
    kept = len(ids) - len(submitted)
    print(f"experiment {p.exp.name}: {len(submitted)} job(s) submitted, {kept} already queued or running, "
          f"{len(p.nodes) - len(ids)} done.", flush=True)
    return submitted
