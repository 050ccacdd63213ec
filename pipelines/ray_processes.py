"""The local Ray a job started: shut down, and no process of it left running afterwards.

Ray 2.60 can deadlock an actor in its own exit handler (``~CoreWorkerProcessImpl``, after its log
says "Shutdown completed successfully"): the process stays alive, parented to init once the raylet
is gone, holding its memory (1.8 GB for a CPU embedding actor) until someone kills it. A scheduled
job that leaves one behind every night runs the machine out of memory. So the job notes the Ray
processes below it before shutting Ray down and kills any still running a grace period later.
Linux only (it reads /proc); elsewhere Ray's own shutdown is all there is.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

_PROC = Path("/proc")


@dataclass(frozen=True)
class Process:
    """A process as /proc showed it: its start time tells it from a later process given the same PID."""

    pid: int
    ppid: int
    start: int
    cmdline: str


def read_process(pid: int) -> Process | None:
    """The process with this PID, or None once it is gone (or was never readable)."""
    try:
        stat = (_PROC / str(pid) / "stat").read_text()
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces or parentheses itself.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] == "Z":  # a zombie has exited; only its parent's wait is missing
        return None
    return Process(pid, int(fields[1]), int(fields[19]), raw.replace(b"\0", b" ").decode(errors="replace").strip())


def descendants(pid: int | None = None) -> list[Process]:
    """Every live process below pid (this one by default), each after its parent."""
    if not _PROC.is_dir():
        return []
    procs = [p for p in map(read_process, (int(d.name) for d in _PROC.iterdir() if d.name.isdigit())) if p is not None]
    children: dict[int, list[Process]] = {}
    for p in procs:
        children.setdefault(p.ppid, []).append(p)
    out, todo = [], [os.getpid() if pid is None else pid]
    while todo:
        for child in children.get(todo.pop(0), ()):
            out.append(child)
            todo.append(child.pid)
    return out


def is_ray_process(proc: Process) -> bool:
    """Whether a process is Ray's: a worker or actor (``ray::...``), or a daemon run from Ray's package."""
    return proc.cmdline.startswith("ray::") or "/ray/" in proc.cmdline


def ray_processes(pid: int | None = None) -> list[Process]:
    """Ray's processes below pid (this one by default), and every process they started."""
    inside: set[int] = set()
    below = descendants(pid)
    for p in below:  # parents first
        if p.ppid in inside or is_ray_process(p):
            inside.add(p.pid)
    return [p for p in below if p.pid in inside]


def kill_survivors(procs: list[Process], grace_s: float) -> list[Process]:
    """Wait up to grace_s for these processes to exit, then SIGKILL those still running; returns them."""
    deadline = time.monotonic() + grace_s
    while True:
        alive = [p for p in procs if _same(p)]
        if not alive or time.monotonic() >= deadline:
            break
        time.sleep(0.1)
    killed = []
    for p in alive:
        try:
            if _same(p):  # not a new process that reused the PID meanwhile
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
    """Record that this process started the local Ray it uses (one it joined is not its to stop)."""
    global _started_here
    _started_here = True


def shutdown_if_started_here(grace_s: float = 10.0) -> list[Process]:
    """Shut down the local Ray this process started, if any, then kill its processes still running
    grace_s later; returns those it killed."""
    global _started_here
    if not _started_here:
        return []
    import ray

    _started_here = False
    ours = ray_processes()
    ray.shutdown()
    killed = kill_survivors(ours, grace_s)
    for p in killed:
        log.warning("killed Ray process %d (%s): still running %.0f s after Ray's shutdown (a known Ray "
                    "exit-handler hang)", p.pid, p.cmdline[:80], grace_s)
    return killed
