"""Preemption: a signal handler installed when the process starts, read by the loops at safe points.

SLURM warns a job in one of two ways, and both mean "checkpoint and requeue":

* ``--signal=USR1@120`` (the sbatch scripts): SIGUSR1 120 s before the time limit;
* preemption (``PreemptMode=REQUEUE``/``CANCEL``) and ``scancel``: SIGTERM to every process of the
  job, then SIGKILL after the partition's ``GraceTime`` (``KillWait`` on a time limit).

``midtrain``'s entry point calls :func:`install` first thing (for the training and evaluation
commands SIGTERM too), so a signal that arrives while the process is still importing, loading data
or building the model is remembered rather than fatal. The training loops and ``midtrain evaluate``
read :func:`requested` at step / row boundaries, write what they have and exit with
:data:`EXIT_PREEMPTED`; the sbatch scripts requeue on it. DataLoader workers are started inside
:func:`shielded` so that a signal sent to the whole job leaves them running until the main process
has checkpointed (they ignore it; SIGKILL still ends them).
"""

from __future__ import annotations

import atexit
import contextlib
import itertools
import multiprocessing
import signal
import sys
from collections.abc import Iterator
from typing import Any

from midtrain.errors import MidtrainError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": training_scripts/ requeue the task on it
DEFAULT_SIGNAL = "SIGUSR1"
COMMANDS = ("pretrain", "finetune", "evaluate")
"""The commands that read :func:`requested` (so catching SIGTERM for them never leaves a process unkillable)."""

_received: list[str] = []  # names of the preemption signals received so far
_installed: set[signal.Signals] = set()


def _handle(signum: int, frame: object) -> None:  # noqa: ARG001
    _received.append(signal.Signals(signum).name)


def _signal(signal_name: str) -> signal.Signals:
    sig = getattr(signal, signal_name, None)
    if not isinstance(sig, signal.Signals):
        raise MidtrainError(f"Unknown preemption signal {signal_name!r}; use e.g. SIGUSR1, SIGUSR2, SIGTERM.")
    return sig


def install(signal_name: str | None = DEFAULT_SIGNAL, sigterm: bool = True) -> None:
    """Catch ``signal_name`` (e.g. ``SIGUSR1``) and, with ``sigterm``, SIGTERM from now on; None: neither.

    Idempotent; a signal received before a later call is kept. Outside the main thread (where Python
    cannot install handlers) this is a no-op.
    """
    if not signal_name:
        return
    for sig in {_signal(signal_name), *([signal.SIGTERM] if sigterm else [])}:
        try:
            signal.signal(sig, _handle)
            _installed.add(sig)
        except ValueError:  # not the main thread
            pass


def uninstall(signal_name: str = DEFAULT_SIGNAL) -> None:
    """Give ``signal_name`` and every signal :func:`install` caught their default action back and forget what was
    received (``preemption_signal: null``)."""
    for sig in {_signal(signal_name), *_installed}:
        if signal.getsignal(sig) is _handle:
            signal.signal(sig, signal.SIG_DFL)
    _installed.clear()
    _received.clear()


def requested() -> bool:
    """True once a preemption signal has been received by this process."""
    return bool(_received)


def clear() -> None:
    """Forget received signals (for callers that run several commands in one process, e.g. tests)."""
    _received.clear()


@contextlib.contextmanager
def shielded() -> Iterator[None]:
    """Block the preemption signals in this thread while child processes (DataLoader workers) start.

    Children inherit the mask whatever the start method (fork; spawn and forkserver exec with it), so a
    signal sent to the whole job does not kill a worker before the main process has checkpointed. Here,
    a signal that arrives meanwhile is delivered when the block ends, so none is lost.
    """
    sigs = {signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, *_installed}
    # atexit runs last-registered first: (re)registered here, after multiprocessing's handler (which re-registers
    # itself when its logger is first set up), ours runs before it
    atexit.unregister(_kill_daemon_children)
    atexit.register(_kill_daemon_children)
    old = signal.pthread_sigmask(signal.SIG_BLOCK, sigs)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _kill_daemon_children() -> None:
    """At interpreter exit, SIGKILL the daemonic children (DataLoader workers) still running.

    multiprocessing's own exit handler ends them with SIGTERM and then joins them; started inside :func:`shielded`
    they never receive it, so a worker whose loader was never closed (an exception, a kept reference) would hang
    the exit forever.
    """
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


def shielded_iter(loader: Any) -> Iterator[Any]:
    """``iter(loader)`` with its worker processes started inside :func:`shielded` (they start at the first item
    when ``__iter__`` is a generator, so that one is taken inside too)."""
    items = iter(loader)
    with shielded():
        first = next(items, _END)
    return iter(()) if first is _END else itertools.chain([first], items)


_END = object()


def exit_if_requested(fabric: Any, where: str) -> None:
    """In the end phase of a run: if any rank got a preemption signal, exit :data:`EXIT_PREEMPTED` now (collective).

    What is left (``where`` says what) is redone by the requeued run, which finds the end checkpoint.
    """
    import torch

    flag = torch.tensor([1.0 if requested() else 0.0], device=fabric.device)
    if fabric.world_size > 1:
        flag = fabric.all_reduce(flag, reduce_op="sum")
    if flag.item() == 0:
        return
    fabric.print(f"Preemption signal {where}: exiting with status {EXIT_PREEMPTED}; the requeued run finishes the end.")
    fabric.barrier()
    sys.exit(EXIT_PREEMPTED)


_first_save: list[float] = []


def report_save_time(fabric: Any, metrics: Any, step: int, path: Any, reason: str, seconds: float) -> None:
    """Log a checkpoint's save time (``checkpoint_seconds`` in the metrics) and print it; the first time with what
    it means for the preemption lead time, which must cover one save."""
    metrics.log(step, {"checkpoint_seconds": seconds})
    fabric.print(f"Saved checkpoint {path} ({reason}) in {seconds:.1f} s.")
    if not _first_save:
        _first_save.append(seconds)
        fabric.print(
            f"note: a checkpoint takes {seconds:.0f} s to save here; the warning before a kill must exceed it with "
            "margin: sbatch --signal=USR1@N (N seconds before the time limit) and, for preemption, the partition's "
            "GraceTime (SIGTERM to SIGKILL)."
        )
