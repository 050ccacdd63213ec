"""Probe videos with PyAV and cut them into time segments.

``probe_video`` opens the container, picks the first video stream, reads its
duration / frame rate / frame count / size and decodes the first frame (so a file
whose header parses but whose frames do not is reported as corrupt). Frames the model
cannot take are refused from the header, before any decode, with the image path's
checks (aspect ratio over 200, more pixels than the bomb guard allows). Sources: a
local path, raw bytes, or a binary file object (e.g. from ``fsspec.open``).
"""

from __future__ import annotations

import io
import math
from typing import IO, NamedTuple

import av

from operators.media.images import ImageValidationError, check_geometry

MIN_SEGMENT_S = 0.5  # a trailing segment shorter than this merges into the previous one


class VideoError(ValueError):
    """A video cannot be used."""


class VideoNoStreamError(VideoError):
    """The container holds no video stream."""


class VideoCorruptError(VideoError):
    """PyAV/FFmpeg cannot read the file."""


class VideoTooLongError(VideoError):
    """Longer than the configured duration cap."""


class VideoFrameSizeError(VideoError):
    """Frames the model's video reader cannot take: an aspect ratio over 200, too many or too few pixels."""


class VideoTooShortError(VideoError):
    """Fewer than the 2 frames the model's video reader samples at least."""


MIN_FRAMES = 2  # qwen-vl-utils samples at least 2 frames: a 1-frame span fails ("Start frame exceeds end frame")


class VideoInfo(NamedTuple):
    """What a probe finds: duration (s), frames per second, frame count, width, height."""

    duration_s: float
    fps: float
    n_frames: int
    width: int
    height: int


def _tagged_seconds(value: str | None) -> float | None:
    """A Matroska/WebM per-stream DURATION tag ("HH:MM:SS.nnnnnnnnn") in seconds, or None."""
    parts = (value or "").strip().split(":")
    try:
        seconds = sum(float(p) * 60 ** i for i, p in enumerate(reversed(parts))) if len(parts) == 3 else None
    except ValueError:
        return None
    return seconds if seconds and math.isfinite(seconds) and seconds > 0 else None


def _duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """The video stream's duration in seconds; None when only demuxing it can tell."""
    if stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    # Matroska has no per-stream duration field, only a tag; the container's duration spans every
    # stream, so a soundtrack that outlasts the picture would give segments with no frames.
    tagged = _tagged_seconds(stream.metadata.get("DURATION") or stream.metadata.get("duration"))
    if tagged is not None:
        return tagged
    if container.duration is not None and len(container.streams) == 1:
        return container.duration / av.time_base
    return None


def _demuxed_duration(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> float | None:
    """Duration from the last packet's end time (slow path for containers without one)."""
    end = None
    container.seek(0)
    for packet in container.demux(stream):
        if packet.pts is not None and packet.time_base is not None:
            t = float((packet.pts + (packet.duration or 0)) * packet.time_base)
            end = t if end is None else max(end, t)
    return end


def _first_frame(container: av.container.InputContainer, stream: av.video.stream.VideoStream) -> None:
    """Decode one frame, or raise VideoCorruptError."""
    for frame in container.decode(stream):
        if frame is not None:
            return
    raise VideoCorruptError("video stream has no decodable frame")


def check_frame_size(width: int, height: int, max_pixels: int | None = None) -> None:
    """Raise VideoFrameSizeError for frames the image path would refuse (images.check_geometry).

    No minimum side: qwen-vl-utils scales small frames up (30x30, 100x8 are read fine); decord's
    failures on some small sizes (16x16, 48x48) follow no size rule, and fail their segments alone."""
    try:
        check_geometry(width, height, max_pixels, what="video frame")
    except ImageValidationError as exc:
        raise VideoFrameSizeError(str(exc)) from exc


def probe_video(source: str | bytes | IO[bytes], max_duration_s: float | None = None,
                max_pixels: int | None = None) -> VideoInfo:
    """Probe a video (path, bytes or binary file object): (duration_s, fps, n_frames, width, height).

    max_pixels: frames of more pixels are refused before any is decoded, as an image of more is.
    """
    src = io.BytesIO(source) if isinstance(source, (bytes, bytearray, memoryview)) else source
    try:
        container = av.open(src, mode="r")
    except FileNotFoundError:
        raise
    except (av.FFmpegError, OSError, ValueError) as exc:
        raise VideoCorruptError(f"cannot open video: {exc}") from exc
    try:
        if not container.streams.video:
            raise VideoNoStreamError("file has no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        width, height = int(stream.codec_context.width or 0), int(stream.codec_context.height or 0)
        if width > 0 and height > 0:  # from the header: a bomb or a 1000x4 strip is refused undecoded
            check_frame_size(width, height, max_pixels)
        try:
            duration = _duration(container, stream)
            _first_frame(container, stream)
            if duration is None or duration <= 0:
                duration = _demuxed_duration(container, stream)
        except av.FFmpegError as exc:
            raise VideoCorruptError(f"cannot decode video: {exc}") from exc
        if duration is None or duration <= 0 or not math.isfinite(duration):
            raise VideoCorruptError("video has no usable duration")
        if width <= 0 or height <= 0:
            raise VideoCorruptError(f"video has no frame size ({width}x{height})")
        n_frames = int(stream.frames or 0) or (round(duration * fps) if fps else 0)
    finally:
        container.close()
    if max_duration_s is not None and duration > max_duration_s:
        raise VideoTooLongError(f"video is {duration:.1f} s long, over the cap of {max_duration_s:g} s")
    if 0 < n_frames < MIN_FRAMES:
        raise VideoTooShortError(f"video has {n_frames} frame: the model reads videos of at least {MIN_FRAMES} "
                                 "frames (store a single frame as an image)")
    return VideoInfo(duration, fps, n_frames, width, height)


def video_segments(duration_s: float, segment_s: float, fps: float = 0.0) -> list[tuple[float, float]]:
    """(start, end) seconds of consecutive segments; the last is shorter, a too short one merges back.

    Too short: under 0.5 s, or, given the video's fps, under 2 frame intervals; segments are
    never shorter than that either. A span of one frame cannot be embedded (MIN_FRAMES), so a
    low-fps video's tail segment would fail on every run.
    """
    if not duration_s > 0:
        raise ValueError(f"duration must be > 0, got {duration_s}")
    if not segment_s > 0:
        raise ValueError(f"segment length must be > 0, got {segment_s}")
    frames_s = MIN_FRAMES / fps if fps > 0 else 0.0
    segment_s = max(segment_s, frames_s)
    bounds: list[tuple[float, float]] = []
    i = 0
    while i * segment_s < duration_s:
        start = i * segment_s
        bounds.append((start, min(start + segment_s, duration_s)))
        i += 1
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < max(MIN_SEGMENT_S, frames_s):
        tail = bounds.pop()
        bounds[-1] = (bounds[-1][0], tail[1])
    return bounds
