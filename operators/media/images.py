"""Validate encoded images cheaply and hand the embedder the bytes it should decode.

Order of checks: open (header only) → pixel count against ``max_pixels`` (the
decompression-bomb guard, before any decode) → aspect ratio ≤ 200 (qwen-vl-utils'
MAX_RATIO) → full ``load()`` (catches truncated files).

The original bytes are returned unchanged unless the model would see them wrongly,
and then they are re-encoded as PNG (lossless): an EXIF orientation of 2..8 is applied,
so the model sees the image upright; an image of more than 8 bits per sample (16-bit
grayscale, 32-bit integer or float) is scaled to 8-bit grayscale, because the model
side's conversion to RGB clips every value over 255 (a 16-bit scan came out white).
CMYK, palette, 8-bit grayscale and alpha images are accepted as is; the model side
converts them to RGB. Animated GIF/WebP and multi-page TIFF: the
embedder decodes the bytes with Pillow, which yields the FIRST frame; the frame
count is reported in ``ImageInfo.frames``.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

MAX_RATIO = 200  # qwen-vl-utils' MAX_RATIO
# Pillow refuses to open an image of more than twice its MAX_IMAGE_PIXELS (its default, 89,478,485)
# whatever our own limit says: a larger max_image_pixels could never take effect.
PILLOW_DECODE_LIMIT = 178_956_970
_ORIENTATION_TAG = 0x0112
_PNG_MODES = {"1", "L", "LA", "P", "RGB", "RGBA"}
_DEEP_MODES = ("I", "F")  # and every "I;16..." variant: more than 8 bits per sample


class ImageValidationError(ValueError):
    """An image cannot be used."""


class ImageTooLargeError(ImageValidationError):
    """More pixels than the decompression-bomb limit."""


class ImageAspectError(ImageValidationError):
    """Aspect ratio beyond what the model resizer accepts."""


@dataclass(frozen=True)
class ImageInfo:
    """A validated image: the bytes to embed, their MIME type, upright size and frame count."""

    data: bytes
    mime: str
    width: int
    height: int
    frames: int = 1


_WARNINGS_LOCK = threading.Lock()


def _open(data: bytes) -> Image.Image:
    """Open image bytes lazily (header only), mapping Pillow's own bomb error to ours."""
    try:
        # catch_warnings swaps the process-wide filter list: two threads overlapping here would
        # restore each other's copies and leave the filter on (or lose another's).
        with _WARNINGS_LOCK, warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"decompression-bomb guard: {exc}") from exc
    except Exception as exc:
        # Pillow names the stream ("<_io.BytesIO object at 0x...>"): say what it is instead
        reason = re.sub(r"<_io\.BytesIO object at 0x[0-9a-f]+>", "data (not a known image format)", str(exc))
        raise ImageValidationError(f"not a readable image: {type(exc).__name__}: {reason}") from exc


def check_geometry(width: int, height: int, max_pixels: int | None, what: str = "image") -> None:
    """Pixel-count and aspect-ratio checks from the size alone, before any decode (what: the message's noun)."""
    pixels = width * height
    if max_pixels is not None and pixels > max_pixels:
        raise ImageTooLargeError(f"{what} is {width}x{height} = {pixels} pixels, over the limit of {max_pixels} pixels (decompression-bomb guard)")
    if width <= 0 or height <= 0:
        raise ImageValidationError(f"{what} has no pixels ({width}x{height})")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_RATIO:
        shown = f"{width}x{height}" if what == "image" else f"the {what} {width}x{height}"
        raise ImageAspectError(f"aspect ratio {ratio:.1f} of {shown} exceeds the model's maximum of {MAX_RATIO}")


def _orientation(img: Image.Image) -> int:
    """EXIF orientation (1 when absent or unreadable)."""
    try:
        value = img.getexif().get(_ORIENTATION_TAG, 1)
        return int(value) if value else 1
    except Exception:
        return 1


def exif_rotated(img: Image.Image) -> bool:
    """True when the image's EXIF orientation rotates or flips it (read from the header alone)."""
    return 2 <= _orientation(img) <= 8


def deep_samples(img: Image.Image) -> bool:
    """True when the image has more than 8 bits per sample (known from the header alone)."""
    return img.mode in _DEEP_MODES or img.mode.startswith("I;16")


def needs_reencoding(img: Image.Image) -> bool:
    """True when the model would see the image wrongly from its own bytes (see the module's docstring)."""
    return exif_rotated(img) or deep_samples(img)


def eight_bit(img: Image.Image) -> Image.Image:
    """A deep grayscale image as 8-bit "L", as a viewer shows it.

    16-bit samples are divided by 256. 32-bit integer samples are kept within 0..255, divided by
    256 within 0..65535 (16-bit data that Pillow opened as "I"), else stretched from min to max.
    Float samples within 0..1 are multiplied by 255, kept within 0..255, else stretched.
    """
    samples = np.asarray(img)
    if img.mode.startswith("I;16"):
        return Image.fromarray((samples.astype(np.uint32) >> 8).astype(np.uint8), "L")
    samples = np.nan_to_num(samples.astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
    low, high = float(samples.min()), float(samples.max())
    if low >= 0 and high <= 1 and img.mode == "F":
        samples = samples * 255.0
    elif low >= 0 and 255 < high <= 65535 and img.mode == "I":
        samples = np.floor(samples / 256.0)
    elif low < 0 or high > 255:
        samples = (samples - low) * (255.0 / (high - low))
    return Image.fromarray(np.rint(samples).astype(np.uint8), "L")


def _model_ready_png(img: Image.Image) -> tuple[bytes, int, int]:
    """Apply the EXIF rotation, bring deep samples to 8 bits, and re-encode losslessly as PNG."""
    ready = ImageOps.exif_transpose(img)
    if deep_samples(ready):
        ready = eight_bit(ready)
    elif ready.mode not in _PNG_MODES:
        ready = ready.convert("RGBA" if "A" in ready.getbands() else "RGB")
    buf = io.BytesIO()
    ready.save(buf, format="PNG")
    return buf.getvalue(), ready.width, ready.height


def inspect_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Validate image bytes (bomb guard, aspect, truncation) and return what to embed."""
    img = _open(data)
    with img:
        width, height = img.size
        check_geometry(width, height, max_pixels)
        try:
            img.load()
        except Exception as exc:
            raise ImageValidationError(f"cannot decode image (truncated or corrupt): {type(exc).__name__}: {exc}") from exc
        mime = Image.MIME.get(img.format or "", "application/octet-stream")
        try:
            frames = int(getattr(img, "n_frames", 1) or 1)
        except Exception:  # a multi-page TIFF cut short: its first page, what is embedded, decoded above
            frames = 1
        if img.format == "MPO":  # a camera's JPEG with extra images appended (a preview, a depth map): a still photo
            mime, frames = "image/jpeg", 1
        if needs_reencoding(img):
            png, w, h = _model_ready_png(img)
            return ImageInfo(png, "image/png", w, h, frames)
        return ImageInfo(data, mime, width, height, frames)


def model_ready_bytes(data: bytes) -> bytes | None:
    """The PNG bytes ingestion embeds instead of these (EXIF rotation, deep samples), else None.

    A query image must be re-encoded the same way, or a stored image would not find itself.
    """
    with _open(data) as img:
        return _model_ready_png(img)[0] if needs_reencoding(img) else None


def image_unit_bytes(data: bytes, max_pixels: int) -> tuple[bytes, str]:
    """Validated image bytes (original unless EXIF-rotated) and their MIME type."""
    info = inspect_image(data, max_pixels)
    return info.data, info.mime
