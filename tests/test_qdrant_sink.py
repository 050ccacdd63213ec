"""Qdrant sink: schema create/validate, batched retrying writer, incremental queries, Ray datasink (local mode)."""

from __future__ import annotations

import json
import pickle

import httpx
import numpy as np
import pytest
from qdrant_client import QdrantClient, models
from qdrant_client.http.exceptions import UnexpectedResponse

from operators.units import point_id
from sinks.qdrant_client_factory import QdrantSettings, make_client, tune_embedded_storage
from sinks.qdrant_schema import (
    CollectionMismatchError,
    CollectionSpec,
    ensure_collection,
    vector_name,
)
from sinks.qdrant_writer import (
    PointRecord,
    QdrantWriteError,
    QdrantWriter,
    estimate_point_bytes,
    is_transient,
    split_requests,
)

FULL, MRL = 32, 8
SPEC = CollectionSpec(name="docs", full_dim=FULL, mrl_dims=(MRL,), quantization="int8")


@pytest.fixture
def client(tmp_path):
    c = QdrantClient(path=str(tmp_path / "qdrant"))
    yield c
    c.close()


def make_points(n: int, uri_count: int = 3, fingerprint: str = "fp1", seed: int = 0) -> list[PointRecord]:
    rng = np.random.default_rng(seed)
    points = []
    for i in range(n):
        uri = f"file:///data/doc{i % uri_count}.txt"
        pos = f"chunk={i}"
        points.append(
            PointRecord(
                point_id(uri, pos),
                {"full": rng.standard_normal(FULL).astype(np.float32), "mrl_8": rng.standard_normal(MRL).tolist()},
                {"source_uri": uri, "fingerprint": fingerprint, "modality": "text", "position": pos},
            )
        )
    return points


def _response(status: int) -> UnexpectedResponse:
    return UnexpectedResponse(status, "err", b'{"status":{"error":"x"}}', httpx.Headers())


class FlakyUpsert:
    """Wraps client.upsert at the client boundary: call k (1-based) raises `exc` when fail(k), else delegates."""

    def __init__(self, client: QdrantClient, fail, exc: Exception):
        self.inner, self.fail, self.exc, self.calls = client.upsert, fail, exc, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.fail(self.calls):
            raise self.exc
        return self.inner(*args, **kwargs)


# -- schema ------------------------------------------------------------------------


def test_vector_name():
    assert vector_name(None) == "full" and vector_name(256) == "mrl_256"


def test_create_named_vectors_and_quantization(client):
    ensure_collection(client, SPEC)
    vectors = client.get_collection("docs").config.params.vectors
    assert set(vectors) == {"full", "mrl_8"}
    assert vectors["full"].size == FULL and vectors["mrl_8"].size == MRL
    assert vectors["full"].distance == models.Distance.COSINE
    assert vectors["full"].quantization_config is None
    quant = vectors["mrl_8"].quantization_config
    assert isinstance(quant, models.ScalarQuantization)
    assert quant.scalar.type == models.ScalarType.INT8 and quant.scalar.always_ram

    spec16 = CollectionSpec(name="bin", full_dim=FULL, mrl_dims=(MRL, 4), full_datatype="float16",
                            on_disk=True, quantization="binary")
    ensure_collection(client, spec16)
    v = client.get_collection("bin").config.params.vectors
    assert v["full"].datatype == models.Datatype.FLOAT16 and v["full"].on_disk
    assert isinstance(v["mrl_4"].quantization_config, models.BinaryQuantization)
    assert ensure_collection(client, spec16) == []  # validating a matching collection is a no-op


def test_storage_settings_that_differ_are_reported_not_applied(client):
    spec = CollectionSpec(name="plain", full_dim=FULL, mrl_dims=(MRL,))
    ensure_collection(client, spec)
    other = CollectionSpec(name="plain", full_dim=FULL, mrl_dims=(MRL,), full_datatype="float16", on_disk=True,
                           quantization="binary")
    notes = ensure_collection(client, other)
    assert len(notes) == 3, notes
    assert "full_datatype is float16 but the collection stores float32" in notes[0]
    assert "on_disk is true" in notes[1] and "quantization is binary" in notes[2] and "use none" in notes[2]
    assert client.get_collection("plain").config.params.vectors["full"].datatype in (None, models.Datatype.FLOAT32)


def test_mismatch_names_both_dims_and_writes_nothing(client):
    ensure_collection(client, SPEC)
    QdrantWriter(client, "docs").upsert_points(make_points(3))
    before = client.get_collection("docs")

    wrong = CollectionSpec(name="docs", full_dim=FULL * 2, mrl_dims=(MRL,))
    with pytest.raises(CollectionMismatchError) as err:
        ensure_collection(client, wrong)
    msg = str(err.value)
    assert "'docs'" in msg and "'full'" in msg and str(FULL) in msg and str(FULL * 2) in msg

    with pytest.raises(CollectionMismatchError, match="no vector 'mrl_4'"):
        ensure_collection(client, CollectionSpec(name="docs", full_dim=FULL, mrl_dims=(MRL, 4)))
    # Fewer MRL dimensions than the collection holds: new points would be invisible to the funnel.
    with pytest.raises(CollectionMismatchError, match=r"holds MRL vectors \['mrl_8'\] .*embedder.mrl_dims \[\] .*"
                                                      r"set embedder.mrl_dims to \[8\]"):
        ensure_collection(client, CollectionSpec(name="docs", full_dim=FULL))

    after = client.get_collection("docs")
    assert after.config.params.vectors == before.config.params.vectors
    assert client.count("docs").count == 3


def test_distance_mismatch(client):
    client.create_collection(
        "dot", vectors_config={"full": models.VectorParams(size=FULL, distance=models.Distance.DOT)}
    )
    with pytest.raises(CollectionMismatchError, match="distance"):
        ensure_collection(client, CollectionSpec(name="dot", full_dim=FULL))


def test_a_multivector_or_uint8_vector_is_a_mismatch_before_any_work(client):
    multi = models.MultiVectorConfig(comparator=models.MultiVectorComparator.MAX_SIM)
    client.create_collection("multi", vectors_config={
        "full": models.VectorParams(size=FULL, distance=models.Distance.COSINE, multivector_config=multi)})
    with pytest.raises(CollectionMismatchError, match="vector 'full' is a multivector"):
        ensure_collection(client, CollectionSpec(name="multi", full_dim=FULL))
    client.create_collection("bytes", vectors_config={
        "full": models.VectorParams(size=FULL, distance=models.Distance.COSINE, datatype=models.Datatype.UINT8)})
    with pytest.raises(CollectionMismatchError, match="vector 'full' stores uint8"):
        ensure_collection(client, CollectionSpec(name="bytes", full_dim=FULL))


def test_payload_index_creation_is_idempotent(client):
    """Local mode reports no payload schema; emulate the server's so the second run creates nothing."""
    created: dict[str, models.PayloadIndexInfo] = {}
    calls: list[str] = []
    real_create, real_get = client.create_payload_index, client.get_collection

    def create(name, field_name, field_schema, **kw):
        calls.append(field_name)
        created[field_name] = models.PayloadIndexInfo(data_type=field_schema, points=0)
        return real_create(name, field_name=field_name, field_schema=field_schema, **kw)

    def get(name, **kw):
        return real_get(name, **kw).model_copy(update={"payload_schema": dict(created)})

    client.create_payload_index, client.get_collection = create, get
    ensure_collection(client, SPEC)
    assert sorted(calls) == ["fingerprint", "modality", "model_id", "source_prefixes", "source_uri"]
    ensure_collection(client, SPEC)
    ensure_collection(client, SPEC)
    assert len(calls) == 5


# -- writer ------------------------------------------------------------------------


def test_upsert_splits_requests(client):
    ensure_collection(client, SPEC)
    writer = QdrantWriter(client, "docs", max_points_per_request=16)
    calls = FlakyUpsert(client, lambda k: False, RuntimeError())
    client.upsert = calls
    assert writer.upsert_points(make_points(100)) == 100
    assert calls.calls == 7 and writer.stats.requests == 7 and writer.stats.retries == 0
    assert writer.count() == 100
    # the byte limit splits too
    pts = make_points(10)
    per_point = estimate_point_bytes(pts[0])
    batches = list(split_requests(pts, max_points=128, max_bytes=2 * per_point + per_point // 2))
    assert [len(b) for b in batches] == [2] * 5


def test_transient_errors_are_retried_without_loss(client):
    ensure_collection(client, SPEC)
    sleeps: list[float] = []
    writer = QdrantWriter(client, "docs", max_points_per_request=10, sleep=sleeps.append)
    client.upsert = FlakyUpsert(client, lambda k: k <= 3, _response(503))
    assert writer.upsert_points(make_points(25)) == 25
    assert writer.count() == 25 and writer.stats.retries == 3 and len(sleeps) == 3
    assert all(0 < s <= 10 for s in sleeps) and sleeps[2] >= 1.0  # 2 s ceiling, equal jitter


def test_persistent_transient_failure_reports_written_count(client):
    ensure_collection(client, SPEC)
    writer = QdrantWriter(client, "docs", max_points_per_request=10, max_attempts=4, sleep=lambda s: None)
    # the first two requests pass, then the server stays down
    client.upsert = FlakyUpsert(client, lambda k: k > 2, _response(503))
    with pytest.raises(QdrantWriteError) as err:
        writer.upsert_points(make_points(35))
    assert err.value.points_written == 20 and err.value.attempts == 4
    assert "20 points were written" in str(err.value) and "'docs'" in str(err.value)
    assert writer.count() == 20


def test_retries_are_bounded_by_time_and_honour_retry_after(client):
    """A server restarting refuses connections for tens of seconds: retries last qdrant.retry_s, not a
    count a refused connection spends in seconds; a 429's Retry-After is waited for in full."""
    import socket

    from qdrant_client.common.client_exceptions import ResourceExhaustedResponse

    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
    down = QdrantClient(url=f"http://127.0.0.1:{port}", timeout=2)  # nothing listens: refused at once
    sleeps: list[float] = []
    writer = QdrantWriter(down, "docs", retry_s=30, sleep=sleeps.append)
    with pytest.raises(QdrantWriteError, match=r"failed after \d+ attempts in \d+ s \(ResponseHandlingException.*"
                                               r"qdrant.retry_s=30"):
        writer.upsert_points(make_points(3))
    assert len(sleeps) >= 6 and 20 < sum(sleeps) <= 30, sleeps  # the next wait (at most 10 s) would pass 30 s

    ensure_collection(client, SPEC)
    sleeps.clear()
    writer = QdrantWriter(client, "docs", retry_s=120, sleep=sleeps.append)
    client.upsert = FlakyUpsert(client, lambda k: k == 1, ResourceExhaustedResponse("too many requests", 60))
    assert writer.upsert_points(make_points(3)) == 3 and sleeps == [60.0]  # past the 10 s backoff cap
    client.upsert = FlakyUpsert(client, lambda k: k == 1, ResourceExhaustedResponse("too many requests", 600))
    with pytest.raises(QdrantWriteError, match=r"failed after 1 attempts in 0 s \(ResourceExhaustedResponse: too many "
                                               r"requests\); the server asks to wait 600 s \(Retry-After\); "
                                               r"qdrant.retry_s=120"):
        writer.upsert_points(make_points(3))  # a wait past the budget: given up at once, not slept through
    assert sleeps == [60.0]


def test_non_transient_error_is_not_retried(client):
    ensure_collection(client, SPEC)
    sleeps: list[float] = []
    writer = QdrantWriter(client, "docs", sleep=sleeps.append)
    flaky = FlakyUpsert(client, lambda k: True, _response(400))
    client.upsert = flaky
    with pytest.raises(QdrantWriteError, match="upsert on collection 'docs' failed .*not a transient error") as err:
        writer.upsert_points(make_points(5))
    assert flaky.calls == 1 and sleeps == [] and writer.count() == 0
    assert isinstance(err.value.__cause__, UnexpectedResponse) and err.value.attempts == 1
    assert pickle.loads(pickle.dumps(err.value)).args == err.value.args  # crosses a Ray call as itself


def test_is_transient_classification():
    assert is_transient(_response(429)) and is_transient(_response(502)) and is_transient(_response(408))
    assert not is_transient(_response(400)) and not is_transient(_response(404))
    assert is_transient(httpx.ConnectError("x")) and is_transient(httpx.ReadTimeout("x"))
    assert is_transient(ConnectionResetError()) and not is_transient(ValueError("x"))


def test_fingerprints_and_delete_by_uri(client):
    ensure_collection(client, SPEC)
    writer = QdrantWriter(client, "docs")
    writer.upsert_points(make_points(9, uri_count=3, fingerprint="v1"))
    fps = writer.fingerprints_by_uri()
    assert fps == {f"file:///data/doc{i}.txt": "v1" for i in range(3)}
    assert writer.fingerprints_by_uri(["file:///data/doc1.txt", "file:///nope"]) == {"file:///data/doc1.txt": "v1"}

    writer.delete_by_uri(["file:///data/doc0.txt", "file:///data/doc2.txt"])
    assert writer.count() == 3
    assert set(writer.fingerprints_by_uri()) == {"file:///data/doc1.txt"}


class CountingCalls:
    """Wraps one client method at the client boundary and counts its calls (it still does the work)."""

    def __init__(self, client: QdrantClient, name: str):
        self.inner, self.calls = getattr(client, name), 0
        setattr(client, name, self)

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.inner(*args, **kwargs)


@pytest.mark.parametrize("one_pass", [True, False], ids=["embedded-one-pass", "server-filtered-chunks"])
def test_replaced_units_and_settled_counts_are_batched_not_one_request_per_object(client, one_pass):
    """After a run that changed many objects, delete_stale and settle_object_units cost a few requests,
    not one filtered request per object: in embedded mode each such request was a pass over the whole
    collection (0.18 s per object at 20,000 points; a settings change on 20,000 objects spent an hour).
    Both ways of finding the points (the embedded store's one pass, a server's filtered chunks) agree."""
    ensure_collection(client, SPEC)
    writer = QdrantWriter(client, "docs")
    assert writer.one_pass  # an embedded client
    writer.one_pass = one_pass
    n_objects = 600  # more than two chunks of URIs
    old = make_points(2 * n_objects, uri_count=n_objects, fingerprint="old")  # two points per object
    new = [PointRecord(pid, vecs, {**payload, "fingerprint": "new"})  # the new version: one unit, same first id
           for pid, vecs, payload in make_points(n_objects, uri_count=n_objects, fingerprint="new")]
    writer.upsert_points(old)
    writer.upsert_points(new)
    uris = [f"file:///data/doc{i}.txt" for i in range(n_objects)]
    # Two objects swapped contents: each holds a stale point under the other's current fingerprint,
    # and one holds a point without any fingerprint.
    a, b = uris[0], uris[1]
    vec = old[0].vectors
    writer.upsert_points([PointRecord(point_id(u, pos), vec, {"source_uri": u, "fingerprint": fp})
                          for u, pos, fp in ((a, "x", "A"), (a, "y", "B"), (b, "x", "B"), (b, "y", "A"))]
                         + [PointRecord(point_id(a, "nofp"), vec, {"source_uri": a})])
    current = {u: "new" for u in uris[2:]} | {a: "A", b: "B"}
    deletes = CountingCalls(client, "delete")
    writer.delete_stale(current)
    assert deletes.calls <= 3, deletes.calls  # a request per chunk of URIs, not one per object
    held = writer.stored_objects(by_modality=False)
    assert {u: dict(h.points) for u, h in held.items()} == (
        {u: {("new", ""): 1} for u in uris[2:]} | {a: {("A", ""): 1}, b: {("B", ""): 1}})
    assert writer.count() == n_objects  # the point without a fingerprint went too

    # Settling: many objects, one unit count each, set by id in a few requests.
    set_payloads = CountingCalls(client, "set_payload")
    writer.settle_object_units({u: ("new", 7 if i % 2 else 9) for i, u in enumerate(uris[2:])} | {uris[2]: ("old", 5)})
    assert set_payloads.calls <= 6, set_payloads.calls
    held = writer.stored_objects(by_modality=False)
    assert held[uris[2]].expected is None  # its points are not the fingerprint named: untouched
    assert all(held[u].expected == (7 if i % 2 else 9) for i, u in enumerate(uris) if i > 2)


def test_an_embedded_store_finds_many_uris_in_one_pass(client):
    """An embedded store runs a filter in Python per point and request (a MatchAny of 256 URIs cost 2.6 s
    per chunk at 20,000 points): the writer reads it once, unfiltered, whatever the number of URIs."""
    ensure_collection(client, SPEC)
    writer = QdrantWriter(client, "docs")
    writer.upsert_points(make_points(2_100, uri_count=700))  # 3 points per URI; 3 pages of 1,024
    uris = [f"file:///data/doc{i}.txt" for i in range(0, 700, 2)] + ["file:///data/none.txt"]
    filters = []
    inner = client.scroll

    def scroll(*args, **kwargs):
        filters.append(kwargs.get("scroll_filter"))
        return inner(*args, **kwargs)

    client.scroll = scroll
    held = writer.stored_objects(uris)
    assert filters == [None, None, None]  # one pass of three pages, no filter
    assert sorted(held) == sorted(uris[:-1]) and all(sum(h.points.values()) == 3 for h in held.values())
    filters.clear()
    writer.delete_by_uri(uris)
    assert filters == [None, None, None] and writer.count() == 2_100 - 3 * 350
    filters.clear()
    writer.delete_stale({})  # nothing asked: nothing read
    assert filters == []


def test_stored_objects_count_points_per_fingerprint_and_modality(client):
    from sinks.qdrant_writer import INCOMPLETE, StoredObject

    ensure_collection(client, SPEC)
    writer = QdrantWriter(client, "docs")
    writer.upsert_points(make_points(6, uri_count=2, fingerprint="v1"))  # 3 points per URI
    held = writer.stored_objects()
    assert sorted(held) == ["file:///data/doc0.txt", "file:///data/doc1.txt"]
    one = held["file:///data/doc0.txt"]
    assert one.fingerprint() == "v1" and sum(one.points.values()) == 3
    assert one.points_of("v1") == {m: n for (fp, m), n in one.points.items()} and one.points_of("v2") == {}
    # Half replaced, or fewer points than units: never a fingerprint the next run would skip.
    assert StoredObject({("v1", "text"): 2, ("v2", "text"): 1}, None).fingerprint() == INCOMPLETE
    assert StoredObject({("v2", "text"): 2}, 3).fingerprint() == INCOMPLETE
    assert StoredObject({("v2", "text"): 2, ("v2", "image"): 1}, 3).fingerprint() == "v2"
    assert StoredObject({("v2", "text"): 2, ("v2", "image"): 1}, 3).points_of("v2") == {"text": 2, "image": 1}
    # A version complete beside another's surplus points (a changed object, a run stopped before
    # its old units were deleted): complete at that version, though not one fingerprint.
    both = StoredObject({("v1", "text"): 3, ("v2", "text"): 2}, 3, {"v1": 3, "v2": 2})
    assert both.fingerprint() == INCOMPLETE and both.complete("v2") and both.complete("v1")
    assert not StoredObject({("v2", "text"): 1}, 2, {"v2": 2}).complete("v2") and not both.complete("v3")


# -- client factory ----------------------------------------------------------------


def test_settings_validation_and_secret_hygiene(tmp_path, monkeypatch):
    for kwargs in ({}, {"url": "http://x:6333", "path": str(tmp_path)}):
        with pytest.raises(ValueError) as err:
            QdrantSettings(**kwargs)
        assert "qdrant.url" in str(err.value) and "qdrant.path" in str(err.value)

    monkeypatch.setenv("QVL_TEST_QDRANT_KEY", "s3cr3t-key")
    settings = QdrantSettings(url="https://127.0.0.1:9", api_key_env="QVL_TEST_QDRANT_KEY",
                              timeout_s=1, check_compatibility=False)
    assert "s3cr3t-key" not in repr(settings)
    remote = make_client(settings)
    remote.close()

    local = make_client(QdrantSettings(path=str(tmp_path / "emb")))
    assert local.get_collections().collections == []
    local.close()


# -- Ray ---------------------------------------------------------------------------


def _rows(n: int, fingerprint: str = "v1") -> list[dict]:
    rows = []
    for p in make_points(n, uri_count=4, fingerprint=fingerprint):
        rows.append({
            "point_id": p.id,
            "vec_full": p.vectors["full"],  # numpy -> Ray tensor column
            "vec_mrl_8": [float(x) for x in p.vectors["mrl_8"]],  # list<double>
            "payload": json.dumps(p.payload),
        })
    return rows


def test_datasink_server_path_client_per_task(tmp_path, monkeypatch):
    """Server mode opens a client per write task; a local client stands in for the server (no Ray needed)."""
    import pyarrow as pa
    from ray.data.datasource.datasink import WriteResult

    import sinks.qdrant_sink as qs

    opened = []

    def fake_make_client(settings):
        opened.append(settings.url)
        return QdrantClient(path=str(tmp_path / "srv"))

    monkeypatch.setattr(qs, "make_client", fake_make_client)
    sink = qs.QdrantDatasink(QdrantSettings(url="https://qdrant.invalid"), "docs", spec=SPEC,
                             writer_kwargs={"max_points_per_request": 8})
    sink.on_write_start()
    rows = _rows(20)
    for r in rows:
        r["vec_full"] = r["vec_full"].tolist()
    blocks = [pa.Table.from_pylist(rows[:12]), pa.Table.from_pylist(rows[12:])]
    ret = sink.write(iter(blocks), None)
    assert ret["points"] == 20 and ret["requests"] == 3 and ret["rows"] == 20
    sink.on_write_complete(WriteResult(num_rows=20, size_bytes=1, write_returns=[ret, dict(ret)]))
    assert sink.summary["points"] == 40 and sink.summary["tasks"] == 2 and sink.summary["requests"] == 6
    assert opened == ["https://qdrant.invalid"] * 2
    check = QdrantClient(path=str(tmp_path / "srv"))
    assert check.count("docs").count == 20
    check.close()


def _sqlite_modes(client: QdrantClient, collection: str) -> tuple[str, int]:
    connection = client._client.collections[collection].storage.storage
    return (connection.execute("PRAGMA journal_mode").fetchone()[0],
            connection.execute("PRAGMA synchronous").fetchone()[0])


def test_embedded_storage_commits_without_a_sync_per_point(tmp_path):
    path = str(tmp_path / "q")
    client = QdrantClient(path=path)
    ensure_collection(client, SPEC)
    assert _sqlite_modes(client, "docs") == ("delete", 2)  # qdrant-client's default: FULL, a sync per commit
    assert tune_embedded_storage(client) == 1 and tune_embedded_storage(client) == 0  # once per collection
    assert _sqlite_modes(client, "docs") == ("wal", 1)  # NORMAL
    QdrantWriter(client, "docs").upsert_points(make_points(30))
    client.close()
    reopened = QdrantClient(path=path)  # every point is there for the next process
    try:
        assert reopened.count("docs", exact=True).count == 30
    finally:
        reopened.close()
    assert tune_embedded_storage(QdrantClient(location=":memory:")) == 0  # nothing on disk to tune


def test_ray_datasink_embedded_through_owner(ray_local, tmp_path):
    ray = ray_local
    from sinks.qdrant_sink import QdrantDatasink, start_owner, stop_owner, write_rows

    settings = QdrantSettings(path=str(tmp_path / "emb"))
    owner = start_owner(settings, "docs", {"max_points_per_request": 16})
    try:
        rows = _rows(60)
        for _ in range(2):  # same ids: the second run overwrites, never duplicates
            sink = QdrantDatasink(settings, "docs", owner, spec=SPEC, flush_points=16)
            ray.data.from_items(rows, override_num_blocks=3).write_datasink(sink)
            assert ray.get(owner.count.remote()) == 60
            assert sink.summary["points"] == 60 and sink.summary["rows"] == 60
            assert sink.summary["requests"] >= 4 and sink.summary["tasks"] >= 1
            assert sink.summary["num_rows"] == 60
        fps = ray.get(owner.fingerprints_by_uri.remote())
        assert len(fps) == 4 and set(fps.values()) == {"v1"}
        # The owner created the collection and tuned its storage.
        assert ray.get(owner.__ray_call__.remote(lambda self: _sqlite_modes(self.client, "docs"))) == ("wal", 1)

        # driver-side fallback through the same owner
        extra = [dict(r, point_id=point_id("file:///extra", f"chunk={i}")) for i, r in enumerate(_rows(3))]
        assert write_rows(extra, owner, SPEC)["points"] == 3
        assert ray.get(owner.count.remote()) == 63

        # a dimension mismatch fails in on_write_start and writes nothing
        bad = QdrantDatasink(settings, "docs", owner, spec=CollectionSpec(name="docs", full_dim=16, mrl_dims=(MRL,)))
        with pytest.raises(CollectionMismatchError, match="dimension 32 but the embedder produces 16"):
            ray.data.from_items(rows[:4]).write_datasink(bad)
        assert ray.get(owner.count.remote()) == 63
    finally:
        stop_owner(owner)


def test_stopping_an_owner_that_died_is_no_error(ray_local, tmp_path):
    # An owner killed mid-job (an OOM kill): its callers failed alone; stopping it must not throw
    # away the rest of the job's work (a query-batch's answered queries were lost, exit 3).
    from sinks.qdrant_sink import start_owner, stop_owner

    owner = start_owner(QdrantSettings(path=str(tmp_path / "emb")), "docs", {})
    ray_local.kill(owner, no_restart=True)
    stop_owner(owner)

