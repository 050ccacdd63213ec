"""Qwen3VLEmbedder on a tiny random checkpoint: prompts, pooling, batching, MRL, truncation, errors."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from operators.qwen3vl import InputError, Qwen3VLEmbedder
from tests.media_gen import image_bytes, pattern_image, write_video

SYSTEM = "<|im_start|>system\n{}<|im_end|>\n<|im_start|>user\n"
ASSISTANT = "<|im_end|>\n<|im_start|>assistant\n"
IMG = "<|vision_start|><|image_pad|><|vision_end|>"
VID = "<|vision_start|><|video_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("embed_media")
    paths = {}
    for name, mode, size in [("rgb", "RGB", (96, 64)), ("rgba", "RGBA", (80, 120)), ("wide", "RGB", (300, 40))]:
        paths[name] = root / f"{name}.png"
        pattern_image(len(paths), size, mode).save(paths[name])
    paths["video"] = write_video(root / "clip.mp4", seconds=2.0)
    paths["frames"] = [root / f"f{i}.png" for i in range(5)]
    for i, p in enumerate(paths["frames"]):
        pattern_image(100 + i, (64, 48)).save(p)
    return paths


def cos(a, b):
    return F.cosine_similarity(a, b, dim=-1)


@pytest.mark.parametrize("item, expected", [
    ({"text": "hello"}, SYSTEM.format("Represent the user's input.") + "hello" + ASSISTANT),
    ({"text": "hello", "instruction": "Find a match "}, SYSTEM.format("Find a match.") + "hello" + ASSISTANT),
    ({"text": "hello", "instruction": "Find a match?"}, SYSTEM.format("Find a match?") + "hello" + ASSISTANT),
    ({}, SYSTEM.format("Represent the user's input.") + "NULL" + ASSISTANT),
    ({"text": ""}, SYSTEM.format("Represent the user's input.") + ASSISTANT),  # as the reference: not NULL
    ({"image": "IMG", "text": "cap"}, SYSTEM.format("Represent the user's input.") + IMG + "cap" + ASSISTANT),
    ({"image": ["IMG", "IMG"]}, SYSTEM.format("Represent the user's input.") + IMG + IMG + ASSISTANT),
    ({"text": "t", "image": "IMG", "video": "VID", "instruction": "Q"},
     SYSTEM.format("Q.") + VID + IMG + "t" + ASSISTANT),
])
def test_rendered_prompt_strings(embedder, media, item, expected):
    item = {k: ([str(media["rgb"])] * len(v) if v == ["IMG", "IMG"] else
                str(media["rgb"]) if v == "IMG" else str(media["video"]) if v == "VID" else v)
            for k, v in item.items()}
    assert embedder.prompt(item) == expected


def test_pooled_token_is_the_tokenizer_appended_endoftext(embedder, media):
    tok = embedder.processor.tokenizer
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    for item in ({"text": "hello world"}, {"image": str(media["rgb"])}, {}):
        prepared = embedder.prepare(item)
        assert prepared.input_ids[-1] == eot
        assert prepared.input_ids[-2] != eot  # appended by the tokenizer, once
        assert prepared.prompt.endswith("<|im_start|>assistant\n")
    # The pooled vector is the final-norm hidden state at that last position.
    prepared = embedder.prepare({"text": "hello world"})
    with torch.inference_mode():
        out = embedder.model.model(input_ids=torch.tensor([prepared.input_ids]))
    expected = F.normalize(out.last_hidden_state[0, -1].float(), dim=-1)
    got = embedder.process([{"text": "hello world"}])[0]
    assert torch.allclose(got, expected, atol=1e-5)


def test_batched_equals_single_on_mixed_inputs(embedder, media):
    inputs = [
        {"text": "a short text"},
        {"image": str(media["rgb"])},
        {"image": str(media["rgba"]), "text": "alpha image with caption"},
        {"text": "a much longer text " * 30, "instruction": "Retrieve documents"},
        {"image": [str(media["rgb"]), str(media["wide"])]},
        {"video": [str(p) for p in media["frames"]]},
        {"video": str(media["video"])},
        {},
    ]
    batched = embedder.process(inputs)
    single = torch.cat([embedder.process([x]) for x in inputs])
    assert batched.shape == (len(inputs), embedder.hidden_size)
    assert batched.dtype == torch.float32
    assert torch.all(cos(batched, single) > 0.99999)
    assert torch.allclose(batched.norm(dim=-1), torch.ones(len(inputs)), atol=1e-5)


def test_image_sources_give_identical_vectors(embedder, media):
    from PIL import Image
    path = media["rgba"]
    variants = [str(path), "file://" + str(path), path.read_bytes(), Image.open(path)]
    vecs = embedder.process([{"image": v} for v in variants])
    assert torch.allclose(vecs, vecs[0].expand_as(vecs), atol=1e-6)


def test_file_urls_are_percent_decoded_as_rfc_8089_writes_them(embedder, media, tmp_path):
    """Path.as_uri() writes "my%20photo%20%C3%A9.png": that URL, with or without the localhost host, names
    the file; a plain path is never decoded (a file may be called "100%20.png")."""
    import shutil

    image, video = tmp_path / "my photo é.png", tmp_path / "my clip.mp4"
    shutil.copy(media["rgba"], image)
    shutil.copy(media["video"], video)
    literal = tmp_path / "100%20.png"
    shutil.copy(media["rgb"], literal)
    results = embedder.embed([{"image": str(image)}, {"image": image.as_uri()},
                              {"image": "file://localhost" + str(image).replace(" ", "%20")},
                              {"video": str(video)}, {"video": video.as_uri()},
                              {"video": [f.as_uri() for f in media["frames"]]},
                              {"video": [str(f) for f in media["frames"]]},
                              {"image": str(literal)}, {"image": str(media["rgb"])}], normalize=False)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    v = [np.asarray(r.vector) for r in results]
    assert np.abs(v[1] - v[0]).max() < 1e-6 and np.abs(v[2] - v[0]).max() < 1e-6
    assert np.abs(v[4] - v[3]).max() < 1e-6 and np.abs(v[5] - v[6]).max() < 1e-6
    assert np.abs(v[7] - v[8]).max() < 1e-6


def test_mrl_equals_truncate_and_renormalise(embedder):
    inputs = [{"text": "one"}, {"text": "two two"}]
    raw = embedder.process(inputs, normalize=False)
    for d in (8, 16, embedder.hidden_size):
        got = embedder.process(inputs, dim=d)
        assert torch.allclose(got, F.normalize(raw[:, :d], dim=-1), atol=1e-6)
        full = embedder.process(inputs)
        assert torch.allclose(got, F.normalize(full[:, :d], dim=-1), atol=1e-6)
    for bad in (0, -1, embedder.hidden_size + 1, 2.5):
        with pytest.raises(ValueError, match="dim must be an integer"):
            embedder.process(inputs, dim=bad)


def test_overlong_text_is_truncated_keeping_the_pooled_token(tiny_embedding_ckpt):
    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt), max_length=64)
    try:
        prepared = emb.prepare({"text": "word " * 500})
        assert prepared.num_tokens == 64
        assert prepared.input_ids[-1] == emb.processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
        assert emb.process([{"text": "word " * 500}]).shape == (1, emb.hidden_size)
    finally:
        emb.close()


def test_one_bad_item_fails_alone_with_index_and_reason(embedder, media, tmp_path):
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes(image_bytes(pattern_image(3))[:40])
    inputs = [{"text": "good"}, {"image": str(tmp_path / "missing.png")}, {"image": str(corrupt)},
              {"image": b"not an image"}, {"image": str(media["rgb"])}, {"video": str(tmp_path / "nope.mp4")}]
    results = embedder.embed(inputs)
    assert [r.ok for r in results] == [True, False, False, False, True, False]
    assert "missing.png" in results[1].error
    assert f"cannot decode image {corrupt}" in results[2].error
    assert "nope.mp4" in results[5].error
    good = embedder.process([inputs[0], inputs[4]])
    assert torch.allclose(torch.from_numpy(results[0].vector), good[0], atol=1e-6)
    with pytest.raises(InputError, match="input 1: .*missing.png"):
        embedder.process(inputs)


def test_an_undecodable_video_fails_with_the_readers_reason(embedder, media, tmp_path):
    # qwen-vl-utils retries such videos with torchvision's read_video, gone from torchvision 0.22+:
    # the error must be the video's own, not that AttributeError.
    data = media["video"].read_bytes()
    truncated = tmp_path / "truncated.mp4"
    truncated.write_bytes(data[: len(data) * 3 // 10])
    inputs = [{"video": str(truncated)}, {"video": str(media["video"]), "video_start": 1.5, "video_end": 0.5},
              {"video": str(media["video"]), "video_start": 10.0, "video_end": 12.0}, {"video": str(media["video"])}]
    results = embedder.embed(inputs)
    assert [r.ok for r in results] == [False, False, False, True]
    for r in results[:3]:
        assert "torchvision" not in r.error and "read_video" not in r.error
    assert "truncated.mp4 cannot be read" in results[0].error
    assert "Invalid time range" in results[1].error and "exceeds end frame" in results[1].error
    assert "Invalid time range" in results[2].error


def test_an_undecodable_remote_video_is_named_by_its_uri_not_its_local_copy(tiny_embedding_ckpt, media, moto_s3):
    client, opts = moto_s3["client"], moto_s3["storage_options"]
    client.create_bucket(Bucket="video-errors")
    data = media["video"].read_bytes()
    client.put_object(Bucket="video-errors", Key="cut.mp4", Body=data[: len(data) * 3 // 10])
    with Qwen3VLEmbedder(str(tiny_embedding_ckpt), storage_options=opts) as emb:
        (result,) = emb.embed([{"video": "s3://video-errors/cut.mp4"}])
    assert not result.ok and "video s3://video-errors/cut.mp4 cannot be read" in result.error


def test_many_inputs_are_split_into_budgeted_batches(embedder, monkeypatch):
    sizes = []
    original = embedder._launch

    def spy(items, batch):
        sizes.append(len(items))
        return original(items, batch)

    monkeypatch.setattr(embedder, "_launch", spy)
    inputs = [{"text": f"item {i} " * (1 + i % 7)} for i in range(40)]
    vecs = embedder.process(inputs)
    assert vecs.shape[0] == 40 and max(sizes) <= 4 and sum(sizes) == 40
    assert torch.allclose(vecs[7], embedder.process([inputs[7]])[0], atol=1e-5)


def test_results_are_fetched_after_the_next_batch_is_collated(embedder, monkeypatch):
    # On a GPU, copying a batch's vectors back waits for the device; doing it after the next batch
    # is collated (and before it is launched) lets the device compute while the host collates.
    events = []
    for name in ("_collate", "_launch", "_store"):
        original = getattr(embedder, name)

        def spy(*args, _name=name, _original=original):
            events.append((_name, len(args[0])))
            return _original(*args)

        monkeypatch.setattr(embedder, name, spy)
    inputs = [{"text": f"item {i}"} for i in range(10)]
    vecs = embedder.process(inputs)
    assert [e for e, _ in events] == ["_collate", "_store", "_launch"] * 3 + ["_store"]
    assert [n for _, n in events] == [4, 0, 4, 4, 4, 4, 2, 4, 2, 2]
    assert torch.allclose(vecs[9], embedder.process([inputs[9]])[0], atol=1e-5)


def test_a_batch_that_fails_in_the_model_fails_only_its_culprit(embedder, monkeypatch):
    original = embedder._launch

    def launch(items, batch):
        if any("POISON" in p.prompt for p in items):
            raise RuntimeError("the model rejected this input")
        return original(items, batch)

    monkeypatch.setattr(embedder, "_launch", launch)
    inputs = [{"text": f"item {i}"} for i in range(6)]
    inputs[2] = {"text": "POISON"}
    results = embedder.embed(inputs)
    assert [r.ok for r in results] == [True, True, False, True, True, True]
    assert "RuntimeError" in results[2].error and "rejected" in results[2].error
    monkeypatch.setattr(embedder, "_launch", original)
    single = embedder.process([inputs[4]])[0]
    assert torch.allclose(torch.from_numpy(results[4].vector), single, atol=1e-5)


def test_bad_model_path_is_a_clear_error(tmp_path):
    from operators.qwen3vl import ModelLoadError
    with pytest.raises(ModelLoadError, match="nowhere"):
        Qwen3VLEmbedder(str(tmp_path / "nowhere"))


def test_token_budget_batches_cut_on_budget_items_and_padding():
    import random

    from operators.qwen3vl.preprocess import token_budget_batches
    rng = random.Random(0)
    lengths = [rng.choice([rng.randint(5, 20), rng.randint(200, 400)]) for _ in range(300)]
    batches = list(token_budget_batches(lengths, token_budget=2048, max_items=16, window=128))
    assert sorted(i for b in batches for i in b) == list(range(300))
    for b in batches:
        longest, real = max(lengths[i] for i in b), sum(lengths[i] for i in b)
        assert len(b) <= 16 and (len(b) == 1 or longest * len(b) <= 2048)
        assert len(b) == 1 or longest * len(b) <= 1.25 * real  # padding at most 25% of real tokens
        assert len({i // 128 for i in b}) == 1  # never across sorting windows
    # Short items are not padded up to a long one: [10]*8 + [100]*2 splits into two batches.
    assert [sorted(b) for b in token_budget_batches([10] * 8 + [100] * 2, 10**6, 64)] == [
        list(range(8)), [8, 9]]


def test_window_sizes_below_one_are_refused_before_any_work(embedder):
    for kwargs in ({"window": 0}, {"first_window": 0}, {"window": -1}, {"first_window": 2.5}):
        with pytest.raises(ValueError, match="window must be an integer >= 1"):
            embedder.embed([{"text": "a"}], **kwargs)


def test_collated_positions_equal_the_models_own_on_the_padded_batch(embedder, media):
    # Positions are computed per item in the preparation threads; the batch must carry exactly
    # what get_rope_index computes on the padded batch (left and right padding, mixed modalities).
    from operators.qwen3vl.preprocess import collate
    items = [embedder.prepare(x) for x in ({"text": "short"}, {"image": str(media["rgb"]), "text": "a caption"},
                                           {"video": str(media["video"])}, {"image": str(media["wide"])})]
    pad = embedder.processor.tokenizer.pad_token_id
    for side in ("right", "left"):
        batch = collate(items, pad, side)
        expected, _ = embedder.backbone.get_rope_index(batch["input_ids"], batch.get("image_grid_thw"),
                                                       batch.get("video_grid_thw"), batch["attention_mask"])
        assert torch.equal(batch["position_ids"], expected)


def test_positions_are_what_the_model_uses(embedder, media):
    # Not vacuous: wrong (text-only) positions on an image item move its vector.
    item = {"image": str(media["rgb"]), "text": "a caption"}
    good = embedder.process([item])
    original = embedder.prepare

    def text_positions(x):
        p = original(x)
        p.positions = torch.arange(p.num_tokens).expand(3, -1)
        return p

    embedder.prepare = text_positions
    try:
        bad = embedder.process([item])
    finally:
        del embedder.prepare
    assert (good - bad).abs().max() > 1e-3


def test_an_unsupported_video_fails_its_item_instead_of_vanishing(embedder, media):
    # A video the reader cannot take used to be dropped, so the item was embedded as "NULL" (or
    # as its text alone): a wrong vector with no error. The reference raises for it too.
    inputs = [{"video": media["video"]}, {"video": media["video"].read_bytes(), "text": "caption"}, {"video": 42},
              {"video": [str(media["video"]), 3]}, {"video": str(media["video"])}]
    results = embedder.embed(inputs)
    assert [r.ok for r in results] == [False, False, False, False, True]
    assert "unsupported video type PosixPath" in results[0].error
    assert "unsupported video type bytes" in results[1].error
    assert "unsupported video type int" in results[2].error
    assert "in a list of videos" in results[3].error


def test_api_guards(tiny_embedding_ckpt):
    import numpy as np

    with pytest.raises(ValueError, match="dtype or torch_dtype, not both"):
        Qwen3VLEmbedder(str(tiny_embedding_ckpt), dtype="float32", torch_dtype=torch.bfloat16)
    # transformers' older keyword is honoured, not overridden by our default dtype
    with Qwen3VLEmbedder(str(tiny_embedding_ckpt), torch_dtype=torch.bfloat16) as emb:
        assert emb.model.dtype == torch.bfloat16
        assert emb.process([{"text": "a"}], dim=np.int64(16)).shape == (1, 16)
        with pytest.raises(TypeError, match="got one dict: wrap it in a list"):
            emb.process({"text": "a"})
        with pytest.raises(TypeError):
            emb.process([{"text": "a"}], 16)  # flags are keywords: 16 must not become normalize=16
    with pytest.raises(RuntimeError, match="Qwen3VLEmbedder is closed"):
        emb.embed([{"text": "a"}])


def test_malformed_inputs_fail_alone_naming_the_key(embedder):
    """A misspelt key or a non-string text is an error, not the empty input "NULL" or "b'...'" embedded."""
    inputs = [{"txt": "a dog"}, {"text": b"a dog"}, {"text": ["ok", None]}, {"text": "a dog"},
              {"text": "a dog", "instruction": 5}, {"text": "a dog", "fps": "2"}]
    results = embedder.embed(inputs)
    assert [r.ok for r in results] == [False, False, False, True, False, False]
    assert "unknown key 'txt'" in results[0].error
    assert "text must be a string or a list of strings, got bytes" in results[1].error
    assert "a list holding NoneType" in results[2].error
    assert "instruction must be a string, got int" in results[4].error
    assert "fps must be a number, got str" in results[5].error
    assert torch.allclose(torch.from_numpy(results[3].vector), embedder.process([inputs[3]])[0], atol=1e-6)


def test_one_unloaded_pil_image_in_many_inputs(embedder, media):
    """Image.open() decodes lazily from one file object: every thread's input must still read it whole."""
    from PIL import Image

    want = embedder.process([{"image": str(media["rgb"])}])[0]
    for _ in range(5):
        with Image.open(media["rgb"]) as lazy:
            results = embedder.embed([{"image": lazy}] * 8)
        assert all(r.ok for r in results), [r.error for r in results]
        for r in results:
            assert torch.allclose(torch.from_numpy(r.vector), want, atol=1e-5)


def test_zero_fps_or_max_frames_means_the_default_as_in_the_reference(embedder, media):
    """The reference reads a video with `fps or self.fps` and `max_frames or self.max_frames`."""
    video = str(media["video"])
    results = embedder.embed([{"video": video}, {"video": video, "fps": 0}, {"video": video, "max_frames": 0},
                              {"video": video, "fps": 4.0}])
    assert all(r.ok for r in results), [r.error for r in results]
    default = results[0].vector
    # Not bit for bit: on some CPUs the same input at another row of a batch rounds differently
    # (3e-8 on an AMD EPYC; the matrix kernels depend on the row), so equal within 1e-6.
    assert np.abs(results[1].vector - default).max() < 1e-6 and np.abs(results[2].vector - default).max() < 1e-6
    assert np.abs(results[3].vector - default).max() > 1e-4  # fps itself does count


def test_a_bad_frame_bound_fails_its_input_alone(embedder, media):
    """Inputs are weighed before they are checked: a negative max_frames must not break the call."""
    results = embedder.embed([{"text": "a"}, {"video": str(media["video"]), "max_frames": -2}])
    assert results[0].ok and not results[1].ok and "max_frames" in results[1].error, results[1].error


def test_a_data_uri_that_is_not_an_image_is_named_by_its_type(embedder, media):
    """qwen-vl-utils opens a data: URI that is not data:image as a file path: 'not found', echoing it whole.
    The scheme is case-insensitive; an image's data: URI without base64 is refused too."""
    import base64

    from operators.qwen3vl.media_io import is_fetch_failure

    png = base64.b64encode(media["rgb"].read_bytes()).decode()
    text_uri = "data:text/plain;base64," + "QUJD" * 100_000
    results = embedder.embed([{"image": text_uri}, {"video": "DATA:video/mp4;base64,AAAA"},
                              {"video": [str(media["frames"][0]), "data:,x"]}, {"image": "data:image/png," + "A" * 5000},
                              {"image": "Data:IMAGE/PNG;BASE64," + png}, {"image": "data:image/png;base64," + png},
                              {"image": "DATA:text/plain," + "x" * 5000}])
    assert "a data: URI of 'text/plain;base64' (400,023 characters) is not read as an image" in results[0].error
    assert "a data: URI of 'video/mp4;base64' (26 characters) is not read as a video" in results[1].error
    assert "a data: URI of 'no media type'" in results[2].error
    assert "a data: URI of 'image/png'" in results[3].error and "a data: URI of 'text/plain'" in results[6].error
    for r in (results[0], results[1], results[2], results[3], results[6]):
        assert len(r.error) < 400 and not is_fetch_failure(r.error), r.error[:300]
    assert results[4].ok and results[5].ok
    assert np.abs(results[4].vector - results[5].vector).max() < 1e-6


def test_video_cuts_without_a_video_file_and_bad_frames_are_named(embedder, media, tmp_path):
    """video_start/video_end cut a video file: with a frame list or no video they would do nothing, so the
    input fails naming them; a corrupt frame of a frame list is named; a corrupt data: URI is not taken for
    a missing file, nor echoed whole."""
    import base64

    bad_frame = tmp_path / "cut.png"
    bad_frame.write_bytes(media["frames"][0].read_bytes()[:200])
    junk = "data:image/png;base64," + base64.b64encode(b"\0" * 300_000).decode()
    results = embedder.embed([{"video": [str(f) for f in media["frames"]], "video_start": 5.0, "video_end": 1.0},
                              {"text": "t", "video_start": 1.0},
                              {"video": [str(media["frames"][1]), str(bad_frame)]},
                              {"image": junk},
                              {"video": str(media["video"]), "video_start": 0.0, "video_end": 1.0}])
    assert "video_start/video_end cut a video file, and this input has only frame lists" in results[0].error
    assert "this input has no video" in results[1].error
    assert f"cannot decode image {bad_frame}" in results[2].error
    assert "FileNotFoundError" not in results[3].error and len(results[3].error) < 2000, results[3].error[:300]
    assert results[4].ok


def test_prepared_inputs_held_at_once_are_bounded_by_window_mib(tiny_embedding_ckpt):
    """Items prepared but not yet run through the model: two windows of them, each of about
    window_mib (but one forward batch at least), whatever the number of inputs and whatever came
    before them in the call; vectors unchanged."""
    from tests.media_gen import image_bytes

    thumbs = [{"image": image_bytes(pattern_image(i, (64, 64)))} for i in range(12)]  # 98 KB each, prepared
    photos = [{"image": image_bytes(pattern_image(i, (256, 256)))} for i in range(24)]  # 1.5 MB each
    heavy = {id(x) for x in photos}

    def held_at_most(emb):
        """The most photos submitted for preparation and not yet launched through the model."""
        held, peak = [0], [0]
        submit, launch = emb.submit_prepare, emb._launch

        def counted_submit(item):
            held[0] += id(item) in heavy
            peak[0] = max(peak[0], held[0])
            return submit(item)

        def counted_launch(items, batch):
            held[0] -= sum(p.num_tokens > 50 for p in items)  # a photo has 64 image tokens, a thumbnail 4
            return launch(items, batch)

        emb.submit_prepare, emb._launch = counted_submit, counted_launch
        vectors = emb.process(thumbs + photos)
        return peak[0], vectors

    with Qwen3VLEmbedder(str(tiny_embedding_ckpt), token_budget=4096, max_batch_items=4, window_mib=1) as emb:
        assert emb.prepare(photos[0]).num_tokens > 50 > emb.prepare(thumbs[0]).num_tokens
        assert emb.prepare(photos[0]).nbytes > 2**20 / 4  # so 1 MiB holds fewer than one batch of photos
        bounded, vectors = held_at_most(emb)
    with Qwen3VLEmbedder(str(tiny_embedding_ckpt), token_budget=4096, max_batch_items=4) as emb:
        unbounded, expected = held_at_most(emb)
    assert bounded <= 2 * 4 < unbounded  # windows of one batch (4): the one running and the next
    assert torch.allclose(vectors, expected, atol=1e-5)


def test_window_mib_below_one_is_refused(tiny_embedding_ckpt):
    with pytest.raises(ValueError, match="window_mib must be an integer >= 1, got 0"):
        Qwen3VLEmbedder(str(tiny_embedding_ckpt), window_mib=0)


def test_http_media_are_fetched_within_a_timeout(embedder, media, monkeypatch):
    """http(s) images and videos give the vectors of the same local files; a server that accepts and
    never answers fails its input alone, in seconds (qwen-vl-utils' own request has no timeout: it
    held the whole call, every other input included, forever)."""
    import functools
    import http.server
    import socket
    import threading
    import time

    from operators.media import reading
    from operators.qwen3vl import media_io

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(media["rgba"].parent)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    stalled = socket.create_server(("127.0.0.1", 0))  # the kernel accepts; nobody ever answers
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        local = embedder.process([{"image": str(media["rgba"])}, {"video": str(media["video"])}])
        remote = embedder.process([{"image": f"{base}/rgba.png"}, {"video": f"{base}/clip.mp4"}])
        assert torch.allclose(remote, local, atol=1e-6)

        monkeypatch.setattr(reading, "HTTP_TIMEOUT_S", (1.0, 1.0))
        url = f"http://127.0.0.1:{stalled.getsockname()[1]}/stalled.png"
        started = time.monotonic()
        text, image = embedder.embed([{"text": "fine"}, {"image": url}])
        assert time.monotonic() - started < 30
        assert text.ok and not image.ok and image.error.startswith(f"cannot read {url}: ")
        assert "timed out" in image.error.lower() and media_io.is_fetch_failure(image.error)
    finally:
        stalled.close()
        server.shutdown()
        server.server_close()


def test_an_http_medium_that_trickles_fails_at_the_total_deadline(embedder, monkeypatch):
    # A byte every 0.2 s never trips the read timeout (a wait for bytes), but the whole download is bounded.
    import http.server
    import threading
    import time

    from operators.media import reading

    class Trickle(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", "100000")
            self.end_headers()
            try:
                for _ in range(300):
                    self.wfile.write(b"x")
                    self.wfile.flush()
                    time.sleep(0.2)
            except OSError:  # the client gave up
                pass

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Trickle)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setattr(reading, "HTTP_TOTAL_S", 1.5)
        url = f"http://127.0.0.1:{server.server_address[1]}/slow.png"
        started = time.monotonic()
        text, image = embedder.embed([{"text": "fine"}, {"image": url}])
        assert time.monotonic() - started < 15
        assert text.ok and image.error.startswith(f"cannot read {url}: TimeoutError: ")
        assert "HTTP_TOTAL_S" in image.error
    finally:
        server.shutdown()
        server.server_close()


def test_a_read_past_its_byte_cap_fails_naming_the_cap(tmp_path):
    from operators.qwen3vl import media_io

    (tmp_path / "f.bin").write_bytes(b"x" * 100)
    assert media_io.read_bytes((tmp_path / "f.bin").as_uri(), max_bytes=100) == b"x" * 100
    with pytest.raises(media_io.MediaError, match=r"f.bin is over max_object_bytes=99$") as exc:
        media_io.read_bytes((tmp_path / "f.bin").as_uri(), max_bytes=99)
    assert not media_io.is_fetch_failure(str(exc.value))


def test_frames_of_a_video_list_take_every_form_an_image_takes(embedder, media):
    """A frame list of data: URIs or memoryviews was taken for a list of video files (or refused)."""
    import base64

    frames = media["frames"][:3]
    datas = [p.read_bytes() for p in frames]
    forms = [[str(p) for p in frames], datas, [memoryview(d) for d in datas],
             ["data:image/png;base64," + base64.b64encode(d).decode() for d in datas]]
    vecs = embedder.process([{"video": f} for f in forms])
    assert torch.allclose(vecs, vecs[0].expand_as(vecs), atol=1e-6)
    # Through preparation worker processes (a GPU's default), which cannot be handed a memoryview.
    from operators.qwen3vl import Qwen3VLEmbedder

    procs = Qwen3VLEmbedder(embedder.model_name_or_path, prepare_processes=1)
    try:
        got = procs.process([{"video": forms[2]}, {"image": memoryview(datas[0])}])
    finally:
        procs.close()
    assert torch.allclose(got, embedder.process([{"video": forms[0]}, {"image": datas[0]}]), atol=1e-6)
