"""Small generated media for model tests: images with distinct content and short video clips."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image


def pattern_image(seed: int, size: tuple[int, int] = (96, 64), mode: str = "RGB") -> Image.Image:
    """A deterministic noisy image whose content depends on seed."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, (h, w, 4 if mode == "RGBA" else 3), dtype=np.uint8)
    if mode == "RGBA":
        arr[..., 3] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    return Image.fromarray(arr, mode)


def image_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    """Encode an image."""
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def write_video(path: Path, seconds: float = 2.0, fps: int = 8, size: tuple[int, int] = (64, 48),
                codec: str = "mpeg4", seed: int = 0, faststart: bool = False) -> Path:
    """Encode a short clip of moving noise with PyAV (faststart: the index before the frames)."""
    rng = np.random.default_rng(seed)
    w, h = size
    container = av.open(str(path), "w", options={"movflags": "+faststart"} if faststart else {})
    stream = container.add_stream(codec, rate=fps)
    stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
    base = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    for i in range(int(seconds * fps)):
        frame = av.VideoFrame.from_ndarray(np.roll(base, i * 3, axis=1), format="rgb24")
        for packet in stream.encode(frame):
            container.mux(packet)
    for packet in stream.encode():
        container.mux(packet)
    container.close()
    return path


def string_array_from_bytes(values: list[bytes]) -> Any:
    """A string-typed Arrow array holding the raw bytes unchecked, as a writer that skips UTF-8
    validation stores them: Parquet keeps them, and reading them back into Python fails."""
    import pyarrow as pa

    offsets = [0]
    for value in values:
        offsets.append(offsets[-1] + len(value))
    return pa.Array.from_buffers(pa.string(), len(values), [None, pa.array(offsets, pa.int32()).buffers()[1], pa.py_buffer(b"".join(values))])
