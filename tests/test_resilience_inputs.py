"""Unusual-but-valid and malformed inputs through the real job (Ray, embedded Qdrant): every good file
lands with the right points, every bad one is a dead letter naming the problem, nothing crashes.

One corpus (both kinds side by side, so bad files have good neighbours) is ingested once per module.
"""

import io
import os
import re

import numpy as np
import pytest
from PIL import Image, ImageOps
from transformers import AutoTokenizer

from operators.media.text_chunks import chunk_spans
from pipelines.config import parse_config
from pipelines.ingest import run_ingest
from tests.resilience_corpus import (EMBED, EXPAND, LIMITS, MANIFEST_RECORD_REASONS, make_malformed_corpus,
                                     make_unusual_corpus)
from tests.resilience_helpers import all_points, config_dict, latest_run, point_keys

pytestmark = pytest.mark.slow

IS_ROOT = os.geteuid() == 0


@pytest.fixture(scope="module")
def run(tmp_path_factory, tiny_embedding_ckpt, ray_local):
    tmp = tmp_path_factory.mktemp("inputs")
    root = tmp / "src"
    tok = AutoTokenizer.from_pretrained(str(tiny_embedding_ckpt))

    def chunks(text):
        return len(chunk_spans(text, tok, EXPAND["chunk_tokens"], EXPAND["overlap_tokens"]))

    good = make_unusual_corpus(root, chunks)
    bad = make_malformed_corpus(root, IS_ROOT)
    cfg = parse_config(config_dict(root, tiny_embedding_ckpt, tmp, expand=EXPAND, embedder=EMBED, limits=LIMITS,
                                   compute={"batch_size": 16}))
    report = run_ingest(cfg)
    saved, dead = latest_run(tmp / "runs")
    points = all_points(tmp / "qdrant", vectors=True)
    yield {"root": root, "good": good, "bad": bad, "expect": {**good, **bad}, "report": report, "saved": saved,
           "dead": dead, "points": points, "ckpt": tiny_embedding_ckpt}
    for rel in ("links/unreadable.txt", "refs/locked.png"):  # let pytest clean up
        os.chmod(root / rel, 0o644)


def uri(run, rel):
    return str(run["root"] / rel)


def by_uri(points):
    out = {}
    for p in points:
        out.setdefault(p.payload["source_uri"], []).append(p)
    return out


def test_every_object_is_accounted_for_and_point_counts_are_exact(run):
    expect, saved = run["expect"], run["saved"]
    statuses = {rel: saved["objects"].get(uri(run, rel)) for rel in expect}
    assert statuses == {rel: e.status for rel, e in expect.items()}
    assert set(saved["objects"]) == {uri(run, rel) for rel in expect}, "an object nobody expected was listed"
    keys = point_keys(run["points"])
    assert len(keys) == len(set(keys)), "duplicate points"
    assert len(run["points"]) == sum(e.points for e in expect.values()) == saved["points_written"]
    got = by_uri(run["points"])
    assert {rel: len(got.get(uri(run, rel), [])) for rel in expect} == {rel: e.points for rel, e in expect.items()}
    counts = saved["counts"]
    assert counts["skipped"] == sum(e.status == "skipped" for e in expect.values()) == 6
    assert counts["failed"] == sum(e.status == "failed" for e in expect.values())
    assert counts["ingested"] == sum(e.status == "ingested" for e in expect.values())


def test_unusual_but_valid_files_land_with_the_right_payload(run):
    got = by_uri(run["points"])
    for rel, e in run["good"].items():
        points = got.get(uri(run, rel), [])
        assert len(points) == e.points, rel
        for p in points:
            for key, value in (e.check or {}).items():
                assert p.payload.get(key) == value, (rel, key, p.payload.get(key))
            assert np.isfinite(p.vector["full"]).all() and abs(np.linalg.norm(p.vector["full"]) - 1) < 1e-3
    dead_uris = {d["uri"] for d in run["dead"]}
    assert not dead_uris & {uri(run, rel) for rel in run["good"]}
    # Names with spaces, unicode, '#', '?' and '%20' keep their exact URI (nothing is URL-decoded).
    for rel in run["good"]:
        if rel.startswith("names/"):
            assert [p.payload["source_uri"] for p in got[uri(run, rel)]] == [uri(run, rel)]
    # Long text: chunks are consecutive, overlapping windows, each far shorter than the whole text.
    long_points = sorted(got[uri(run, "texts/very_long.txt")], key=lambda p: p.payload["chunk_index"])
    assert [p.payload["chunk_index"] for p in long_points] == list(range(len(long_points)))
    # The video with an audio track: its video stream is segmented as usual.
    segs = sorted((p.payload["start_s"], p.payload["end_s"]) for p in got[uri(run, "videos/with_audio.mp4")])
    assert segs == [(0.0, 1.0), (1.0, 2.0)]


def test_animated_gif_is_its_first_frame_and_exif_rotation_is_applied(run):
    """Documented behaviour: an animated GIF is embedded as its first frame (frame count in the payload);
    an EXIF-rotated JPEG is embedded upright."""
    from operators.qwen3vl import Qwen3VLEmbedder, reduce_dim

    got = by_uri(run["points"])
    root = run["root"]
    gif = Image.open(root / "images/animated.gif")
    gif.seek(0)
    first = io.BytesIO()
    gif.convert("RGB").save(first, format="PNG")
    upright = io.BytesIO()
    ImageOps.exif_transpose(Image.open(root / "images/rotated.jpg")).save(upright, format="PNG")
    emb = Qwen3VLEmbedder(str(run["ckpt"]), **{k: EMBED[k] for k in ("max_length", "min_pixels", "max_pixels")})
    try:
        raw = emb.process([{"image": first.getvalue()}, {"image": upright.getvalue()}], normalize=False).numpy()
    finally:
        emb.close()
    for rel, vec in (("images/animated.gif", raw[0]), ("images/rotated.jpg", raw[1])):
        (point,) = got[uri(run, rel)]
        np.testing.assert_allclose(point.vector["full"], reduce_dim(vec[None], None)[0], atol=1e-5, err_msg=rel)


def test_each_malformed_file_is_a_dead_letter_naming_the_problem(run):
    dead = {}
    for d in run["dead"]:
        dead.setdefault(d["uri"], []).append(d)
    for rel, e in run["bad"].items():
        letters = dead.get(uri(run, rel), [])
        assert len(letters) == e.dead_letters, (rel, letters)
        for d in letters:
            assert d["stage"] in ("list", "expand") and d["error_type"] and d["message"], d
        if e.reason and rel != "refs/manifest.jsonl":
            texts = [f"{d['error_type']}: {d['message']}" for d in letters]
            assert any(re.search(e.reason, t) for t in texts), (rel, texts)


def test_a_manifest_lands_its_good_records_and_reports_each_bad_one(run):
    manifest = uri(run, "refs/manifest.jsonl")
    letters = {d["position"]: f"{d['error_type']}: {d['message']}" for d in run["dead"] if d["uri"] == manifest}
    expected = dict(MANIFEST_RECORD_REASONS)
    if not IS_ROOT:
        expected["record=locked"] = r"PermissionError"
    assert set(letters) == set(expected)
    for position, reason in expected.items():
        assert re.search(reason, letters[position]), (position, letters[position])
    positions = sorted(p.payload["position"] for p in by_uri(run["points"])[manifest])
    assert positions == sorted(["record=good-text", "record=good-mixed", "record=15"]
                               + (["record=locked"] if IS_ROOT else []))
    # A manifest with no usable record fails as a whole, with one letter per bad record plus a summary.
    all_bad = [d["error_type"] for d in run["dead"] if d["uri"] == uri(run, "refs/all_bad.jsonl")]
    assert sorted(all_bad) == ["EmptyManifest", "FileNotFoundError", "InvalidJSON"]


def test_nothing_crashed_and_the_run_reports_no_infrastructure_error(run):
    assert run["saved"]["error"] is None
    assert run["report"].counts() == run["saved"]["counts"]
    assert run["saved"]["dead_letter_count"] == len(run["dead"]) == sum(e.dead_letters for e in run["expect"].values())
