"""Preemption: a signal handler installed when the process starts, read by the loops at safe points.

SLURM sends a signal (``--signal=USR1@120``) before a job's time limit, or when it is preempted.
``midtrain``'s entry point calls :func:`install` first thing, so a signal that arrives while the
process is still importing, loading data or building the model is remembered rather than fatal.
The training loops and ``midtrain evaluate`` read :func:`requested` at step / row boundaries,
write what they have and exit with :data:`EXIT_PREEMPTED`; the sbatch scripts requeue on it.
"""

from __future__ import annotations

import signal

from midtrain.errors import MidtrainError

EXIT_PREEMPTED = 75  # EX_TEMPFAIL, "try again": training_scripts/ requeue the task on it
DEFAULT_SIGNAL = "SIGUSR1"

_received: list[str] = []  # names of the preemption signals received so far


def _handle(signum: int, frame: object) -> None:  # noqa: ARG001
    _received.append(signal.Signals(signum).name)


def install(signal_name: str | None = DEFAULT_SIGNAL) -> None:
    """Catch ``signal_name`` (e.g. ``SIGUSR1``) from now on; None leaves every signal as it is.

    Idempotent; a signal received before a later call is kept. Outside the main thread (where Python
    cannot install handlers) this is a no-op.
    """
    if not signal_name:
        return
    sig = getattr(signal, signal_name, None)
    if not isinstance(sig, signal.Signals):
        raise MidtrainError(f"Unknown preemption signal {signal_name!r}; use e.g. SIGUSR1, SIGUSR2, SIGTERM.")
    try:
        signal.signal(sig, _handle)
    except ValueError:  # not the main thread
        pass


def uninstall(signal_name: str = DEFAULT_SIGNAL) -> None:
    """Give ``signal_name`` its default action back and forget it was received (``preemption_signal: null``)."""
    sig = getattr(signal, signal_name, None)
    if isinstance(sig, signal.Signals) and signal.getsignal(sig) is _handle:
        signal.signal(sig, signal.SIG_DFL)
    _received.clear()


def requested() -> bool:
    """True once a preemption signal has been received by this process."""
    return bool(_received)


def clear() -> None:
    """Forget received signals (for callers that run several commands in one process, e.g. tests)."""
    _received.clear()
