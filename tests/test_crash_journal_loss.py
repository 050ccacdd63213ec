"""The crash journal is advice (operators/crash_journal.py): a journal that died is restarted or done
without, never a reason for a task to fail; and a run that stops on an error wrapped by Ray Data
reports the error itself (pipelines/ingest.py: real_cause), not Ray Data's retry advice."""

import os
import signal
import threading
import time
from pathlib import Path

import pytest
import ray

from operators.crash_journal import TaskGuard, current_task_id, start_journal, stop_journal
from pipelines import ingest
from pipelines.config import parse_config
from tests.resilience_corpus import make_text_corpus
from tests.resilience_helpers import all_points, config_dict, point_keys

ONE_CHUNK = {"chunk_tokens": 512, "overlap_tokens": 8}  # every generated text file is one unit


def _wait_for(path: Path, timeout_s: float = 60) -> None:
    """Until `path` exists (a step of the other side of a test)."""
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert time.monotonic() < deadline, f"no {path.name} after {timeout_s} s"
        time.sleep(0.05)


def _journals(job_id: str) -> dict[str, dict]:
    """This job's CrashJournal actors, by actor id."""
    from ray._private import state

    return {aid: a for aid, a in state.actors().items()
            if a["ActorClassName"] == "CrashJournal" and a["JobID"] == job_id}


@ray.remote(max_retries=0)
def _guarded_task(journal, items: list[str]) -> tuple[bool, list[str]]:
    """A task attempt that reads `items` under a guard: (careful, the items it read)."""
    guard = TaskGuard(journal, current_task_id(), limit_s=30.0, setting="limits.example_s")
    read = []
    for item in items:
        if not guard.skip(item):
            with guard.reading(item):
                read.append(item)
    guard.end()
    return guard.careful, read


@ray.remote(max_retries=0)
def _task_losing_its_journal(journal, sync: str) -> list[str]:
    """A careful attempt whose journal dies after it began and before it names its next item."""
    guard = TaskGuard(journal, "careful-task", limit_s=30.0)
    assert guard.careful
    Path(sync, "begun").touch()
    _wait_for(Path(sync, "killed"))
    read = []
    for item in ("a", "b"):
        with guard.reading(item):  # names the item first: the journal is gone by then
            read.append(item)
    guard.end()
    return read


def test_a_task_goes_on_unguarded_when_the_journal_is_dead(ray_local):
    journal = start_journal()
    ray.kill(journal)  # for good: no restart
    careful, read = ray.get(_guarded_task.remote(journal, ["a", "b"]), timeout=120)
    assert not careful and read == ["a", "b"]


def test_a_journal_that_dies_during_an_attempt_does_not_fail_it(ray_local, tmp_path):
    journal = start_journal()
    try:
        ray.get(journal.begin.remote("careful-task"))  # an earlier attempt: the next one is careful
        ref = _task_losing_its_journal.remote(journal, str(tmp_path))
        _wait_for(tmp_path / "begun")
        ray.kill(journal)  # for good: no restart
        (tmp_path / "killed").touch()
        assert ray.get(ref, timeout=120) == ["a", "b"]
    finally:
        stop_journal(journal)


def _wait_restarted(journal, timeout_s: float = 60) -> None:
    """Until Ray has restarted `journal` at least once and it is alive again."""
    job_id, actor_id = ray.get_runtime_context().get_job_id(), journal._actor_id.hex()
    deadline = time.monotonic() + timeout_s
    while True:
        actor = _journals(job_id).get(actor_id, {})
        if actor.get("NumRestarts", 0) >= 1 and actor.get("State") == "ALIVE":
            return
        assert time.monotonic() < deadline, f"the journal was not restarted: {actor}"
        time.sleep(0.05)


def test_a_journal_whose_process_died_is_restarted(ray_local):
    journal = start_journal()
    try:
        ray.get(journal.begin.remote("t"))
        ray.kill(journal, no_restart=False)  # its process killed, as by `kill -9` or the OOM killer
        assert TaskGuard(journal, "u").journal is not None  # answered by the old process or the new one
        _wait_restarted(journal)
        guard = TaskGuard(journal, "t")  # the records died with the old process: a fresh journal, and it is used
        assert guard.journal is not None and (guard.attempt, guard.skipped) == (0, {})
        careful, read = ray.get(_guarded_task.remote(journal, ["a"]), timeout=120)
        assert not careful and read == ["a"]
        ray.get(journal.begin.remote("u"))
        ray.get(journal.enter.remote("u", "bad"))  # a careful attempt died reading "bad"
        assert TaskGuard(journal, "u").skip("bad")  # crash isolation works again on the new process
    finally:
        stop_journal(journal)


def test_a_guard_without_a_journal_logs_one_warning(ray_local, caplog, monkeypatch):
    import operators.crash_journal as cj

    monkeypatch.setattr(cj, "_WARNED", False)
    journal = start_journal()
    ray.kill(journal)
    with caplog.at_level("WARNING", logger="operators.crash_journal"):
        for task in ("t1", "t2"):
            guard = TaskGuard(journal, task)
            with guard.reading("x"):
                pass
            guard.end()
    warnings = [r for r in caplog.records if "crash journal could not be reached" in r.getMessage()]
    assert len(warnings) == 1 and "ActorDiedError" in warnings[0].getMessage()
    # One line, with why the actor died; not Ray's ids, pid, namespace and address, a line each.
    assert "\n" not in warnings[0].getMessage() and "killed by `ray.kill`" in warnings[0].getMessage()


# ------------------------------------------------------------------ a whole ingestion losing its journal


def _ingest_all(tmp_path: Path, ckpt, n: int) -> None:
    """Ingest `n` one-unit text files: every one ingested once, no error, no dead letter."""
    src = tmp_path / "src"
    names = make_text_corpus(src, n, words=40)
    cfg = parse_config(config_dict(src, ckpt, tmp_path, compute={"batch_size": 2}, expand=ONE_CHUNK))
    report = ingest.run_ingest(cfg)
    assert report.error is None and not report.dead_letters
    assert report.counts()["ingested"] == len(names) and report.counts()["failed"] == 0
    keys = point_keys(all_points(tmp_path / "qdrant"))
    assert sorted(keys) == sorted((str(src / name), "chunk=0") for name in names)


@pytest.mark.slow
def test_an_ingestion_whose_journal_is_dead_from_the_start_finishes(tmp_path, tiny_embedding_ckpt, ray_local,
                                                                     monkeypatch):
    def dead_journal():
        journal = start_journal()
        ray.kill(journal)  # for good: no restart
        return journal

    monkeypatch.setattr(ingest, "start_journal", dead_journal)
    _ingest_all(tmp_path, tiny_embedding_ckpt, 12)


@pytest.mark.slow
def test_an_ingestion_whose_journal_is_killed_mid_run_finishes(tmp_path, tiny_embedding_ckpt, ray_local):
    job_id = ray.get_runtime_context().get_job_id()
    before = set(_journals(job_id))
    killed: dict = {}
    done = threading.Event()

    def killer():
        # SIGKILL the journal's process (as `kill -9` would) once the stages have had time to use it.
        while not done.is_set():
            alive = [(aid, a) for aid, a in _journals(job_id).items() if aid not in before and a["State"] == "ALIVE"]
            if alive:
                time.sleep(1.0)
                aid, actor = alive[0]
                os.kill(actor["Pid"], signal.SIGKILL)
                killed.update(actor_id=aid, at=time.monotonic())
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        _ingest_all(tmp_path, tiny_embedding_ckpt, 30)
    finally:
        done.set()
        thread.join(5)
    assert killed, "the crash journal was never found alive"
    assert _journals(job_id)[killed["actor_id"]]["NumRestarts"] >= 1, "the killed journal was not restarted"


# ------------------------------------------------- the reported cause of an error wrapped by Ray Data


@ray.remote(num_cpus=0)
class _Doomed:
    """An actor to call after it was killed."""

    def ping(self) -> int:
        return 1


def _ray_data_error(udf) -> BaseException:
    """What a Ray Data pipeline raises on the driver when `udf` raises in its map task."""
    with pytest.raises(Exception) as info:
        ray.data.range(2, override_num_blocks=1).map_batches(udf).materialize()
    return info.value


def test_an_actor_death_behind_ray_datas_wrapper_is_named(ray_local):
    from pipelines.ingest import _error_text, cause_name

    doomed = _Doomed.remote()
    ray.get(doomed.ping.remote())
    ray.kill(doomed)

    def udf(batch):
        ray.get(doomed.ping.remote())
        return batch

    exc = _ray_data_error(udf)
    assert isinstance(exc, ray.exceptions.UserCodeException)  # Ray Data's wrapper, its cause left in the worker
    text = _error_text(exc)
    assert cause_name(exc) == "ActorDiedError"
    assert text.startswith("The actor died unexpectedly") and "class_name: _Doomed" in text
    assert "To change retry attempts" not in text and "UDF failed" not in text


def test_a_user_error_behind_ray_datas_wrapper_is_named(ray_local):
    from pipelines.ingest import _error_text, cause_name

    def udf(batch):
        raise ValueError("row 3 is not a row:\nit has no columns")

    exc = _ray_data_error(udf)
    assert (cause_name(exc), _error_text(exc)) == ("ValueError", "row 3 is not a row: it has no columns")


class _UnpicklableError(Exception):
    """Pickles, but cannot be unpickled (its __init__ takes two arguments): the driver gets Ray's
    UnserializableException holding the original's traceback text."""

    def __init__(self, what, why):
        super().__init__(f"{what} failed: {why}")


def test_an_error_that_cannot_be_unpickled_is_named_as_itself(ray_local):
    """Ray hands the driver an UnserializableException holding the original's traceback text (a store
    owner's death in a write task was reported as 'UnserializableException'); the original is named."""
    from pipelines.ingest import _error_text, cause_name

    @ray.remote
    def task():
        raise _UnpicklableError("the store owner", "it died")

    with pytest.raises(ray.exceptions.UnserializableException) as info:
        ray.get(task.remote())
    assert (cause_name(info.value), _error_text(info.value)) == ("_UnpicklableError", "the store owner failed: it died")


def test_an_error_from_ray_outside_ray_data_keeps_its_last_line():
    from pipelines.ingest import _error_text, cause_name

    exc = ray.exceptions.ActorDiedError()  # not wrapped: named as itself, as before
    assert cause_name(exc) == "ActorDiedError" and _error_text(exc) == str(exc).strip().splitlines()[-1].strip()
