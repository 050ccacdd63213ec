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
        Image.new("CMYK", (20, 10), (10, 20, 30, 40)),
        pattern(2, (20, 10)).convert("P"),
        Image.new("L", (20, 10), 128),
        Image.new("LA", (20, 10), (128, 50)),
        pattern(3, (20, 10), "RGBA"),
        Image.new("1", (20, 10), 1),
    ],
    ids=["CMYK", "P", "L", "LA", "RGBA", "1"],
)
def test_modes_accepted_unchanged(img: Image.Image) -> None:
    data = encode(img, "JPEG" if img.mode == "CMYK" else "TIFF" if img.mode == "LA" else "PNG")
    out, _ = image_unit_bytes(data, LIMIT)
    assert out == data


@pytest.mark.parametrize(
    ("img", "fmt", "expected"),
    [
        # 16-bit grayscale over its whole range: the model side's RGB conversion clipped it white
        (Image.fromarray(np.array([[0, 255, 256, 40_000, 65_535]], np.uint16)), "PNG", [0, 0, 1, 156, 255]),
        (Image.fromarray(np.array([[0, 255, 256, 40_000, 65_535]], np.int32)), "TIFF", [0, 0, 1, 156, 255]),
        (Image.fromarray(np.array([[0, 7, 200, 255, 3]], np.int32)), "TIFF", [0, 7, 200, 255, 3]),
        (Image.fromarray(np.array([[-1000, 0, 1000, 0, 0]], np.int32)), "TIFF", [0, 128, 255, 128, 128]),
        (Image.fromarray(np.array([[0.0, 0.5, 1.0, 0.2, 0.0]], np.float32)), "TIFF", [0, 128, 255, 51, 0]),
        (Image.fromarray(np.array([[0.0, 12.4, 250.0, 3.0, 0.0]], np.float32)), "TIFF", [0, 12, 250, 3, 0]),
        (Image.fromarray(np.array([[-1.0, 0.0, 3.0, 1.0, 1.0]], np.float32)), "TIFF", [0, 64, 255, 128, 128]),
    ],
    ids=["I16", "I-16bit", "I-8bit", "I-signed", "F-unit", "F-8bit", "F-any"],
)
def test_deep_samples_become_8bit_grayscale_as_a_viewer_shows_them(img: Image.Image, fmt: str, expected) -> None:
    data = encode(img, fmt)
    info = inspect_image(data, LIMIT)
    assert info.mime == "image/png" and (info.width, info.height) == (5, 1)
    out = Image.open(io.BytesIO(info.data))
    assert out.mode == "L" and np.asarray(out).ravel().tolist() == expected
    assert np.asarray(out.convert("RGB"))[0, :, 0].tolist() == expected  # what the model side sees


def test_pillow_decodes_up_to_the_limit_the_settings_allow() -> None:
    """Pillow refuses twice its MAX_IMAGE_PIXELS whatever our limit says: a larger one is refused
    where it is set. Between Pillow's default and that, the configured limit is what counts."""
    from operators.media.expand import ExpandSettings
    from operators.media.images import PILLOW_DECODE_LIMIT

    assert PILLOW_DECODE_LIMIT == 2 * Image.MAX_IMAGE_PIXELS
    with pytest.raises(ValueError, match="max_image_pixels must be <= 178956970"):
        ExpandSettings(max_image_pixels=PILLOW_DECODE_LIMIT + 1)
    big = Image.new("1", (10_000, 9_000))  # 90 M pixels, over Pillow's default: 11 kB as a PNG
    data = encode(big, "PNG")
    assert inspect_image(data, 100_000_000).width == 10_000
    with pytest.raises(ImageTooLargeError, match="over the limit of 89478485"):
        inspect_image(data, LIMIT)


def test_a_phone_jpeg_with_appended_images_is_a_still_jpeg() -> None:
    """Pillow opens many camera JPEGs as MPO (a preview or depth map appended): the payload says JPEG."""
    buf = io.BytesIO()
    pattern(4, (32, 24)).save(buf, format="MPO", save_all=True, append_images=[pattern(5, (32, 24))])
    assert Image.open(io.BytesIO(buf.getvalue())).format == "MPO"
    info = inspect_image(buf.getvalue(), LIMIT)
    assert (info.data, info.mime, info.frames) == (buf.getvalue(), "image/jpeg", 1)


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


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's, while it looks for page 2
def test_a_multipage_tiff_cut_short_is_its_first_page() -> None:
    """An interrupted copy of a scan: page 1 (what is embedded) decodes; counting the pages cannot."""
    pages = [pattern(i, (64, 64)) for i in range(6)]
    buf = io.BytesIO()
    pages[0].save(buf, format="TIFF", save_all=True, append_images=pages[1:])
    info = inspect_image(buf.getvalue()[: len(buf.getvalue()) * 6 // 10], LIMIT)
    assert (info.mime, info.width, info.height, info.frames) == ("image/tiff", 64, 64, 1)


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
