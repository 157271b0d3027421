"""Shared by the training benchmarks: run a command in a fresh process and read its peak memory.

``run_module("litgpt", ["pretrain", ...])`` runs ``python -m litgpt pretrain ...`` under a small
wrapper that records the peak memory of the training steps: a thread watches the run's log file and,
once it holds ``after`` lines (start-up and compilation are over), resets the process's peak RSS
(``/proc/self/clear_refs``) and CUDA's peak counter; at exit the wrapper writes the peak RSS since
then (``VmHWM``), the whole process's (``ru_maxrss``) and, with CUDA, ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

_WRAPPER = """
import atexit, glob, json, re, resource, runpy, sys, threading, time
report, log_glob, after, module = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
state = {"reset": False}
def status_mb(field):
    return int(re.search(field + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024
def watch():
    while True:
        files = glob.glob(log_glob)
        if files and len(open(files[0]).readlines()) >= after:
            state["rss_at_reset_mb"] = status_mb("VmRSS")
            open("/proc/self/clear_refs", "w").write("5")
            torch = sys.modules.get("torch")
            if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
                torch.cuda.reset_peak_memory_stats()
            state["reset"] = True
            return
        time.sleep(0.02)
threading.Thread(target=watch, daemon=True).start()
def write():
    out = {"process_peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
           "step_peak_rss_mb": status_mb("VmHWM"), **state}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
    with open(report, "w") as f:
        json.dump(out, f)
atexit.register(write)
sys.argv = [module, *sys.argv[5:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_module(
    module: str, args: list[str], what: str, log_glob: str, after: int, threads: int | None = None
) -> tuple[str, dict[str, float]]:
    """``python -m module *args``: its stdout and peak memory in MiB.

    The step peak is measured from the moment the newest file matching ``log_glob`` has ``after``
    lines. ``threads`` sets ``OMP_NUM_THREADS`` for the run.
    """
    env = dict(os.environ)
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "peak.json"
        out = subprocess.run(
            [sys.executable, "-c", _WRAPPER, str(report), log_glob, str(after), module, *args],
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        if out.returncode:
            raise SystemExit(f"{what} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}")
        peak = json.loads(report.read_text())
    if not peak["reset"]:
        raise SystemExit(f"{what}: its log {log_glob} never reached {after} lines; no step peak measured.")
    return out.stdout, peak


def peak_mb(peak: dict[str, float]) -> tuple[float, float]:
    """The figures to compare: the steps' peak, and its growth over the memory held when the steps began.

    GPU memory when the run used a GPU, else resident memory (whose level at the start of the steps also
    holds each program's imports and compiled code, so the growth is the fairer CPU comparison).
    """
    if "peak_cuda_mb" in peak:
        return peak["peak_cuda_mb"], float("nan")
    return peak["step_peak_rss_mb"], peak["step_peak_rss_mb"] - peak["rss_at_reset_mb"]


def print_table(title: str, rows: dict[str, list[tuple[float, tuple[float, float]]]], unit: str, baseline: str) -> None:
    """Per command: median throughput, peak memory and its growth during the steps over rounds, every round's
    throughput, and the throughput ratio to ``baseline``."""
    print(f"\n{title}")
    print(f"{'command':<30} {unit:>10} {'peak MiB':>9} {'growth MiB':>10} {'vs ' + baseline:>24}   rounds ({unit})")
    base = statistics.median(v for v, _ in rows[baseline])
    for name, values in rows.items():
        speed = statistics.median(v for v, _ in values)
        memory = statistics.median(m for _, (m, _) in values)
        growth = statistics.median(g for _, (_, g) in values)
        print(
            f"{name:<30} {speed:>10,.1f} {memory:>9,.0f} {growth:>10,.0f} {speed / base:>23.3f}x   "
            + ", ".join(f"{v:,.1f}" for v, _ in values)
        )
