"""One live owner per run directory, and one view of it: rank 0 claims ``out_dir``, cleans it, resolves the start
and broadcasts it to the other ranks.

**Ownership.** Rank 0 holds an exclusive POSIX record lock (``fcntl``) on ``.<out_dir name>.owner.lock`` next to
``out_dir`` as long
as its command runs, and writes who it is into the file (SLURM job id, host, pid, start time). A second start on the
same ``out_dir`` (a manual resubmit while the requeued task is pending; two configs with one
``out_dir``) cannot take the lock and stops at once, naming the owner. The kernel drops the lock
when the owner dies however it dies (``kill -9``; on a node loss, when the file server notices), so
a dead owner never blocks the requeue.

A POSIX lock, not ``flock``: it belongs to the process, so forked children (DataLoader workers) do not inherit it
and it ends with the command (:func:`release`) or the process. What it relies on: POSIX locks exclusive across
hosts. Local filesystems and Linux NFS clients have them (held by the server; NFSv4 frees a dead client's locks
when its lease runs out, about 90 s; NFSv3 needs ``lockd``/``statd``); Lustre needs the ``flock`` mount
option (``localflock`` is per node only). Where locking is refused (``ENOLCK``/``ENOSYS``/``EINVAL``),
the record itself decides: a record from this SLURM job (a requeue keeps the job id) or of a dead
process on this host is stale; another live or unknown owner is refused (delete the file once it is
known to be dead).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

from midtrain.errors import MidtrainError


def lock_file(out_dir: Path) -> Path:
    """``.<name>.owner.lock`` next to ``out_dir`` (so a refused or failed start leaves no ``out_dir`` behind)."""
    return out_dir.parent / f".{out_dir.name}.owner.lock"


_held: dict[Path, int] = {}  # lock file -> open descriptor, kept for the life of the process


def _me() -> dict[str, Any]:
    return {"job": os.environ.get("SLURM_JOB_ID"), "host": socket.gethostname(), "pid": os.getpid(),
            "started": _start_time(os.getpid()), "since": time.strftime("%Y-%m-%d %H:%M:%S")}  # fmt: skip


def _start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (tells a reused pid from the original); None if gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def describe(owner: dict[str, Any]) -> str:
    job = f"SLURM job {owner['job']}, " if owner.get("job") else ""
    return f"{job}host {owner.get('host')}, pid {owner.get('pid')} (since {owner.get('since')})"


def _read(fd: int) -> dict[str, Any]:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _stale(owner: dict[str, Any]) -> bool:
    """Without locks: is the recorded owner certainly gone?"""
    if not owner:
        return True
    if owner.get("job") and owner.get("job") == os.environ.get("SLURM_JOB_ID"):
        return True  # an earlier attempt of this very job: SLURM ended it before requeueing
    if owner.get("host") == socket.gethostname():
        return _start_time(int(owner.get("pid", -1))) != owner.get("started")
    return False


def claim(out_dir: Path | str) -> None:
    """Make this process the owner of ``out_dir`` until it exits; a MidtrainError naming the owner if it has one."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)  # the run directory itself only once the run begins
    path = lock_file(out_dir)
    if path in _held:  # this process already owns it (commands run one after another in one process)
        return
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as err:
        if err.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            owner = _read(fd)
            os.close(fd)
            raise MidtrainError(
                f"{out_dir} is in use by {describe(owner)}; two jobs must not train one run directory. Wait for it, "
                "cancel it, or use another out_dir."
            ) from None
        owner = _read(fd)  # locks unsupported here: the record decides
        if not _stale(owner):
            os.close(fd)
            raise MidtrainError(
                f"{out_dir} is recorded as in use by {describe(owner)} and this filesystem has no locks to check it; "
                f"if that process is gone, delete {path}."
            ) from None
    record = json.dumps(_me()).encode()
    os.ftruncate(fd, 0)
    os.pwrite(fd, record, 0)
    _held[path] = fd


def release(out_dir: Path | str) -> None:
    """Give up ownership of ``out_dir`` (the command is over; the process may run another, e.g. an experiment
    worker or a test); a no-op where this process does not own it."""
    fd = _held.pop(lock_file(Path(out_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the lock


def shared_start(fabric: Any, resolve: Any, out_dir: Path) -> Any:
    """Rank 0 claims ``out_dir``, removes leftovers of interrupted saves and deletes, and calls ``resolve()``
    (listing ``out_dir``); every rank gets rank 0's answer, or its error, through one broadcast."""
    from midtrain.train.checkpoints import clean_leftovers

    answer: tuple[Any, str | None] = (None, None)
    if fabric.global_rank == 0:
        try:
            claim(out_dir)
            for path in clean_leftovers(out_dir):
                fabric.print(f"Removed {path.name}: left over from an interrupted checkpoint save or delete.")
            answer = (resolve(), None)
        except MidtrainError as err:
            answer = (None, str(err))
    if fabric.world_size > 1:
        answer = fabric.broadcast(answer, src=0)
    if answer[1] is not None:
        raise MidtrainError(answer[1])
    return answer[0]
