"""Which item a crashed Ray worker was working on, so that the retry skips that item instead of dying on it again.

A file that crashes a native decoder (PDFium, FFmpeg, decord, Pillow's C code) kills the whole worker
process, not just a Python call: no ``except`` can catch it. Ray retries the task (expansion: forever,
Ray Data's default; embedding: a few times, then the run stops), and every retry dies on the same file.

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
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray

CRASH_ERROR_TYPE = "WorkerCrashed"


def crash_message(doing: str) -> str:
    """The dead letter's text for an item that killed its worker process."""
    return (f"the worker process died while {doing} it, on a retry after an earlier crash (a native decoder "
            "crashing, or out of memory); it was skipped so that its neighbours could go on")


@dataclass
class _Task:
    attempts: int = 0
    current: str | None = None  # the item a careful attempt is reading now
    crashed: set[str] = field(default_factory=set)


class CrashJournal:
    """The driver's record of task attempts and the items they were reading (run as one Ray actor)."""

    def __init__(self) -> None:
        self._tasks: dict[str, _Task] = {}

    def begin(self, task: str) -> tuple[int, set[str]]:
        """Start an attempt of `task`: (its attempt number from 0, the items that killed earlier attempts)."""
        rec = self._tasks.setdefault(task, _Task())
        if rec.current is not None:  # the last attempt died reading this item
            rec.crashed.add(rec.current)
            rec.current = None
        attempt, rec.attempts = rec.attempts, rec.attempts + 1
        return attempt, set(rec.crashed)

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
        """Tasks begun and not ended (for tests and the report)."""
        return len(self._tasks)


def start_journal() -> ray.actor.ActorHandle:
    """A CrashJournal actor for one run (it dies with the driver)."""
    # No CPU reserved: it does a dict update per call, and must not wait behind the work it watches.
    return ray.remote(num_cpus=0, max_restarts=0)(CrashJournal).remote()


class TaskGuard:
    """One task attempt's view of the journal: which items to skip, and (after a crash) which item it reads now."""

    def __init__(self, journal: ray.actor.ActorHandle, task: str) -> None:
        self.journal = journal
        self.task = task
        self.attempt, self.crashed = ray.get(journal.begin.remote(task))

    @property
    def careful(self) -> bool:
        """True when an earlier attempt of this task died: items are then named before they are read."""
        return self.attempt > 0

    def skip(self, item: str) -> bool:
        """True when `item` killed an earlier attempt: leave it unread."""
        return item in self.crashed

    @contextlib.contextmanager
    def reading(self, item: str) -> Iterator[None]:
        """Around the reading of one item: named to the journal first when this attempt is careful."""
        if not self.careful:
            yield
            return
        ray.get(self.journal.enter.remote(self.task, item))  # recorded before the read that may kill us
        try:
            yield
        finally:  # an exception is not a crash: only a death leaves the item named
            self.journal.leave.remote(self.task, item)  # no wait: calls from one caller arrive in order

    def end(self) -> None:
        """The attempt finished (no wait)."""
        self.journal.end.remote(self.task)


def batch_key(items: list[str]) -> str:
    """A task key for a batch of items, the same for every attempt at that batch."""
    return hashlib.blake2b("\n".join(items).encode(), digest_size=16).hexdigest()


def current_task_id() -> str | None:
    """The running Ray task's id (kept across its retries), or None outside a task."""
    try:
        return ray.get_runtime_context().get_task_id()
    except Exception:  # not in a Ray worker (a direct call in a test or a script)
        return None
