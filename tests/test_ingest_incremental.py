"""Incremental runs and --prune at their edges: partly failed objects, `~` sources, filters, unlisted files."""

import contextlib
import json
import os
import re
import shutil

import pytest

from operators.units import SourceObject
from pipelines.config import parse_config
from pipelines.ingest import run_ingest
from pipelines.plan import plan_objects, source_root
from pipelines.preview import preview_ingest
from tests.media_gen import image_bytes, pattern_image, write_video
from tests.resilience_helpers import all_points, config_dict, latest_run


def _by_uri(points):
    out = {}
    for p in points:
        out.setdefault(p.payload["source_uri"], []).append(p)
    return out


@pytest.mark.slow
def test_an_object_whose_units_partly_fail_to_embed_is_unchanged_on_the_next_run(tmp_path, tiny_embedding_ckpt,
                                                                                 ray_local):
    # The video's index comes first, so listing and expansion read its length; its frames are cut
    # off, so every segment fails when the embedder decodes it.
    media = tmp_path / "media"
    media.mkdir()
    whole = write_video(media / "whole.mp4", seconds=6.0, faststart=True).read_bytes()
    (media / "cut.mp4").write_bytes(whole[: len(whole) * 3 // 10])
    (media / "whole.mp4").unlink()
    src = tmp_path / "src"
    src.mkdir()
    manifest = src / "records.jsonl"
    manifest.write_text(json.dumps({"id": "t", "text": "A record about lanterns."}) + "\n"
                        + json.dumps({"id": "v", "video": str(media / "cut.mp4")}) + "\n")
    cfg = parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path))

    first = run_ingest(cfg)
    assert first.objects == {str(manifest): "ingested"}
    _, dead = latest_run(tmp_path / "runs")
    assert [(d["position"], d["stage"]) for d in dead] == [("record=v", "embed")]
    assert "cut.mp4 cannot be read" in dead[0]["message"]
    points = _by_uri(all_points(tmp_path / "qdrant"))[str(manifest)]
    assert [p.payload["position"] for p in points] == ["record=t"]
    assert points[0].payload["object_units"] == 1  # settled: the one unit that has a point

    again = run_ingest(cfg)
    assert again.objects == {str(manifest): "unchanged"} and again.points_written == 0


@pytest.mark.slow
def test_an_object_that_changes_into_an_unsupported_kind_loses_its_points(tmp_path, tiny_embedding_ckpt, ray_local):
    """An extension-less key sniffed as an image, then overwritten with plain bytes: skipped now, so
    its image point is removed (it no longer shows what the object holds)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "upload-3f2a9c").write_bytes(image_bytes(pattern_image(0)))
    (src / "note.txt").write_text("A short note about lanterns.")
    cfg = parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path))
    assert run_ingest(cfg).objects[str(src / "upload-3f2a9c")] == "ingested"
    (src / "upload-3f2a9c").write_bytes(b"just some bytes now, not an image at all\n" * 10)

    again = run_ingest(cfg)
    assert again.objects == {str(src / "upload-3f2a9c"): "skipped", str(src / "note.txt"): "unchanged"}
    assert again.removed_failed_objects == 1
    assert sorted(_by_uri(all_points(tmp_path / "qdrant"))) == [str(src / "note.txt")]


@pytest.mark.slow
def test_prune_follows_a_home_relative_source(tmp_path, tiny_embedding_ckpt, ray_local, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    src = tmp_path / "home" / "src"
    src.mkdir(parents=True)
    for name in ("keep.txt", "gone.txt"):
        (src / name).write_text(f"The note called {name}.")
    cfg = parse_config(config_dict("~/src", tiny_embedding_ckpt, tmp_path))
    assert run_ingest(cfg).counts()["ingested"] == 2
    (src / "gone.txt").unlink()
    report = run_ingest(cfg, prune=True)
    assert report.pruned_objects == 1
    assert set(_by_uri(all_points(tmp_path / "qdrant"))) == {str(src / "keep.txt")}

    # Now the folder lists nothing, as an unmounted one would: --prune deletes nothing, and says so.
    (src / "keep.txt").unlink()
    said = []
    empty = run_ingest(cfg, prune=True, echo=said.append)
    assert empty.pruned_objects == 0
    assert set(_by_uri(all_points(tmp_path / "qdrant"))) == {str(src / "keep.txt")}
    assert any(line.startswith("warning: 1 stored objects vanished, none pruned: --prune deletes nothing when the "
                               "source lists no object") for line in said)
    assert preview_ingest(cfg, prune=True).lines()[2].startswith(
        "  vanished from the source 1: their points are kept: --prune deletes nothing when the source lists no object")


@pytest.mark.slow
def test_prune_removes_files_that_became_dangling_links_or_fifos(tmp_path, tiny_embedding_ckpt, ray_local):
    """A link whose target was deleted, a FIFO where a file was, a folder replaced by a dangling link: no
    file stands there any more, so --prune removes their points (a fresh ingestion would hold none)."""
    src, targets = tmp_path / "src", tmp_path / "targets"
    (src / "docs").mkdir(parents=True)
    targets.mkdir()
    for path in (targets / "t.txt", src / "a.txt", src / "b.txt", src / "docs" / "x.txt"):
        path.write_text(f"A note called {path.name}, about lanterns.")
    os.symlink(targets / "t.txt", src / "link.txt")
    cfg = parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path))
    assert run_ingest(cfg).counts()["ingested"] == 4

    (targets / "t.txt").unlink()
    (src / "a.txt").unlink()
    os.mkfifo(src / "a.txt")
    shutil.rmtree(src / "docs")
    os.symlink(tmp_path / "nowhere", src / "docs")
    kept = run_ingest(cfg)  # without --prune: vanished objects keep their points, as any other
    assert kept.pruned_objects == 0 and len(_by_uri(all_points(tmp_path / "qdrant"))) == 4
    report = run_ingest(cfg, prune=True)
    assert report.pruned_objects == 3
    assert sorted(_by_uri(all_points(tmp_path / "qdrant"))) == [str(src / "b.txt")]
    assert {report.objects[str(src / n)] for n in ("a.txt", "link.txt", "docs")} == {"failed"}  # still reported


@pytest.mark.slow
def test_the_runs_own_folders_inside_the_source_are_never_listed(tmp_path, tiny_embedding_ckpt, ray_local):
    """source.uri "." with the default output.dir "runs": each run's dead_letters.jsonl was parsed as a
    manifest by the next run (1, 3, then 7 dead letters) and the embedded store's files were listed."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("A short note about lanterns.")
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not a png at all")
    cfg = parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path, output={"dir": str(src / "runs")},
                                   qdrant={"path": str(src / "qdrant")}))
    for _ in range(3):
        report = run_ingest(cfg, echo=lambda _: None)
        assert report.objects == {str(src / "a.txt"): report.objects[str(src / "a.txt")], str(src / "bad.png"): "failed"}
        _, dead = latest_run(src / "runs")
        assert [d["uri"] for d in dead] == [str(src / "bad.png")]
    assert report.objects[str(src / "a.txt")] == "unchanged"
    assert sorted(_by_uri(all_points(src / "qdrant"))) == [str(src / "a.txt")]
    notes = [line for line in preview_ingest(cfg).lines() if line.startswith("  note:")]
    assert notes == [f"  note: output.dir {src / 'runs'} lies inside the source: it is not listed",
                     f"  note: qdrant.path {src / 'qdrant'} lies inside the source: it is not listed"]


def test_source_root_resolves_local_uris_as_the_listing_does(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    assert source_root("~/media") == f"{tmp_path}/media/"
    assert source_root("local:///data/media/") == "/data/media/"
    assert source_root("file:///data/media") == "/data/media/"
    assert source_root("s3://bucket/media") == "s3://bucket/media/"


def test_vanished_means_gone_not_filtered_out_or_unreadable():
    root = "/src/"
    fp = "size:1:mtime_ns:1"
    stored = {f"{root}{rel}": fp for rel in ("a.png", "notes/b.txt", "sub/c.png", "locked.png", "gone.png",
                                             "old/gone.png")}
    stored["/elsewhere/x.png"] = fp  # another source's object in the same collection
    listed = [SourceObject(uri=f"{root}a.png", size=1, fingerprint=fp)]
    # This run keeps only PNGs outside old/; sub/ could not be listed and locked.png could not be read.
    plan = plan_objects(listed, stored, root, include=["*.png"], exclude=["old/"],
                        unlisted=[f"{root}sub", f"{root}locked.png"])
    assert plan.vanished == [f"{root}gone.png"]
    assert plan.unchanged == [f"{root}a.png"]
    # Without filters or unreadable entries, everything not listed under the root has vanished.
    plan = plan_objects(listed, stored, root)
    assert plan.vanished == sorted(u for u in stored if u.startswith(root) and u != f"{root}a.png")
    assert plan.to_prune() == plan.vanished
    # A source that is one object (an S3 key): once deleted, it is what vanished. The listing is
    # empty then, and an empty listing prunes nothing (it looks the same as a mistyped prefix).
    key = "s3://bucket/in/notes/one.md"
    plan = plan_objects([], {key: fp, "s3://bucket/in/notes/other.md": fp}, source_root(key))
    assert plan.vanished == [key] and plan.to_prune() == []
    # A key named like a folder that another run ingested (s3://bucket/pfx beside s3://bucket/pfx/a.txt):
    # the source is that one key, and nothing under the folder vanished from it.
    pfx = "s3://bucket/pfx"
    plan = plan_objects([SourceObject(pfx, 1, fp)], {pfx: fp, f"{pfx}/a.txt": fp, f"{pfx}/b/c.txt": fp},
                        source_root(pfx))
    assert plan.vanished == [] and plan.unchanged == [pfx]


def test_a_plan_with_many_unlisted_entries_takes_no_time_per_pair():
    """Stored objects are checked against the unlisted entries by looking up their own folders, not by
    a scan of every entry per object: 40,000 stored and 10,000 unlisted took 17 s, now well under one."""
    import time

    root, fp = "s3://bucket/src/", "etag:1"
    listed = [SourceObject(uri=f"{root}kept/{i}.txt", size=1, fingerprint=fp) for i in range(20_000)]
    stored = {o.uri: fp for o in listed} | {f"{root}gone/{i}.txt": fp for i in range(10_000)}
    stored |= {f"{root}bad/{i}.txt": fp for i in range(5_000)} | {f"{root}locked/d{i}/x.txt": fp for i in range(5_000)}
    unlisted = [f"{root}bad/{i}.txt" for i in range(5_000)] + [f"{root}locked/d{i}/" for i in range(5_000)]
    unlisted.append(f"{root}gone/1")  # a prefix of gone/1x.txt's name, not its folder
    start = time.perf_counter()
    plan = plan_objects(listed, stored, root, unlisted=unlisted)
    assert time.perf_counter() - start < 3.0
    assert plan.vanished == sorted(f"{root}gone/{i}.txt" for i in range(10_000))


@pytest.mark.slow
def test_changing_how_units_are_embedded_re_embeds_every_object(tmp_path, tiny_embedding_ckpt, ray_local):
    src = tmp_path / "src"
    src.mkdir()
    (src / "short.txt").write_text("A short note about lanterns.")
    (src / "long.txt").write_text("Many words about rivers and boats. " * 30)
    data = config_dict(src, tiny_embedding_ckpt, tmp_path, expand={"chunk_tokens": 64, "overlap_tokens": 8})
    first = run_ingest(parse_config(data))
    before = all_points(tmp_path / "qdrant")
    assert first.counts()["ingested"] == 2
    # A new instruction changes every vector; smaller chunks change the units themselves.
    data["embedder"]["instruction"] = "Represent this note for retrieval."
    data["expand"]["chunk_tokens"] = 32
    second = run_ingest(parse_config(data))
    after = all_points(tmp_path / "qdrant")
    assert second.counts()["ingested"] == 2 and second.counts()["unchanged"] == 0
    assert len({p.payload["fingerprint"] for p in after}) == 2  # one per object: no old point is left
    assert len(after) > len(before)  # long.txt: more, smaller chunks
    assert {p.payload["fingerprint"] for p in after}.isdisjoint({p.payload["fingerprint"] for p in before})
    # Settings that only move rounding or batching change nothing.
    data["compute"]["batch_size"] = 3
    data["embedder"]["token_budget"] = 2048
    assert run_ingest(parse_config(data)).counts()["unchanged"] == 2


@pytest.mark.slow
def test_a_source_where_nothing_matches_is_warned_about(tmp_path, tiny_embedding_ckpt, ray_local):
    src = tmp_path / "src"
    src.mkdir()
    (src / "note.txt").write_text("A note.")
    lines = []
    data = config_dict(src, tiny_embedding_ckpt, tmp_path, source={"include": ["*.png"]})
    report = run_ingest(parse_config(data), echo=lines.append)
    assert report.counts()["ingested"] == 0
    assert any(line.startswith("warning: nothing under source.uri") for line in lines), lines


@pytest.mark.slow
def test_an_existing_collections_layout_is_kept_or_refused(tmp_path, tiny_embedding_ckpt, ray_local):
    from pipelines.preflight import PreflightError

    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_text("Alpha bravo charlie.")
    run_ingest(parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path, embedder={"mrl_dims": [32, 16]})))
    (src / "b.txt").write_text("Zulu yankee xray.")
    # Points without mrl_16 would never be found by a query that prefetches on it.
    with pytest.raises(PreflightError, match=r"holds MRL vectors \['mrl_16'\] .*set embedder.mrl_dims to \[32, 16\]"):
        run_ingest(parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path, embedder={"mrl_dims": [32]})))
    lines: list[str] = []
    data = config_dict(src, tiny_embedding_ckpt, tmp_path, embedder={"mrl_dims": [32, 16]},
                       qdrant={"quantization": "binary"})
    report = run_ingest(parse_config(data), echo=lines.append)
    assert report.counts()["ingested"] == 1
    assert any(line.startswith("warning: collection 'media': qdrant.quantization is binary") for line in lines), lines


def test_settings_digest_ignores_spelling_that_embeds_the_same(tiny_embedding_ckpt, tmp_path):
    from operators.qwen3vl.formatting import DEFAULT_EMBED_INSTRUCTION
    from pipelines.plan import settings_digest

    def digest(**embedder):
        data = config_dict(tmp_path, tiny_embedding_ckpt, tmp_path)
        data["embedder"].update(embedder)
        return settings_digest(parse_config(data))

    assert digest() == digest(instruction=DEFAULT_EMBED_INSTRUCTION) == digest(token_budget=1024)
    assert digest() != digest(instruction="Represent the note.") != digest(max_pixels=10_000)


def test_window_mib_reaches_the_embedder_and_leaves_the_digest_alone(tiny_embedding_ckpt, tmp_path):
    from operators.qwen3vl import Qwen3VLEmbedder
    from pipelines.ingest import embedder_kwargs
    from pipelines.plan import settings_digest

    data = config_dict(tmp_path, tiny_embedding_ckpt, tmp_path)
    before = settings_digest(parse_config(data))
    data["embedder"]["window_mib"] = 32
    cfg = parse_config(data)
    assert settings_digest(cfg) == before  # how much is prepared at once changes no vector
    with Qwen3VLEmbedder(str(tiny_embedding_ckpt), **embedder_kwargs(cfg, {})) as emb:
        assert emb.window_bytes == 32 * 2**20


def test_only_units_that_fail_for_good_are_settled():
    """A unit whose file could not be fetched (gone, unreachable) keeps its object incomplete, so
    the next run tries again; one the decoder rejects is final until the object changes."""
    from pipelines.ingest import partly_embedded
    from pipelines.report import RunReport

    report = RunReport("run", "media", "/src", "model")
    report.objects = {"/src/a.jsonl": "ingested", "/src/b.jsonl": "ingested"}
    todo = [SourceObject(uri=u, size=1, fingerprint=f"fp-{u[-7]}") for u in report.objects]
    dead = [("/src/a.jsonl", "video /v/page not found/cut.mp4 cannot be read: DECORDError: av_read_frame failed"),
            ("/src/b.jsonl", "cannot read s3://b/clip.mp4: EndpointConnectionError: could not connect")]
    summary = {"dead": [{"object_uri": u, "position": "record=v", "error_stage": "embed", "error_message": m}
                        for u, m in dead],
               "objects": [{"object_uri": u, "n_units": 3} for u in report.objects]}
    assert partly_embedded(summary, todo, report) == {"/src/a.jsonl": ("fp-a", 2)}
    # A bad record at expansion counts in object_units until the run settles it to the units stored.
    summary["dead"].append({"object_uri": "/src/a.jsonl", "position": "record=x", "error_stage": "expand",
                            "error_message": "line 4: record has none of text, image, video"})
    summary["dead"][1]["error_stage"] = "expand"  # b's letter is now an expansion one (not a fetch)
    assert partly_embedded(summary, todo, report) == {"/src/a.jsonl": ("fp-a", 2), "/src/b.jsonl": ("fp-b", 3)}


@pytest.mark.slow
def test_a_run_stopped_after_its_writes_reports_the_expansion_letters_on_the_next_run(
        tmp_path, tiny_embedding_ckpt, ray_local, monkeypatch):
    """The letters of a stopped run die with its sink's summary: its objects stay incomplete until a
    run ends, so the next one expands them again and reports the bad record."""
    import pipelines.ingest as ingest

    src = tmp_path / "src"
    src.mkdir()
    manifest = src / "m.jsonl"
    manifest.write_text('{"id": "a", "text": "record a"}\n{"id": "b", "image": "missing.png"}\n')
    cfg = parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path))
    real = ingest._run_dataset

    def stopped(*args, **kwargs):
        real(*args, **kwargs)
        raise RuntimeError("the store went away after the writes")

    monkeypatch.setattr(ingest, "_run_dataset", stopped)
    with pytest.raises(ingest.IngestError, match="the store went away"):
        run_ingest(cfg, echo=lambda _: None)
    _, dead = latest_run(tmp_path / "runs")
    assert [(d["stage"], d["message"].split(":")[0]) for d in dead] == [("write", "not complete (its unit count "
                                                                           "is settled, and its failed units reported, when a run ends)")]
    monkeypatch.setattr(ingest, "_run_dataset", real)
    again = run_ingest(cfg, echo=lambda _: None)
    assert again.objects == {str(manifest): "ingested"}
    assert [(d["position"], d["stage"]) for d in again.dead_letters] == [("record=b", "expand")]
    assert [p.payload["object_units"] for p in all_points(tmp_path / "qdrant")] == [1]
    assert run_ingest(cfg, echo=lambda _: None).objects == {str(manifest): "unchanged"}


def test_reported_errors_are_one_line_and_a_model_load_failure_is_recognised():
    from operators.qwen3vl.loading import ModelLoadError
    from pipelines.ingest import _error_text, _model_load_failed

    body = "Unexpected Response: 500 (Internal Server Error)\n" + "Raw response content:\n" + "x" * 2000
    assert _error_text(RuntimeError(body)) == "Unexpected Response: 500 (Internal Server Error)"
    assert len(_error_text(RuntimeError("y" * 2000))) == 500
    assert _model_load_failed(ModelLoadError("cannot load model from '/m': bad header"))
    assert not _model_load_failed(RuntimeError("the store went away"))


def test_the_summary_tells_replaced_from_removed_changed_objects():
    from pipelines.report import RunReport

    report = RunReport("r", "c", "src", "m", deleted_stale_objects=2, removed_failed_objects=1)
    assert ("replaced units of 2 changed objects, removed the points of 1 changed objects that now fail or are skipped, "
            "pruned 0 vanished objects") in report.summary()
    assert report.as_dict()["removed_failed_objects"] == 1


def test_an_unreachable_ray_address_fails_in_seconds_naming_the_key():
    import socket

    from pipelines.preflight import PreflightError, check_ray_address

    with socket.create_server(("127.0.0.1", 0)) as server:  # a listening port: reachable
        port = server.getsockname()[1]
        check_ray_address(f"127.0.0.1:{port}")
        check_ray_address(f"ray://127.0.0.1:{port}")
    # The port is closed now: refused at once, where ray.init() would retry for minutes.
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(PreflightError, match=rf"compute.ray_address '{re.escape(address)}': cannot connect"):
            check_ray_address(address, timeout_s=5)
    with pytest.raises(PreflightError, match="'x' is not a port number"):
        check_ray_address("head:x")
    with pytest.raises(PreflightError, match=r"the RAY_ADDRESS environment variable '127.0.0.1:\d+': cannot connect"):
        check_ray_address(f"127.0.0.1:{port}", key="the RAY_ADDRESS environment variable")
    # ("auto" is probed: the cluster running on this machine, which an earlier test's Ray may be.)
    for not_probed in (None, "local", "http://127.0.0.1:1"):
        check_ray_address(not_probed)
    # An IPv6 host's colons are no port (before: "'1]' is not a port number").
    with pytest.raises(PreflightError, match=r"cannot connect to ::1:6379"):
        check_ray_address("[::1]", timeout_s=5)
    with pytest.raises(PreflightError, match=r"cannot connect to ::1:10001"):
        check_ray_address("ray://[::1]", timeout_s=5)
    with pytest.raises(PreflightError, match=rf"cannot connect to ::1:{port}"):
        check_ray_address(f"[::1]:{port}", timeout_s=5)


def test_a_store_that_cannot_be_reached_is_told_from_a_missing_object():
    """Real failures: a refused HTTP connection (which fsspec raises as FileNotFoundError) and a refused
    S3 endpoint are unreachable; a missing local file and an HTTP 404 are not."""
    import http.server
    import socket
    import threading

    from operators.media.expand import _open
    from operators.media.reading import is_unreachable

    def error_of(uri, opts=None):
        try:
            with _open(uri, opts) as fh:
                fh.read()
        except Exception as exc:
            return exc
        raise AssertionError(f"{uri} was read")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        s3 = {"endpoint_url": f"http://127.0.0.1:{closed}", "key": "k", "secret": "s",
              "config_kwargs": {"retries": {"max_attempts": 1}}}
        assert is_unreachable(error_of(f"http://127.0.0.1:{closed}/pic.png"))
        assert is_unreachable(error_of("s3://bucket/pic.png", s3))
        assert not is_unreachable(error_of(f"http://127.0.0.1:{server.server_address[1]}/no-such-file.png"))
        assert not is_unreachable(error_of("/no/such/file.png"))
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_a_record_whose_media_store_was_down_is_embedded_once_it_is_back(tmp_path, tiny_embedding_ckpt, ray_local):
    """A record's image on a server that refused connections used to be final: the next run found the
    manifest unchanged and the record was never embedded. Now the manifest stays incomplete."""
    import functools
    import http.server
    import socket
    import threading

    media = tmp_path / "media"
    media.mkdir()
    (media / "pic.png").write_bytes(image_bytes(pattern_image(3, (40, 32))))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = tmp_path / "src"
    src.mkdir()
    manifest = src / "records.jsonl"
    manifest.write_text(json.dumps({"id": "t", "text": "A record about lanterns."}) + "\n"
                        + json.dumps({"id": "r", "image": f"http://127.0.0.1:{port}/pic.png"}) + "\n")
    cfg = parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path))

    first = run_ingest(cfg)  # nothing listens on the port yet
    _, dead = latest_run(tmp_path / "runs")
    assert first.objects == {str(manifest): "ingested"}
    assert [(d["position"], d["error_type"]) for d in dead] == [("record=r", "Unreachable")], dead
    assert f"line 2: cannot reach http://127.0.0.1:{port}/pic.png: " in dead[0]["message"]

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(media))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        second = run_ingest(cfg)
        assert second.objects == {str(manifest): "ingested"}, second.objects
        positions = sorted(p.payload["position"] for p in all_points(tmp_path / "qdrant"))
        assert positions == ["record=r", "record=t"]
        assert run_ingest(cfg).objects == {str(manifest): "unchanged"}
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.slow
def test_max_expand_s_bounds_each_manifest_record_not_their_sum(tmp_path, tiny_embedding_ckpt, ray_local):
    """Eight records whose images take about 0.8 s each to fetch, under a 3 s limit: the whole manifest
    used to be one WorkerTimedOut letter, every run; the watchdog now times each record."""
    import functools
    import http.server
    import threading
    import time

    class Slow(http.server.SimpleHTTPRequestHandler):
        def send_head(self):
            time.sleep(0.4)  # HEAD and GET alike: an honest, slow store
            return super().send_head()

        def log_message(self, *args):
            pass

    media = tmp_path / "media"
    media.mkdir()
    for i in range(8):
        (media / f"p{i}.png").write_bytes(image_bytes(pattern_image(i, (24, 24))))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Slow, directory=str(media)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    src = tmp_path / "src"
    src.mkdir()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    (src / "slow.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "image": f"{url}/p{i}.png"}) + "\n"
                                            for i in range(8)))
    try:  # 8 records x (HEAD + GET) x 0.4 s = 6.4 s of fetching in one expansion, over the 3 s limit
        report = run_ingest(parse_config(config_dict(src, tiny_embedding_ckpt, tmp_path, limits={"max_expand_s": 3})))
    finally:
        server.shutdown()
        server.server_close()
    _, dead = latest_run(tmp_path / "runs")
    assert report.objects == {str(src / "slow.jsonl"): "ingested"} and dead == [], dead
    assert len(all_points(tmp_path / "qdrant")) == 8


@contextlib.contextmanager
def _writer_store(tmp_path):
    """(a QdrantWriter on a fresh embedded collection, a Store stand-in running its calls on it, as
    Store does in server mode), and points(uri, fingerprint, n, units) to write there."""
    import numpy as np
    from qdrant_client import QdrantClient

    from operators.units import point_id
    from sinks.qdrant_schema import CollectionSpec, ensure_collection
    from sinks.qdrant_writer import PointRecord, QdrantWriter

    client = QdrantClient(path=str(tmp_path / "qdrant"))
    try:
        ensure_collection(client, CollectionSpec("c", full_dim=8, mrl_dims=(4,)))
        writer = QdrantWriter(client, "c")

        class Direct:
            def call(self, method, *args):
                return getattr(writer, method)(*args)

            call_reopening = call

        def points(uri, fingerprint, n, units=None):
            return [PointRecord(point_id(uri, f"chunk={i}"),
                                {"full": np.ones(8, np.float32), "mrl_4": np.ones(4, np.float32)},
                                {"source_uri": uri, "fingerprint": fingerprint, "object_units": units or n,
                                 "modality": "text"})
                    for i in range(n)]

        yield writer, Direct(), points
    finally:
        client.close()


def test_a_failed_object_keeps_the_points_of_the_version_it_still_has(tmp_path):
    """"Changed" also holds an object stored incomplete at its current version (a killed run, an
    unreachable record). A run that then fails on it must delete only points of another version."""
    from pipelines.ingest import _account, _settle_and_replace
    from pipelines.report import RunReport

    with _writer_store(tmp_path) as (writer, store, points):
        same, other = "/src/same.mp4", "/src/other.mp4"
        writer.upsert_points(points(same, "v1", 9, 10) + points(other, "v1", 3))  # same.mp4: 9 of 10 written
        objects = [SourceObject(same, 100, "v1"), SourceObject(other, 100, "v2")]
        plan = plan_objects(objects, writer.fingerprints_by_uri(), "/src/")
        assert plan.changed == {same: "v1", other: "v2"}
        report = RunReport("r", "c", "/src", "m")
        failed = [{"object_uri": u, "status": "failed", "n_units": 0, "seconds": 0.1} for u in (same, other)]
        dead = [{"object_uri": u, "position": None, "error_stage": "expand", "error_type": "OSError",
                 "error_message": "503 Slow Down"} for u in (same, other)]
        summary = {"objects": failed, "dead": dead}
        _account(report, summary)
        _settle_and_replace(report, summary, plan, store)

        held = writer.stored_objects(by_modality=False)
        assert sorted(held) == [same] and held[same].points == {("v1", ""): 9}
        assert report.removed_failed_objects == 1  # other.mp4 changed, and its old points went


def test_a_stopped_run_counts_a_changed_object_whose_new_version_landed(tmp_path):
    """An object changed from 3 units to 2, its 2 new points written, then the run stopped before
    the old version's surplus unit was deleted: it is ingested, and that surplus point goes now."""
    from pipelines.ingest import _account_stopped_run
    from pipelines.report import RunReport

    with _writer_store(tmp_path) as (writer, store, points):
        done, half = "/src/done.txt", "/src/half.txt"
        writer.upsert_points(points(done, "v1", 3) + points(half, "v1", 3))
        writer.upsert_points(points(done, "v2", 2) + points(half, "v2", 3)[:1])  # then the run stopped
        report = RunReport("r", "c", "/src", "m")
        _account_stopped_run(report, [SourceObject(done, 1, "v2"), SourceObject(half, 1, "v2")], store,
                             KeyboardInterrupt())
        assert report.objects == {done: "ingested", half: "failed"} and report.points_written == 3
        assert report.deleted_stale_objects == 1
        assert writer.fingerprints_by_uri() == {done: "v2", half: "incomplete"}
