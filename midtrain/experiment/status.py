"""Each node's state: from its output (the truth) and, while it is not done, from the executor's record.

``<root>/jobs.json`` keeps, per node, the last submission: ``{"executor": "slurm", "job": ID, "log":
PATH}`` or ``{"executor": "local", "pid": PID, "log": PATH, "rc": exit status or null}``. A node is
``done`` only when its output says so; the record only tells a node that is not done apart as
running / pending / waiting (queued behind a dependency) / failed / not submitted.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

from midtrain.experiment.generate import Plan
from midtrain.experiment.graph import Node
from midtrain.rundir import FINAL_DIR, MARKER_FILE, SUMMARY_FILE, checkpoint_name, is_complete, read_eval_rows

STATES = ("done", "running", "pending", "waiting", "failed", "not submitted")
ACTIVE_SLURM = {"PENDING": "pending", "RUNNING": "running", "REQUEUED": "pending", "CONFIGURING": "running",
                "COMPLETING": "running", "SUSPENDED": "running", "REQUEUE_HOLD": "pending", "REQUEUE_FED": "pending",
                "RESIZING": "running", "SIGNALING": "running", "STAGE_OUT": "running"}  # fmt: skip


@dataclass
class NodeState:
    name: str
    kind: str
    state: str
    out_dir: str
    job: str | None = None
    log: str | None = None
    detail: str = ""

    def as_dict(self) -> dict:
        return {"name": self.name, "kind": self.kind, "state": self.state, "out_dir": self.out_dir, "job": self.job,
                "log": self.log, "detail": self.detail}


def _summary_step(out: Path) -> int | None:
    path = out / SUMMARY_FILE
    try:
        return int(json.loads(path.read_text(encoding="utf-8"))["step"]) if path.is_file() else None
    except (ValueError, KeyError, TypeError):
        return None


def is_done(node: Node, p: Plan) -> bool:
    """What the node's output says: segments have their checkpoint, runs their summary and ``final/``,
    evaluations a row for every set, the report its ``report.md``."""
    out = node.out
    if node.kind == "pretrain" and node.name != node.owner:
        step = _summary_step(out)
        return is_complete(out / checkpoint_name(node.end_step)) or (step is not None and step >= node.end_step)
    if node.kind in ("pretrain", "branch", "finetune"):
        step = _summary_step(out)
        final = (out / FINAL_DIR / MARKER_FILE).is_file()
        return final and step is not None and (node.end_step is None or step >= node.end_step)
    if node.kind == "evaluate":
        sets = {row["set"] for row in read_eval_rows(out)} if out.is_file() else set()
        return set(p.exp.evaluate.val) <= sets
    return (out / "report.md").is_file()


def jobs_file(p: Plan) -> Path:
    return p.exp.root / "jobs.json"


def read_jobs(p: Plan) -> dict[str, dict]:
    path = jobs_file(p)
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def write_jobs(p: Plan, jobs: dict[str, dict]) -> None:
    path = jobs_file(p)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(jobs, indent=1, sort_keys=True))
    tmp.replace(path)


def slurm_jobs(ids: list[str]) -> dict[str, dict[str, str]]:
    """``scontrol show job`` of each job ID (an array job of one task: its task), keyed by the ID we submitted."""
    if not ids:
        return {}
    try:
        out = subprocess.run(["scontrol", "-o", "show", "job"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    found: dict[str, dict[str, str]] = {}
    for line in out.stdout.splitlines():
        fields = dict(re.findall(r"(\w+)=(\S*)", line))
        key = fields.get("ArrayJobId") or fields.get("JobId")
        if key in ids:
            found[key] = fields
    return found


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except (OSError, ValueError):
        return False
    return True


def states(p: Plan) -> list[NodeState]:
    """Every node's state, in the plan's order."""
    jobs = read_jobs(p)
    slurm = slurm_jobs([str(j["job"]) for j in jobs.values() if j.get("executor") == "slurm"])
    result: list[NodeState] = []
    by_name: dict[str, NodeState] = {}
    for node in p.nodes:
        rec = jobs.get(node.name, {})
        st = NodeState(node.name, node.kind, "not submitted", str(node.out), rec.get("job") or rec.get("pid"),
                       rec.get("log"))
        if st.job is not None:
            st.job = str(st.job)
        if is_done(node, p):
            st.state = "done"
        elif rec.get("executor") == "slurm":
            info = slurm.get(str(rec["job"]))
            job_state = (info or {}).get("JobState", "")
            reason = (info or {}).get("Reason", "")
            if info is None:
                st.state, st.detail = "failed", f"job {rec['job']} is unknown to SLURM and the node is not done"
            elif job_state in ACTIVE_SLURM:
                st.state = ACTIVE_SLURM[job_state]
                if st.state == "pending" and reason.startswith("Dependency"):
                    st.state = "waiting"
                    failed = [d for d in node.deps if by_name[d].state == "failed"]
                    if reason == "DependencyNeverSatisfied" or failed:
                        st.detail = f"never starts: dependency {', '.join(failed) or '?'} failed"
            elif job_state == "CANCELLED" and "Dependency" in reason:
                st.state, st.detail = "not submitted", "cancelled before it started: a dependency failed"
            else:
                st.state = "failed"
                st.detail = f"job {rec['job']} {job_state or 'ended'} (exit {info.get('ExitCode', '?')}) and the " \
                            "node is not done"
        elif rec.get("executor") == "local":
            if rec.get("rc") is None and _alive(int(rec.get("pid", 0))):
                st.state = "running"
            elif rec.get("rc") is None:
                st.state, st.detail = "failed", "its process ended without recording an exit status"
            else:
                st.state, st.detail = "failed", f"exit status {rec['rc']} and the node is not done"
        if st.state == "not submitted":
            blocked = [d for d in node.deps if by_name[d].state == "failed"]
            if blocked:
                st.detail = st.detail or f"blocked: dependency {', '.join(blocked)} failed"
        result.append(st)
        by_name[node.name] = st
    return result


def table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(fmt.format(*map(str, r)).rstrip() for r in [header, *rows])


def _deps(names: tuple[str, ...]) -> str:
    return ",".join(names) if len(names) <= 2 else f"{len(names)} nodes ({names[0]}, ...)"


def render(p: Plan, sts: list[NodeState]) -> str:
    """The status table, with each failed node's log."""
    deps = {n.name: n.deps for n in p.nodes}
    rows = [[s.name, s.kind, _deps(deps[s.name]), s.out_dir, s.state + (f" (job {s.job})" if s.job and
             s.state not in ("done", "not submitted") else "")] for s in sts]  # fmt: skip
    lines = [table(rows, ["node", "kind", "depends on", "out_dir", "state"])]
    counts = {k: sum(s.state == k for s in sts) for k in STATES}
    lines.append(f"{len(sts)} nodes: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v))
    for s in sts:
        if s.state == "failed" or s.detail:
            lines.append(f"{s.name}: {s.state}: {s.detail}" + (f"; log: {s.log}" if s.log else ""))
    return "\n".join(lines)
