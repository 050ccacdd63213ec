"""Qwen3VLReranker on a tiny random checkpoint: prompt, score formula, batching, truncation, errors."""

import pytest
import torch
from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

from operators.qwen3vl import InputError, Qwen3VLReranker
from tests.media_gen import pattern_image, write_video


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("rerank_media")
    img, rgba = root / "a.png", root / "b.png"
    pattern_image(1).save(img)
    pattern_image(2, (64, 96), "RGBA").save(rgba)
    return {"img": str(img), "rgba": str(rgba), "video": str(write_video(root / "v.mp4")),
            "frames": [str(img), str(rgba).replace("b.png", "a.png")]}


def test_prompt_string(reranker):
    prompt = reranker.prompt({"text": "the query"}, {"text": "the doc"}, "Judge it")
    assert prompt == (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the "
        'Instruct provided. Note that the answer can only be "yes" or "no".<|im_end|>\n'
        "<|im_start|>user\n<Instruct>: Judge it<Query>:the query\n<Document>:the doc<|im_end|>\n"
        "<|im_start|>assistant\n")
    default = reranker.prompt({}, {"text": "d"})
    assert "<Instruct>: Given a search query, retrieve relevant candidates that answer the query.<Query>:NULL" \
        in default


def test_score_is_softmax_of_yes_over_no_from_the_lm_head(reranker, tiny_reranker_ckpt):
    lm = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_reranker_ckpt), dtype=torch.float32).eval()
    tok = AutoProcessor.from_pretrained(str(tiny_reranker_ckpt)).tokenizer
    yes, no = tok.get_vocab()["yes"], tok.get_vocab()["no"]
    query, doc = {"text": "cats"}, {"text": "a cat on a mat"}
    ids = reranker.prepare(query, doc).input_ids
    with torch.inference_mode():
        logits = lm(input_ids=torch.tensor([ids])).logits[0, -1]
    expected = torch.softmax(logits[[yes, no]].float(), dim=0)[0].item()
    assert reranker.process({"query": query, "documents": [doc]})[0] == pytest.approx(expected, abs=1e-5)


def test_batched_equals_one_pair_at_a_time_on_every_modality(reranker, media):
    query = {"text": "find the picture", "image": media["img"]}
    docs = [{"text": "short"}, {"image": media["img"]}, {"image": media["rgba"], "text": "with caption"},
            {"video": media["frames"]}, {"video": media["video"]}, {"text": "long " * 200}, {}]
    batched = reranker.process({"instruction": "Pick", "query": query, "documents": docs})
    single = [reranker.process({"instruction": "Pick", "query": query, "documents": [d]})[0] for d in docs]
    assert len(batched) == len(docs)
    assert batched == pytest.approx(single, abs=1e-5)
    assert all(0.0 < s < 1.0 for s in batched)


def test_truncation_keeps_special_tokens_and_the_tail(tiny_reranker_ckpt, media):
    rr = Qwen3VLReranker(str(tiny_reranker_ckpt), max_length=60)
    try:
        prepared = rr.prepare({"text": "q " * 10}, {"image": media["img"], "text": "word " * 300})
        tok = rr.processor.tokenizer
        full = rr.processor.tokenizer(prepared.prompt).input_ids  # no vision expansion: compare specials only
        specials = set(tok.all_special_ids)
        ids = prepared.input_ids
        assert tok.decode(ids[-5:]) == "<|im_end|>\n<|im_start|>assistant\n"
        assert sum(1 for t in ids[:-5] if t not in specials) == 60 - sum(1 for t in ids[:-5] if t in specials)
        n_image = ids.count(tok.convert_tokens_to_ids("<|image_pad|>"))
        assert n_image == int(prepared.vision["image_grid_thw"].prod()) // 4
        assert len(full) > 0
        score = rr.process({"query": {"text": "q"}, "documents": [{"text": "word " * 300}]})
        assert 0.0 < score[0] < 1.0
    finally:
        rr.close()


def test_bad_document_fails_alone(reranker, tmp_path):
    docs = [{"text": "fine"}, {"image": str(tmp_path / "gone.png")}, {"text": "also fine"}]
    results = reranker.score({"text": "q"}, docs)
    assert [r.ok for r in results] == [True, False, True]
    assert "gone.png" in results[1].error
    with pytest.raises(InputError, match="input 1"):
        reranker.process({"query": {"text": "q"}, "documents": docs})
    assert reranker.process({"query": {"text": "q"}, "documents": []}) == []


@pytest.mark.parametrize("pair", ["image query, text doc", "image query, image doc", "text query, image doc",
                                  "two query images and text, image doc", "bytes query image", "truncated"])
def test_query_scoped_preparation_equals_the_processor(tiny_reranker_ckpt, media, pair):
    # Images processed one by one (the query's once per score() call) give the processor's ids and pixels.
    from tests.media_gen import image_bytes
    rr = Qwen3VLReranker(str(tiny_reranker_ckpt), max_length=60 if pair == "truncated" else 10240)
    query, doc = {
        "image query, text doc": ({"image": media["img"]}, {"text": "a doc"}),
        "image query, image doc": ({"image": media["img"], "text": "q"}, {"image": media["rgba"]}),
        "text query, image doc": ({"text": "q"}, {"image": media["rgba"], "text": "caption"}),
        "two query images and text, image doc": ({"image": [media["img"], media["rgba"]], "text": "q"},
                                                 {"image": media["img"]}),
        "bytes query image": ({"image": image_bytes(pattern_image(3))}, {"text": "d"}),
        "truncated": ({"image": media["img"]}, {"text": "word " * 200}),
    }[pair]
    try:
        plain = rr.prepare(query, doc)
        for _ in range(2):  # the second time the query's images come from the cache
            scoped = rr.prepare(query, doc, query_scope="call-1")
            assert scoped.input_ids == plain.input_ids and scoped.prompt == plain.prompt
            assert scoped.vision.keys() == plain.vision.keys()
            assert all(torch.equal(scoped.vision[k], plain.vision[k]) for k in plain.vision)
            assert torch.equal(scoped.positions, plain.positions)
    finally:
        rr.close()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_pairs_of_one_query_image_share_its_pixels(tiny_reranker_ckpt, media, dtype):
    # 100 pairs of an image query and text documents hold one copy of the query's pixels, in the
    # model's dtype: no per-pair copy or cast, and comparing them with the prefix's is free.
    rr = Qwen3VLReranker(str(tiny_reranker_ckpt), dtype=dtype, prepare_processes=0)
    try:
        query = {"image": media["img"]}
        a, b = (rr.prepare(query, {"text": t}, query_scope="call") for t in ("one doc", "another doc"))
        assert a.vision["pixel_values"].dtype == dtype
        assert a.vision["pixel_values"].data_ptr() == b.vision["pixel_values"].data_ptr()
        plain = rr.prepare(query, {"text": "one doc"})
        assert all(torch.equal(a.vision[k], plain.vision[k]) for k in plain.vision)
        with_image = rr.prepare(query, {"image": media["rgba"]}, query_scope="call")  # its own rows follow
        assert with_image.vision["pixel_values"].data_ptr() != a.vision["pixel_values"].data_ptr()
        assert all(torch.equal(with_image.vision[k], rr.prepare(query, {"image": media["rgba"]}).vision[k])
                   for k in with_image.vision)
    finally:
        rr.close()


def test_a_query_of_more_images_than_the_cache_holds_is_processed_once(tiny_reranker_ckpt, monkeypatch):
    """Its text-document pairs share one tensor of its rows: looked up whole, not image by image."""
    from operators.qwen3vl import preprocess
    from tests.media_gen import image_bytes

    calls = []
    original = preprocess.process_image

    def counting(processor, entry, storage_options):
        calls.append(entry)
        return original(processor, entry, storage_options)

    monkeypatch.setattr(preprocess, "process_image", counting)
    query = {"text": "q", "image": [image_bytes(pattern_image(i, (32, 32))) for i in range(20)]}
    docs = [{"text": f"doc {i}"} for i in range(4)]
    with Qwen3VLReranker(str(tiny_reranker_ckpt), prepare_processes=0, prefix_cache=False) as rr:
        assert rr._vision_cache.max_items < 20
        pairs = [rr.prepare(query, d, query_scope="one call") for d in docs]
        scores = [r.score for r in rr.score(query, docs)]
    assert len(calls) == 20 + 20  # once for the prepared pairs above, once for the score() call
    assert len({p.vision["pixel_values"].data_ptr() for p in pairs}) == 1
    with Qwen3VLReranker(str(tiny_reranker_ckpt), prepare_processes=0, prefix_cache=False) as rr:
        single = [rr.score(query, [d])[0].score for d in docs]
    assert scores == pytest.approx(single, abs=1e-5)


def test_same_tensor_reads_nothing_for_the_same_view_and_compares_otherwise():
    from operators.qwen3vl.preprocess import same_tensor
    x = torch.arange(12.0)
    assert same_tensor(x, x) and same_tensor(x[2:8], x[2:8]) and same_tensor(x, x.clone())
    assert not same_tensor(x[:4], x[1:5]) and not same_tensor(x, x + 1)
    assert same_tensor(torch.zeros(3)[:0], torch.ones(3)[:0])  # empty: equal by shape
    assert not same_tensor(x.view(3, 4), x.view(4, 3))


def test_a_query_image_is_read_once_per_score_call(tiny_reranker_ckpt, media, monkeypatch):
    from operators.qwen3vl import preprocess
    reads = []
    original = preprocess.resolve_image

    def counting(source, storage_options=None):
        reads.append(source)
        return original(source, storage_options)

    monkeypatch.setattr(preprocess, "resolve_image", counting)
    rr = Qwen3VLReranker(str(tiny_reranker_ckpt), prepare_processes=0)
    try:
        docs = [{"text": f"doc {i}"} for i in range(5)] + [{"image": media["rgba"]}]
        first = [r.score for r in rr.score({"image": media["img"]}, docs)]
        assert reads.count(media["img"]) == 1 and reads.count(media["rgba"]) == 1
        second = [r.score for r in rr.score({"image": media["img"]}, docs)]
        assert reads.count(media["img"]) == 2  # a new call reads the query again (it may have changed)
        assert first == second
        # Only the last call's query images stay cached: no later call could use an earlier call's
        # (hundreds of MiB of pixels for large query images, held until 16 newer entries came).
        for _ in range(3):
            rr.score({"image": media["rgba"]}, docs[:2])
        assert len(rr._vision_cache) == 1 and rr._cache_scope is not None
    finally:
        rr.close()


def test_documents_and_queries_of_the_wrong_shape_are_named(reranker):
    with pytest.raises(TypeError, match="documents must be a list of dicts, got one dict"):
        reranker.score({"text": "q"}, {"text": "one document"})
    with pytest.raises(TypeError, match="query must be a dict"):
        reranker.score("q", [{"text": "d"}])
    results = reranker.score({"text": "q"}, ["a bare string", {"text": "a document"}])
    assert not results[0].ok and "a document must be a dict" in results[0].error
    assert results[1].ok


def test_a_bad_query_is_named_as_the_query(reranker, tmp_path):
    docs = [{"text": "a"}, {"text": "b"}]
    with pytest.raises(ValueError, match="query: image file not found: .*gone.png"):
        reranker.score({"image": str(tmp_path / "gone.png")}, docs)
    with pytest.raises(ValueError, match="query: image file not found"):
        reranker.process({"query": {"image": str(tmp_path / "gone.png")}, "documents": docs})
    with pytest.raises(ValueError, match="query: unknown key 'txt'"):
        reranker.score({"txt": "q"}, docs)
    with pytest.raises(TypeError, match="instruction must be a string, got int"):
        reranker.score({"text": "q"}, docs, instruction=5)
    # Every document failing on its own is still each document's error.
    results = reranker.score({"text": "q"}, [{"image": str(tmp_path / "gone.png")}, {"txt": "b"}])
    assert "gone.png" in results[0].error and "unknown key 'txt'" in results[1].error


def test_one_unloaded_pil_image_in_many_documents(reranker, media):
    from PIL import Image

    want = reranker.score({"text": "q"}, [{"image": media["img"]}])[0].score
    for _ in range(5):
        with Image.open(media["img"]) as lazy:
            results = reranker.score({"text": "q"}, [{"image": lazy}] * 6)
        assert all(r.ok for r in results), [r.error for r in results]
        assert all(abs(r.score - want) < 1e-5 for r in results)


def test_a_first_window_below_one_is_refused(reranker):
    with pytest.raises(ValueError, match="first_window must be an integer >= 1, got 0"):
        reranker.score({"text": "q"}, [{"text": "d"}], first_window=0)
    assert reranker.score({"text": "q"}, []) == []


def test_video_settings_per_call_and_per_item(reranker, media):
    """The call's fps / max_frames are checked up front; a document's own win over the call's, as in the
    embedder (the reference ignored them); an instruction inside the query or a document is refused."""
    q, doc = {"text": "q"}, {"video": media["video"]}
    with pytest.raises(TypeError, match="fps must be a number, got str"):
        reranker.score(q, [doc], fps="2")
    with pytest.raises(ValueError, match="max_frames must be an integer >= 2"):
        reranker.score(q, [doc], max_frames=1)
    plain = reranker.score(q, [doc])[0]
    call_level = reranker.score(q, [doc], fps=4.0)[0]
    own = reranker.score(q, [{**doc, "fps": 4.0}])[0]
    own_wins = reranker.score(q, [{**doc, "fps": 4.0}], fps=1.0)[0]
    assert plain.ok and call_level.ok and own.ok and own_wins.ok
    assert abs(call_level.score - plain.score) > 1e-6  # more frames: another input
    assert abs(own.score - call_level.score) < 1e-6 and abs(own_wins.score - call_level.score) < 1e-6
    with pytest.raises(ValueError, match="query: 'instruction' in the query: the reranker takes one per call"):
        reranker.score({"text": "q", "instruction": "Find it"}, [{"text": "a"}, {"text": "b"}])
    bad = reranker.score(q, [{"text": "a", "instruction": "Find it"}, {"text": "b"}])
    assert "'instruction' in the document" in bad[0].error and bad[1].ok


def test_pairs_held_at_once_are_bounded_by_window_mib(tiny_reranker_ckpt):
    """Pairs prepared but not yet scored: two windows of them, each of about window_mib (but one
    forward batch at least), even on a CPU, whose one window would otherwise hold every pair; scores
    unchanged."""
    from tests.media_gen import image_bytes

    thumbs = [{"image": image_bytes(pattern_image(i, (64, 64)))} for i in range(12)]  # 98 KB each, prepared
    photos = [{"image": image_bytes(pattern_image(i, (256, 256)))} for i in range(24)]  # 1.5 MB each
    docs = thumbs + photos
    heavy = {i for i, d in enumerate(docs) if d in photos}
    query = {"text": "a pattern"}

    def held_at_most(rr):
        """The most photo pairs submitted for preparation and not yet scored."""
        held, peak = [0], [0]
        submit, record = rr.submit_prepare, rr._record

        def counted_submit(q, document, *args):
            held[0] += any(document is p for p in photos)
            peak[0] = max(peak[0], held[0])
            return submit(q, document, *args)

        def counted_record(results, index, out):
            held[0] -= index in heavy
            return record(results, index, out)

        rr.submit_prepare, rr._record = counted_submit, counted_record
        results = rr.score(query, docs)
        assert all(r.ok for r in results), [r.error for r in results]
        return peak[0], [r.score for r in results]

    with Qwen3VLReranker(str(tiny_reranker_ckpt), token_budget=4096, max_batch_items=4, window_mib=1) as rr:
        assert rr.prepare(query, photos[0]).nbytes > 2**20 / 4  # so 1 MiB holds fewer than one batch of photos
        bounded, scores = held_at_most(rr)
        assert rr.last_prefix_length > 0  # later windows still share the prefix
    with Qwen3VLReranker(str(tiny_reranker_ckpt), token_budget=4096, max_batch_items=4) as rr:
        unbounded, expected = held_at_most(rr)
    assert bounded <= 2 * 4 < unbounded == len(photos)  # windows of one batch (4): the one scored and the next
    assert scores == pytest.approx(expected, abs=1e-5)


def test_a_pair_weighs_the_query_pixels_only_where_it_holds_its_own(reranker, media):
    """A query's images are processed once per call and shared by the pairs of documents without
    media (one tensor, however many images the query has); a pair with media of its own holds a copy
    joined to them; a query video is processed per pair."""
    from tests.media_gen import image_bytes

    image_query = {"text": "q", "image": image_bytes(pattern_image(0, (256, 256)))}
    text, picture = {"text": "a caption"}, {"image": image_bytes(pattern_image(1, (128, 128)))}
    query_pixels = 6 * 256 * 256 * 4  # float32
    weigh, _ = reranker._pair_weights(image_query, None)
    assert weigh(text)[0] < query_pixels / 10
    assert weigh(picture)[0] > query_pixels + 6 * 128 * 128 * 4
    assert weigh(picture)[0] == pytest.approx(reranker.prepare(image_query, picture, query_scope="s").nbytes, rel=0.02)
    two_images = {"text": "q", "image": [image_query["image"], picture["image"]]}
    pairs = [reranker.prepare(two_images, {"text": t}, query_scope="s2") for t in ("a", "b")]
    assert pairs[0].vision["pixel_values"].data_ptr() == pairs[1].vision["pixel_values"].data_ptr()
    assert reranker._pair_weights(two_images, None)[0](text)[0] < query_pixels / 10
    video_query = {"text": "q", "video": media["video"]}
    assert reranker._pair_weights(video_query, None)[0](text)[0] > 2**20  # its frames, in every pair
    assert reranker.score({"text": "q"}, [{"video": media["video"]}], max_frames=6)[0].ok
    assert (0, 1, 6) in reranker.weights.seen  # learned as read: up to the call's 6 frames
    with pytest.raises(ValueError, match="window_mib must be an integer >= 1, got 0"):
        Qwen3VLReranker("unused", window_mib=0)
