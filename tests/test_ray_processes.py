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

from pipelines.ray_processes import (Process, command_name, kill, node_processes, processes_below, read_process,
                                     survivors)

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


def descendants() -> list[Process]:
    """Every live process below this one."""
    return processes_below([os.getpid()])[1:]


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
    assert kill(survivors([child], grace_s=0.5)) == [child]
    assert time.monotonic() - t0 >= 0.5
    assert _gone(child.pid)


def test_a_pid_taken_by_another_process_is_left_alone():
    child = _orphan()
    try:
        reused = Process(child.pid, child.ppid, child.start + 1)  # as if the PID were reused
        assert kill(survivors([reused], grace_s=0.1)) == []
        assert not _gone(child.pid, within_s=0.3)
    finally:
        os.kill(child.pid, signal.SIGKILL)
    assert kill(survivors([child], grace_s=5.0)) == []  # it exits within the grace: nothing to kill


def _config(root) -> dict:
    return {"source": {"uri": str(root)}, "embedder": {"model": "Qwen/Qwen3-VL-Embedding-2B"},
            "qdrant": {"path": f"{root}/q", "collection": "media"}, "output": {"dir": f"{root}/runs"}}


def test_the_node_s_processes_are_ray_s_not_this_process_s_others(ray_local):
    with subprocess.Popen(["sleep", "60"]) as mine:
        try:
            ours = node_processes()
            assert any("raylet" in command_name(p.pid) for p in ours), [command_name(p.pid)[:60] for p in ours]
            assert all(p.pid != mine.pid for p in ours)  # this process's own children are not Ray's
        finally:
            mine.kill()


def test_a_command_leaves_a_ray_it_did_not_start_running(ray_local, tmp_path, monkeypatch):
    import ray

    from pipelines import cli
    from pipelines.config import parse_config
    from pipelines.ingest import ensure_ray
    from pipelines.ray_processes import note_started_here

    cfg = parse_config(_config(tmp_path))

    def register(sub):
        sub.add_parser("touch-ray").set_defaults(func=lambda args: ensure_ray(cfg) or 0)

    monkeypatch.setattr(cli, "_EXTRA_COMMANDS", [*cli._EXTRA_COMMANDS, register])
    note_started_here()  # as a library call that started Ray earlier in this process would have
    assert cli.main(["touch-ray"]) == 0
    assert ray.is_initialized()  # the session's Ray: neither this command's nor its to stop


# A job's driver: runs a qvl command that starts a local Ray, as `qvl ingest` does, and gives an
# actor a child that ignores SIGTERM in a session of its own, so Ray's shutdown never reaches it.
_DRIVER = textwrap.dedent("""
    import json, os, sys
    import ray
    from pipelines import cli
    from pipelines.config import parse_config
    from pipelines.ingest import ensure_ray
    from pipelines.ray_processes import node_processes

    cfg = parse_config(json.loads(sys.argv[1]))
    seen = {}

    @ray.remote(num_cpus=0)
    class Stuck:
        def start(self):
            import subprocess
            child = subprocess.Popen(["sh", "-c", 'trap "" TERM; exec sleep 300'], start_new_session=True)
            return os.getpid(), child.pid

    def command(args):
        ensure_ray(cfg)
        seen["actor"], seen["child"] = ray.get(Stuck.remote().start.remote())
        seen["node"] = sorted(p.pid for p in node_processes())
        return 0

    def register(sub):
        sub.add_parser("stuck").set_defaults(func=command)

    cli._EXTRA_COMMANDS.append(register)
    code = cli.main(["stuck"])
    print(json.dumps({**seen, "code": code, "ray_up": ray.is_initialized()}))
""")


def test_the_local_ray_a_command_started_leaves_no_process_behind(tmp_path):
    import json

    # Ray kills a worker's children when the worker exits; turned off here, the child stands for any Ray
    # process still running after the shutdown (the actor hung in its exit handler cannot be staged).
    env = {**os.environ, "PYTHONPATH": str(REPO), "RAY_kill_child_processes_on_worker_exit": "0"}
    env.pop("RAY_ADDRESS", None)
    out = subprocess.run([sys.executable, "-c", _DRIVER, json.dumps(_config(tmp_path))], env=env, cwd=tmp_path,
                         text=True, capture_output=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["code"] == 0 and not result["ray_up"]
    assert result["actor"] in result["node"] and result["child"] in result["node"]
    # It outlived Ray's shutdown by the grace period, and was killed then, with one line.
    assert f"killed Ray process {result['child']} (sleep): still running 10 s" in out.stderr
    assert _gone(result["child"]) and _gone(result["actor"])


# A process (no Ray running in it: the shutdown itself does nothing) with a child that ignores
# SIGTERM, as a hung Ray process does, and a SIGTERM of its own half a second into the wait.
_STOPPED = textwrap.dedent("""
    import json, os, signal, subprocess, threading, time
    import ray  # noqa: F401  (imported before the timer starts: _shut_down's import must not eat its 0.5 s)
    from pipelines.interrupts import Interrupted
    from pipelines.ray_processes import _shut_down, processes_below

    child = subprocess.Popen(["sh", "-c", 'trap "" TERM; exec sleep 300'], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL)
    time.sleep(0.3)
    (proc,) = [p for p in processes_below([os.getpid()]) if p.pid == child.pid]
    timer = threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    t0 = time.monotonic()
    try:
        _shut_down([proc], 30.0)
        outcome = "returned"
    except Interrupted as stop:
        outcome = stop.signum
    finally:
        timer.cancel()
    waited = time.monotonic() - t0
    child.wait(timeout=5)
    print(json.dumps({"outcome": outcome, "waited": waited, "child": child.returncode,
                      "restored": signal.getsignal(signal.SIGTERM) == signal.SIG_DFL}))
""")


def test_a_stop_signal_while_waiting_for_survivors_kills_them_at_once_and_stops():
    """A scheduler's SIGTERM during the grace period must not end the process with the survivors alive."""
    import json

    out = subprocess.run([sys.executable, "-c", _STOPPED], env={**os.environ, "PYTHONPATH": str(REPO)},
                         text=True, capture_output=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["outcome"] == signal.SIGTERM and result["waited"] < 10  # not the 30 s grace
    assert result["child"] == -signal.SIGKILL and result["restored"]
