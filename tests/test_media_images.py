"""Image validation: bomb guard, aspect ratio, truncation, EXIF rotation, odd modes."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from operators.media.images import ImageAspectError, ImageTooLargeError, ImageValidationError, image_unit_bytes, inspect_image
from tests.media_corpus import encode, pattern

LIMIT = 89_478_485


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"), ("GIF", "image/gif"), ("BMP", "image/bmp"), ("TIFF", "image/tiff")],
)
def test_formats_pass_original_bytes(fmt: str, mime: str) -> None:
    data = encode(pattern(1, (40, 30)), fmt)
    assert image_unit_bytes(data, LIMIT) == (data, mime)


@pytest.mark.parametrize(
    "img",
    [
        Image.fromarray((np.arange(600, dtype=np.uint16).reshape(20, 30) * 100)),  # 16-bit grayscale
        Image.new("CMYK", (20, 10), (10, 20, 30, 40)),
        pattern(2, (20, 10)).convert("P"),
        Image.new("L", (20, 10), 128),
        Image.new("LA", (20, 10), (128, 50)),
        pattern(3, (20, 10), "RGBA"),
        Image.new("1", (20, 10), 1),
    ],
    ids=["I16", "CMYK", "P", "L", "LA", "RGBA", "1"],
)
def test_modes_accepted_unchanged(img: Image.Image) -> None:
    data = encode(img, "JPEG" if img.mode == "CMYK" else "TIFF" if img.mode == "LA" else "PNG")
    out, _ = image_unit_bytes(data, LIMIT)
    assert out == data


def test_one_pixel_is_valid() -> None:
    info = inspect_image(encode(Image.new("RGB", (1, 1), (1, 2, 3)), "PNG"), LIMIT)
    assert (info.width, info.height) == (1, 1)


def test_bomb_guard_before_decode() -> None:
    data = encode(Image.new("L", (1000, 1000)), "PNG")
    with pytest.raises(ImageTooLargeError, match=r"1000x1000 = 1000000 pixels, over the limit of 999999 pixels"):
        inspect_image(data, 999_999)


def test_pillow_own_bomb_error_is_wrapped(monkeypatch) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow raises at open above 2x this
    with pytest.raises(ImageTooLargeError, match="decompression-bomb"):
        inspect_image(encode(Image.new("L", (100, 100)), "PNG"), LIMIT)


def test_aspect_ratio_limit() -> None:
    assert inspect_image(encode(Image.new("L", (400, 2)), "PNG"), LIMIT).width == 400  # exactly 200
    with pytest.raises(ImageAspectError, match=r"aspect ratio 201.0 .* maximum of 200"):
        inspect_image(encode(Image.new("L", (201, 1)), "PNG"), LIMIT)


def test_truncated_and_garbage() -> None:
    jpeg = encode(pattern(4, (120, 90)), "JPEG")
    with pytest.raises(ImageValidationError, match="truncated"):
        inspect_image(jpeg[: len(jpeg) // 2], LIMIT)
    with pytest.raises(ImageValidationError, match="not a readable image"):
        inspect_image(b"\x00" * 100, LIMIT)


def test_exif_rotation_reencodes_upright_png() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    data = encode(pattern(5, (90, 60)), "JPEG", exif=exif)
    info = inspect_image(data, LIMIT)
    assert info.mime == "image/png" and (info.width, info.height) == (60, 90)
    assert Image.open(io.BytesIO(info.data)).size == (60, 90)


def test_exif_orientation_one_keeps_bytes() -> None:
    exif = Image.Exif()
    exif[0x0112] = 1
    data = encode(pattern(6, (90, 60)), "JPEG", exif=exif)
    assert image_unit_bytes(data, LIMIT) == (data, "image/jpeg")


def test_cmyk_with_rotation_becomes_rgb_png() -> None:
    exif = Image.Exif()
    exif[0x0112] = 3
    data = encode(Image.new("CMYK", (30, 20), (0, 50, 100, 0)), "JPEG", exif=exif)
    info = inspect_image(data, LIMIT)
    assert info.mime == "image/png" and Image.open(io.BytesIO(info.data)).mode == "RGB"


def test_animated_gif_reports_frames_and_decodes_first() -> None:
    frames = [pattern(i, (20, 20)).convert("P") for i in (1, 2, 3)]
    buf = io.BytesIO()
    frames[0].save(buf, format="GIF", save_all=True, append_images=frames[1:], duration=50)
    info = inspect_image(buf.getvalue(), LIMIT)
    assert info.frames == 3 and info.data == buf.getvalue()
    assert Image.open(io.BytesIO(info.data)).tell() == 0  # the embedder sees frame 0


def test_inspecting_images_on_many_threads_leaves_the_warning_filters_as_they_were() -> None:
    # The query reads candidates on 8 threads; the bomb-warning filter is set around each open,
    # and overlapping catch_warnings blocks used to leave it on for the whole process.
    import warnings
    from concurrent.futures import ThreadPoolExecutor

    from operators.media.images import _open  # where the filter is set; the callers add work that hides the race

    data = encode(pattern(7, (64, 64)), "PNG")
    before = list(warnings.filters)
    with ThreadPoolExecutor(8) as pool:
        sizes = set(pool.map(lambda _: _open(data).size, range(20000)))
    assert sizes == {(64, 64)}
    assert warnings.filters == before
