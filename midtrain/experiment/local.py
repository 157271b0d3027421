"""``midtrain experiment run``: the graph on this machine, up to ``jobs`` processes at once.

Each node runs as ``python -m midtrain <command> --config <generated config>`` (the CLI's own code
path) with its output in ``<root>/logs/<node>.log``, as soon as every node it depends on is done.
Done nodes are skipped; a failing node stops only its dependents, and the run ends with an error
naming each failed node's log.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from midtrain.errors import MidtrainError
from midtrain.experiment.generate import Plan, write
from midtrain.experiment.status import is_done, read_jobs, write_jobs


def log_path(p: Plan, name: str) -> Path:
    return p.exp.root / "logs" / f"{name}.log"


def run_local(p: Plan, jobs: int = 1) -> None:
    if jobs < 1:
        raise MidtrainError(f"--jobs must be >= 1, got {jobs}.")
    write(p)
    records = read_jobs(p)
    done = {n.name for n in p.nodes if is_done(n, p)}
    pending = [n for n in p.nodes if n.name not in done]
    failed: dict[str, str] = {}
    running: dict[str, subprocess.Popen] = {}
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    start = time.perf_counter()
    print(f"experiment {p.exp.name}: {len(p.nodes)} nodes, {len(done)} done, {len(pending)} to run, "
          f"{jobs} at once", flush=True)
    while pending or running:
        blocked = [n for n in pending if any(d in failed for d in n.deps)]
        for n in blocked:
            pending.remove(n)
            failed[n.name] = "not started: a dependency failed"
        ready = [n for n in pending if all(d in done for d in n.deps)]
        for node in ready[: jobs - len(running)]:
            pending.remove(node)
            log = log_path(p, node.name)
            log.parent.mkdir(parents=True, exist_ok=True)
            cmd = [sys.executable, "-m", "midtrain", node.command, "--config", str(node.config)]
            with open(log, "w", encoding="utf-8") as f:
                f.write(f"$ midtrain {node.command} --config {node.config}\n")
                f.flush()
                proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
            running[node.name] = proc
            records[node.name] = {"executor": "local", "pid": proc.pid, "log": str(log), "rc": None}
            write_jobs(p, records)
            print(f"[{time.perf_counter() - start:6.0f} s] start {node.name} ({node.kind})", flush=True)
        if not running:
            break
        time.sleep(0.2)
        for name, proc in list(running.items()):
            rc = proc.poll()
            if rc is None:
                continue
            del running[name]
            records[name]["rc"] = rc
            write_jobs(p, records)
            node = p.node(name)
            if rc == 0 and is_done(node, p):
                done.add(name)
                print(f"[{time.perf_counter() - start:6.0f} s] done  {name}", flush=True)
            else:
                failed[name] = f"exit status {rc}; log: {records[name]['log']}"
                print(f"[{time.perf_counter() - start:6.0f} s] FAILED {name}: {failed[name]}", flush=True)
    if failed:
        first = [f"{k} ({v})" for k, v in failed.items() if "dependency" not in v]
        raise MidtrainError(f"experiment {p.exp.name}: {len(failed)} node(s) not done; failed: {'; '.join(first)}.")
    print(f"experiment {p.exp.name}: all {len(p.nodes)} nodes done in {time.perf_counter() - start:.0f} s", flush=True)
