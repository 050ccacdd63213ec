"""Stopping a run on request: Ctrl-C (SIGINT) or a scheduler's SIGTERM become ``Interrupted``.

A scheduler that times a job out, or a person at the terminal, asks it to stop with a signal.
Python's default turns SIGINT into a KeyboardInterrupt with a traceback, and Ray's driver turns
SIGTERM into an abort in its core worker (exit 134, a crash dump); either way the run ends
without saying what it wrote. Inside ``stop_on_signals()`` both raise ``Interrupted`` in the
main thread instead (at once in the interruptible phase, else at its start or the job's end),
which the jobs catch like any mid-run failure: the ingestion writes its report (complete
objects ingested, the others "not written"), then the CLI exits 128 + the signal's number
(130, 143), as shells and schedulers expect. The first signal also restores the default
action, so a second one stops the process at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Any, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """The run was asked to stop by a signal (a KeyboardInterrupt, so callers' handlers still catch it)."""

    def __init__(self, signum: int, message: str | None = None) -> None:
        self.signum = int(signum)
        super().__init__(message or f"interrupted by {self.signal_name}")

    @property
    def signal_name(self) -> str:
        """SIGINT, SIGTERM, ..."""
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        """128 + the signal's number: what a shell reports for a process the signal ended."""
        return 128 + self.signum

    def with_message(self, message: str) -> "Interrupted":
        """The same interruption, saying what the run did before it stopped."""
        return Interrupted(self.signum, message)

    def __reduce__(self) -> tuple[Any, ...]:
        return Interrupted, (self.signum, str(self))


class SignalGate:
    """Where a stop signal may take effect: at once inside ``interruptible()``, else at the next such point.

    The job's long phase (the Ray Data run, whose written points are accounted object by object)
    is interruptible; short bookkeeping around it (deleting an object's replaced units after its
    new ones landed) is not, since stopping half-way through it would leave stale points that
    the next run cannot see.
    """

    def __init__(self) -> None:
        self.pending: int | None = None
        self._armed = False

    def handle(self, signum: int, frame: Any) -> None:
        """The signal handler: remember the signal; raise Interrupted if the gate is open."""
        for sig in SIGNALS:  # the next signal, of either kind, acts at once
            signal.signal(sig, signal.SIG_DFL)
        self.pending = int(signum)
        if self._armed:
            self._armed = False
            raise Interrupted(signum)

    @contextlib.contextmanager
    def interruptible(self) -> Iterator[None]:
        """Within the block a stop signal raises Interrupted at once (one that came before, on entry)."""
        self.raise_pending()
        self._armed = True
        try:
            yield
        except KeyboardInterrupt as exc:
            # ray.get / ray.wait re-raise an exception from a signal handler during their wait as a
            # plain KeyboardInterrupt: the signal it was, and the run's accounting of it, were lost.
            if isinstance(exc, Interrupted) or self.pending is None:
                raise
            raise Interrupted(self.pending) from None
        finally:
            self._armed = False

    def raise_pending(self, message: str | None = None) -> None:
        """Raise Interrupted if a stop signal came while the gate was closed."""
        if self.pending is not None:
            raise Interrupted(self.pending, message)


class _Deferral:
    """From defer_signals() to the next stop_on_signals(): active, and the stop signal that came meanwhile."""

    active = False
    signum: int | None = None


_DEFERRAL = _Deferral()


def _remember(signum: int, frame: Any) -> None:
    """A stop signal before the run's gate: kept for the gate (raising here could leave a lock held)."""
    for sig in SIGNALS:  # the next one, of either kind, stops the process at once
        signal.signal(sig, signal.SIG_DFL)
    _DEFERRAL.signum = int(signum)


def defer_signals() -> None:
    """Until stop_on_signals(), a stop signal is remembered and acted on by its gate at the first safe point.

    For the start of a job, after ray.init: Ray's handler would exit 15 with no word, wherever the
    main thread is. Outside the main thread nothing is installed.
    """
    if threading.current_thread() is threading.main_thread():
        _DEFERRAL.active = True
        for sig in SIGNALS:
            signal.signal(sig, _remember)


_DEFAULTS = {signal.SIGINT: signal.default_int_handler, signal.SIGTERM: signal.SIG_DFL}


@contextlib.contextmanager
def deferral_ends_on_error() -> Iterator[None]:
    """Around a job's start after defer_signals(): if it fails before its stop_on_signals(), the
    default handlers come back (else the next Ctrl-C, in a notebook or service, would be swallowed)."""
    try:
        yield
    except BaseException:
        if _DEFERRAL.active and threading.current_thread() is threading.main_thread():
            _DEFERRAL.active, _DEFERRAL.signum = False, None
            for sig, handler in _DEFAULTS.items():
                signal.signal(sig, handler)
        raise


@contextlib.contextmanager
def stop_on_signals() -> Iterator[SignalGate]:
    """Within the block SIGINT and SIGTERM are the gate's (see SignalGate); the old handlers are restored after.

    Outside the main thread (where Python cannot install handlers) the gate never sees a signal.
    """
    gate = SignalGate()
    if threading.current_thread() is not threading.main_thread():
        yield gate
        return
    # After a deferral the handlers to come back to are the defaults (the deferral ends with the job).
    previous = dict(_DEFAULTS) if _DEFERRAL.active else {sig: signal.getsignal(sig) for sig in SIGNALS}
    early, _DEFERRAL.active, _DEFERRAL.signum = _DEFERRAL.signum, False, None
    for sig in SIGNALS:
        signal.signal(sig, gate.handle)
    if early is not None:  # came since defer_signals(): the gate acts on it at its first safe point
        gate.pending = early
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_DFL)
    try:
        yield gate
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
