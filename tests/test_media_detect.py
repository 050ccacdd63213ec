"""Content-type sniffing: magic bytes first, extension second."""

from __future__ import annotations

import pytest

from operators.media.detect import detect, extension
from tests.media_corpus import encode, make_pdf, pattern

PNG = encode(pattern(1, (8, 8)), "PNG")


@pytest.mark.parametrize(
    ("fmt", "mime"),
    [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"), ("GIF", "image/gif"), ("BMP", "image/bmp"), ("TIFF", "image/tiff")],
)
def test_image_magic(fmt: str, mime: str) -> None:
    data = encode(pattern(2, (10, 6)), fmt)
    assert detect("x.bin", data[:4096]) == ("image", mime) or detect("x.bin", data).mime == mime
    assert detect("no_extension", data).kind == "image"


def test_magic_beats_extension() -> None:
    assert detect("photo.jpg", PNG).mime == "image/png"
    assert detect("notes.txt", make_pdf(["x"])).kind == "pdf"


def test_video_and_parquet_magic() -> None:
    assert detect("a.bin", b"\x00\x00\x00\x18ftypisom" + b"\x00" * 20).mime == "video/mp4"
    assert detect("a.bin", b"\x00\x00\x00\x14ftypqt  " + b"\x00" * 20).mime == "video/quicktime"
    assert detect("a.bin", b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm").mime == "video/webm"
    assert detect("a.bin", b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x88matroska").mime == "video/x-matroska"
    assert detect("m.jsonl", b"PAR1\x15\x04").kind == "manifest"


@pytest.mark.parametrize(
    ("name", "kind"),
    [
        ("a.txt", "text"),
        ("a.MD", "text"),
        ("a.rst", "text"),
        ("m.jsonl", "manifest"),
        ("m.parquet", "manifest"),
        ("x.json", "unsupported"),
        ("x.csv", "unsupported"),
        ("x.exe", "unsupported"),
        ("x.zip", "unsupported"),
        ("x", "unsupported"),
        ("broken.png", "image"),  # no magic: the name routes it, validation then fails it
        ("broken.pdf", "pdf"),
        ("broken.mp4", "video"),
    ],
)
def test_extension_fallback(name: str, kind: str) -> None:
    assert detect(f"s3://bucket/dir/{name}", b"plain words without magic").kind == kind


def test_text_that_looks_like_magic_stays_text() -> None:
    assert detect("a.txt", b"I'm free to talk about mdat boxes").kind == "text"
    assert detect("a.txt", b"BMW cars are not bitmaps, nor is this").kind == "text"
    assert detect("a.txt", b"see the %PDF-1.7 header spec").kind == "text"


def test_extension_helper() -> None:
    assert extension("s3://b/k/Photo.JPEG") == ".jpeg"
    assert extension("/a.b/c") == ""
