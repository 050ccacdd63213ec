"""Validate encoded images cheaply and hand the embedder the bytes it should decode.

Order of checks: open (header only) → pixel count against ``max_pixels`` (the
decompression-bomb guard, before any decode) → aspect ratio ≤ 200 (qwen-vl-utils'
MAX_RATIO) → full ``load()`` (catches truncated files).

The original bytes are returned unchanged unless the EXIF orientation is 2..8:
then the image is transposed and re-encoded as PNG (lossless), so the model sees
it upright. 16-bit, CMYK, palette, grayscale and alpha images are accepted as is;
the model side converts to RGB. Animated GIF/WebP and multi-page TIFF: the
embedder decodes the bytes with Pillow, which yields the FIRST frame; the frame
count is reported in ``ImageInfo.frames``.
"""

from __future__ import annotations

import io
import re
import threading
import warnings
from dataclasses import dataclass

from PIL import Image, ImageOps

MAX_RATIO = 200  # qwen-vl-utils' MAX_RATIO
_ORIENTATION_TAG = 0x0112
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


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


def _check_geometry(width: int, height: int, max_pixels: int) -> None:
    """Pixel-count and aspect-ratio checks, before any decode."""
    pixels = width * height
    if pixels > max_pixels:
        raise ImageTooLargeError(f"image is {width}x{height} = {pixels} pixels, over the limit of {max_pixels} pixels (decompression-bomb guard)")
    if width <= 0 or height <= 0:
        raise ImageValidationError(f"image has no pixels ({width}x{height})")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_RATIO:
        raise ImageAspectError(f"aspect ratio {ratio:.1f} of {width}x{height} exceeds the model's maximum of {MAX_RATIO}")


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


def _upright_png(img: Image.Image) -> tuple[bytes, int, int]:
    """Apply the EXIF rotation and re-encode losslessly as PNG."""
    upright = ImageOps.exif_transpose(img)
    if upright.mode not in _PNG_MODES:
        upright = upright.convert("RGBA" if "A" in upright.getbands() else "RGB")
    buf = io.BytesIO()
    upright.save(buf, format="PNG")
    return buf.getvalue(), upright.width, upright.height


def inspect_image(data: bytes, max_pixels: int) -> ImageInfo:
    """Validate image bytes (bomb guard, aspect, truncation) and return what to embed."""
    img = _open(data)
    with img:
        width, height = img.size
        _check_geometry(width, height, max_pixels)
        try:
            img.load()
        except Exception as exc:
            raise ImageValidationError(f"cannot decode image (truncated or corrupt): {type(exc).__name__}: {exc}") from exc
        mime = Image.MIME.get(img.format or "", "application/octet-stream")
        frames = int(getattr(img, "n_frames", 1) or 1)
        if exif_rotated(img):
            png, w, h = _upright_png(img)
            return ImageInfo(png, "image/png", w, h, frames)
        return ImageInfo(data, mime, width, height, frames)


def upright_bytes(data: bytes) -> bytes | None:
    """PNG bytes of the image turned upright when its EXIF orientation rotates or flips it, else None.

    Ingestion embeds these for an EXIF-rotated image (inspect_image): a query image must be
    turned the same way, or a stored photo would not find itself.
    """
    with _open(data) as img:
        return _upright_png(img)[0] if exif_rotated(img) else None


def image_unit_bytes(data: bytes, max_pixels: int) -> tuple[bytes, str]:
    """Validated image bytes (original unless EXIF-rotated) and their MIME type."""
    info = inspect_image(data, max_pixels)
    return info.data, info.mime
