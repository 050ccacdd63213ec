"""A local Ray the job started leaves no process behind: real processes, a real Ray started in a subprocess."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipelines.ray_processes import (Process, descendants, kill_survivors, ray_processes, read_process,
                                     shutdown_if_started_here)

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc (Linux)")

# A parent that starts a child ignoring SIGTERM (as a process hung in an exit handler ignores it),
# prints the child's PID and exits when told to, orphaning it.
_PARENT = textwrap.dedent("""
    import signal, subprocess, sys
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # inherited by the child across exec
    child = subprocess.Popen(["sleep", "300"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    print(child.pid, flush=True)
    sys.stdin.readline()
""")


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        if read_process(pid) is None:  # exited (a zombie counts as exited)
            return True
        time.sleep(0.05)
    return False


def _orphan() -> Process:
    """A live process ignoring SIGTERM, no longer below this one: its parent has exited."""
    parent = subprocess.Popen([sys.executable, "-c", _PARENT], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    pid = int(parent.stdout.readline())
    (child,) = [p for p in descendants() if p.pid == pid]
    parent.communicate("\n", timeout=30)
    os.kill(pid, signal.SIGTERM)
    time.sleep(0.2)
    assert read_process(pid) is not None, "the orphan should ignore SIGTERM"
    assert not any(p.pid == pid for p in descendants()), "the orphan should no longer be below this process"
    return child


def test_a_survivor_that_ignores_sigterm_is_killed_after_the_grace_period():
    child = _orphan()
    t0 = time.monotonic()
    assert kill_survivors([child], grace_s=0.5) == [child]
    assert time.monotonic() - t0 >= 0.5
    assert _gone(child.pid)


def test_a_pid_taken_by_another_process_is_left_alone():
    child = _orphan()
    try:
        reused = Process(child.pid, child.ppid, child.start + 1, child.cmdline)  # as if the PID were reused
        assert kill_survivors([reused], grace_s=0.1) == []
        assert not _gone(child.pid, within_s=0.3)
    finally:
        os.kill(child.pid, signal.SIGKILL)
    assert kill_survivors([child], grace_s=5.0) == []  # it exits within the grace: nothing to kill


def test_ray_processes_are_ray_s_and_what_they_started(ray_local):
    with subprocess.Popen(["sleep", "60"]) as mine:
        try:
            ours = ray_processes()
            assert any("raylet" in p.cmdline for p in ours), [p.cmdline[:60] for p in ours]
            assert all(p.pid != mine.pid for p in ours)  # this process's own children are not Ray's
        finally:
            mine.kill()
    import ray

    assert shutdown_if_started_here() == [] and ray.is_initialized()  # a Ray it did not start is left alone


# A job's driver: starts a local Ray as the CLI does, gives an actor a child that ignores SIGTERM in
# a session of its own (so Ray's shutdown never reaches it), then ends as the CLI ends.
_DRIVER = textwrap.dedent("""
    import json, os, sys
    import ray
    from pipelines.config import parse_config
    from pipelines.ingest import ensure_ray
    from pipelines.ray_processes import ray_processes, shutdown_if_started_here

    cfg = parse_config({"source": {"uri": sys.argv[1]}, "embedder": {"model": "Qwen/Qwen3-VL-Embedding-2B"},
                        "qdrant": {"path": sys.argv[1] + "/q", "collection": "media"}, "output": {"dir": sys.argv[1] + "/runs"}})
    ensure_ray(cfg)

    @ray.remote(num_cpus=0)
    class Stuck:
        def start(self):
            import subprocess
            child = subprocess.Popen(["sh", "-c", 'trap "" TERM; exec sleep 300'], start_new_session=True)
            return os.getpid(), child.pid

    actor = Stuck.remote()
    actor_pid, child_pid = ray.get(actor.start.remote())
    seen = {p.pid for p in ray_processes()}
    killed = [p.pid for p in shutdown_if_started_here(grace_s=3.0)]
    print(json.dumps({"actor": actor_pid, "child": child_pid, "seen": sorted(seen), "killed": killed}))
""")


def test_the_local_ray_a_job_started_leaves_no_process_behind(tmp_path):
    # Ray kills a worker's children when the worker exits; turned off here, the child stands for any Ray
    # process still running after the shutdown (the actor hung in its exit handler cannot be staged).
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_kill_child_processes_on_worker_exit": "0"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", _DRIVER, str(tmp_path)], env=env, cwd=tmp_path, text=True,
                         capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    import json

    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["actor"] in result["seen"] and result["child"] in result["seen"]
    assert result["child"] in result["killed"]  # it outlived Ray's shutdown by the grace period
    assert f"killed Ray process {result['child']} (sleep 300)" in out.stderr
    assert _gone(result["child"]) and _gone(result["actor"])
