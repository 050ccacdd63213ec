"""Preparation windows: inputs weighed before they are prepared, windows cut by bytes."""

import os

import pytest

from operators.qwen3vl.formatting import VisionSettings
from operators.qwen3vl.windows import InputWeights, Windows, image_pixels, input_kind, window_end
from tests.media_gen import image_bytes, pattern_image

MIB = 2**20
VISION = VisionSettings(min_pixels=4096, max_pixels=65536, total_pixels=7864320)


def weights(pixel_bytes=4, vision=VISION):
    return InputWeights(vision, pixel_bytes)


def test_kinds_count_images_and_videos():
    assert input_kind({"text": "a"}) == (0, 0)
    assert input_kind({"image": b"x", "text": "a"}) == (1, 0)
    assert input_kind({"image": ["a.png", "b.png"]}) == (2, 0)
    assert input_kind({"video": "v.mp4"}) == (0, 1)
    assert input_kind({"video": ["f1.png", "f2.png", "f3.png"]}) == (0, 1)  # one video, as frames
    assert input_kind({"video": ["a.mp4", "b.mp4"]}) == (0, 2)
    assert input_kind({"video": [3.5]}) == (0, 1)  # fails in preparation, alone; weighing must not raise
    assert input_kind("not a dict") == (0, 0)


def test_an_image_given_as_bytes_is_weighed_exactly_from_its_header():
    # 300x200 -> 288x192 (multiples of 32, under 65,536 pixels); 1600x1200 -> resized down to the budget.
    assert image_pixels(image_bytes(pattern_image(0, (300, 200))), VISION) == 288 * 192
    assert image_pixels(pattern_image(0, (1600, 1200)), VISION) <= 65536
    assert image_pixels(b"not an image", VISION) is None and image_pixels("s3://b/a.png", VISION) is None
    w = weights()
    small = w.estimate({"image": image_bytes(pattern_image(0, (300, 200)))})
    assert small[0] == pytest.approx(6 * 288 * 192 * 4, rel=0.01)  # float32 pixels; tokens and ids beside
    w.learn({"image": b"x"}, nbytes=10**9, tokens=10**5)  # an input weighed from its header teaches nothing
    assert w.estimate({"image": image_bytes(pattern_image(0, (300, 200)))}) == small


def test_a_local_image_file_is_weighed_from_its_header(tmp_path):
    path = tmp_path / "my pic.png"
    pattern_image(0, (300, 200)).save(path)
    assert image_pixels(str(path), VISION) == image_pixels(path.as_uri(), VISION) == 288 * 192  # %20 decoded
    assert image_pixels(str(tmp_path / "gone.png"), VISION) is None  # fails in preparation, alone
    assert image_pixels("data:image/png;base64,AAAA", VISION) is None
    w = weights()
    w.learn({"image": str(path)}, nbytes=10**9, tokens=10**5)
    assert w.estimate({"image": str(path)})[0] == pytest.approx(6 * 288 * 192 * 4, rel=0.01)


def test_an_unseen_kind_is_weighed_by_its_pixel_budgets_then_by_what_recent_ones_held():
    w = weights()
    image_bytes_ceiling, image_tokens = w.estimate({"image": "s3://b/a.png"})
    assert image_bytes_ceiling >= 6 * 65536 * 4 and image_tokens >= 65536 / 1024  # 1.57 MB of float32 pixels
    video = w.estimate({"video": "v.mp4"})[0]
    assert video >= 6 * 7864320 * 4  # 189 MB: every frame pair of a segment at its budget
    assert w.estimate({"video": "v.mp4", "max_frames": 128})[0] >= video  # the input's own frame count
    assert weights(pixel_bytes=2).estimate({"image": "s3://b/a.png"})[0] < image_bytes_ceiling  # bf16 pixels: half
    # Many frames at a small budget: qwen-vl-utils keeps each frame at 137,625 pixels or more.
    few = weights(vision=VisionSettings(total_pixels=1_000_000, max_frames=64)).estimate({"video": "v.mp4"})[0]
    assert few >= 3 * 64 * 137_625 * 4
    w.learn({"image": "s3://b/a.png"}, nbytes=100 * MIB, tokens=2000)
    for _ in range(40):  # a moving average: recent inputs of the kind count, old ones fade
        w.learn({"image": "s3://b/b.png"}, nbytes=MIB, tokens=80)
    assert w.estimate({"image": "s3://b/c.png"})[0] == pytest.approx(MIB, rel=0.01)
    two = w.estimate({"image": ["s3://b/c.png", "s3://b/d.png"]})[0]
    assert two > 1.9 * image_bytes_ceiling  # another kind: its ceiling


def test_a_window_holds_window_bytes_once_it_fills_a_forward_batch():
    w = weights()
    w.learn({"text": "t"}, nbytes=4_000, tokens=50)
    w.learn({"image": "s3://b/a"}, nbytes=1.5 * MIB, tokens=86)
    w.learn({"video": "v"}, nbytes=189 * MIB, tokens=7700)
    texts, images, videos = [{"text": "t"}] * 300, [{"image": "s3://b/a"}] * 300, [{"video": "v"}] * 300
    end = lambda inputs, start=0, cap=256, mib=64, budget=16384, items=64: window_end(  # noqa: E731
        inputs, start, cap, w.estimate, mib * MIB, budget, items)
    assert end(texts) == 256  # light inputs: the item cap
    assert end(images) == 64  # 42 fit 64 MiB; one forward batch holds 64
    assert end(images, items=16) == 42
    assert end(images, mib=1024) == 256
    assert end(videos) == 2  # one forward batch of 16,384 tokens holds two segments
    assert end(texts + videos) == 256  # the texts fill the cap before a video is reached
    # A light head does not let heavy inputs in by the count: 64 texts fill a batch; 10 leave room for 2 videos.
    assert end(texts[:64] + videos) == 64 and end(texts[:10] + videos) == 12
    assert end(images, start=290) == 300 and end(images, start=300) == 300
    assert end([{"video": "v"}], mib=1) == 1  # never an empty window


def test_small_images_then_large_ones_of_the_same_kind_are_each_weighed():
    w = weights(vision=VisionSettings())  # max_pixels 1,843,200: a 1600x1200 photo keeps 1,920,000 -> 1.8 MP
    thumbs = [{"image": image_bytes(pattern_image(i, (64, 64)))} for i in range(100)]
    photos = [{"image": image_bytes(pattern_image(i, (1600, 1200)), "JPEG")} for i in range(4)] * 64
    for item in thumbs:
        w.learn(item, nbytes=100_000, tokens=20)
    # 42 MB of float32 pixels each: a window of them is one forward batch (9 of 1,800 tokens), not 256.
    assert window_end(thumbs[:10] + photos, 10, 256, w.estimate, 64 * MIB, 16384, 64) == 10 + 9


def test_a_fresh_embedders_first_window_of_heavy_inputs_is_bounded_by_their_budgets():
    fresh = weights()
    images = [{"image": f"s3://b/{i}.png"} for i in range(256)]
    # Unseen, a 65,536-pixel image weighs 1.57 MB: 64 MiB hold 42, and one forward batch 64.
    assert window_end(images, 0, 256, fresh.estimate, 64 * MIB, 16384, 64) == 64
    videos = [{"video": f"{i}.mp4"} for i in range(256)]
    assert window_end(videos, 0, 256, fresh.estimate, 64 * MIB, 16384, 64) == 2


def windows_of(n, first, cap, weigh=lambda item: (0.0, 1.0), mib=64):
    """Every window's indices, in order."""
    windows, out = Windows(list(range(n)), first, cap, weigh, mib * MIB, 16384, 64), []
    while idx := windows.next():
        out.append(idx)
    return out


def test_windows_start_small_double_up_to_the_cap_and_cover_every_input():
    windows = windows_of(1000, 32, 256)
    assert [len(w) for w in windows] == [32, 64, 128, 256, 256, 256, 8]
    assert [i for w in windows for i in w] == list(range(1000))
    assert windows_of(0, 32, 256) == [] and windows_of(3, 64, 16) == [[0, 1, 2]]
    assert windows_of(3, 0, 0) == [[0], [1], [2]]  # a cap below 1 once never advanced
    # Heavy inputs (8 MiB each): past one forward batch (64 inputs), a window stops at 64 MiB.
    assert [len(w) for w in windows_of(300, 256, 256, weigh=lambda item: (8.0 * MIB, 1.0))] == [64] * 4 + [44]


def test_a_pair_is_weighed_as_its_query_and_document_prepared_together():
    w = weights()
    query, document = ({"text": "q", "image": image_bytes(pattern_image(0, (300, 200)))},
                       {"image": image_bytes(pattern_image(1, (200, 100)))})
    both, one, other = w.estimate(query, document), w.estimate(query), w.estimate(document)
    assert both[0] == pytest.approx(one[0] + other[0]) and both[1] == pytest.approx(one[1] + other[1])
    assert w.estimate(query, "not a dict") == one  # a bad document fails alone; the query still weighs
    # Learned by the pair's kind (two images between them), not by either input's.
    w.learn({"image": "s3://b/q.png"}, {"image": "s3://b/d.png"}, nbytes=5 * MIB, tokens=300)
    assert w.estimate({"image": "s3://b/q.png"}, {"image": "s3://b/e.png"}) == (5 * MIB, 300)
    one_input = w.estimate({"image": ["s3://b/a.png", "s3://b/b.png"]})  # the same kind, one input's text less
    assert one_input[0] == pytest.approx(5 * MIB, rel=0.01) and one_input[1] == 300 - 64
    assert w.estimate({"image": "s3://b/a.png"})[0] < 2 * MIB  # one image: still its ceiling, 1.57 MB


def test_exactly_weighed_images_count_beside_what_a_kind_learned():
    """A pair of a local query image and a document image by URL: the query's pixels count exactly,
    only the rest is learned, so one query's size is not carried to the next."""
    w = weights(vision=VisionSettings())
    small_query = {"image": image_bytes(pattern_image(0, (64, 64)))}
    big_query = {"image": image_bytes(pattern_image(0, (1600, 1200)), "JPEG")}
    document = {"image": "s3://b/d.png"}
    exact_small, exact_big = w.estimate(small_query)[0], w.estimate(big_query)[0]
    for _ in range(20):
        w.learn(small_query, document, nbytes=exact_small + 2 * MIB, tokens=200)
    assert w.estimate(small_query, document)[0] == pytest.approx(exact_small + 2 * MIB, rel=0.01)
    assert w.estimate(big_query, document)[0] == pytest.approx(exact_big + 2 * MIB, rel=0.01)  # 44 MB + 2 MiB
    assert w.estimate(document)[0] == pytest.approx(2 * MIB, rel=0.01)  # the same kind: one image by URL


def test_a_call_s_own_frame_bound_raises_an_unseen_video_s_ceiling():
    w = weights()
    assert w.estimate({"video": "s3://b/v.mp4"}, max_frames=256)[0] > 1.5 * w.estimate({"video": "s3://b/v.mp4"})[0]


def test_a_fifo_is_not_opened_to_weigh_it(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    assert image_pixels(str(fifo), VISION) is None  # returns at once: nobody ever writes to it
    assert weights().estimate({"image": str(fifo)})[0] >= 6 * 65536 * 4  # weighed as an image not seen yet


def test_a_kind_learns_only_its_media_and_counts_each_input_s_own_text_and_frames():
    w = weights()
    w.learn({"image": "s3://b/a.png", "text": "short"}, nbytes=MIB, tokens=100)
    long_text = "word " * 3000  # 5,000 tokens by its length
    assert w.estimate({"image": "s3://b/b.png", "text": long_text})[1] == pytest.approx(100 + 5000, rel=0.01)
    # A video read as up to 128 frames says nothing of one read as up to 256.
    w.learn({"video": "s3://b/v.mp4", "max_frames": 128}, nbytes=10 * MIB, tokens=500)
    assert w.estimate({"video": "s3://b/w.mp4", "max_frames": 128})[0] == pytest.approx(10 * MIB, rel=0.01)
    assert w.estimate({"video": "s3://b/w.mp4"}, max_frames=256)[0] > 100 * MIB  # its ceiling


def test_a_video_s_own_frame_bound_wins_over_the_call_s_as_when_it_is_read():
    w = weights()
    w.learn({"video": "s3://b/v.mp4", "max_frames": 4}, nbytes=4 * MIB, tokens=300)
    assert w.estimate({"video": "s3://b/w.mp4", "max_frames": 4})[0] == pytest.approx(4 * MIB, rel=0.01)
    assert w.estimate({"video": "s3://b/w.mp4", "max_frames": 4}, max_frames=256)[0] == pytest.approx(4 * MIB, rel=0.01)
    assert w.estimate({"video": "s3://b/w.mp4"})[0] > 40 * MIB  # read as up to 64 frames: another kind
    # Of a pair, the largest bound its videos are read as: a query's 256 beside a document's own 8.
    pair = w.tally({"video": "s3://b/q.mp4"}, {"video": "s3://b/d.mp4", "max_frames": 8})
    assert w._kind(pair, 256) == (0, 2, 256) and w._kind(pair, None) == (0, 2, 64)


def test_a_truncated_input_teaches_nothing_and_long_text_counts_up_to_max_length():
    w = InputWeights(VISION, 4, max_length=8192)
    long_text = "x" * 300_000
    w.learn({"image": "s3://b/a.png", "text": long_text}, nbytes=MIB, tokens=8192)  # cut at max_length
    assert (0, 1, 0) not in w.seen and (1, 0, 0) not in w.seen
    assert w.estimate({"text": long_text})[1] == 8192
    w.learn({"image": "s3://b/a.png", "text": "short"}, nbytes=2 * MIB, tokens=1800)
    assert w.estimate({"image": "s3://b/b.png", "text": "short"}) == pytest.approx((2 * MIB, 1800), rel=0.01)


def test_a_list_of_frames_is_bounded_by_the_settings_and_a_bad_bound_weighs_without_error():
    w = weights()  # settings: up to 64 frames
    frames = [f"s3://b/f{i}.png" for i in range(100)]
    # formatting samples a list of frames to the settings' bound, whatever the input or the call say.
    assert w._kind(w.tally({"video": frames, "max_frames": 4}), 2) == (0, 1, 64)
    assert w._kind(w.tally({"video": "s3://b/v.mp4", "max_frames": 4}), 2) == (0, 1, 4)
    for bad in (-2, 0, 1.5, True):  # fails in preparation, alone; weighed as the call's or settings' bound
        assert w._kind(w.tally({"video": "s3://b/v.mp4", "max_frames": bad}), None) == (0, 1, 64)
        assert w.estimate({"video": "s3://b/v.mp4", "max_frames": bad})[0] > 0
