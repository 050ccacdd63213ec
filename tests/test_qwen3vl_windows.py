"""Preparation windows: inputs weighed before they are prepared, windows cut by bytes."""

import pytest

from operators.qwen3vl.formatting import VisionSettings
from operators.qwen3vl.windows import InputWeights, image_pixels, input_kind, window_end
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
    assert image_pixels(b"not an image", VISION) is None and image_pixels("a.png", VISION) is None
    w = weights()
    small = w.estimate({"image": image_bytes(pattern_image(0, (300, 200)))})
    assert small[0] == pytest.approx(6 * 288 * 192 * 4, rel=0.01)  # float32 pixels; tokens and ids beside
    w.learn({"image": b"x"}, 10**9, 10**5)  # what path-given images weighed changes nothing here
    assert w.estimate({"image": image_bytes(pattern_image(0, (300, 200)))}) == small


def test_an_unseen_kind_is_weighed_by_its_pixel_budgets_then_by_what_recent_ones_held():
    w = weights()
    image_bytes_ceiling, image_tokens = w.estimate({"image": "a.png"})
    assert image_bytes_ceiling >= 6 * 65536 * 4 and image_tokens >= 65536 / 1024  # 1.57 MB of float32 pixels
    video = w.estimate({"video": "v.mp4"})[0]
    assert video >= 6 * 7864320 * 4  # 189 MB: every frame pair of a segment at its budget
    assert w.estimate({"video": "v.mp4", "max_frames": 128})[0] >= video  # the input's own frame count
    assert weights(pixel_bytes=2).estimate({"image": "a.png"})[0] < image_bytes_ceiling  # bf16 pixels: half
    # Many frames at a small budget: qwen-vl-utils keeps each frame at 137,625 pixels or more.
    few = weights(vision=VisionSettings(total_pixels=1_000_000, max_frames=64)).estimate({"video": "v.mp4"})[0]
    assert few >= 3 * 64 * 137_625 * 4
    w.learn({"image": "a.png"}, 100 * MIB, 2000)
    for _ in range(40):  # a moving average: recent inputs of the kind count, old ones fade
        w.learn({"image": "b.png"}, MIB, 80)
    assert w.estimate({"image": "c.png"})[0] == pytest.approx(MIB, rel=0.01)
    assert w.estimate({"image": ["c.png", "d.png"]})[0] > 1.9 * image_bytes_ceiling  # another kind: its ceiling


def test_a_window_holds_window_bytes_once_it_fills_a_forward_batch():
    w = weights()
    w.learn({"text": "t"}, 4_000, 50)
    w.learn({"image": "a"}, 1.5 * MIB, 86)
    w.learn({"video": "v"}, 189 * MIB, 7700)
    texts, images, videos = [{"text": "t"}] * 300, [{"image": "a"}] * 300, [{"video": "v"}] * 300
    end = lambda inputs, start=0, cap=256, mib=64, budget=16384, items=64: window_end(  # noqa: E731
        inputs, start, cap, w, mib * MIB, budget, items)
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
        w.learn(item, 100_000, 20)
    # 42 MB of float32 pixels each: a window of them is one forward batch (9 of 1,800 tokens), not 256.
    assert window_end(thumbs[:10] + photos, 10, 256, w, 64 * MIB, 16384, 64) == 10 + 9


def test_a_fresh_embedders_first_window_of_heavy_inputs_is_bounded_by_their_budgets():
    fresh = weights()
    images = [{"image": f"{i}.png"} for i in range(256)]
    # Unseen, a 65,536-pixel image weighs 1.57 MB: 64 MiB hold 42, and one forward batch 64.
    assert window_end(images, 0, 256, fresh, 64 * MIB, 16384, 64) == 64
    videos = [{"video": f"{i}.mp4"} for i in range(256)]
    assert window_end(videos, 0, 256, fresh, 64 * MIB, 16384, 64) == 2
