"""Failures injected while the real job runs (Ray local cluster, moto S3 on loopback, embedded Qdrant).

- an embedding actor killed mid-run: restarted, its batch retried, every unit stored exactly once;
- Qdrant writes failing transiently (503s and timeouts at the client boundary): retried, nothing lost;
  failing persistently: the run stops with exit code 3 and the report says what was and was not written;
- the S3 endpoint answering 503 (loopback proxy in front of moto): retried, everything ingested; an
  object deleted between listing and reading: a dead letter, not a crash;
- the driver SIGKILLed mid-run: the same job run again completes without duplicates, re-embedding only
  the objects that were not completely written;
- the driver sent SIGTERM (a scheduler) or SIGINT (Ctrl-C, to its process group) mid-run: it stops within
  seconds, exit 143 / 130, with one error line and a report of what it wrote; re-running finishes;
- files that crash or hang a native decoder (SIGSEGV or an endless call in PDFium or decord, injected by
  tests/crash_hooks into a run's own Ray): each fails alone, in ingestion and in `query-batch`, instead
  of a crash loop or a stalled job.
"""

import dataclasses
import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
from ray import cloudpickle

import tests.resilience_helpers as helpers
from pipelines import ingest
from pipelines.cli import EXIT_INFRA, EXIT_OK, main as qvl
from pipelines.config import parse_config
from pipelines.ingest import UNFINISHED, run_ingest
from operators.sample_media import make_pdf
from tests.media_gen import image_bytes, pattern_image
from tests.resilience_corpus import make_text_corpus, write_av
from tests.resilience_helpers import (FlakyProxy, FlakyQdrantClient, all_points, config_dict, latest_run, point_keys,
                                      reap_session, sqlite_point_count, write_yaml)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ONE_CHUNK = {"chunk_tokens": 512, "overlap_tokens": 8}  # every generated text file is one unit


@pytest.fixture()
def client_wrapper(monkeypatch):
    """Install a QdrantSettings.client_wrapper for the runs of one test (the flaky client reaches
    the owner actor by value: `tests` is not importable in Ray workers)."""
    cloudpickle.register_pickle_by_value(helpers)
    original = ingest.qdrant_settings

    def install(wrapper):
        monkeypatch.setattr(ingest, "qdrant_settings",
                            lambda cfg: dataclasses.replace(original(cfg), client_wrapper=wrapper))

    yield install
    cloudpickle.unregister_pickle_by_value(helpers)


def check_exactly_once(qdrant_path, expected_keys):
    points = all_points(qdrant_path)
    keys = point_keys(points)
    assert len(keys) == len(set(keys)), "a unit was stored twice"
    assert sorted(keys) == sorted(expected_keys)
    return points


def text_keys(src, names):
    return [(str(src / n), "chunk=0") for n in names]


# ----------------------------------------------------------------------------- (a) actor killed


def _embed_actors(job_id):
    """This job's embedding actors (Ray Data names them "MapWorker(MapBatches(EmbedStage))")."""
    from ray._private import state

    return {aid: a for aid, a in state.actors().items()
            if "EmbedStage" in a["ActorClassName"] and a["JobID"] == job_id}


def test_embedding_actor_killed_mid_run_is_restarted_and_nothing_is_lost(tmp_path, tiny_embedding_ckpt, ray_local):
    src = tmp_path / "src"
    names = make_text_corpus(src, 40, words=40)
    cfg = parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path, compute={"batch_size": 2}, expand=ONE_CHUNK))
    job_id = ray.get_runtime_context().get_job_id()
    before = set(_embed_actors(job_id))
    killed = {}
    done = threading.Event()

    def killer():
        # SIGKILL the embedding actor's process (a crash, not a polite exit) shortly after it has loaded
        # the model and started taking batches: 20 batches of 2 rows keep it busy for seconds.
        alive_since = None
        while not done.is_set():
            alive = [(aid, a) for aid, a in _embed_actors(job_id).items() if aid not in before and a["State"] == "ALIVE"]
            if alive and alive_since is None:
                alive_since = time.monotonic()
            if alive and time.monotonic() - alive_since > 0.3:
                aid, actor = alive[0]
                written = sqlite_point_count(tmp_path / "qdrant")
                os.kill(actor["Pid"], signal.SIGKILL)
                killed.update(actor_id=aid, pid=actor["Pid"], written=written, at=time.monotonic())
                return
            time.sleep(0.02)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    try:
        report = run_ingest(cfg)
    finally:
        done.set()
        thread.join(5)
    finished = time.monotonic()
    assert killed, "the embedding actor was never found alive"
    assert killed["written"] < len(names), "killed too late: everything was already written"
    assert killed["at"] < finished
    assert _embed_actors(job_id)[killed["actor_id"]]["NumRestarts"] >= 1, "the killed actor was not restarted"
    assert report.counts()["ingested"] == len(names) and report.counts()["failed"] == 0
    assert not report.dead_letters and report.error is None
    check_exactly_once(tmp_path / "qdrant", text_keys(src, names))


# ---------------------------------------------------------------------- (b) Qdrant writes failing


def test_transient_qdrant_write_failures_are_retried_and_nothing_is_lost(tmp_path, tiny_embedding_ckpt, ray_local,
                                                                          client_wrapper):
    src = tmp_path / "src"
    names = make_text_corpus(src, 24)
    client_wrapper(functools.partial(FlakyQdrantClient, fail_upserts=3))  # 503, timeout, 503, then fine
    cfg = parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path, qdrant={"upsert_batch": 8}, expand=ONE_CHUNK))
    report = run_ingest(cfg)
    assert report.error is None
    assert report.write_stats["retries"] >= 3
    assert report.points_written == len(names) and report.counts()["ingested"] == len(names)
    check_exactly_once(tmp_path / "qdrant", text_keys(src, names))


def test_persistent_qdrant_write_failure_stops_the_run_and_reports_what_was_not_written(
        tmp_path, tiny_embedding_ckpt, ray_local, client_wrapper, capsys):
    src = tmp_path / "src"
    names = make_text_corpus(src, 12)
    client_wrapper(functools.partial(FlakyQdrantClient, fail_upserts=None))  # the store never comes back
    path = write_yaml(config_dict(src, tiny_embedding_ckpt, tmp_path, qdrant={"upsert_batch": 64, "retry_s": 6},
                                  expand=ONE_CHUNK), tmp_path / "cfg.yaml")
    started = time.monotonic()
    code = qvl(["ingest", path])
    elapsed = time.monotonic() - started
    out, err = capsys.readouterr()
    assert code == EXIT_INFRA
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "QdrantWriteError" in errors[0] and re.search(r"failed after \d+ attempts in \d+ s", errors[0])
    assert "qdrant.retry_s=6" in errors[0]
    assert f"0 objects were written completely, {len(names)} were not" in errors[0]
    assert "RUN STOPPED: QdrantWriteError" in out
    saved, dead = latest_run(tmp_path / "runs")
    assert saved["error"].startswith("QdrantWriteError: upsert on collection 'media' failed after ")
    assert saved["counts"]["failed"] == len(names) and saved["counts"]["ingested"] == 0
    not_written = sorted(d["uri"] for d in dead if d["stage"] == "write")
    assert not_written == sorted(str(src / n) for n in names)
    assert all("not written" in d["message"] for d in dead if d["stage"] == "write")
    assert all_points(tmp_path / "qdrant") == []
    assert saved["points_written"] == 0 and "points written 0 (none)" in out
    assert elapsed < 120, f"stopping took {elapsed:.0f}s"


def test_a_store_failing_after_the_writes_still_writes_the_report_and_the_next_run_finishes(
        tmp_path, tiny_embedding_ckpt, ray_local, client_wrapper, capsys):
    """The deletes after the writes (replaced units here) failing: one error line, exit 3, the report
    and its dead letters written; the next run deletes what this one could not."""
    src = tmp_path / "src"
    src.mkdir()
    manifest = src / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "record a"}\n{"id": "b", "text": "record b"}\n')
    path = write_yaml(config_dict(src, tiny_embedding_ckpt, tmp_path), tmp_path / "cfg.yaml")
    assert qvl(["ingest", path]) == EXIT_OK
    capsys.readouterr()
    # Record b goes (its point must be deleted as stale) and c has a missing image (a dead letter).
    manifest.write_text('{"id": "a", "text": "record a"}\n{"id": "c", "image": "missing.png"}\n')
    client_wrapper(functools.partial(FlakyQdrantClient, fail_upserts=0, refuse_deletes=True))
    assert qvl(["ingest", path]) == EXIT_INFRA
    out, err = capsys.readouterr()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "in the bookkeeping after the writes" in errors[0], err
    assert "QdrantWriteError: delete on collection 'media' failed (UnexpectedResponse" in errors[0], errors[0]
    saved, dead = latest_run(tmp_path / "runs")
    assert "in the bookkeeping after the writes" in saved["error"] and saved["deleted_stale_objects"] == 0
    assert [(d["position"], d["stage"]) for d in dead] == [("record=c", "expand")]
    client_wrapper(None)
    assert qvl(["ingest", path]) == EXIT_OK
    assert sorted(p.payload["position"] for p in all_points(tmp_path / "qdrant")) == ["record=a"]


# --------------------------------------------------------------------------- (c) S3 failing


def test_s3_endpoint_failing_transiently_and_an_object_deleted_after_listing(
        tmp_path, tiny_embedding_ckpt, moto_s3, ray_local, monkeypatch):
    from tests.resilience_corpus import encode, pattern, write_av

    s3 = moto_s3["client"]
    bucket = "flaky-s3"
    s3.create_bucket(Bucket=bucket)
    texts = [f"notes/n{i}.txt" for i in range(3)] + ["odd/with space.txt", "odd/ünï 日本.txt", "odd/hash#tag.txt",
                                                     "odd/question?.txt", "odd/percent%20twenty.txt"]
    for i, key in enumerate(texts):
        s3.put_object(Bucket=bucket, Key=f"in/{key}", Body=f"Note {i} stored under the key {key}.".encode())
    s3.put_object(Bucket=bucket, Key="in/images/p.png", Body=encode(pattern(3, (40, 30)), "PNG"))
    write_av(tmp_path / "clip.mp4", 2.0)
    s3.upload_file(str(tmp_path / "clip.mp4"), bucket, "in/videos/clip.mp4")  # the embed stage reads it via S3 too
    victim = "in/notes/n2.txt"

    real_list = ingest.list_objects

    def list_then_delete(*args, **kwargs):  # the object vanishes between listing and reading
        listed = real_list(*args, **kwargs)
        s3.delete_object(Bucket=bucket, Key=victim)
        return listed

    monkeypatch.setattr(ingest, "list_objects", list_then_delete)
    with FlakyProxy(moto_s3["endpoint_url"], fail_first=3, fail_each_once=True) as proxy:
        options = {"endpoint_url": proxy.url, "key": "testing", "secret": "testing"}
        cfg = parse_config(config_dict(f"s3://{bucket}/in/", tiny_embedding_ckpt, tmp_path, storage_options=options,
                                       expand=ONE_CHUNK))
        report = run_ingest(cfg)
    uri = lambda key: f"s3://{bucket}/{key}"  # noqa: E731
    # Every object read met a 503 (HEAD and GET each failed once) and was retried.
    failed_paths = {path for _, path in proxy.failed}
    for key in [f"in/{t}" for t in texts if f"in/{t}" != victim] + ["in/images/p.png", "in/videos/clip.mp4"]:
        from urllib.parse import quote
        assert f"/{bucket}/{quote(key, safe='/~')}" in failed_paths or f"/{bucket}/{key}" in failed_paths, key
    assert len(proxy.failed) >= 3 + len(texts)

    assert report.error is None
    assert report.counts() == {"ingested": len(texts) - 1 + 2, "unchanged": 0, "failed": 1, "skipped": 0}
    (letter,) = report.dead_letters
    assert letter["uri"] == uri(victim) and letter["stage"] == "expand" and letter["error_type"] == "FileNotFoundError"
    assert "listed but is gone now" in letter["message"]
    expected = [(uri(f"in/{t}"), "chunk=0") for t in texts if f"in/{t}" != victim]
    expected += [(uri("in/images/p.png"), "image"), (uri("in/videos/clip.mp4"), "t=0.000-1.000"),
                 (uri("in/videos/clip.mp4"), "t=1.000-2.000")]
    check_exactly_once(tmp_path / "qdrant", expected)


# ------------------------------------------------------------------------------ (d) driver killed


def _expected_units(src, ckpt):
    """(uri, position) of every unit of every file under src, and units per uri, from the expansion itself."""
    from transformers import AutoTokenizer

    from operators.media.expand import ExpandSettings, expand_object
    from operators.media.listing import list_objects

    tok = AutoTokenizer.from_pretrained(str(ckpt))
    objects, _ = list_objects(str(src))
    keys, per_uri = [], {}
    for obj in objects:
        units, _, _ = expand_object(obj, ExpandSettings(chunk_tokens=64, overlap_tokens=8), None, tok)
        keys += [(u.object_uri, u.position) for u in units]
        per_uri[obj.uri] = len(units)
    return keys, per_uri


def _complete_objects(qdrant_path):
    """URIs whose points are all in the store (what the next run will skip)."""
    from qdrant_client import QdrantClient

    from sinks.qdrant_writer import INCOMPLETE, QdrantWriter

    client = QdrantClient(path=str(qdrant_path))
    try:
        if not client.collection_exists("media"):
            return set()
        return {u for u, fp in QdrantWriter(client, "media").fingerprints_by_uri().items() if fp != INCOMPLETE}
    finally:
        client.close()


def _wait_lock_free(lock_file, timeout_s):
    """True once an exclusive flock on lock_file can be taken (and is released again at once)."""
    import fcntl

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with open(lock_file, "r+") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass
            else:
                fcntl.flock(fh, fcntl.LOCK_UN)
                return True
        time.sleep(0.1)
    return False


def own_ray_env(request, pythonpath: list[Path] = (), **extra: str) -> dict[str, str]:
    """The environment for a `qvl` subprocess that starts its own Ray, not this session's."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="qvlray", dir="/tmp"))  # short: Ray's socket paths
    request.addfinalizer(lambda: shutil.rmtree(ray_tmp, ignore_errors=True))
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_TMPDIR=str(ray_tmp), PYTHONPATH=os.pathsep.join(map(str, [*pythonpath, REPO])), **extra)
    return env


def _driver_job(tmp_path, ckpt, request):
    """A job for a `qvl ingest` subprocess: 24 texts of about 5 chunks, small batches (many writes).

    Returns the expected unit keys, units per URI, the config path, the environment and the store folder."""
    src = tmp_path / "src"
    make_text_corpus(src, 24, words=40)
    expected, per_uri = _expected_units(src, ckpt)
    path = write_yaml(config_dict(src, ckpt, tmp_path, compute={"batch_size": 4}, qdrant={"upsert_batch": 16}),
                      tmp_path / "cfg.yaml")
    return expected, per_uri, path, own_ray_env(request), tmp_path / "qdrant"


def _ingest_until_points(path, env, out, err, qdrant, at_least, timeout_s=240):
    """`qvl ingest path` in its own session, returned once the store holds at_least points (or it ended)."""
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "ingest", path], cwd=REPO, env=env,
                            stdout=out, stderr=err, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    written = 0
    while time.monotonic() < deadline and proc.poll() is None:
        written = sqlite_point_count(qdrant)
        if written >= at_least:
            break
        time.sleep(0.01)
    return proc, written


def test_driver_killed_mid_run_then_rerun_completes_without_duplicates(tmp_path, tiny_embedding_ckpt, ray_local,
                                                                       request):
    expected, per_uri, path, env, qdrant = _driver_job(tmp_path, tiny_embedding_ckpt, request)
    with open(tmp_path / "driver.out", "wb") as out, open(tmp_path / "driver.err", "wb") as err:
        # Kill the driver (SIGKILL: no cleanup at all) once a quarter of the points are in the store.
        proc, written = _ingest_until_points(path, env, out, err, qdrant, len(expected) // 4)
        try:
            assert proc.poll() is None, f"the run ended before it could be killed: {(tmp_path / 'driver.err').read_text()[-2000:]}"
            assert written < len(expected), "everything was written before the kill"
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        finally:
            if proc.poll() is None:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(30)
    try:
        # The embedded store's lock is an flock held by the owner actor's process: the kernel drops it
        # when that process dies, which it does with the killed driver's Ray (fate sharing). No stale
        # lock is left behind, and nothing is killed here until that has been seen.
        assert _wait_lock_free(qdrant / ".lock", 60), "the embedded store is still locked after the driver died"
    finally:
        # Ray's agent processes notice the lost raylet only after a while: end them, by pid.
        stragglers = reap_session(proc.pid, grace_s=3)
    # The killed run's report is the one written once the plan was made: it says the run did not finish.
    [killed] = [json.loads(p.read_text()) for p in (tmp_path / "runs").glob("*/report.json")]
    assert killed["error"] == UNFINISHED and killed["points_written"] == 0
    after_kill = len(all_points(qdrant))
    complete = _complete_objects(qdrant)
    assert 0 < after_kill < len(expected)
    assert len(complete) < len(per_uri)

    # The same job again: it finishes, skips the complete objects and re-embeds only the rest.
    assert qvl(["ingest", path]) == EXIT_OK
    saved, dead = latest_run(tmp_path / "runs")
    assert not dead and saved["error"] is None
    assert saved["counts"]["unchanged"] == len(complete)
    assert saved["counts"]["ingested"] == len(per_uri) - len(complete)
    assert saved["points_written"] == len(expected) - sum(per_uri[u] for u in complete)
    check_exactly_once(qdrant, expected)
    print(f"killed after {written} points ({after_kill} stored, {len(complete)} complete objects); "
          f"stragglers killed: {stragglers}")


def _run_report(report_line: str) -> tuple[dict, list[dict]]:
    """(report.json, dead letters) of the run whose console line was "report: <path>"."""
    path = Path(report_line.split("report: ", 1)[1].strip())
    dead = [json.loads(line) for line in (path.parent / "dead_letters.jsonl").read_text().splitlines() if line]
    return json.loads(path.read_text()), dead


def test_stop_signals_mid_run_write_the_report_and_exit_128_plus_the_signal(tmp_path, tiny_embedding_ckpt,
                                                                            ray_local, request):
    """A scheduler's SIGTERM to the driver, then Ctrl-C (SIGINT to the whole process group): each run
    stops within seconds with one error line, exit 143 / 130, and a report of what it wrote. Before,
    SIGTERM aborted in Ray's core worker (exit 134, a crash dump) and SIGINT ended in a traceback
    (exit 1), neither with a report."""
    expected, per_uri, path, env, qdrant = _driver_job(tmp_path, tiny_embedding_ckpt, request)
    complete: set[str] = set()
    for sig, to_group in ((signal.SIGTERM, False), (signal.SIGINT, True)):
        name = signal.Signals(sig).name
        before = sqlite_point_count(qdrant) if qdrant.exists() else 0
        with open(tmp_path / f"{name}.out", "wb") as out, open(tmp_path / f"{name}.err", "wb") as err:
            proc, written = _ingest_until_points(path, env, out, err, qdrant, before + (len(expected) - before) // 4)
            try:
                assert proc.poll() is None, f"the run ended first: {(tmp_path / f'{name}.err').read_text()[-2000:]}"
                assert written < len(expected), "everything was written before the signal"
                sent = time.monotonic()
                os.killpg(proc.pid, sig) if to_group else os.kill(proc.pid, sig)
                proc.wait(60)
                took = time.monotonic() - sent
            finally:
                if proc.poll() is None:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait(30)
                stragglers = reap_session(proc.pid, grace_s=10)
        stderr = (tmp_path / f"{name}.err").read_text()
        assert proc.returncode == 128 + sig, stderr[-3000:]
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and errors[0].startswith(f"error: interrupted by {name}: "), errors
        assert "re-run the same job to finish" in errors[0] and "Traceback" not in stderr
        assert _wait_lock_free(qdrant / ".lock", 60)
        previously = complete
        complete = _complete_objects(qdrant)
        report_line = [ln for ln in (tmp_path / f"{name}.out").read_text().splitlines() if ln.startswith("report: ")]
        saved, dead = _run_report(report_line[-1])
        assert saved["error"] == f"Interrupted: interrupted by {name}"
        assert saved["counts"] == {"ingested": len(complete - previously), "unchanged": len(previously),
                                   "failed": len(per_uri) - len(complete), "skipped": 0}
        assert {d["uri"] for d in dead} == set(per_uri) - complete
        assert {(d["stage"], d["error_type"]) for d in dead} == {("write", "Interrupted")}
        assert f"{len(complete - previously)} objects were written completely" in errors[0]
        assert previously < complete < set(per_uri), "no object was completed, or all were"
        # What the run wrote, counted in the store (the sink's own count died with the run).
        this_run = len(all_points(qdrant)) - sum(per_uri[u] for u in previously)
        assert saved["points_written"] == this_run > 0 and saved["points_per_modality"] == {"text": this_run}
        print(f"{name}: stopped {took:.1f} s after the signal, {len(complete)} of {len(per_uri)} objects "
              f"complete; stragglers: {stragglers}")

    # The same job again: it finishes the rest, with every unit stored exactly once.
    assert qvl(["ingest", path]) == EXIT_OK
    saved, dead = latest_run(tmp_path / "runs")
    assert not dead and saved["error"] is None
    assert saved["counts"]["unchanged"] == len(complete)
    assert saved["counts"]["ingested"] == len(per_uri) - len(complete)
    check_exactly_once(qdrant, expected)


def test_a_stop_signal_outside_the_run_phase_waits_for_a_safe_point(tmp_path, tiny_embedding_ckpt, ray_local):
    """Bookkeeping (planning, deleting replaced units after a run) is not stopped half-way: a signal there
    takes effect when the run phase starts (nothing embedded, all "not written"), or after the report."""
    from pipelines.interrupts import Interrupted

    src = tmp_path / "src"
    names = make_text_corpus(src, 6)
    cfg = parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path, expand=ONE_CHUNK))
    lines: list[str] = []

    def signal_on(prefix):
        def echo(line):
            lines.append(line)
            if line.startswith(prefix):
                os.kill(os.getpid(), signal.SIGTERM)
        return echo

    ray_handler = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Interrupted) as info:
        run_ingest(cfg, echo=signal_on("listed "))  # after planning, before the run
    assert info.value.exit_code == 143
    assert str(info.value).startswith("interrupted by SIGTERM: 0 objects were written completely, 6 were not")
    saved, dead = _run_report([ln for ln in lines if ln.startswith("report: ")][-1])
    assert saved["error"] == "Interrupted: interrupted by SIGTERM" and len(dead) == 6
    assert not all_points(tmp_path / "qdrant")
    assert signal.getsignal(signal.SIGTERM) == ray_handler  # restored after the run

    lines.clear()
    with pytest.raises(Interrupted, match="after the run had written everything") as info:
        run_ingest(cfg, echo=signal_on("report: "))  # the last line: the run is complete
    assert info.value.exit_code == 143
    saved, dead = _run_report([ln for ln in lines if ln.startswith("report: ")][-1])
    assert saved["error"] is None and not dead and saved["counts"]["ingested"] == len(names)
    check_exactly_once(tmp_path / "qdrant", text_keys(src, names))


def test_the_reported_cause_is_the_error_not_ray_datas_empty_marker():
    """Ray Data re-raises internal errors `from SystemException()`, which has no message: the report
    must name the error itself (for an actor that died loading its model, that error's last line)."""
    from ray.data.exceptions import SystemException

    from pipelines.ingest import root_cause

    try:
        try:
            raise ValueError("ModelLoadError: cannot load model from '/models/x': header incomplete")
        except ValueError as inner:
            raise inner from SystemException()
    except ValueError as exc:
        assert root_cause(exc) is exc


def test_a_model_the_actors_cannot_load_is_named_with_what_to_fix(tmp_path, tiny_embedding_ckpt, ray_local, capsys):
    """Weights whose shapes do not match the config pass preflight (only headers are read there) and
    fail in every embedding actor: the error names the load failure, and the advice is to fix the
    model, not to re-run."""
    import json

    model = tmp_path / "model"
    shutil.copytree(tiny_embedding_ckpt, model)
    config = json.loads((model / "config.json").read_text())
    config["text_config"]["intermediate_size"] += 8
    (model / "config.json").write_text(json.dumps(config))
    src = tmp_path / "src"
    make_text_corpus(src, 2)
    data = config_dict(src, model, tmp_path)
    path = tmp_path / "cfg.yaml"
    helpers.write_yaml(data, path)
    assert qvl(["ingest", str(path)]) == EXIT_INFRA
    err = capsys.readouterr().err
    assert "ModelLoadError" in err and "could not load the model" in err and "re-run the same job" not in err
    report, _ = latest_run(tmp_path / "runs")
    assert report["error"].startswith("ActorDiedError: ") and "ModelLoadError: cannot load model" in report["error"]


# ------------------------------------------------------------- (e) a file that crashes a decoder


def qvl_with_crash_hook(request, args: list[str], timeout_s: float = 300) -> tuple[int, str]:
    """(exit code, output) of `qvl ARGS` in a subprocess whose own Ray loads tests/crash_hooks (marked
    files kill their decoder's process with SIGSEGV)."""
    env = own_ray_env(request, [REPO / "tests" / "crash_hooks"], QVL_TEST_NATIVE_CRASH="1")
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait(30)
        reap_session(proc.pid, grace_s=10)
    return proc.returncode, out.decode(errors="replace")


def test_files_that_crash_or_hang_a_native_decoder_fail_alone(tmp_path, tiny_embedding_ckpt, request):
    """PDFs that kill or hang their expansion worker, and videos that kill or hang the embedding actor
    (SIGSEGV, or an endless call, inside the decoder, injected by tests/crash_hooks/sitecustomize.py into
    this run's own Ray): each becomes a dead letter naming what happened, and every other file lands.
    Before the crash journal, the crashing PDF's expansion task was retried forever, the crashing video
    stopped the run, and either hanging file stalled it for good."""
    src = tmp_path / "src"
    names = make_text_corpus(src, 4)
    (src / "docs").mkdir()
    (src / "docs/fine.pdf").write_bytes(make_pdf(["a page that renders"]))
    (src / "docs/qvl-crash.pdf").write_bytes(make_pdf(["a page PDFium dies on"]) + b"\n%qvl-crash\n")
    (src / "docs/qvl-hang.pdf").write_bytes(make_pdf(["a page PDFium never finishes"]) + b"\n%qvl-hang\n")
    (src / "clips").mkdir()
    for name in ("fine", "qvl-crash", "qvl-hang"):
        write_av(src / f"clips/{name}.mp4", 2.0)  # two 1-second segments: both open the same file
    # A manifest whose image records kill or hang Pillow: each fails alone, its good record lands.
    media = tmp_path / "media"
    media.mkdir()
    for i, name in enumerate(("fine", "qvl-crash", "qvl-hang")):
        (media / f"{name}.png").write_bytes(image_bytes(pattern_image(i, (24, 24))) + name.encode())
    (src / "list.jsonl").write_text("".join(json.dumps({"id": name, "image": str(media / f"{name}.png")}) + "\n"
                                            for name in ("fine", "qvl-crash", "qvl-hang")))
    # Parquet manifests whose parse kills or hangs pyarrow: before the run (tests/test_expand_plan.py
    # has a hang there), then in their expansion.
    for name in ("qvl-crash", "qvl-hang"):
        pq.write_table(pa.table({"id": ["r"], "text": [name]}), src / f"{name}.parquet", compression="none")
    path = write_yaml(config_dict(src, tiny_embedding_ckpt, tmp_path, compute={"batch_size": 16},
                                  limits={"max_expand_s": 6.0, "max_embed_batch_s": 12.0}), tmp_path / "cfg.yaml")
    code, log = qvl_with_crash_hook(request, ["ingest", path])
    assert code == EXIT_OK, log[-3000:]
    assert "Segmentation fault" in log or "SIGSEGV" in log or "worker died" in log.lower(), "no crash happened"
    report, dead = latest_run(tmp_path / "runs")
    assert report["error"] is None
    letters = sorted((Path(d["uri"]).name, d["stage"], d["position"], d["error_type"]) for d in dead)
    assert letters == [
        ("list.jsonl", "expand", "record=qvl-crash", "WorkerCrashed"),
        ("list.jsonl", "expand", "record=qvl-hang", "WorkerTimedOut"),
        ("qvl-crash.mp4", "embed", "t=0.000-1.000", "WorkerCrashed"),
        ("qvl-crash.mp4", "embed", "t=1.000-2.000", "WorkerCrashed"),
        ("qvl-crash.parquet", "expand", None, "WorkerCrashed"),
        ("qvl-crash.pdf", "expand", None, "WorkerCrashed"),
        ("qvl-hang.mp4", "embed", "t=0.000-1.000", "WorkerTimedOut"),
        ("qvl-hang.mp4", "embed", "t=1.000-2.000", "WorkerTimedOut"),
        ("qvl-hang.parquet", "expand", None, "WorkerTimedOut"),
        ("qvl-hang.pdf", "expand", None, "WorkerTimedOut")], dead
    messages = {Path(d["uri"]).name: d["message"] for d in dead if d["stage"] == "expand"}
    assert "worker process died while expanding it" in messages["qvl-crash.pdf"]
    assert "expanding it took longer than limits.max_expand_s=6 s" in messages["qvl-hang.pdf"]
    # The three manifests share a parse task. It dies; then each is parsed alone: list.jsonl's records
    # go to a range task (where Pillow dies and hangs), the two Parquet files are expanded whole.
    assert "parsing 3 manifests (" in log and "each is parsed again alone" in log
    assert re.search(r"parsing \S*qvl-crash.parquet before the run failed \(\w+Error.*; it is expanded whole", log)
    assert re.search(r"parsing \S*qvl-hang.parquet took over limits.max_expand_s=6 s; it is expanded whole", log)
    assert not re.search(r"parsing \S*list.jsonl before the run failed", log)
    assert report["counts"]["failed"] == 6
    assert report["counts"]["ingested"] == len(names) + 3
    keys = point_keys(all_points(tmp_path / "qdrant"))
    assert sorted(keys) == sorted([*text_keys(src, names), (str(src / "docs/fine.pdf"), "page=1"),
                                   (str(src / "list.jsonl"), "record=fine"),
                                   (str(src / "clips/fine.mp4"), "t=0.000-1.000"),
                                   (str(src / "clips/fine.mp4"), "t=1.000-2.000")])


def test_a_batch_of_many_crashing_videos_fails_them_alone(tmp_path, tiny_embedding_ckpt, request):
    """Five videos in one embedding batch, each killing the actor: each death names one of them, so the
    batch is retried until all five are dead letters, and its other units land. Before, a batch got five
    retries whatever it held: the sixth death (the first names nothing) stopped the run with exit 3 and
    every object "not written", and every re-run died the same way."""
    src = tmp_path / "src"
    names = make_text_corpus(src, 2)
    (src / "clips").mkdir()
    write_av(src / "clips/fine.mp4", 1.0)
    for i in range(5):
        write_av(src / f"clips/qvl-crash-{i}.mp4", 1.0)  # one one-second segment each
    path = write_yaml(config_dict(src, tiny_embedding_ckpt, tmp_path, compute={"batch_size": 32}),
                      tmp_path / "cfg.yaml")
    code, log = qvl_with_crash_hook(request, ["ingest", path])
    assert code == EXIT_OK, log[-3000:]
    report, dead = latest_run(tmp_path / "runs")
    assert report["error"] is None
    assert sorted((Path(d["uri"]).name, d["stage"], d["error_type"]) for d in dead) == [
        (f"qvl-crash-{i}.mp4", "embed", "WorkerCrashed") for i in range(5)]
    assert report["counts"]["ingested"] == len(names) + 1 and report["counts"]["failed"] == 5
    keys = point_keys(all_points(tmp_path / "qdrant"))
    assert sorted(keys) == sorted([*text_keys(src, names), (str(src / "clips/fine.mp4"), "t=0.000-1.000")])


def test_candidates_that_crash_or_hang_their_decoder_fail_their_query_alone(tmp_path, tiny_embedding_ckpt,
                                                                              tiny_reranker_ckpt, ray_local,
                                                                              request):
    """`qvl query-batch`: a query whose candidates include a video that kills decord (and so the reranking
    actor), and one whose candidates include a video that hangs it, each fail alone, naming what happened;
    the other query of the job gets its hits. Before, Ray Data retried the dying batch forever, and the
    hang stalled the job."""
    src = tmp_path / "src"
    make_text_corpus(src, 3)
    for folder, name in (("clips", "qvl-crash.mp4"), ("slow", "qvl-hang.mp4")):
        (src / folder).mkdir()
        write_av(src / folder / name, 2.0)
    path = write_yaml(config_dict(src, tiny_embedding_ckpt, tmp_path, reranker={"model": str(tiny_reranker_ckpt)},
                                  limits={"max_rerank_query_s": 10.0}), tmp_path / "cfg.yaml")
    assert qvl(["ingest", path]) == EXIT_OK  # this session's Ray has no crash hook: the videos embed
    queries = tmp_path / "queries.jsonl"
    rows = [{"id": "texts", "text": "words", "filters": {"modality": "text"}},
            {"id": "crashing", "text": "words", "filters": {"source_prefix": str(src / "clips")}},
            {"id": "hanging", "text": "words", "filters": {"source_prefix": str(src / "slow")}}]
    queries.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "results.jsonl"
    code, log = qvl_with_crash_hook(request, ["query-batch", path, "--queries", str(queries), "--out", str(out),
                                             "--top-k", "10", "--top-n", "3"])
    assert code == EXIT_OK, log[-3000:]
    results = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert results["texts"]["error"] is None and len(results["texts"]["hits"]) == 3
    assert "WorkerCrashed" in results["crashing"]["error"], results["crashing"]
    assert "died while reranking the candidates of it" in results["crashing"]["error"]
    assert "WorkerTimedOut" in results["hanging"]["error"], results["hanging"]
    assert "took longer than limits.max_rerank_query_s=10 s" in results["hanging"]["error"]
