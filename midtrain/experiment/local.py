"""``midtrain experiment run``: the graph on this machine, up to ``jobs`` processes at once.

Each node runs as ``python -m midtrain <command> --config <generated config>`` (the CLI's own code
path) with its output in ``<root>/logs/<node>.log``, as soon as every node it depends on is done.
Done nodes are skipped; a failing node stops only its dependents, and the run ends with an error
naming each failed node's log. ``reuse_processes``: nodes run in ``jobs`` long-lived worker processes
instead (``midtrain.cli.run`` in each, the same code path), so torch and litgpt are imported once per
worker, not once per node: on small models (the demo) that start-up is a large part of the time.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import traceback
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import redirect_stderr, redirect_stdout
from multiprocessing import get_context
from pathlib import Path

from midtrain.errors import MidtrainError
from midtrain.experiment.generate import Plan, write
from midtrain.experiment.status import is_done, read_jobs, write_jobs


def log_path(p: Plan, name: str) -> Path:
    return p.exp.root / "logs" / f"{name}.log"


def _in_worker(command: str, config: str, log: str, threads: int) -> int:
    """In a worker process: ``midtrain <command> --config <config>`` with its output appended to ``log``."""
    import torch

    from midtrain.cli import run

    torch.set_num_threads(threads)
    with open(log, "a", encoding="utf-8") as f, redirect_stdout(f), redirect_stderr(f):
        try:
            run(command, ["--config", config])
        except SystemExit as e:
            return e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 (the node fails; its log holds why)
            traceback.print_exc()
            return 1
    return 0


class _Pool:
    """Nodes as futures on ``jobs`` spawned workers, with ``poll()`` like ``Popen``."""

    TASKS_PER_WORKER = 8
    """A worker is replaced after this many nodes (bounds what a long-lived process accumulates)."""

    def __init__(self, jobs: int) -> None:
        self.jobs, self.threads = jobs, max(1, (os.cpu_count() or 1) // jobs)
        self.pool = self._new()

    def _new(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.jobs, mp_context=get_context("spawn"),
                                   max_tasks_per_child=self.TASKS_PER_WORKER)

    def start(self, command: str, config: str, log: str) -> _Future:
        try:
            future = self.pool.submit(_in_worker, command, config, log, self.threads)
        except BrokenProcessPool:  # a worker was killed (its node failed); later nodes get a fresh pool
            self.pool.shutdown(wait=False)
            self.pool = self._new()
            future = self.pool.submit(_in_worker, command, config, log, self.threads)
        return _Future(future)


class _Future:
    def __init__(self, future: Future) -> None:
        self.future, self.pid = future, os.getpid()

    def poll(self) -> int | None:
        if not self.future.done():
            return None
        try:
            return self.future.result()
        except BaseException:  # noqa: BLE001 (a worker that died)
            return 1


def run_local(p: Plan, jobs: int = 1, reuse_processes: bool = False) -> None:
    """Run every node that is not done, ``jobs`` at once (see the module docstring)."""
    if jobs < 1:
        raise MidtrainError(f"--jobs must be >= 1, got {jobs}.")
    write(p)
    records = read_jobs(p)
    done = {n.name for n in p.nodes if is_done(n, p)}
    pending = [n for n in p.nodes if n.name not in done]
    failed: dict[str, str] = {}
    running: dict[str, subprocess.Popen | _Future] = {}
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    start = time.perf_counter()
    pool = _Pool(jobs) if reuse_processes else None
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
                proc = (pool.start(node.command, str(node.config), str(log)) if pool else
                        subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env))
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
    if pool:
        pool.pool.shutdown()
    if failed:
        first = [f"{k} ({v})" for k, v in failed.items() if "dependency" not in v]
        raise MidtrainError(f"experiment {p.exp.name}: {len(failed)} node(s) not done; failed: {'; '.join(first)}.")
    print(f"experiment {p.exp.name}: all {len(p.nodes)} nodes done in {time.perf_counter() - start:.0f} s", flush=True)
