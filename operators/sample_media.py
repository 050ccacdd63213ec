"""Generated sample media: PDFs, video clips and images made locally (no downloads).

Used by `qvl sample-data` to give the embedded default config something to ingest,
and by the tests to generate their corpora.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

VIDEO_FPS = 8
VIDEO_SIZE = (64, 48)


def make_pdf(pages: list[str], size: tuple[int, int] = (200, 150), encrypted: bool = False) -> bytes:
    """A valid PDF with one text line and a coloured box per page (encrypted: needs an unknown password)."""
    n = len(pages)
    font = 3 + 2 * n
    objs = [b"<< /Type /Catalog /Pages 2 0 R >>", f"<< /Type /Pages /Kids [{' '.join(f'{3 + 2 * i} 0 R' for i in range(n))}] /Count {n} >>".encode()]
    for i, text in enumerate(pages):
        objs.append(
            f"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 {size[0]} {size[1]}] /Resources << /Font << /F1 {font} 0 R >> >> /Contents {4 + 2 * i} 0 R >>".encode()
        )
        esc = text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")
        r, g, b = ((i * 0.37 + k * 0.29) % 1 for k in range(3))
        stream = f"{r:.2f} {g:.2f} {b:.2f} rg 10 10 60 40 re f 0 0 0 rg BT /F1 14 Tf 20 100 Td ({esc}) Tj ET".encode("latin-1")
        objs.append(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
    objs.append(b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    trailer_extra = b""
    if encrypted:  # Standard handler R2 whose /U matches no password we know
        objs.append(b"<< /Filter /Standard /V 1 /R 2 /Length 40 /P -44 /O <" + b"11" * 32 + b"> /U <" + b"22" * 32 + b"> >>")
        trailer_extra = b" /Encrypt %d 0 R /ID [<00112233445566778899aabbccddeeff> <00112233445566778899aabbccddeeff>]" % len(objs)
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objs, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objs) + 1)
    for off in offsets:
        out += b"%010d 00000 n \n" % off
    out += b"trailer\n<< /Size %d /Root 1 0 R%s >>\nstartxref\n%d\n%%%%EOF\n" % (len(objs) + 1, trailer_extra, xref)
    return bytes(out)


def write_video(path: Path, n_frames: int, codec: str = "mpeg4", fps: int = VIDEO_FPS, size: tuple[int, int] = VIDEO_SIZE) -> None:
    """Encode a short moving-pattern clip with PyAV (container from the file extension)."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = size
        stream.pix_fmt = "yuv420p"
        for i in range(n_frames):
            arr = np.zeros((size[1], size[0], 3), np.uint8)
            arr[..., 0] = (i * 12) % 256
            arr[:, (i * 3) % size[0] :, 1] = 200
            arr[..., 2] = np.linspace(0, 255, size[0], dtype=np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(arr, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def pattern(seed: int, size: tuple[int, int], mode: str = "RGB") -> Image.Image:
    """A deterministic image whose content depends on `seed` (blocks of colour + noise)."""
    rng = np.random.default_rng(seed)
    w, h = size
    bands = 4 if mode == "RGBA" else 3
    arr = rng.integers(0, 64, (h, w, bands), dtype=np.uint8)
    arr[: h // 2, : w // 2, seed % 3] += 180
    if mode == "RGBA":
        arr[..., 3] = np.linspace(0, 255, w, dtype=np.uint8)[None, :]
    return Image.fromarray(arr, mode)


def encode(img: Image.Image, fmt: str, **kwargs: Any) -> bytes:
    """Encode an image to bytes."""
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kwargs)
    return buf.getvalue()


SAMPLE_TEXT = (
    "Qwen3-VL-Embedding maps text, images, visual documents and video into one vector space. "
    "This sample folder holds a few of each so the embedded default configuration has something to ingest."
)


def write_sample_media(out_dir: str | Path) -> list[Path]:
    """A small mixed-media folder: texts, images, a PDF, a video and a manifest."""
    root = Path(out_dir)
    (root / "images").mkdir(parents=True, exist_ok=True)
    files: dict[str, bytes] = {
        "readme.txt": SAMPLE_TEXT.encode(),
        "notes/retrieval.md": b"# Retrieval\n\nA cheap search on small MRL vectors, a rescore on full vectors, then reranking.",
        "images/red.png": encode(pattern(0, (160, 120)), "PNG"),
        "images/green.jpg": encode(pattern(1, (200, 150)), "JPEG"),
        "images/blue.webp": encode(pattern(2, (120, 160)), "WEBP"),
        "docs/report.pdf": make_pdf(["Quarterly report: page one", "Figures and tables: page two"]),
        "records.jsonl": (b'{"id": "r1", "text": "A red square", "image": "images/red.png", "source": "sample"}\n'
                          b'{"id": "r2", "text": "Just a caption without media"}\n'),
    }
    written = []
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        written.append(path)
    (root / "videos").mkdir(exist_ok=True)
    write_video(root / "videos" / "clip.mp4", n_frames=24)
    written.append(root / "videos" / "clip.mp4")
    return written
