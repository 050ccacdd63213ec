"""A small generated mixed-media corpus with the exact outcome expected for every file.

``make_corpus(root, settings, tokenizer)`` writes text, images, a PDF, videos,
manifests and malformed files under ``root`` and returns a ``CorpusSpec`` whose
per-file expectations (status, unit count, dead letters) hold for
``operators.media.expand.expand_object`` with the same settings and tokenizer, so
end-to-end tests can assert exact point counts. Also: ``make_pdf`` (hand-written
PDFs, optionally with an unusable password), ``write_video`` (PyAV), and
``make_test_tokenizer`` (a tiny locally trained byte-level BPE fast tokenizer).
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import av
import numpy as np
from PIL import Image

from operators.media.expand import ExpandSettings
from operators.media.text_chunks import chunk_spans, decode_text
from operators.media.video import video_segments

from operators.sample_media import VIDEO_FPS, VIDEO_SIZE, encode, make_pdf, pattern, write_video  # noqa: F401
MP4_FRAMES = 22  # 2.75 s
WEBM_FRAMES = 18  # 2.25 s
_EXT_KIND = {"txt": "text", "jpg": "image", "png": "image", "pdf": "pdf", "mp4": "video"}

LONG_TEXT = " ".join(
    f"Paragraph {i}: the ingestion pipeline lists objects, expands them into units, embeds every unit "
    f"and writes points to the vector store; item {i} talks about {word}."
    for i, word in enumerate(["apples", "rivers", "engines", "violins", "glaciers", "lanterns", "orbits", "meadows", "harbors", "comets", "deserts", "pianos"])
)


@dataclass(frozen=True)
class FileSpec:
    """What expanding one corpus file must give."""

    status: str  # ok | failed | skipped
    units: int  # units expected (0 unless ok)
    kind: str  # text | image | pdf | video | manifest | unsupported
    dead_letters: int = 0  # expand-stage dead letters (1 for a failed file)
    modalities: tuple[str, ...] = ()  # modality of each unit, in order


@dataclass
class CorpusSpec:
    """Every generated file (relative POSIX path → FileSpec) and a few handy totals."""

    root: Path
    files: dict[str, FileSpec] = field(default_factory=dict)

    def paths(self, status: str | None = None) -> list[str]:
        """Relative paths, optionally only those with the given status, sorted."""
        return sorted(p for p, s in self.files.items() if status is None or s.status == status)

    def count(self, status: str) -> int:
        """How many files end with `status`."""
        return len(self.paths(status))

    @property
    def total_units(self) -> int:
        """Units (= points) the whole corpus yields."""
        return sum(s.units for s in self.files.values())

    @property
    def total_dead_letters(self) -> int:
        """Expand-stage dead letters the whole corpus yields."""
        return sum(s.dead_letters for s in self.files.values())

    def uri(self, rel: str) -> str:
        """Absolute local path (the listing's URI) of a corpus file."""
        return str((self.root / rel).resolve())


def make_test_tokenizer() -> Any:
    """A tiny byte-level BPE `PreTrainedTokenizerFast` trained locally (no downloads)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=["<|endoftext|>"])
    tok.train_from_iterator([LONG_TEXT, "The quick brown fox jumps over the lazy dog."], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>")


def _images() -> dict[str, bytes]:
    """The valid image files, one per format (plus a mislabelled PNG and an EXIF-rotated JPEG)."""
    exif = Image.Exif()
    exif[0x0112] = 6
    frames = [pattern(20 + i, (48, 40)).convert("P") for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return {
        "images/photo.jpg": encode(pattern(1, (160, 120)), "JPEG", quality=90),
        "images/red.png": encode(pattern(2, (64, 64)), "PNG"),
        "images/alpha.png": encode(pattern(3, (80, 60), "RGBA"), "PNG"),
        "images/pic.webp": encode(pattern(4, (120, 90)), "WEBP", quality=90),
        "images/anim.gif": gif.getvalue(),
        "images/bitmap.bmp": encode(pattern(5, (50, 40)), "BMP"),
        "images/scan.tiff": encode(pattern(6, (100, 200)), "TIFF"),
        "images/mislabelled.jpg": encode(pattern(7, (40, 40)), "PNG"),
        "images/rotated.jpg": encode(pattern(8, (90, 60)), "JPEG", exif=exif),
    }


def _texts() -> dict[str, bytes]:
    """The valid text files."""
    return {
        "texts/short.txt": b"A short note about red squares.\n",
        "texts/notes.md": "# Notes\n\nMarkdown with *emphasis* and a list:\n\n- one\n- two\n".encode(),
        "texts/long.txt": LONG_TEXT.encode(),
        "texts/unicode.txt": "\ufeffUnicode: café, naïve, 日本語, emoji 🙂.\n".encode(),
    }


def _manifests() -> dict[str, bytes]:
    """A JSONL and a Parquet manifest pointing at corpus files by relative path."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = [
        {"id": "t1", "text": "A caption about apples and rivers.", "lang": "en"},
        {"id": "i1", "image": "../images/red.png", "caption": "red"},
        {"id": "ti1", "text": "A photo with a caption.", "image": "../images/photo.jpg", "tags": ["a", "b"]},
        {"id": "v1", "video": "../videos/clip.mp4", "duration_hint": 2.75},
        {"text": "A record without an id, keyed by its line."},
    ]
    table = pa.table(
        {
            "id": ["p1", "p2", "p3"],
            "text": ["Parquet text record.", None, "Parquet text and image."],
            "image": [None, "../images/pic.webp", "../images/bitmap.bmp"],
            "score": [0.1, 0.2, 0.3],
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return {"manifests/records.jsonl": "\n".join(json.dumps(r) for r in jsonl).encode() + b"\n", "manifests/records.parquet": buf.getvalue()}


def _malformed() -> dict[str, bytes]:
    """Broken and unsupported files."""
    rng = np.random.default_rng(99)
    jpeg = encode(pattern(9, (120, 90)), "JPEG")
    return {
        "bad/empty.txt": b"",
        "bad/truncated.jpg": jpeg[: len(jpeg) // 2],
        "bad/random.png": b"\x00RND" + rng.integers(0, 256, 2000, dtype=np.uint8).tobytes(),
        "bad/corrupt.pdf": b"%PDF-1.4\n1 0 obj << /Type /Catalog /Pages 2 0 R >>\ngarbage without xref\n",
        "bad/corrupt.mp4": b"\x00\x00\x00\x18ftypisom" + rng.integers(0, 256, 3000, dtype=np.uint8).tobytes(),
        "bad/invalid_utf8.txt": b"valid start \xff\xfe then broken \xc3\x28 bytes\n",
        "bad/blob.bin": b"\x00BIN" + rng.integers(0, 256, 500, dtype=np.uint8).tobytes(),
    }


def _text_units(data: bytes, settings: ExpandSettings, tokenizer: Any) -> int:
    """How many chunks a text file gives under these settings."""
    return len(chunk_spans(decode_text(data), tokenizer, settings.chunk_tokens, settings.overlap_tokens))


def make_corpus(root: Path, settings: ExpandSettings | None = None, tokenizer: Any = None, include_malformed: bool = True) -> CorpusSpec:
    """Write the corpus under `root` and return what expanding each file must give."""
    settings = settings or ExpandSettings(chunk_tokens=64, overlap_tokens=8)
    root = Path(root)
    spec = CorpusSpec(root=root)
    files: dict[str, bytes] = {**_texts(), **_images(), "docs/three_pages.pdf": make_pdf(["Page one: apples", "Page two: bananas", "Page three: cherries"])}
    files.update(_manifests())
    if include_malformed:
        files.update(_malformed())
    for rel, data in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    (root / "videos").mkdir(parents=True, exist_ok=True)
    write_video(root / "videos/clip.mp4", MP4_FRAMES, "mpeg4")
    write_video(root / "videos/clip.webm", WEBM_FRAMES, "libvpx")

    for rel, data in _texts().items():
        n = _text_units(data, settings, tokenizer)
        spec.files[rel] = FileSpec("ok", n, "text", modalities=("text",) * n)
    for rel in _images():
        spec.files[rel] = FileSpec("ok", 1, "image", modalities=("image",))
    spec.files["docs/three_pages.pdf"] = FileSpec("ok", 3, "pdf", modalities=("pdf_page",) * 3)
    for rel, frames in (("videos/clip.mp4", MP4_FRAMES), ("videos/clip.webm", WEBM_FRAMES)):
        n = len(video_segments(frames / VIDEO_FPS, settings.video_segment_s, VIDEO_FPS))
        spec.files[rel] = FileSpec("ok", n, "video", modalities=("video",) * n)
    spec.files["manifests/records.jsonl"] = FileSpec("ok", 5, "manifest", modalities=("text", "image", "mixed", "video", "text"))
    spec.files["manifests/records.parquet"] = FileSpec("ok", 3, "manifest", modalities=("text", "image", "mixed"))
    if include_malformed:
        for rel in _malformed():
            if rel.endswith(".bin"):
                spec.files[rel] = FileSpec("skipped", 0, "unsupported")
            else:
                spec.files[rel] = FileSpec("failed", 0, _EXT_KIND[rel.rsplit(".", 1)[1]], dead_letters=1)
    return spec
