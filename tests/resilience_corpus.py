"""Generated corpora for the resilience tests: unusual-but-valid media, malformed media, and plain text.

``make_unusual_corpus`` and ``make_malformed_corpus`` write files under a root and
return ``{relative path: Expect}``: the object's final status in the run report
(``ingested`` / ``failed`` / ``skipped``), how many points it must give, and for bad
files a regex that its dead letter(s) must match (the reason must name the
problem). Limits the malformed corpus relies on are in ``LIMITS``; the settings the
expectations assume are in ``EXPAND`` and ``EMBED``.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image

from tests.media_corpus import make_pdf

# Settings the expectations below assume (the tests put them in the job config).
EXPAND = {"chunk_tokens": 128, "overlap_tokens": 16, "video_segment_s": 1.0, "video_fps": 2.0,
          "video_max_frames": 4, "pdf_dpi": 72}
EMBED = {"max_length": 1024, "min_pixels": 1024, "max_pixels": 16384, "total_pixels": 65536}
LIMITS = {"max_image_pixels": 1_000_000, "max_pdf_pages": 3, "max_video_duration_s": 2.5,
          "max_object_bytes": 1024 * 1024}


@dataclass(frozen=True)
class Expect:
    """What the run must report for one file."""

    status: str  # ingested | failed | skipped
    points: int = 0
    reason: str | None = None  # regex over "error_type: message" of the file's dead letter(s)
    dead: int | None = None  # dead letters expected for this URI (default: 1 if failed else 0)
    check: dict | None = None  # payload fields every point of the file must have (subset match)

    @property
    def dead_letters(self) -> int:
        if self.dead is not None:
            return self.dead
        return 1 if self.status == "failed" else 0


def pattern(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A deterministic noisy image (content depends on seed)."""
    rng = np.random.default_rng(seed)
    w, h = size
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2, seed % 3] = 255
    img = Image.fromarray(arr, "RGB")
    return img if mode == "RGB" else img.convert(mode)


def encode(img: Image.Image, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def write_av(path: Path, seconds: float, video: bool = True, audio: bool = False, fps: int = 8,
             size: tuple[int, int] = (64, 48), audio_codec: str = "aac", audio_seconds: float | None = None) -> None:
    """A short clip with a video stream, an audio stream (sine tone, audio_seconds long: default
    seconds), or both (PyAV)."""
    rate = 16000
    with av.open(str(path), "w") as out:
        vs = out.add_stream("mpeg4", rate=fps) if video else None
        if vs is not None:
            vs.width, vs.height, vs.pix_fmt = size[0], size[1], "yuv420p"
        aus = out.add_stream(audio_codec, rate=rate) if audio else None
        if aus is not None:
            aus.layout = "mono"
            aus.time_base = Fraction(1, rate)
        if vs is not None:
            for i in range(int(round(seconds * fps))):
                arr = np.zeros((size[1], size[0], 3), np.uint8)
                arr[..., 0] = (i * 20) % 256
                arr[:, (i * 5) % size[0]:, 1] = 200
                for packet in vs.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                    out.mux(packet)
            for packet in vs.encode():
                out.mux(packet)
        if aus is not None:
            frame_size = aus.codec_context.frame_size or 1024
            total = int((seconds if audio_seconds is None else audio_seconds) * rate)
            t = np.arange(total) / rate
            samples = (0.3 * np.sin(2 * math.pi * 440 * t)).astype(np.float32)
            fmt = aus.codec_context.format.name if aus.codec_context.format else "fltp"
            for start in range(0, total, frame_size):
                chunk = samples[start:start + frame_size]
                if len(chunk) < frame_size:
                    chunk = np.pad(chunk, (0, frame_size - len(chunk)))
                frame = av.AudioFrame.from_ndarray(chunk[None, :], format="fltp", layout="mono")
                frame.sample_rate = rate
                frame.pts = start
                frame.time_base = Fraction(1, rate)
                if fmt != "fltp":
                    frame = av.AudioResampler(format=fmt, layout="mono", rate=rate).resample(frame)[0]
                for packet in aus.encode(frame):
                    out.mux(packet)
            for packet in aus.encode():
                out.mux(packet)


def long_text(n_paragraphs: int = 60) -> str:
    words = ["apples", "rivers", "engines", "violins", "glaciers", "lanterns", "orbits", "meadows"]
    return "\n\n".join(f"Paragraph {i}: the ingestion job reads objects, cuts them into units and embeds each "
                       f"unit; this paragraph is about {words[i % len(words)]} number {i}."
                       for i in range(n_paragraphs))


def _write(root: Path, rel: str, data: bytes) -> None:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def make_unusual_corpus(root: Path, text_chunks) -> dict[str, Expect]:
    """Unusual but valid files. `text_chunks(text) -> int` gives the chunk count of a text."""
    root = Path(root)
    exp: dict[str, Expect] = {}
    frames = [pattern(10 + i, (48, 40)).convert("P") for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display upright
    gray16 = Image.fromarray((np.linspace(0, 65535, 64 * 48).reshape(48, 64)).astype(np.uint16))
    palette_t = pattern(5, (40, 30)).convert("P")
    palette_t.info["transparency"] = 0
    images = {
        "images/animated.gif": (gif.getvalue(), {"mime": "image/gif", "frames": 3}),  # first frame is embedded
        "images/gray16.png": (encode(gray16, "PNG"), {"mime": "image/png"}),
        "images/gray.png": (encode(pattern(1, (50, 40), "L"), "PNG"), {"mime": "image/png"}),
        "images/palette.png": (encode(pattern(2, (50, 40), "P"), "PNG"), {"mime": "image/png"}),
        "images/palette_transparent.gif": (encode(palette_t, "GIF"), {"mime": "image/gif"}),
        "images/cmyk.jpg": (encode(pattern(3, (64, 48), "CMYK"), "JPEG"), {"mime": "image/jpeg"}),
        "images/alpha.png": (encode(pattern(4, (64, 48), "RGBA"), "PNG"), {"mime": "image/png"}),
        "images/gray_alpha.png": (encode(pattern(6, (32, 32), "LA"), "PNG"), {"mime": "image/png"}),
        "images/alpha.webp": (encode(pattern(7, (40, 40), "RGBA"), "WEBP"), {"mime": "image/webp"}),
        "images/rotated.jpg": (encode(pattern(8, (90, 60)), "JPEG", exif=exif),
                               {"mime": "image/png", "width": 60, "height": 90}),  # upright, re-encoded
        "images/one_pixel.png": (encode(Image.new("RGB", (1, 1), (200, 10, 10)), "PNG"),
                                 {"width": 1, "height": 1}),
        "images/png_named.jpg": (encode(pattern(9, (40, 40)), "PNG"), {"mime": "image/png"}),  # content wins
        "images/tall_ok.png": (encode(pattern(11, (3, 500)), "PNG"), {"width": 3, "height": 500}),  # 167:1
    }
    for rel, (data, check) in images.items():
        _write(root, rel, data)
        exp[rel] = Expect("ingested", 1, check={"modality": "image", **check})

    names = ["names/with space.txt", "names/ünïcödé 日本語.txt", "names/hash#tag.txt", "names/question?.txt",
             "names/percent%20twenty.txt", "names/a/b/c/d/deeply nested.md"]
    for i, rel in enumerate(names):
        _write(root, rel, f"A short note number {i} in a file with an unusual name.".encode())
        exp[rel] = Expect("ingested", 1, check={"modality": "text"})

    text = long_text()
    _write(root, "texts/very_long.txt", text.encode())
    n = text_chunks(text)
    assert n >= 8, n
    exp["texts/very_long.txt"] = Expect("ingested", n, check={"modality": "text"})

    (root / "videos").mkdir(parents=True, exist_ok=True)
    write_av(root / "videos/with_audio.mp4", 2.0, video=True, audio=True)  # 2 segments of 1 s
    exp["videos/with_audio.mp4"] = Expect("ingested", 2, check={"modality": "video"})
    _write(root, "docs/two_pages.pdf", make_pdf(["First page: apples", "Second page: pears"]))
    exp["docs/two_pages.pdf"] = Expect("ingested", 2, check={"modality": "pdf_page"})
    return exp


def _zero_page_pdf() -> bytes:
    return make_pdf([])


def make_malformed_corpus(root: Path, is_root: bool) -> dict[str, Expect]:
    """Malformed, hostile and unsupported files, each with its expected outcome."""
    root = Path(root)
    exp: dict[str, Expect] = {}
    rng = np.random.default_rng(7)
    jpeg = encode(pattern(20, (120, 90)), "JPEG")
    png = encode(pattern(21, (120, 90)), "PNG")
    big = Image.new("L", (2000, 2000))  # 4 Mpx, compresses to a few KB: over LIMITS["max_image_pixels"]
    files = {
        "bad/empty.jpg": (b"", r"EmptyFileError: empty file"),
        "bad/empty.pdf": (b"", r"EmptyFileError: empty file"),
        "bad/empty.mp4": (b"", r"EmptyFileError: empty file"),
        "bad/empty.txt": (b"", r"EmptyFileError: empty file"),
        "bad/blank.txt": (b"  \n\t\n   ", r"EmptyTextError: empty text"),
        "bad/truncated.jpg": (jpeg[: len(jpeg) // 2], r"(?i)truncated|corrupt"),
        "bad/truncated.png": (png[: len(png) // 2], r"(?i)truncated|corrupt"),
        "bad/random.png": (b"\x00RND" + rng.bytes(3000), r"(?i)not a readable image|cannot identify"),
        "bad/random.webp": (rng.bytes(2000).replace(b"RIFF", b"RIFX"), r"(?i)not a readable image"),
        "bad/bomb.png": (encode(big, "PNG"), r"ImageTooLargeError: .*4000000 pixels.*1000000"),
        "bad/too_wide.png": (encode(Image.new("RGB", (2010, 10)), "PNG"), r"ImageAspectError: aspect ratio 201"),
        "bad/encrypted.pdf": (make_pdf(["secret"], encrypted=True), r"PdfEncryptedError: .*password"),
        "bad/corrupt.pdf": (b"%PDF-1.4\n1 0 obj << /Type /Catalog >>\nno xref, no pages\n", r"PdfCorruptError"),
        "bad/zero_pages.pdf": (_zero_page_pdf(), r"PdfEmptyError: PDF has no pages"),
        "bad/four_pages.pdf": (make_pdf(["1", "2", "3", "4"]), r"PdfTooManyPagesError: PDF has 4 pages, over the cap of 3"),
        "bad/huge_page.pdf": (make_pdf(["big"], size=(5000, 5000)),
                              r"PdfPageTooLargeError: page 1 would render to 25000000 pixels, over the limit of 1000000"),
        "bad/too_big.txt": (b"x" * (1024 * 1024 + 1), r"ObjectTooLargeError: object is 1048577 bytes, over max_object_bytes=1048576"),
        "bad/corrupt.mp4": (b"\x00\x00\x00\x18ftypisom" + rng.bytes(4000), r"VideoCorruptError"),
        "bad/invalid_utf8.txt": (b"valid start then \xc3\x28 broken \xff bytes\n", r"TextDecodeError: invalid UTF-8"),
        "bad/binary.txt": (b"\x7fELF\x02\x01\x01\x00" + rng.bytes(500), r"TextDecodeError: binary content"),
        "bad/utf16.txt": ("hello".encode("utf-16"), r"TextDecodeError: UTF-16"),
    }
    for rel, (data, reason) in files.items():
        _write(root, rel, data)
        exp[rel] = Expect("failed", reason=reason)

    # A file name that is not valid UTF-8 (byte 0xff): reported under its printable form, not stored.
    with open(os.path.join(os.fsencode(root / "bad"), b"name\xff.txt"), "wb") as f:
        f.write(b"A fine text under a name no UTF-8 payload can hold.")
    exp["bad/name\\xff.txt"] = Expect("failed", reason=r"InvalidFileName: .*not valid UTF-8")

    write_av(root / "bad/audio_only.mp4", 1.0, video=False, audio=True)
    exp["bad/audio_only.mp4"] = Expect("failed", reason=r"VideoNoStreamError: file has no video stream")
    write_av(root / "bad/too_long.mp4", 4.0, fps=4)
    exp["bad/too_long.mp4"] = Expect("failed", reason=r"VideoTooLongError: video is 4\.0 s long, over the cap of 2\.5 s")

    for rel, data in {"skip/program.exe": b"MZ\x90\x00" + rng.bytes(100), "skip/archive.zip": b"PK\x03\x04" + rng.bytes(100),
                      "skip/data.json": b'{"a": 1}', "skip/table.csv": b"a,b\n1,2\n", "skip/NOEXT": b"just bytes",
                      "skip/empty.bin": b""}.items():
        _write(root, rel, data)
        exp[rel] = Expect("skipped")

    # Local-source hazards: symlink loops, dangling links, special files, unreadable files.
    (root / "links").mkdir(parents=True, exist_ok=True)
    os.symlink(".", root / "links/loop_dir")  # a folder linking back to its parent
    os.symlink("self_loop.txt", root / "links/self_loop.txt")  # ELOOP
    os.symlink("missing_target.txt", root / "links/dangling.txt")
    os.mkfifo(root / "links/pipe.txt")
    exp["links/loop_dir"] = Expect("failed", reason=r"SymlinkLoop")
    exp["links/self_loop.txt"] = Expect("failed", reason=r"SymlinkLoop")
    exp["links/dangling.txt"] = Expect("failed", reason=r"DanglingSymlink")
    exp["links/pipe.txt"] = Expect("failed", reason=r"NotARegularFile: .*FIFO")
    _write(root, "links/unreadable.txt", b"you cannot read me")
    os.chmod(root / "links/unreadable.txt", 0)
    # root reads every file whatever its mode: then the file is simply ingested
    exp["links/unreadable.txt"] = (Expect("ingested", 1) if is_root
                                   else Expect("failed", reason=r"PermissionError: file is not readable"))

    # A manifest whose good records land while every bad one is a dead letter of its own.
    _write(root, "refs/good.png", encode(pattern(30, (32, 32)), "PNG"))
    exp["refs/good.png"] = Expect("ingested", 1)
    os.mkfifo(root / "refs/pipe.png")
    exp["refs/pipe.png"] = Expect("failed", reason=r"NotARegularFile")
    (root / "refs/folder.png").mkdir()
    _write(root, "refs/locked.png", encode(pattern(31, (32, 32)), "PNG"))
    os.chmod(root / "refs/locked.png", 0)
    exp["refs/locked.png"] = (Expect("ingested", 1) if is_root
                              else Expect("failed", reason=r"PermissionError"))
    lines = [
        json.dumps({"id": "good-text", "text": "A good record about lanterns."}),
        "{this is not json",
        json.dumps({"id": "no-content", "caption": "no text, image or video"}),
        json.dumps({"id": "missing-file", "image": "does_not_exist.png"}),
        json.dumps({"id": "fifo", "image": "pipe.png"}),
        json.dumps({"id": "folder", "image": "folder.png"}),
        json.dumps({"id": "bad-image", "image": "../bad/truncated.jpg"}),
        json.dumps({"id": "good-mixed", "text": "A caption.", "image": "good.png"}),
        json.dumps({"id": "empty-text", "text": "  "}),
        json.dumps({"id": 3.5, "text": "id of a wrong type"}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"id": "good-text", "text": "duplicate id"}),
        json.dumps({"id": "locked", "image": "locked.png"}),
        "",
        json.dumps({"text": "A good record keyed by its line."}),
        json.dumps({"id": "lone\ud800", "text": "an id that is not valid Unicode"}),
        json.dumps({"id": "lone-text", "text": "text with a lone \udfff surrogate"}),
    ]
    _write(root, "refs/manifest.jsonl", ("\n".join(lines) + "\n").encode())
    good_records = 3 + (1 if is_root else 0)
    exp["refs/manifest.jsonl"] = Expect("ingested", good_records, dead=len(lines) - 1 - good_records,
                                        reason=None)  # per record: MANIFEST_RECORD_REASONS
    _write(root, "refs/all_bad.jsonl", b"{nope\n" + json.dumps({"image": "nowhere.png"}).encode() + b"\n")
    exp["refs/all_bad.jsonl"] = Expect("failed", dead=3, reason=r"InvalidJSON|FileNotFoundError|EmptyManifest")
    return exp


MANIFEST_RECORD_REASONS = {
    "record=2": r"InvalidJSON: line 2: invalid JSON",
    "record=no-content": r"InvalidRecord: .*none of text, image, video",
    "record=missing-file": r"FileNotFoundError: .*does_not_exist\.png",
    "record=fifo": r"NotARegularFileError: line 5: not a regular file \(FIFO\): .*pipe\.png",
    "record=folder": r"NotARegularFileError: line 6: not a regular file \(folder\): .*folder\.png",
    "record=bad-image": r"ImageValidationError: .*(truncated|corrupt)",
    "record=empty-text": r"InvalidRecord: line 9: field 'text' is empty",
    "record=10": r"InvalidRecord: line 10: field 'id' must be",
    "record=11": r"InvalidRecord: line 11: record is a list",
    "record=good-text": r"DuplicateId: line 12: record key 'good-text' already used",
    "record=16": r"InvalidUnicode: line 16: .*lone surrogate",
    "record=17": r"InvalidUnicode: line 17: .*lone surrogate",
}


def make_text_corpus(root: Path, n: int, prefix: str = "t", words: int = 12) -> dict[str, int]:
    """n small one-chunk text files; returns {relative path: 1}."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    out = {}
    for i in range(n):
        rel = f"{prefix}{i:03d}.txt"
        (root / rel).write_text(" ".join(f"word{i}_{k}" for k in range(words)) + ".")
        out[rel] = 1
    return out
