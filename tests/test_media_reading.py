"""Reading one object: FIFOs refused without hanging, size caps and expected versions checked before reading."""

import os
import threading

import pytest

from operators.content import CandidateUnavailable, SourceCache, candidate_input
from operators.media.expand import ExpandSettings
from operators.media.listing import list_objects, object_fingerprint
from operators.media.reading import (NotARegularFileError, ObjectTooLargeError, SourceChangedError, open_uri,
                                     read_with_fingerprint)
from operators.qwen3vl.media_io import MediaError, VideoFiles, resolve_image
from pipelines.query_inputs import oversized_image
from tests.media_gen import image_bytes, pattern_image


def returns_within(seconds, fn, *args, **kwargs):
    """fn's outcome (value or exception), failing the test if it blocks: a FIFO open waits for a writer."""
    outcome = {}

    def run():
        try:
            outcome["value"] = fn(*args, **kwargs)
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            outcome["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"{fn.__name__} blocked on a FIFO"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


@pytest.fixture
def fifo(tmp_path):
    path = tmp_path / "pipe.png"
    os.mkfifo(path)
    return str(path)


def test_a_fifo_is_refused_not_waited_on(fifo):
    with pytest.raises(NotARegularFileError, match="FIFO"):
        returns_within(10, read_with_fingerprint, fifo)
    with pytest.raises(NotARegularFileError):
        returns_within(10, open_uri, fifo)
    with pytest.raises(MediaError, match="not a regular file"):
        returns_within(10, resolve_image, fifo)
    with pytest.raises(MediaError, match="not a regular file"):
        returns_within(10, VideoFiles().acquire, fifo)
    assert returns_within(10, oversized_image, {"image": fifo}, 100) is None  # the embedder names it


def test_a_fifo_candidate_is_skipped(fifo):
    payload = {"source_uri": fifo, "modality": "image", "position": "image", "fingerprint": "size:1:mtime_ns:1"}
    with pytest.raises(CandidateUnavailable, match="not a regular file"):
        returns_within(10, candidate_input, payload)


def test_size_cap_and_expected_version_are_checked_before_reading(tmp_path):
    path = tmp_path / "a.bin"
    path.write_bytes(b"x" * 100)
    now = object_fingerprint(str(path))
    assert read_with_fingerprint(str(path), max_bytes=100, expect=now) == (b"x" * 100, now)
    with pytest.raises(ObjectTooLargeError, match="100 bytes, over max_object_bytes=99"):
        read_with_fingerprint(str(path), max_bytes=99)
    with pytest.raises(SourceChangedError) as info:
        read_with_fingerprint(str(path), expect="size:1:mtime_ns:1")
    assert info.value.now == now and info.value.expected == "size:1:mtime_ns:1"


def test_s3_size_cap_and_expected_version(moto_s3):
    client, opts = moto_s3["client"], moto_s3["storage_options"]
    client.create_bucket(Bucket="reading-bucket")
    client.put_object(Bucket="reading-bucket", Key="a.bin", Body=b"y" * 50)
    uri = "s3://reading-bucket/a.bin"
    now = object_fingerprint(uri, opts)
    assert now.startswith("etag:")
    assert read_with_fingerprint(uri, opts, max_bytes=50, expect=now) == (b"y" * 50, now)
    with pytest.raises(ObjectTooLargeError):
        read_with_fingerprint(uri, opts, max_bytes=49)
    with pytest.raises(SourceChangedError):
        read_with_fingerprint(uri, opts, expect="etag:0123")


def test_a_changed_candidate_is_not_read(tmp_path):
    """A source replaced by a 4 GiB file since ingestion is skipped at once, not read into memory first."""
    (tmp_path / "img.png").write_bytes(image_bytes(pattern_image(1, (32, 24))))
    listed = list_objects(str(tmp_path))[0][0]
    payload = {"source_uri": listed.uri, "modality": "image", "position": "image", "fingerprint": listed.fingerprint}
    assert candidate_input(payload)["image"]
    with open(listed.uri, "r+b") as fh:
        fh.truncate(4 << 30)  # sparse: no disk used, but a read would allocate 4 GiB
    cache = SourceCache()
    with pytest.raises(CandidateUnavailable, match="source changed since it was ingested"):
        returns_within(20, candidate_input, payload, cache=cache)


def test_a_candidate_over_the_size_cap_is_not_read(tmp_path):
    (tmp_path / "img.png").write_bytes(image_bytes(pattern_image(1, (32, 24))))
    listed = list_objects(str(tmp_path))[0][0]
    payload = {"source_uri": listed.uri, "modality": "image", "position": "image", "fingerprint": listed.fingerprint}
    with pytest.raises(CandidateUnavailable, match="ObjectTooLargeError"):
        candidate_input(payload, settings=ExpandSettings(max_object_bytes=10))


def test_a_records_http_media_are_rebuilt_within_the_fetch_bounds(tmp_path, monkeypatch):
    """A manifest record's image by URL is fetched as expansion fetched it; a server that accepts and never
    answers makes the candidate unavailable in seconds (fsspec's http waited minutes, holding the query)."""
    import functools
    import http.server
    import socket

    from operators.media import reading
    from operators.media.images import image_unit_bytes

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    (tmp_path / "media").mkdir()
    png = image_bytes(pattern_image(2, (40, 30)))
    (tmp_path / "media" / "a.png").write_bytes(png)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "m.jsonl").write_text('{"id": "r1", "image": "unused"}\n')
    listed = list_objects(str(tmp_path / "src"))[0][0]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "media")))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stalled = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody ever answers
    monkeypatch.setattr(reading, "HTTP_TIMEOUT_S", (1.0, 1.0))
    try:
        payload = {"source_uri": listed.uri, "position": "record=r1", "modality": "image",
                   "fingerprint": listed.fingerprint, "image_uri": f"http://127.0.0.1:{server.server_address[1]}/a.png"}
        assert candidate_input(payload)["image"] == image_unit_bytes(png, 10**8)[0]
        gone = {**payload, "image_uri": f"http://127.0.0.1:{stalled.getsockname()[1]}/a.png"}
        with pytest.raises(CandidateUnavailable, match=r"cannot read source http://127\.0\.0\.1:\d+/a\.png: "):
            returns_within(20, candidate_input, gone)
        with pytest.raises(CandidateUnavailable, match=r"over max_object_bytes=10"):
            candidate_input(payload, settings=ExpandSettings(max_object_bytes=10))
    finally:
        stalled.close()
        server.shutdown()
        server.server_close()


def test_a_body_cut_off_mid_download_is_unreachable_not_final(tmp_path):
    # Read through urllib3 (stream_http's read1), a cut-off body is its ProtocolError, not requests'
    # ChunkedEncodingError: the record was a final dead letter instead of one retried next run.
    import http.server

    from operators.media.reading import is_unreachable, stream_http

    class Cut(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Length", "100")
            self.end_headers()
            self.wfile.write(b"x" * 10)  # then the connection closes

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cut)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(Exception) as caught, open(tmp_path / "out", "wb") as fh:
            stream_http(f"http://127.0.0.1:{server.server_address[1]}/a.png", fh)
        assert is_unreachable(caught.value), repr(caught.value)
    finally:
        server.shutdown()
        server.server_close()
