"""Stop signals (pipelines/interrupts.py): real SIGINT / SIGTERM sent to this process."""

from __future__ import annotations

import os
import pickle
import signal
import threading

import pytest

from pipelines.interrupts import Interrupted, SignalGate, stop_on_signals


def _send(sig: int) -> None:
    os.kill(os.getpid(), sig)  # handled in the main thread before the next bytecode after this call


def test_a_signal_in_the_interruptible_phase_raises_at_once() -> None:
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with stop_on_signals() as gate:
        with pytest.raises(Interrupted) as info:
            with gate.interruptible():
                _send(signal.SIGTERM)
                raise AssertionError("not interrupted")
        # The first signal gave both signals back their default action: a second one stops at once.
        assert signal.getsignal(signal.SIGINT) == signal.SIG_DFL == signal.getsignal(signal.SIGTERM)
    assert {s: signal.getsignal(s) for s in before} == before
    stop = info.value
    assert isinstance(stop, KeyboardInterrupt)  # callers' Ctrl-C handlers still catch it
    assert (stop.signum, stop.signal_name, stop.exit_code, str(stop)) == \
        (signal.SIGTERM, "SIGTERM", 143, "interrupted by SIGTERM")


def test_a_signal_while_ray_waits_is_still_the_signal_it_was(ray_local) -> None:
    # ray.wait / ray.get turn the handler's Interrupted into a plain KeyboardInterrupt: a SIGTERM
    # while the driver waited on manifest parses exited 130 "SIGINT", and the run's report was lost.
    ray = ray_local
    sleeper = ray.remote(lambda: __import__("time").sleep(60)).options(num_cpus=0).remote()
    timer = threading.Timer(1.0, _send, (signal.SIGTERM,))
    try:
        with stop_on_signals() as gate:
            with pytest.raises(KeyboardInterrupt) as info:
                with gate.interruptible():
                    timer.start()
                    ray.wait([sleeper], timeout=30)
                    raise AssertionError("not interrupted")
    finally:
        timer.cancel()
        ray.cancel(sleeper, force=True)
    assert isinstance(info.value, Interrupted) and info.value.signum == signal.SIGTERM


def test_a_signal_outside_it_waits_for_the_next_safe_point() -> None:
    with stop_on_signals() as gate:
        _send(signal.SIGINT)  # bookkeeping: not stopped half-way
        assert gate.pending == signal.SIGINT
        with pytest.raises(Interrupted) as info:
            with gate.interruptible():  # entering the run phase raises it
                raise AssertionError("entered")
        assert info.value.exit_code == 130
        with pytest.raises(Interrupted, match="^after everything$"):
            gate.raise_pending("after everything")


def test_no_signal_no_interruption_and_handlers_restored() -> None:
    before = signal.getsignal(signal.SIGTERM)
    with stop_on_signals() as gate:
        assert signal.getsignal(signal.SIGTERM) == gate.handle
        with gate.interruptible():
            pass
        gate.raise_pending()
    assert signal.getsignal(signal.SIGTERM) == before


def test_outside_the_main_thread_nothing_is_installed() -> None:
    seen = {}

    def worker() -> None:
        with stop_on_signals() as gate:
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["gate"] = gate

    before = signal.getsignal(signal.SIGTERM)
    t = threading.Thread(target=worker)
    t.start()
    t.join()
    assert seen["handler"] == before and isinstance(seen["gate"], SignalGate)


def test_interrupted_keeps_its_signal_and_message_across_pickling() -> None:
    stop = Interrupted(signal.SIGTERM).with_message("interrupted by SIGTERM: 3 objects were written completely")
    back = pickle.loads(pickle.dumps(stop))
    assert (back.signum, str(back), back.exit_code) == (signal.SIGTERM, str(stop), 143)


def test_a_signal_before_the_gate_waits_for_it() -> None:
    """After ray.init and before the run's gate, a stop signal is kept (raising there could leave a lock held)."""
    from pipelines.interrupts import defer_signals

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        defer_signals()
        _send(signal.SIGTERM)  # nothing raised here
        with stop_on_signals() as gate:
            with pytest.raises(Interrupted) as info:
                with gate.interruptible():
                    pass
        assert info.value.signum == signal.SIGTERM
        # the deferral ends with the job: defaults are back, not the deferral
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_a_job_failing_before_its_gate_gives_the_signals_back() -> None:
    """A preflight error after ray.init (a locked store, pools that do not fit) left the deferral's
    handler in place: every later Ctrl-C of the process (a notebook, a service) was swallowed."""
    from pipelines.interrupts import defer_signals, deferral_ends_on_error
    from pipelines.preflight import PreflightError

    before = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with pytest.raises(PreflightError):
            with deferral_ends_on_error():
                defer_signals()  # as ensure_ray does
                raise PreflightError("compute.embed_actors: the pool does not fit")
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
        with pytest.raises(KeyboardInterrupt):
            _send(signal.SIGINT)
        with deferral_ends_on_error():  # no failure: the deferral goes on to the gate
            defer_signals()
        _send(signal.SIGTERM)  # remembered, not acted on
        with stop_on_signals() as gate:
            assert gate.pending == signal.SIGTERM
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


def test_sigterm_while_the_job_starts_ray_is_one_line_and_exit_143(tmp_path, tiny_embedding_ckpt) -> None:
    """Between ray.init and the run's own handlers, Ray's handler used to exit 15 with no word."""
    import subprocess
    import sys

    import yaml

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("a note")
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"source": {"uri": str(tmp_path / "src")}, "embedder": {"model": str(tiny_embedding_ckpt)},
                                   "qdrant": {"path": str(tmp_path / "q"), "collection": "sig"},
                                   "output": {"dir": str(tmp_path / "runs")}}))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ingest", str(job)], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
    seen = []
    try:
        for line in proc.stderr:  # ray.init's last words: its handler is still the one in place
            seen.append(line)
            if "Started a local Ray instance" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.communicate(timeout=120)[1]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    err = "".join(seen) + rest
    assert proc.returncode == 143, err
    assert "error: interrupted by SIGTERM" in err and "Traceback" not in err
