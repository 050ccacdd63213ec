"""expand_object end to end over the generated corpus (local and S3), plus limits and manifests."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from operators.media.expand import ExpandSettings, expand_object, most_units, start_expansion
from operators.media.listing import list_objects
from operators.units import SourceObject, Unit
from tests.media_corpus import CorpusSpec, make_corpus, make_test_tokenizer, write_video

CFG = ExpandSettings(chunk_tokens=64, overlap_tokens=8, video_segment_s=1.0)
STATUS = {"ok": "ok", "failed": "failed", "skipped_unsupported": "skipped"}


@pytest.fixture(scope="module")
def tok():
    return make_test_tokenizer()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, tok) -> CorpusSpec:
    return make_corpus(tmp_path_factory.mktemp("corpus"), CFG, tok)


def _expand_all(objects, spec: CorpusSpec, to_rel, tokenizer, storage_options=None) -> dict[str, tuple]:
    results = {}
    for obj in objects:
        units, dead, status = expand_object(obj, CFG, storage_options, tokenizer)
        results[to_rel(obj.uri)] = (units, dead, status)
    assert sorted(results) == spec.paths()
    for rel, (units, dead, status) in results.items():
        want = spec.files[rel]
        got = (STATUS[status], len(units), len(dead), tuple(u.modality for u in units))
        assert got == (want.status, want.units, want.dead_letters, want.modalities), rel
    return results


def test_local_corpus_exact_counts(corpus: CorpusSpec, tok) -> None:
    objects, dead = list_objects(str(corpus.root))
    assert dead == []
    results = _expand_all(objects, corpus, lambda u: str(Path(u).relative_to(corpus.root)), tok)
    assert sum(len(r[0]) for r in results.values()) == corpus.total_units
    assert corpus.count("failed") == 6 and corpus.count("skipped") == 1
    errors = {rel: r[1][0].error_type for rel, r in results.items() if r[1]}
    assert errors == {
        "bad/corrupt.mp4": "VideoCorruptError",
        "bad/corrupt.pdf": "PdfCorruptError",
        "bad/empty.txt": "EmptyFileError",
        "bad/invalid_utf8.txt": "TextDecodeError",
        "bad/random.png": "ImageValidationError",
        "bad/truncated.jpg": "ImageValidationError",
    }
    assert results["bad/empty.txt"][1][0].message == "empty file"
    assert all(d.stage == "expand" and d.uri == corpus.uri(rel) for rel, r in results.items() for d in r[1])


def test_most_units_bounds_every_object_of_the_corpus(corpus: CorpusSpec, tok, tmp_path: Path) -> None:
    """most_units is a bound by name and size: no object of the generated corpus expands past it, a
    text of one-byte tokens included, and a manifest (any number of records) has none."""
    dense = tmp_path / "dense.txt"
    dense.write_text("." * 5000)  # 5,000 one-character tokens: the densest text there is
    objects, _ = list_objects(str(corpus.root))
    objects += list_objects(str(dense))[0]
    bounded = 0
    for obj in objects:
        units, _, _ = expand_object(obj, CFG, None, tok)
        bound = most_units(obj.uri, obj.size, CFG)
        if obj.uri.endswith((".jsonl", ".parquet", ".csv")):
            assert bound is None, obj.uri
        if bound is not None:
            bounded += 1
            assert len(units) <= bound, (obj.uri, len(units), bound)
    assert bounded >= len(objects) - 3
    units, _, _ = expand_object(list_objects(str(dense))[0][0], CFG, None, tok)
    assert len(units) > 80 and most_units(str(dense), 5000, CFG) == 5000 // (64 - 8) + 2
    assert most_units("s3://b/photo.JPG", 10**9, CFG) == 1
    assert most_units("s3://b/scan.pdf", 10**9, CFG) == CFG.max_pdf_pages
    assert most_units("s3://b/clip.mp4", 10**9, CFG) == 3600  # 3,600 s of 1 s segments
    assert most_units("s3://b/no-extension", 10, CFG) is None  # its magic bytes decide what it is


def test_tokenizer_free_fallback_counts(tmp_path: Path) -> None:
    spec = make_corpus(tmp_path, CFG, None, include_malformed=False)
    objects, _ = list_objects(str(tmp_path), include=["texts/*"])
    for obj in objects:
        units, _, status = expand_object(obj, CFG, None, None)
        assert status == "ok" and len(units) == spec.files[str(Path(obj.uri).relative_to(tmp_path))].units
    off = ExpandSettings(tokenizer_fallback=False)
    _, dead, status = expand_object(objects[0], off, None, None)
    assert status == "failed" and "tokenizer" in dead[0].message


def _units(spec: CorpusSpec, rel: str, tok) -> list[Unit]:
    path = spec.root / rel
    obj = SourceObject(uri=str(path), size=path.stat().st_size, fingerprint="fp-1")
    units, dead, status = expand_object(obj, CFG, None, tok)
    assert status == "ok", dead
    return units


def test_unit_shapes(corpus: CorpusSpec, tok) -> None:
    text = (corpus.root / "texts/long.txt").read_text()
    chunks = _units(corpus, "texts/long.txt", tok)
    assert [u.position for u in chunks] == [f"chunk={i}" for i in range(len(chunks))]
    for i, u in enumerate(chunks):
        assert u.text == text[u.meta["char_start"] : u.meta["char_end"]] and u.meta["chunk_index"] == i
        assert u.mime == "text/plain" and u.fingerprint == "fp-1" and u.object_uri == corpus.uri("texts/long.txt")
    assert _units(corpus, "texts/notes.md", tok)[0].mime == "text/markdown"
    assert _units(corpus, "texts/unicode.txt", tok)[0].text.startswith("Unicode: café")  # BOM stripped

    (img,) = _units(corpus, "images/photo.jpg", tok)
    assert (img.position, img.mime, img.meta) == ("image", "image/jpeg", {"width": 160, "height": 120})
    assert img.image == (corpus.root / "images/photo.jpg").read_bytes()
    (mis,) = _units(corpus, "images/mislabelled.jpg", tok)
    assert mis.mime == "image/png"
    (rot,) = _units(corpus, "images/rotated.jpg", tok)
    assert rot.mime == "image/png" and (rot.meta["width"], rot.meta["height"]) == (60, 90)
    assert _units(corpus, "images/anim.gif", tok)[0].meta["frames"] == 3

    pages = _units(corpus, "docs/three_pages.pdf", tok)
    assert [(u.position, u.meta["page_text"], u.mime, u.text) for u in pages] == [
        ("page=1", "Page one: apples", "image/png", None),
        ("page=2", "Page two: bananas", "image/png", None),
        ("page=3", "Page three: cherries", "image/png", None),
    ]
    assert pages[0].image.startswith(b"\x89PNG")

    segs = _units(corpus, "videos/clip.mp4", tok)
    assert [u.position for u in segs] == ["t=0.000-1.000", "t=1.000-2.000", "t=2.000-2.750"]
    assert all(u.video == corpus.uri("videos/clip.mp4") and u.mime == "video/mp4" for u in segs)
    assert (segs[-1].video_start, segs[-1].video_end) == (2.0, pytest.approx(2.75))
    assert segs[-1].meta["start_s"] == 2.0 and segs[-1].model_input() == {"video": segs[-1].video, "video_start": 2.0, "video_end": segs[-1].video_end}
    assert _units(corpus, "videos/clip.webm", tok)[0].mime == "video/webm"


def test_manifest_units(corpus: CorpusSpec, tok) -> None:
    recs = {u.position: u for u in _units(corpus, "manifests/records.jsonl", tok)}
    assert list(recs) == ["record=t1", "record=i1", "record=ti1", "record=v1", "record=5"]
    assert recs["record=t1"].text.startswith("A caption") and recs["record=t1"].meta["metadata"] == {"lang": "en"}
    assert recs["record=i1"].image == (corpus.root / "images/red.png").read_bytes()
    assert recs["record=i1"].meta["image_uri"] == corpus.uri("images/red.png") and recs["record=i1"].mime == "image/png"
    mixed = recs["record=ti1"]
    assert mixed.modality == "mixed" and mixed.text and mixed.image and mixed.meta["metadata"] == {"tags": ["a", "b"]}
    vid = recs["record=v1"]
    assert vid.video == corpus.uri("videos/clip.mp4") and vid.meta["duration_s"] == pytest.approx(2.75)
    assert vid.video_start is None and vid.mime == "video/mp4"
    row = mixed.to_row()
    assert Unit.from_row(row).meta == mixed.meta and json.loads(row["meta"])["record_id"] == "ti1"
    pq_units = _units(corpus, "manifests/records.parquet", tok)
    assert [u.meta["metadata"]["score"] for u in pq_units] == [0.1, 0.2, 0.3]


def test_manifest_missing_file_fails_that_record_only(tmp_path: Path, corpus: CorpusSpec) -> None:
    manifest = tmp_path / "m.jsonl"
    lines = [
        {"id": "ok", "image": str(corpus.root / "images/red.png")},
        {"id": "gone", "image": "missing.png"},
        {"id": "badvid", "video": str(corpus.root / "bad/corrupt.mp4")},
        {"id": "badimg", "image": str(corpus.root / "bad/random.png")},
        {"id": "t", "text": "still fine"},
    ]
    manifest.write_text("\n".join(json.dumps(x) for x in lines) + "\n{broken\n")
    obj = SourceObject(str(manifest), manifest.stat().st_size, "fp")
    units, dead, status = expand_object(obj, CFG)
    assert status == "ok" and [u.position for u in units] == ["record=ok", "record=t"]
    assert [(d.position, d.error_type) for d in dead] == [
        ("record=gone", "FileNotFoundError"),
        ("record=badvid", "VideoCorruptError"),
        ("record=badimg", "ImageValidationError"),
        ("record=6", "InvalidJSON"),
    ]
    assert dead[0].message.startswith("line 2: ") and all(d.uri == str(manifest) for d in dead)


@pytest.mark.parametrize("remote", [False, True])
def test_manifest_references_over_the_object_cap_fail_their_record(tmp_path: Path, corpus: CorpusSpec, remote,
                                                                  request) -> None:
    image, video = corpus.root / "images/red.png", corpus.root / "videos/clip.mp4"
    cap = min(image.stat().st_size, video.stat().st_size) - 1
    lines = [{"id": "img", "image": image.name}, {"id": "vid", "video": video.name}, {"id": "t", "text": "fine"}]
    body = ("\n".join(json.dumps(x) for x in lines) + "\n").encode()
    opts = None
    if remote:  # a remote video is copied whole to the embedding actor: it must be capped before that
        moto = request.getfixturevalue("moto_s3")
        client, opts = moto["client"], moto["storage_options"]
        client.create_bucket(Bucket="cap-bucket")
        for key, data in (("m.jsonl", body), (image.name, image.read_bytes()), (video.name, video.read_bytes())):
            client.put_object(Bucket="cap-bucket", Key=key, Body=data)
        (obj,), _ = list_objects("s3://cap-bucket/m.jsonl", storage_options=opts)
        where = "s3://cap-bucket/"
    else:
        for path in (image, video):
            (tmp_path / path.name).write_bytes(path.read_bytes())
        (tmp_path / "m.jsonl").write_bytes(body)
        obj = SourceObject(str(tmp_path / "m.jsonl"), len(body), "fp")
        where = f"{tmp_path}/"
    units, dead, status = expand_object(obj, ExpandSettings(max_object_bytes=cap), opts)
    assert status == "ok" and [u.position for u in units] == ["record=t"]
    messages = {d.position: f"{d.error_type}: {d.message}" for d in dead}
    assert messages["record=img"] == f"ObjectTooLargeError: line 1: {where}{image.name} is over max_object_bytes={cap}"
    assert messages["record=vid"] == (f"ObjectTooLargeError: line 2: {where}{video.name} is "
                                      f"{video.stat().st_size} bytes, over max_object_bytes={cap}")


def test_manifest_with_no_good_record_fails(tmp_path: Path) -> None:
    manifest = tmp_path / "m.jsonl"
    manifest.write_text('{"id": "x"}\n{oops\n')
    units, dead, status = expand_object(SourceObject(str(manifest), manifest.stat().st_size, "fp"), CFG)
    assert status == "failed" and units == [] and [d.error_type for d in dead] == ["InvalidRecord", "InvalidJSON", "EmptyManifest"]


def test_limits(tmp_path: Path, corpus: CorpusSpec) -> None:
    huge = SourceObject(str(tmp_path / "never-read.txt"), 10**12, "fp")
    _, dead, status = expand_object(huge, CFG)
    assert status == "failed" and dead[0].error_type == "ObjectTooLargeError"  # not FileNotFoundError: never opened

    def one(rel: str, cfg: ExpandSettings):
        path = corpus.root / rel
        return expand_object(SourceObject(str(path), path.stat().st_size, "fp"), cfg)

    _, dead, status = one("docs/three_pages.pdf", ExpandSettings(max_pdf_pages=2))
    assert status == "failed" and dead[0].error_type == "PdfTooManyPagesError"
    _, dead, status = one("videos/clip.mp4", ExpandSettings(max_video_duration_s=2.0))
    assert status == "failed" and dead[0].error_type == "VideoTooLongError"
    _, dead, status = one("images/photo.jpg", ExpandSettings(max_image_pixels=100))
    assert status == "failed" and "over the limit of 100 pixels" in dead[0].message
    units, _, _ = one("videos/clip.mp4", ExpandSettings())
    assert [u.position for u in units] == ["t=0.000-2.750"]  # default 30 s: one segment


def test_a_pdf_page_that_cannot_be_rendered_fails_alone(tmp_path: Path) -> None:
    """One oversized page is its own dead letter; the other pages are units, and the object counts
    all three positions (so it is complete with two points). No page rendered: the object fails."""
    from operators.sample_media import make_pdf

    pages = ["Page one: apples", "Page two: bananas", "Page three: cherries"]
    data = make_pdf(pages).replace(b"/MediaBox [0 0 200 150]", b"/MediaBox [0 0 900 950]", 2)
    path = tmp_path / "scan.pdf"
    path.write_bytes(data.replace(b"/MediaBox [0 0 900 950]", b"/MediaBox [0 0 200 150]", 1))
    cfg = ExpandSettings(pdf_dpi=72, max_image_pixels=100_000)
    expansion = start_expansion(SourceObject(str(path), path.stat().st_size, "fp"), cfg)
    units, dead, status = expansion.read_all()
    assert status == "ok" and [u.position for u in units] == ["page=1", "page=3"] and expansion.positions == 3
    assert [(d.position, d.error_type) for d in dead] == [("page=2", "PdfPageTooLargeError")]
    assert "page 2 would render to 855000 pixels" in dead[0].message

    path.write_bytes(make_pdf(pages[:2], size=(900, 950)))
    units, dead, status = expand_object(SourceObject(str(path), path.stat().st_size, "fp"), cfg)
    assert (units, status) == ([], "failed") and [(d.position, d.error_type) for d in dead] == [
        (None, "PdfPageTooLargeError")]


def test_object_gone_after_listing(tmp_path: Path) -> None:
    _, dead, status = expand_object(SourceObject(str(tmp_path / "gone.txt"), 5, "fp"), CFG)
    assert status == "failed" and dead[0].error_type == "FileNotFoundError"


def test_settings_validation() -> None:
    with pytest.raises(ValueError):
        ExpandSettings(chunk_tokens=10, overlap_tokens=10)
    with pytest.raises(ValueError):
        ExpandSettings(max_object_bytes=0)
    s = ExpandSettings()
    assert (s.chunk_tokens, s.overlap_tokens, s.pdf_dpi, s.max_pdf_pages, s.video_segment_s) == (512, 64, 144, 200, 30.0)
    assert (s.max_video_duration_s, s.max_object_bytes, s.max_image_pixels) == (3600.0, 512 * 1024**2, 89_478_485)


def test_s3_corpus_exact_counts(moto_s3, corpus: CorpusSpec, tok) -> None:
    client, opts = moto_s3["client"], moto_s3["storage_options"]
    client.create_bucket(Bucket="corpus-bucket")
    for rel in corpus.paths():
        client.put_object(Bucket="corpus-bucket", Key=f"in/{rel}", Body=(corpus.root / rel).read_bytes())
    objects, dead = list_objects("s3://corpus-bucket/in", storage_options=opts)
    assert dead == [] and all(o.fingerprint.startswith("etag:") for o in objects)
    results = _expand_all(objects, corpus, lambda u: u.removeprefix("s3://corpus-bucket/in/"), tok, opts)
    recs = {u.position: u for u in results["manifests/records.jsonl"][0]}
    assert recs["record=v1"].video == "s3://corpus-bucket/in/videos/clip.mp4"
    assert recs["record=i1"].image == (corpus.root / "images/red.png").read_bytes()
    segs = results["videos/clip.webm"][0]
    assert [u.video for u in segs] == ["s3://corpus-bucket/in/videos/clip.webm"] * 2


def test_s3_manifest_record_missing_object(moto_s3) -> None:
    client, opts = moto_s3["client"], moto_s3["storage_options"]
    client.create_bucket(Bucket="manifest-bucket")
    body = b'{"id": "a", "text": "x"}\n{"id": "b", "image": "nope.png"}\n'
    client.put_object(Bucket="manifest-bucket", Key="m/list.jsonl", Body=body)
    (obj,), _ = list_objects("s3://manifest-bucket/m", storage_options=opts)
    units, dead, status = expand_object(obj, CFG, opts)
    assert status == "ok" and len(units) == 1 and dead[0].position == "record=b" and dead[0].error_type == "FileNotFoundError"


def test_remote_video_without_local_copy(tmp_path: Path, moto_s3) -> None:
    write_video(tmp_path / "v.mkv", 40, "mpeg4")  # 5 s
    client, opts = moto_s3["client"], moto_s3["storage_options"]
    client.create_bucket(Bucket="video-bucket")
    client.put_object(Bucket="video-bucket", Key="v.mkv", Body=(tmp_path / "v.mkv").read_bytes())
    (obj,), _ = list_objects("s3://video-bucket", storage_options=opts)
    units, _, status = expand_object(obj, ExpandSettings(video_segment_s=2.0), opts)
    assert status == "ok" and [u.position for u in units] == ["t=0.000-2.000", "t=2.000-4.000", "t=4.000-5.000"]
    assert units[0].mime == "video/x-matroska"


def test_empty_unsupported_file_is_skipped(tmp_path: Path) -> None:
    (tmp_path / ".DS_Store").write_bytes(b"")
    (tmp_path / "empty.png").write_bytes(b"")
    results = {Path(o.uri).name: expand_object(o, CFG)[2] for o in list_objects(str(tmp_path))[0]}
    assert results == {".DS_Store": "skipped_unsupported", "empty.png": "failed"}


def test_a_page_text_layer_is_capped_in_the_payload():
    """A hostile PDF's huge text layer must not make its point too large to upsert."""
    from operators.media.expand import MAX_PAGE_TEXT, page_meta

    assert page_meta(2, "short") == {"page": 2, "page_text": "short"}
    meta = page_meta(1, "x" * (MAX_PAGE_TEXT + 5))
    assert len(meta["page_text"]) == MAX_PAGE_TEXT and meta["page_text_truncated"] is True


def test_a_record_whose_reference_fails_is_named_by_its_uri(moto_s3) -> None:
    """S3's "The specified bucket does not exist" names no object: the letter names the reference."""
    client, opts = moto_s3["client"], moto_s3["storage_options"]
    client.create_bucket(Bucket="refs")
    body = "\n".join(json.dumps(r) for r in ({"id": "gone", "image": "/no-such-bucket-q/o.png"},
                                             {"id": "t", "text": "a note"}))
    client.put_object(Bucket="refs", Key="m/list.jsonl", Body=body.encode())
    [obj], _ = list_objects("s3://refs/m/list.jsonl", storage_options=opts)
    units, dead, _ = expand_object(obj, ExpandSettings(), opts)
    assert [u.position for u in units] == ["record=t"]
    assert [d.position for d in dead] == ["record=gone"]
    assert dead[0].message.startswith("line 1: s3://no-such-bucket-q/o.png: "), dead[0].message
    assert dead[0].error_type != "Unreachable"


def test_an_image_streamed_without_a_length_is_read_whole(tmp_path):
    """An HTTP server that sends no Content-Length (chunked): fsspec's stream returns what has arrived
    from each read, so one read took the first 64 KiB of a 900 KB image and failed it as corrupt."""
    import http.server
    import threading

    import numpy as np
    from PIL import Image

    png = tmp_path / "noise.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (550, 550, 3), dtype=np.uint8)).save(png)
    data = png.read_bytes()

    class Chunked(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for i in range(0, len(data), 50_000):
                piece = data[i:i + 50_000]
                self.wfile.write(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
                self.wfile.flush()
            self.wfile.write(b"0\r\n\r\n")

        def do_HEAD(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Chunked)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        manifest = tmp_path / "list.jsonl"
        manifest.write_text(json.dumps({"id": "n", "image": f"http://127.0.0.1:{server.server_address[1]}/noise.png"}))
        units, dead, status = expand_object(SourceObject(str(manifest), manifest.stat().st_size, "fp"), CFG)
    finally:
        server.shutdown()
        server.server_close()
    assert (status, dead) == ("ok", []), dead
    assert len(data) > 800_000 and units[0].image == data


def test_a_record_whose_http_server_never_answers_is_unreachable_in_seconds(tmp_path, corpus: CorpusSpec,
                                                                          monkeypatch):
    """fsspec's http has no timeout: a record's image or video on a server that accepts and never
    answers held its expansion until the watchdog (limits.max_expand_s) took it for a hung decoder,
    a final letter. Fetched as the model wrappers fetch it, it is Unreachable (tried again next
    run) once the read timeout passes, and a body over max_object_bytes is refused as it arrives."""
    import functools
    import http.server
    import socket
    import threading
    import time

    from operators.media import reading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    for rel in ("images/red.png", "videos/clip.mp4"):
        (tmp_path / Path(rel).name).write_bytes((corpus.root / rel).read_bytes())
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stalled = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody ever answers
    closed = socket.create_server(("127.0.0.1", 0))
    refused = f"http://127.0.0.1:{closed.getsockname()[1]}"
    closed.close()
    # raising=False: where the fetch has no bound (nor this setting), the test fails below, not here.
    monkeypatch.setattr(reading, "HTTP_TIMEOUT_S", (1.0, 1.0), raising=False)
    base, hung = f"http://127.0.0.1:{server.server_address[1]}", f"http://127.0.0.1:{stalled.getsockname()[1]}"
    lines = [{"id": "img", "image": f"{base}/red.png"}, {"id": "vid", "video": f"{base}/clip.mp4"},
             {"id": "hung_img", "image": f"{hung}/a.png"}, {"id": "hung_vid", "video": f"{hung}/a.mp4"},
             {"id": "refused", "image": f"{refused}/a.png"}, {"id": "gone", "image": f"{base}/gone.png"},
             {"id": "t", "text": "fine"}]
    manifest = tmp_path / "list.jsonl"
    manifest.write_text("\n".join(json.dumps(x) for x in lines))
    obj = SourceObject(str(manifest), manifest.stat().st_size, "fp")
    got: list = []
    started = time.monotonic()
    # In a thread: without a timeout the fetch never returns, and the test must fail, not hang.
    worker = threading.Thread(target=lambda: got.append(expand_object(obj, CFG)), daemon=True)
    worker.start()
    try:
        worker.join(30)
        assert not worker.is_alive(), "a record on a server that never answers held the expansion"
        units, dead, status = got[0]
        cap = (tmp_path / "red.png").stat().st_size - 1
        over_cap = expand_object(obj, ExpandSettings(max_object_bytes=cap))[1][0]
    finally:
        stalled.close()
        server.shutdown()
        server.server_close()
    assert time.monotonic() - started < 30
    assert status == "ok" and [u.position for u in units] == ["record=img", "record=vid", "record=t"]
    assert units[0].image == (tmp_path / "red.png").read_bytes() and units[1].meta["duration_s"] > 0
    letters = {d.position: (d.error_type, d.message) for d in dead}
    assert [letters[p][0] for p in ("record=hung_img", "record=hung_vid", "record=refused")] == ["Unreachable"] * 3
    assert letters["record=hung_img"][1].startswith(f"line 3: cannot reach {hung}/a.png: ReadTimeout")
    assert letters["record=gone"][0] == "HTTPError" and "404" in letters["record=gone"][1]  # final: not retried
    assert (over_cap.position, over_cap.error_type) == ("record=img", "ObjectTooLargeError")
    assert over_cap.message == f"line 1: {base}/red.png is over max_object_bytes={cap}"
