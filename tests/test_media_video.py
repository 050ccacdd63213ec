"""Video probing (PyAV) and segmentation."""

from __future__ import annotations

import io
import os
from pathlib import Path

import av
import numpy as np
import pytest

from operators.media.video import (VideoCorruptError, VideoError, VideoNoStreamError, VideoTooLongError,
                                   VideoTooShortError, probe_video, video_segments)
from tests.media_corpus import write_video


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("clips")
    write_video(root / "a.mp4", 22, "mpeg4")
    write_video(root / "b.webm", 18, "libvpx")
    write_video(root / "c.mkv", 16, "mpeg4")
    write_video(root / "d.mov", 12, "mpeg4")
    return {p.suffix: p for p in root.iterdir()}


@pytest.mark.parametrize(("ext", "duration", "frames"), [(".mp4", 2.75, 22), (".webm", 2.25, 18), (".mkv", 2.0, 16), (".mov", 1.5, 12)])
def test_probe(clips, ext: str, duration: float, frames: int) -> None:
    info = probe_video(str(clips[ext]))
    assert info.duration_s == pytest.approx(duration, abs=0.01)
    assert (info.fps, info.n_frames, info.width, info.height) == (8.0, frames, 64, 48)
    duration_s, fps, *_ = info  # unpacks as a tuple
    assert duration_s == info.duration_s


def test_probe_bytes_and_file_object(clips) -> None:
    data = clips[".webm"].read_bytes()
    assert probe_video(data) == probe_video(io.BytesIO(data)) == probe_video(str(clips[".webm"]))


def test_duration_cap(clips) -> None:
    with pytest.raises(VideoTooLongError, match=r"2.8 s long, over the cap of 2 s"):
        probe_video(str(clips[".mp4"]), max_duration_s=2)


def test_corrupt_and_truncated(clips) -> None:
    with pytest.raises(VideoCorruptError):
        probe_video(b"\x00\x00\x00\x18ftypisom" + bytes(range(256)) * 8)
    data = clips[".mp4"].read_bytes()
    with pytest.raises(VideoCorruptError):
        probe_video(data[: len(data) // 3])
    with pytest.raises(FileNotFoundError):
        probe_video("/nonexistent/video.mp4")


def test_no_video_stream() -> None:
    buf = io.BytesIO()
    with av.open(buf, "w", format="wav") as container:
        stream = container.add_stream("pcm_s16le", rate=8000)
        frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
        frame.sample_rate = 8000
        for packet in stream.encode(frame):
            container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    with pytest.raises(VideoNoStreamError, match="no video stream"):
        probe_video(buf.getvalue())


@pytest.mark.parametrize(
    ("duration", "seg", "expected"),
    [
        (2.75, 30.0, [(0.0, 2.75)]),  # shorter than a segment: one segment
        (90.0, 30.0, [(0.0, 30.0), (30.0, 60.0), (60.0, 90.0)]),
        (70.0, 30.0, [(0.0, 30.0), (30.0, 60.0), (60.0, 70.0)]),  # last one shorter
        (60.3, 30.0, [(0.0, 30.0), (30.0, 60.3)]),  # tail < 0.5 s merges back
        (60.5, 30.0, [(0.0, 30.0), (30.0, 60.0), (60.0, 60.5)]),  # 0.5 s is kept
        (0.2, 30.0, [(0.0, 0.2)]),
        (2.25, 1.0, [(0.0, 1.0), (1.0, 2.25)]),
    ],
)
def test_segments(duration: float, seg: float, expected) -> None:
    got = video_segments(duration, seg)
    assert len(got) == len(expected)
    assert [x for span in got for x in span] == pytest.approx([x for span in expected for x in span])


@pytest.mark.parametrize(
    "duration, seg, fps, expected",
    [
        (31.0, 30.0, 1.0, [(0.0, 31.0)]),  # the 1 s tail holds 1 frame at 1 fps: merged
        (32.0, 30.0, 1.0, [(0.0, 30.0), (30.0, 32.0)]),  # 2 frames: kept
        (30.5, 30.0, 2.0, [(0.0, 30.5)]),
        (8.0, 1.0, 0.5, [(0.0, 4.0), (4.0, 8.0)]),  # segments of at least 2 frame intervals
        (6.0, 1.0, 0.5, [(0.0, 6.0)]),
        (60.5, 30.0, 30.0, [(0.0, 30.0), (30.0, 60.0), (60.0, 60.5)]),  # at 30 fps 0.5 s is 15 frames
    ],
)
def test_segments_hold_at_least_two_frames(duration: float, seg: float, fps: float, expected) -> None:
    got = video_segments(duration, seg, fps)
    assert [x for span in got for x in span] == pytest.approx([x for span in expected for x in span])


def test_a_one_frame_video_is_refused_at_probe(tmp_path) -> None:
    from tests.media_gen import write_video as gen_video

    path = gen_video(tmp_path / "one.mp4", seconds=0.125, fps=8)
    with pytest.raises(VideoTooShortError, match="video has 1 frame"):
        probe_video(str(path))


@pytest.mark.parametrize(("size", "told"), [
    ((1000, 4), r"aspect ratio 250\.0 of the video frame 1000x4 exceeds the model's maximum of 200"),
    ((4, 1000), r"aspect ratio 250\.0 of the video frame 4x1000 exceeds the model's maximum of 200"),
])
def test_frames_the_model_cannot_take_are_refused_at_probe_naming_their_size(tmp_path, size, told) -> None:
    """Each segment of such a video used to be decoded and fail at embedding (smart_resize's "absolute
    aspect ratio must be smaller than 200"), and with no point stored, the video was tried again at
    every run. Now its object is one expand letter."""
    from operators.media.expand import ExpandSettings, expand_object
    from operators.units import SourceObject
    from tests.media_gen import write_video as gen_video

    path = gen_video(tmp_path / "odd.mp4", seconds=2.0, size=size)
    with pytest.raises(VideoError, match=told) as caught:
        probe_video(str(path))
    assert type(caught.value).__name__ == "VideoFrameSizeError"
    units, dead, status = expand_object(SourceObject(str(path), path.stat().st_size, "fp"), ExpandSettings())
    assert (status, units, [(d.stage, d.error_type) for d in dead]) == ("failed", [], [("expand", "VideoFrameSizeError")])


def test_frames_over_the_image_pixel_limit_are_refused_and_small_frames_are_taken(tmp_path) -> None:
    from tests.media_gen import write_video as gen_video

    path = gen_video(tmp_path / "v.mp4", seconds=1.0, size=(64, 48))
    with pytest.raises(VideoError, match=r"video frame is 64x48 = 3072 pixels, over the limit of 3071"):
        probe_video(str(path), max_pixels=64 * 48 - 1)
    assert probe_video(str(path), max_pixels=64 * 48).width == 64
    # qwen-vl-utils scales small frames up: a 30x30 or 100x8 video is read (a side minimum refused them).
    for size in ((30, 30), (100, 8)):
        small = gen_video(tmp_path / f"small{size[0]}.mp4", seconds=1.0, size=size)
        assert probe_video(str(small))[3:] == size


@pytest.mark.parametrize("ext", [".mkv", ".mp4"])
def test_a_soundtrack_longer_than_the_picture_does_not_lengthen_the_video(tmp_path, ext: str) -> None:
    """Matroska has no per-stream duration: the container's spans the audio, and segments past the
    last frame could never be embedded. A 1-frame picture under 5 s of sound is still 1 frame."""
    from tests.resilience_corpus import write_av

    write_av(tmp_path / f"long_audio{ext}", 2.0, audio=True, audio_seconds=5.0)
    info = probe_video(str(tmp_path / f"long_audio{ext}"))
    assert info.duration_s == pytest.approx(2.0, abs=0.13) and info.n_frames == 16
    write_av(tmp_path / f"one_frame{ext}", 0.125, audio=True, audio_seconds=5.0)
    with pytest.raises(VideoTooShortError, match="video has 1 frame"):
        probe_video(str(tmp_path / f"one_frame{ext}"))


@pytest.mark.parametrize(("tag", "seconds"), [("00:00:04.000000000", 4.0), ("01:02:03.5", 3723.5), (None, None),
                                              ("", None), ("4.0", None), ("00:00:00.000", None), ("aa:bb:cc", None)])
def test_a_stream_duration_tag_is_read_or_ignored(tag, seconds) -> None:
    from operators.media.video import _tagged_seconds

    assert _tagged_seconds(tag) == seconds


def test_the_tail_segment_of_a_low_fps_video_embeds(tmp_path, tiny_embedding_ckpt) -> None:
    """At 1 fps the 1 s tail of a 5 s video held one frame and failed to embed on every run."""
    from operators.qwen3vl import Qwen3VLEmbedder
    from tests.media_gen import write_video as gen_video

    path = gen_video(tmp_path / "slow.mp4", seconds=5.0, fps=1)
    info = probe_video(str(path))
    segments = video_segments(info.duration_s, 2.0, info.fps)
    assert segments[-1][1] == pytest.approx(info.duration_s) and len(segments) == 2
    with Qwen3VLEmbedder(str(tiny_embedding_ckpt)) as emb:
        results = emb.embed([{"video": str(path), "video_start": a, "video_end": b} for a, b in segments])
    assert all(r.ok for r in results), [r.error for r in results]


def test_segments_reject_bad_input() -> None:
    with pytest.raises(ValueError):
        video_segments(0, 30)
    with pytest.raises(ValueError):
        video_segments(10, 0)


def _fetched(files, uri):
    """The video's local path, not held: evictable at once."""
    path = files.acquire(uri)
    files.release(uri)
    return path


def test_remote_video_copies_live_in_one_temp_dir_removed_on_close():
    import fsspec

    from operators.qwen3vl.media_io import VideoFiles
    files = VideoFiles()
    assert files._dir is None  # nothing on disk until a remote video is read
    with fsspec.open("memory://videos/v.mp4", "wb") as fh:
        fh.write(b"not really a video")
    path = _fetched(files, "memory://videos/v.mp4")
    assert open(path, "rb").read() == b"not really a video" and _fetched(files, "memory://videos/v.mp4") == path
    folder = os.path.dirname(path)
    files.close()
    assert not os.path.exists(folder)
    other = VideoFiles()
    _fetched(other, "memory://videos/v.mp4")
    folder = other._dir
    del other  # dropped without close(): the folder goes with it
    import gc
    gc.collect()
    assert not os.path.exists(folder)


def test_segments_of_one_remote_video_asking_at_once_share_one_download(moto_s3):
    # The segments of one video are prepared on several threads at once: one download, one copy.
    import threading
    from concurrent.futures import ThreadPoolExecutor

    from operators.qwen3vl.media_io import VideoFiles
    moto_s3["client"].create_bucket(Bucket="videos")
    moto_s3["client"].put_object(Bucket="videos", Key="long.mp4", Body=os.urandom(8 << 20))
    files = VideoFiles(moto_s3["storage_options"])
    start = threading.Barrier(8)

    def segment(_):
        start.wait()
        return files.acquire("s3://videos/long.mp4")

    with ThreadPoolExecutor(8) as pool:
        paths = list(pool.map(segment, range(8)))
    assert len(set(paths)) == 1 and os.listdir(files._dir) == [os.path.basename(paths[0])]
    for _ in paths:
        files.release("s3://videos/long.mp4")
    files.close()


def test_a_remote_video_copy_in_use_is_never_evicted():
    # A thread holds its copy from resolving the conversation until the processor has read it;
    # other threads' videos pushing it out of the cache in between failed that item.
    import fsspec

    from operators.qwen3vl.media_io import VideoFiles
    for i in range(5):
        with fsspec.open(f"memory://held/v{i}.mp4", "wb") as fh:
            fh.write(b"video %d" % i)
    files = VideoFiles(max_files=2)
    held = files.acquire("memory://held/v0.mp4")
    others = [_fetched(files, f"memory://held/v{i}.mp4") for i in range(1, 5)]
    assert open(held, "rb").read() == b"video 0"
    assert sum(os.path.exists(p) for p in others) == 1  # the rest went, as the cache holds 2
    files.release("memory://held/v0.mp4")
    _fetched(files, "memory://held/v1.mp4")  # now the held one is the oldest: it goes
    assert not os.path.exists(held) and len(os.listdir(files._dir)) == 2
    files.close()
