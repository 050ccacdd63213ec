"""The local Ray a command started: shut down at its end, and no process of it left running.

Ray 2.60 can deadlock an actor in its own exit handler (``~CoreWorkerProcessImpl``, after its log
says "Shutdown completed successfully"): the process stays alive, parented to init once the raylet
is gone, holding its memory (1.8 GB for a CPU embedding actor) until someone kills it. A scheduled
job that leaves one behind every night runs the machine out of memory. So a command that started
a local Ray notes that Ray's processes (the ones its node started: GCS, raylet, monitors, and
every process below them: workers, actors, what they started) before shutting it down, and kills
any still running a grace period later. Linux only (it reads /proc); elsewhere, and for a cluster
the command joined, Ray's own shutdown is all there is.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from .interrupts import Interrupted

log = logging.getLogger(__name__)

_PROC = Path("/proc")
GRACE_S = 10.0  # a normal shutdown's processes are gone in 1-2 s


@dataclass(frozen=True)
class Process:
    """A process as /proc showed it: its start time tells it from a later process given the same PID."""

    pid: int
    ppid: int
    start: int


def read_process(pid: int) -> Process | None:
    """The process with this PID, or None once it is gone (a zombie counts as gone)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # it has exited; only its parent's wait is missing
        return None
    return Process(pid, int(fields[1]), int(fields[19]))


def command_name(pid: int) -> str:
    """A process's command name, for messages ('' once it is gone). Read from comm, not cmdline: reading
    cmdline takes the process's memory-map lock, which a hung process may hold."""
    try:
        return (_PROC / str(pid) / "comm").read_text().strip()
    except OSError:
        return ""


def processes_below(roots: Iterable[int]) -> list[Process]:
    """These processes and every process below them, live ones only: the roots first, then breadth first."""
    if not _PROC.is_dir():
        return []
    # Only stat is read for every process on the machine: reading another's cmdline takes its
    # memory-map lock (command_name), and one stuck process would stall the command's exit.
    live = [p for p in map(read_process, (int(d.name) for d in _PROC.iterdir() if d.name.isdigit())) if p]
    by_pid = {p.pid: p for p in live}
    children: dict[int, list[Process]] = {}
    for p in live:
        children.setdefault(p.ppid, []).append(p)
    out = [by_pid[r] for r in dict.fromkeys(roots) if r in by_pid]
    seen = {p.pid for p in out}
    for p in out:  # grows as it goes: breadth first
        below = [c for c in children.get(p.pid, ()) if c.pid not in seen]  # a root below another root
        seen.update(c.pid for c in below)
        out.extend(below)
    return out


def node_processes() -> list[Process]:
    """The processes of the Ray node this process started (none if it joined one), and all below them."""
    try:
        import ray._private.worker as worker

        node = worker._global_node
        # Only live ones: a PID Ray's Popen has reaped could since belong to anything.
        roots = [info.process.pid for infos in node.all_processes.values() for info in infos
                 if info.process.poll() is None] if node else []
        return processes_below(roots)
    except Exception:  # a private API: without it, Ray's own shutdown is all there is
        return []


def survivors(procs: list[Process], grace_s: float) -> list[Process]:
    """Those of these processes still running after waiting up to grace_s for them to exit."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = [p for p in procs if _same(p)]
        if not alive or time.monotonic() >= deadline:
            return alive
        time.sleep(0.1)


def kill(procs: list[Process]) -> list[Process]:
    """SIGKILL these processes, those still running; returns them."""
    killed = []
    for p in procs:
        try:
            if _same(p):  # not a new process that took the PID meanwhile
                os.kill(p.pid, signal.SIGKILL)
                killed.append(p)
        except ProcessLookupError:
            pass
    return killed


def _same(proc: Process) -> bool:
    now = read_process(proc.pid)
    return now is not None and now.start == proc.start


_started_here = False


def note_started_here() -> None:
    """Record that the running command started the local Ray it uses (one it joined is not its to stop)."""
    global _started_here
    _started_here = True


@contextmanager
def local_ray_shut_down_after(grace_s: float = GRACE_S) -> Iterator[None]:
    """Within: a local Ray that ensure_ray starts is shut down on the way out, and its processes still
    running grace_s later are killed (a Ray that was running before is left alone)."""
    global _started_here
    _started_here = False  # whatever ran before in this process (a library call) is not this command's
    try:
        yield
    finally:
        started, _started_here = _started_here, False
        if started:
            _shut_down(node_processes(), grace_s)


def _shut_down(ours: list[Process], grace_s: float) -> None:
    """Shut Ray down, then kill those of its processes (ours) still running grace_s later. A SIGINT or
    SIGTERM meanwhile (a scheduler's, during the wait) kills them at once and raises Interrupted:
    otherwise, with the run's own handlers gone, it would end the process and leave them running."""
    import ray

    on_main_thread = threading.current_thread() is threading.main_thread()
    previous: dict[int, Any] = {}
    try:
        if on_main_thread:
            for signum in STOP_SIGNALS:  # each recorded as soon as it is set: a signal in between is caught
                previous[signum] = signal.getsignal(signum)
                signal.signal(signum, _interrupt)
        ray.shutdown()
        stuck = survivors(ours, grace_s)
    except KeyboardInterrupt:
        if on_main_thread:
            for signum in STOP_SIGNALS:  # a second signal must not stop the killing half-way
                previous.setdefault(signum, signal.getsignal(signum))  # restored below, set or not
                signal.signal(signum, signal.SIG_IGN)
        kill(ours)
        raise
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
    names = {p.pid: command_name(p.pid) for p in stuck}
    for p in kill(stuck):
        log.warning("killed Ray process %d (%s): still running %.0f s after Ray's shutdown (a known Ray "
                    "exit-handler hang)", p.pid, names[p.pid], grace_s)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def _interrupt(signum: int, frame: Any) -> None:
    raise Interrupted(signum)
