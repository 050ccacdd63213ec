"""Reranker prefix reuse: scores with the shared query prefix computed once equal the plain path's."""

import pytest
import torch

from operators.qwen3vl import Qwen3VLReranker
from operators.qwen3vl.reranker import _common_prefix_length
from tests.media_gen import pattern_image, write_video

TOL = 1e-5


@pytest.fixture(scope="module")
def rerankers(tiny_reranker_ckpt):
    on = Qwen3VLReranker(str(tiny_reranker_ckpt), max_batch_items=3)
    off = Qwen3VLReranker(str(tiny_reranker_ckpt), max_batch_items=3, prefix_cache=False)
    yield on, off
    on.close()
    off.close()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix_media")
    paths = {}
    for name, seed, size, mode in (("a", 1, (96, 64), "RGB"), ("b", 2, (64, 96), "RGBA"), ("c", 3, (96, 64), "RGB"),
                                   ("big", 4, (200, 150), "RGB")):
        paths[name] = str(root / f"{name}.png")
        pattern_image(seed, size, mode).save(paths[name])
    paths["video"] = str(write_video(root / "v.mp4"))
    paths["frames"] = [paths["a"], paths["c"]]
    return paths


def _docs(media):
    return [{"text": "short"}, {"image": media["a"]}, {"image": media["b"], "text": "with caption"},
            {"video": media["frames"]}, {"video": media["video"]}, {"text": "long " * 200}, {},
            {"image": [media["big"], media["c"]], "text": "two images"}, {"video": media["video"], "image": media["a"]}]


def _check(rerankers, query, docs, instruction="Pick"):
    on, off = rerankers
    cached = on.score(query, docs, instruction)
    prefix = on.last_prefix_length
    # Windows of 2, 4, ...: later windows are scored on the prefix planned in the first (or, where
    # truncation cut a pair inside it, on the plain path).
    windowed = on.score(query, docs, instruction, first_window=2)
    assert [r.score for r in windowed] == pytest.approx([r.score for r in cached], abs=TOL)
    plain = off.score(query, docs, instruction)
    assert off.last_prefix_length == 0
    single = [off.score(query, [d], instruction)[0] for d in docs]
    assert all(r.ok for r in cached + plain + single), [r.error for r in cached if not r.ok]
    scores = [r.score for r in cached]
    assert scores == pytest.approx([r.score for r in plain], abs=TOL)
    assert scores == pytest.approx([r.score for r in single], abs=TOL)
    return prefix


@pytest.mark.parametrize("query_kind", ["text", "empty", "image", "text+image", "two images", "frames", "video file",
                                        "video+image+text"])
def test_prefix_reuse_equals_plain_on_every_modality(rerankers, media, query_kind):
    query = {"text": {"text": "find the picture"}, "empty": {}, "image": {"image": media["a"]},
             "text+image": {"text": "find the picture", "image": media["b"]},
             "two images": {"image": [media["a"], media["big"]]}, "frames": {"video": media["frames"]},
             "video file": {"video": media["video"], "text": "q"},
             "video+image+text": {"video": media["video"], "image": media["c"], "text": "q"}}[query_kind]
    docs = _docs(media)
    prefix = _check(rerankers, query, docs)
    on = rerankers[0]
    # The prefix really was reused and holds the whole query (its vision placeholders included).
    ids = on.prepare(query, docs[0], "Pick").input_ids
    tok = on.processor.tokenizer
    marker = tok("\n<Document>:", add_special_tokens=False).input_ids
    doc_start = next(i for i in range(len(ids)) if ids[i:i + len(marker)] == marker)
    assert doc_start <= prefix <= doc_start + len(marker)


def test_document_images_never_enter_the_prefix(rerankers, media):
    # Same-size document images give identical placeholder ids: the longest common prefix would
    # run into them, but their pixels differ, so the prefix must stop before the first one.
    docs = [{"image": media["a"]}, {"image": media["c"]}, {"image": media["a"], "text": "x"}]
    for query in ({"text": "q"}, {"image": media["a"]}):
        prefix = _check(rerankers, query, docs)
        on = rerankers[0]
        ids = on.prepare(query, docs[0], "Pick").input_ids
        image_id = on.model.config.image_token_id
        n_query_pads = ids.count(image_id) - int(on.prepare({}, docs[0], "Pick").input_ids.count(image_id))
        assert ids[:prefix].count(image_id) == n_query_pads
        assert 0 < prefix


def test_prefix_stops_where_documents_start(rerankers, media):
    # Even when every document starts alike (here: is the same), the prefix ends before document
    # text, so pairs prepared later (next windows) still share it.
    on = rerankers[0]
    a, b = (on.prepare({"text": "q"}, {"text": t}, "Pick").input_ids for t in ("0", "1"))
    doc_start = next(i for i, (x, y) in enumerate(zip(a, b)) if x != y)
    docs = [{"text": "the very same"}] * 3 + [{"image": media["a"]}] * 2
    _check(rerankers, {"text": "q"}, docs[:3])
    assert on.last_prefix_length == doc_start
    _check(rerankers, {"text": "q"}, docs[3:])
    assert on.last_prefix_length == doc_start


def test_truncated_pairs(tiny_reranker_ckpt, media):
    on = Qwen3VLReranker(str(tiny_reranker_ckpt), max_length=70)
    off = Qwen3VLReranker(str(tiny_reranker_ckpt), max_length=70, prefix_cache=False)
    try:
        docs = [{"text": "word " * 300}, {"text": "other " * 10}, {"image": media["a"], "text": "cap " * 100}]
        _check((on, off), {"text": "the query " * 20}, docs)
        _check((on, off), {"text": "q", "image": media["b"]}, docs)
    finally:
        on.close()
        off.close()


def test_bad_document_fails_alone_with_prefix_reuse(rerankers, media, tmp_path):
    on, off = rerankers
    docs = [{"text": "fine"}, {"image": str(tmp_path / "gone.png")}, {"image": media["a"]}]
    results = on.score({"text": "q"}, docs)
    assert [r.ok for r in results] == [True, False, True]
    assert on.last_prefix_length > 0
    plain = off.score({"text": "q"}, docs)
    assert results[0].score == pytest.approx(plain[0].score, abs=TOL)
    assert results[2].score == pytest.approx(plain[2].score, abs=TOL)


def test_wrong_positions_would_be_caught(rerankers, media):
    # The equality above is not vacuous: 1-D (text-only) positions after an image move the scores.
    on, off = rerankers
    query, docs = {"text": "q", "image": media["a"]}, [{"text": "a"}, {"image": media["c"], "text": "b"}]
    good = [r.score for r in off.score(query, docs)]
    original = on.prepare

    def text_positions(*args, **kwargs):
        p = original(*args, **kwargs)
        p.positions = torch.arange(len(p.input_ids)).expand(3, -1)
        return p

    try:
        on.prepare = text_positions
        bad = [r.score for r in on.score(query, docs)]
    finally:
        del on.prepare
    assert max(abs(a - b) for a, b in zip(good, bad)) > 10 * TOL


def test_common_prefix_length():
    assert _common_prefix_length([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert _common_prefix_length([[5], [6]]) == 0
    assert _common_prefix_length([[1, 2, 3]] * 3) == 3


def test_later_windows_run_only_their_suffixes(rerankers, media, monkeypatch):
    on = rerankers[0]
    rows, plain = [], []
    suffixes, isolating = on.score_suffixes, on._score_isolating
    monkeypatch.setattr(on, "score_suffixes", lambda items, *a: rows.append(len(items)) or suffixes(items, *a))
    monkeypatch.setattr(on, "_score_isolating", lambda items: plain.append(len(items)) or isolating(items))
    # The first window's documents start alike; the later ones do not.
    docs = [{"text": "same start one"}, {"text": "same start two"}] + [
        {"text": f"doc {i} " + "x " * i} for i in range(5)] + [{"image": media["a"]}]
    results = on.score({"text": "q", "image": media["b"]}, docs, "Pick", first_window=2)
    assert all(r.ok for r in results) and on.last_prefix_length > 0
    assert sum(rows) == len(docs) and not plain  # windows 2, 4, 2: every pair on the prefix
