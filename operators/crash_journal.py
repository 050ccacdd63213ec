"""Which item a crashed Ray worker was working on, so that the retry skips that item instead of dying on it again.

A file that crashes a native decoder (PDFium, FFmpeg, decord, Pillow's C code) kills the whole worker
process, not just a Python call: no ``except`` can catch it. Ray retries the task (expansion: forever,
Ray Data's default; embedding and reranking: a bounded number of times, then the job stops), and every
retry dies on the same file.

The journal breaks that loop at the cost of one extra retry per bad file, wherever the retry runs:

1. Every task attempt starts with one call, ``begin(key)``; a first attempt works as usual, with no
   other call. The key is the same for every attempt: the Ray task id for an expansion task (Ray keeps
   it across retries), the batch's unit ids for an embedding batch (Ray Data resubmits a batch whose
   actor died under a new task id).
2. A retry works item by item, and tells the journal which item it is about to read before reading it.
3. If that attempt dies too, the item it named last is the culprit: the next attempt gets it back from
   ``begin`` and turns it into a dead letter instead of reading it.

Only an attempt that already follows a crash names items, so one worker death that no item caused
(a node lost, a one-off OOM kill) blames nothing; it takes two deaths on the same item.

Every death of a careful attempt names a new item, however many bad items a task holds, so a task
needs at most one retry per item, plus one. A careful attempt that dies while reading no item named
nothing: after FRUITLESS_DEATHS of those, the next attempt of a task whose output is all or nothing
(an embedding or reranking batch) leaves out all its items but those already named (as dead
letters), so that the job goes on instead of retrying forever. Not so for an expansion task: Ray
keeps the rows an attempt already passed on, and its retry must make the same rows up to there.

A decoder that hangs instead of crashing would stall the job forever (Ray has no task timeouts). A
guard with a time limit arms this process's watchdog around each item (an attribute write, no call):
when an item runs past its limit, the watchdog tells the journal which item it was and kills the
process. The retry skips that item at once. (A hang that holds the GIL starves the watchdog too;
the decoders' C calls through ctypes and Pillow release it.)

The journal is advisory: it is restarted when its process dies (with its records lost, so a bad item
costs a few more retries), and a task attempt that cannot reach it logs a warning once and goes on
unguarded, as if there were no journal.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import ray

_log = logging.getLogger(__name__)

CRASH_ERROR_TYPE = "WorkerCrashed"
TIMEOUT_ERROR_TYPE = "WorkerTimedOut"
_CRASHED = "crashed"  # the journal's reason for an item that killed a worker; "timeout:<s>" for a hang
# Careful attempts that may die reading no item before a task gives up on its items (see above).
FRUITLESS_DEATHS = 3
_FRUITLESS = "fruitless"  # the reason for an item left out after FRUITLESS_DEATHS such deaths
# A journal call is one dict update: an answer this late means the journal is lost (or still restarting).
JOURNAL_TIMEOUT_S = 30.0


def crash_message(doing: str) -> str:
    """The dead letter's text for an item that killed its worker process."""
    return (f"the worker process died while {doing} it, on a retry after an earlier crash (a native decoder "
            "crashing, or out of memory); it was skipped so that its neighbours could go on")


def skip_letter(reason: str, doing: str, setting: str | None = None) -> tuple[str, str]:
    """(error type, message) of the dead letter for an item the journal says to leave out, for `reason`."""
    if reason.startswith("timeout:"):
        seconds = reason.split(":", 1)[1]
        limit = f"{setting}={seconds} s" if setting else f"{seconds} s"
        return TIMEOUT_ERROR_TYPE, (f"{doing} it took longer than {limit} (a hung decoder?): its worker process "
                                    "was stopped, and it was skipped so that its neighbours could go on")
    if reason == _FRUITLESS:
        return CRASH_ERROR_TYPE, (f"its worker process died {FRUITLESS_DEATHS + 1} times on retries of its task "
                                  "while reading no item (out of memory, or a lost node?): the task's items were left "
                                  "out so that the job could go on; re-run to retry them")
    return CRASH_ERROR_TYPE, crash_message(doing)


@dataclass
class _Task:
    attempts: int = 0
    current: str | None = None  # the item a careful attempt is reading now
    skipped: dict[str, str] = field(default_factory=dict)  # item -> why: _CRASHED or "timeout:<s>"
    named: int = 0  # len(skipped) when the last attempt began: a careful attempt that died named none if equal
    fruitless: int = 0  # careful attempts that died naming no item


class CrashJournal:
    """The driver's record of task attempts and the items they were reading (run as one Ray actor)."""

    def __init__(self) -> None:
        self._tasks: dict[str, _Task] = {}

    def begin(self, task: str) -> tuple[int, dict[str, str], int]:
        """Start an attempt of `task`: (its attempt number from 0, {item: why} for the items to leave out,
        how many careful attempts died naming no item)."""
        rec = self._tasks.setdefault(task, _Task())
        if rec.current is not None:  # the last attempt died reading this item
            rec.skipped.setdefault(rec.current, _CRASHED)
            rec.current = None
        if rec.attempts >= 2 and len(rec.skipped) == rec.named:  # the last attempt was careful, and blamed nothing
            rec.fruitless += 1
        rec.named = len(rec.skipped)
        attempt, rec.attempts = rec.attempts, rec.attempts + 1
        return attempt, dict(rec.skipped), rec.fruitless

    def timed_out(self, task: str, item: str, seconds: float) -> None:
        """`item` of `task` ran past its limit; its process is about to be killed."""
        rec = self._tasks.setdefault(task, _Task())
        rec.skipped[item] = f"timeout:{seconds:g}"
        rec.current = None

    def enter(self, task: str, item: str) -> None:
        """A careful attempt of `task` is about to read `item`."""
        self._tasks.setdefault(task, _Task()).current = item

    def leave(self, task: str, item: str) -> None:
        """A careful attempt of `task` is done with `item`."""
        rec = self._tasks.get(task)
        if rec is not None and rec.current == item:
            rec.current = None

    def end(self, task: str) -> None:
        """`task` finished: forget it."""
        self._tasks.pop(task, None)

    def tasks(self) -> int:
        """Tasks begun and not ended (for tests)."""
        return len(self._tasks)


def retries_needed(items: int) -> int:
    """How many retries a journalled task of `items` items may take before every item is read or left out."""
    # The first death names nothing; each careful one names a new item, or counts as fruitless. A journal
    # restarted in between forgets all that, so room for it all twice.
    return 2 * (1 + items + FRUITLESS_DEATHS)


def start_journal() -> ray.actor.ActorHandle:
    """A CrashJournal actor for one run (it dies with the driver)."""
    # No CPU reserved: it does a dict update per call, and must not wait behind the work it watches.
    # Restarted when its process dies (a kill, an OOM kill, its node lost): its records are only advice,
    # and calls caught by the death are retried on the new process rather than failing their task.
    return ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=-1)(CrashJournal).remote()


def stop_journal(journal: ray.actor.ActorHandle) -> None:
    """End a run's CrashJournal actor (quietly: Ray itself may be what failed, and it dies with the driver)."""
    with contextlib.suppress(Exception):
        ray.kill(journal)


class _Watchdog:
    """This process's watchdog: kills it when the armed item runs past its deadline, after telling the journal."""

    def __init__(self) -> None:
        self._slot: tuple[Any, str, str, float, float] | None = None  # journal, task, item, deadline, limit
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def arm(self, journal: Any, task: str, item: str, limit_s: float) -> None:
        """Watch `item` for `limit_s` seconds from now (journal None: kill without telling anyone)."""
        self._slot = (journal, task, item, time.monotonic() + limit_s, limit_s)
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="qvl-watchdog", daemon=True)
                    self._thread.start()

    def disarm(self) -> None:
        """Nothing is being read now."""
        self._slot = None

    def _run(self) -> None:
        while True:
            time.sleep(0.25)
            slot = self._slot
            if slot is None or time.monotonic() < slot[3]:
                continue
            journal, task, item, _, limit = slot
            try:  # the retry must learn which item it was before this process is gone
                if journal is None:  # nobody to tell: the log, at least, names it
                    _log.warning("%s took over %g s: stopping this worker process", item, limit)
                else:
                    ray.get(journal.timed_out.remote(task, item, limit), timeout=JOURNAL_TIMEOUT_S)
            except Exception as exc:  # a lost journal: the hung process is stopped all the same
                _warn_lost(exc)
            finally:
                os.kill(os.getpid(), signal.SIGKILL)  # a hung C call cannot be interrupted any other way


WATCHDOG = _Watchdog()
WHOLE_BATCH = "<the whole batch>"  # the item a first attempt at a batch is watched as
_WARNED = False  # one warning per process about a lost journal: every later call would repeat it


def _warn_lost(exc: BaseException) -> None:
    """Log, once per process, that the journal could not be reached and work goes on unguarded."""
    global _WARNED
    if not _WARNED:
        _WARNED = True
        _log.warning("the crash journal could not be reached (%s: %s); going on without it: an item that "
                     "crashes or hangs its worker is not skipped on the retry", type(exc).__name__, _brief(exc))


def _brief(exc: BaseException) -> str:
    """An exception's first line, and why the actor died when Ray says: its other lines are ids and addresses."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    kept = lines[:1] + [line for line in lines[1:] if line.startswith("The actor is dead because")]
    return " ".join(kept)


def _call(method: Any, *args: Any) -> Any:
    """ray.get of one journal call, within JOURNAL_TIMEOUT_S; raises what Ray raises."""
    return ray.get(method.remote(*args), timeout=JOURNAL_TIMEOUT_S)


def _send(method: Any, *args: Any) -> None:
    """One journal call without waiting for it (nothing to do when the journal is gone)."""
    with contextlib.suppress(Exception):
        method.remote(*args)


class TaskGuard:
    """One task attempt's view of the journal: which items to skip, and which item it reads now.

    limit_s: how long one item (or a first attempt's whole batch) may take before the watchdog
    stops the process; `setting` names it in dead letters. give_up: after FRUITLESS_DEATHS, leave out
    every item (only for a task whose output is all or nothing). When the journal cannot be reached, the
    guard is unguarded (journal None): a first attempt that skips nothing, names nothing, watches nothing.
    """

    def __init__(self, journal: ray.actor.ActorHandle, task: str, limit_s: float | None = None,
                 setting: str | None = None, give_up: bool = True) -> None:
        self.journal: ray.actor.ActorHandle | None = journal
        self.task = task
        self.limit_s = limit_s
        self.setting = setting
        self.give_up = give_up
        # Unguarded until the journal answers: skip nothing, name nothing.
        self.attempt, self.skipped, self.fruitless = 0, {}, 0
        try:
            self.attempt, self.skipped, self.fruitless = _call(journal.begin, task)
        except Exception as exc:  # the journal is advice: its loss must not fail the task
            self._lose(exc)

    def _lose(self, exc: BaseException) -> None:
        """Go on without the journal for the rest of this attempt."""
        _warn_lost(exc)
        self.journal = None

    @property
    def careful(self) -> bool:
        """True when an earlier attempt of this task died: items are then named before they are read."""
        return self.attempt > 0

    def skip(self, item: str) -> bool:
        """True when `item` killed (or hung) an earlier attempt, or attempts keep dying on no item: leave it unread."""
        return item in self.skipped or (self.give_up and self.fruitless >= FRUITLESS_DEATHS)

    def letter(self, item: str, doing: str) -> tuple[str, str]:
        """(error type, message) of the dead letter for a skipped item."""
        return skip_letter(self.skipped.get(item, _FRUITLESS), doing, self.setting)

    @contextlib.contextmanager
    def reading(self, item: str) -> Iterator[None]:
        """Around the reading of one item: named to the journal first when this attempt is careful,
        and watched when the guard has a time limit."""
        if self.careful and self.journal is not None:
            try:
                _call(self.journal.enter, self.task, item)  # recorded before the read that may kill us
            except Exception as exc:
                self._lose(exc)
        journal = self.journal  # the watchdog reports to it; without one, a hang is only a hang
        if self.limit_s is not None and journal is not None:
            WATCHDOG.arm(journal, self.task, item, self.limit_s)
        try:
            yield
        finally:  # an exception is not a crash: only a death leaves the item named
            WATCHDOG.disarm()
            if self.careful and journal is not None:
                _send(journal.leave, self.task, item)  # no wait: calls from one caller arrive in order

    def end(self) -> None:
        """The attempt finished (no wait)."""
        if self.journal is not None:
            _send(self.journal.end, self.task)


def reading(guard: TaskGuard | None, item: str) -> contextlib.AbstractContextManager[None]:
    """guard.reading(item), or nothing to do when there is no journal."""
    return guard.reading(item) if guard is not None else contextlib.nullcontext()


def batch_key(items: list[str]) -> str:
    """A task key for a batch of items, the same for every attempt at that batch."""
    return hashlib.blake2b("\n".join(items).encode(), digest_size=16).hexdigest()


def current_task_id() -> str | None:
    """The running Ray task's id (kept across its retries), or None outside a task."""
    try:
        return ray.get_runtime_context().get_task_id()
    except Exception:  # not in a Ray worker (a direct call in a test or a script)
        return None
