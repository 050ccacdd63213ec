"""Preparation windows: inputs weighed per kind before they are prepared, windows cut by bytes."""

import pytest

from operators.qwen3vl.formatting import VisionSettings
from operators.qwen3vl.windows import InputWeights, input_kind, window_end

MIB = 2**20
VISION = VisionSettings(min_pixels=4096, max_pixels=65536, total_pixels=7864320)


def weights(pixel_bytes=4):
    return InputWeights(VISION, pixel_bytes)


def test_kinds_count_images_and_videos():
    assert input_kind({"text": "a"}) == (0, 0)
    assert input_kind({"image": b"x", "text": "a"}) == (1, 0)
    assert input_kind({"image": ["a.png", "b.png"]}) == (2, 0)
    assert input_kind({"video": "v.mp4"}) == (0, 1)
    assert input_kind("not a dict") == (0, 0)  # it fails in preparation, alone; weighing must not raise


def test_an_unseen_kind_is_weighed_by_its_pixel_budgets_then_by_what_it_held():
    w = weights()
    image_bytes, image_tokens = w.estimate({"image": "a.png"})
    assert image_bytes >= 6 * 65536 * 4 and image_tokens >= 65536 / 1024  # 1.57 MB of float32 pixels
    video_bytes, _ = w.estimate({"video": "v.mp4"})
    assert video_bytes >= 6 * 7864320 * 4  # 189 MB: every frame pair of a segment at its budget
    assert w.estimate({"image": "a.png"}, ) == w.estimate({"image": b"other"})  # by kind, not by source
    assert weights(pixel_bytes=2).estimate({"image": "a.png"})[0] < image_bytes  # bf16 pixels: half
    w.learn({"image": "a.png"}, 1000, 20)
    w.learn({"image": "b.png"}, 3000, 40)
    assert w.estimate({"image": "c.png"}) == (2000, 30)  # the kind's mean
    assert w.estimate({"image": ["c.png", "d.png"]})[0] > 1.9 * image_bytes  # another kind: its ceiling
    assert w.estimate({"video": "v.mp4"}) == (video_bytes, pytest.approx(w.estimate({"video": "w.mp4"})[1]))


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


def test_a_fresh_embedders_first_window_of_heavy_inputs_is_bounded_by_their_budgets():
    fresh = weights()
    images = [{"image": f"{i}.png"} for i in range(256)]
    # Unseen, a 65,536-pixel image weighs 1.57 MB: 64 MiB hold 42, and one forward batch 64.
    assert window_end(images, 0, 256, fresh, 64 * MIB, 16384, 64) == 64
    videos = [{"video": f"{i}.mp4"} for i in range(256)]
    assert window_end(videos, 0, 256, fresh, 64 * MIB, 16384, 64) == 2
