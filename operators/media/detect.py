"""Sniff what an object is: magic bytes first, file extension second.

Kinds: ``text``, ``image``, ``pdf``, ``video``, ``manifest``, ``unsupported``.

- Magic bytes win over the name: a PNG named ``.jpg`` is ``image/png``; a PDF
  named ``.bin`` is a PDF.
- Except for prose: under a text extension, a signature made only of printable
  ASCII (``%PDF-``, ``PAR1``, ``GIF87a``/``GIF89a``, ``RIFF....WEBP``) does not
  win when the sampled head is clean text (valid UTF-8, no NUL byte):
  ``PAR1 of the novel`` in ``par1.txt`` is text. Binary signatures (PNG, JPEG,
  TIFF, BMP, MP4/MOV boxes, EBML) still win, so a PNG named ``.txt`` is an image.
- An ISO-BMFF file (MP4/MOV boxes) is told by its ftyp brands: AVIF is an image;
  HEIF/HEIC photos, audio-only MPEG-4 (``.m4a``) and Canon CR3 raw files are
  ``unsupported``, whatever their name; anything else is video.
- Without recognised magic the extension decides. An image/PDF/video/parquet
  extension on bytes without the matching magic still gets that kind, so the
  object then FAILS validation (random bytes named ``.png`` is a broken image,
  not a skipped file).
- Text is ``.txt .text .md .markdown .rst`` only. ``.json``/``.csv``/``.html``
  and other structured formats are not embedded as prose: they are
  ``unsupported`` (skipped, not failed). ``.jsonl`` is a manifest.
- Anything else (``.exe``, ``.zip``, ``.bin``, no extension...) is
  ``unsupported``, counted as skipped.
"""

from __future__ import annotations

import codecs
import posixpath
from dataclasses import dataclass

HEAD_BYTES = 4096  # how many leading bytes detection wants

TEXT_EXTENSIONS = {".txt": "text/plain", ".text": "text/plain", ".md": "text/markdown", ".markdown": "text/markdown", ".rst": "text/x-rst"}
IMAGE_EXTENSIONS = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".webp": "image/webp",
    ".gif": "image/gif",
    ".bmp": "image/bmp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".avif": "image/avif",
}
VIDEO_EXTENSIONS = {".mp4": "video/mp4", ".m4v": "video/mp4", ".mov": "video/quicktime", ".webm": "video/webm", ".mkv": "video/x-matroska"}
MANIFEST_EXTENSIONS = {".jsonl": "application/jsonl", ".parquet": "application/vnd.apache.parquet"}
PDF_EXTENSIONS = {".pdf": "application/pdf"}

_BMP_DIB_SIZES = {12, 16, 40, 52, 56, 64, 108, 124}
_MP4_BOXES = (b"ftyp", b"moov", b"mdat", b"wide", b"free", b"skip", b"pnot")
# ISO-BMFF is also the container of photos and audio: its ftyp box's brands (major, then
# compatible) tell them from video. AVIF photos are images (Pillow reads them); HEIF/HEIC photos
# (no decoder here), audio-only MPEG-4 and Canon raw files are not media this job embeds.
_AVIF_BRANDS = {b"avif", b"avis"}
_HEIF_BRANDS = {b"mif1", b"msf1", b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif2", b"miaf"}
_AUDIO_BRANDS = {b"M4A ", b"M4B ", b"M4P ", b"F4A ", b"F4B "}
_RAW_BRANDS = {b"crx "}


@dataclass(frozen=True)
class Detection:
    """What an object is: its kind and MIME type."""

    kind: str  # text | image | pdf | video | manifest | unsupported
    mime: str


def extension(uri: str) -> str:
    """Lower-case extension (with the dot) of a URI's last path component.

    Only http(s) URLs have a query string: in local paths and object-store keys
    ``?`` and ``#`` are ordinary characters (``notes?.txt`` is a .txt file).
    """
    name = uri.rsplit("/", 1)[-1]
    if uri.lower().startswith(("http://", "https://")):
        name = name.split("?", 1)[0].split("#", 1)[0]
    return posixpath.splitext(name)[1].lower()


def _ftyp_brands(head: bytes, size: int) -> list[bytes]:
    """The major brand, then the compatible ones, of an ftyp box of `size` bytes at the head."""
    box = head[8:size]
    return [box[:4]] + [box[i : i + 4] for i in range(8, len(box) - 3, 4)]


def _sniff_ftyp(head: bytes, size: int) -> Detection:
    """What an ISO-BMFF file is by its brands: video unless a photo, audio or raw brand says otherwise."""
    brands = _ftyp_brands(head, size)
    if _AVIF_BRANDS & set(brands):
        return Detection("image", "image/avif")
    major = brands[0]
    # The major brand decides between kinds: a video may list "mif1" among its compatible brands.
    if major in _HEIF_BRANDS:
        return Detection("unsupported", "image/heif")
    if major in _AUDIO_BRANDS:
        return Detection("unsupported", "audio/mp4")
    if major in _RAW_BRANDS:
        return Detection("unsupported", "image/x-canon-cr3")
    return Detection("video", "video/quicktime" if major == b"qt  " else "video/mp4")


def _sniff_container(head: bytes) -> Detection | None:
    """ISO-BMFF (mp4/mov; photo and audio brands told apart) or EBML (webm/mkv) containers."""
    size = int.from_bytes(head[:4], "big")
    if len(head) >= 12 and head[4:8] == b"ftyp" and 8 <= size <= 4096:
        return _sniff_ftyp(head, size)
    if len(head) >= 12 and head[4:8] in _MP4_BOXES and head[0] == 0:  # box size < 16 MiB: never text
        return Detection("video", "video/quicktime")
    if head.startswith(b"\x1a\x45\xdf\xa3"):
        return Detection("video", "video/webm" if b"webm" in head[:64] else "video/x-matroska")
    return None


def _sniff_image(head: bytes) -> Detection | None:
    """JPEG, PNG, GIF, WebP, BMP and TIFF signatures."""
    if head.startswith(b"\xff\xd8\xff"):
        return Detection("image", "image/jpeg")
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return Detection("image", "image/png")
    if head[:6] in (b"GIF87a", b"GIF89a"):
        return Detection("image", "image/gif")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return Detection("image", "image/webp")
    if head[:4] in (b"II*\x00", b"MM\x00*"):
        return Detection("image", "image/tiff")
    if head[:2] == b"BM" and len(head) >= 18 and int.from_bytes(head[14:18], "little") in _BMP_DIB_SIZES:
        return Detection("image", "image/bmp")
    return None


# How many leading bytes each kind's signature checks (what sniff() compared), keyed by MIME.
# A signature whose checked bytes are all printable ASCII can also begin ordinary prose.
_SIGNATURE_SPAN = {
    "application/pdf": 5,  # %PDF-
    MANIFEST_EXTENSIONS[".parquet"]: 4,  # PAR1
    "image/jpeg": 3,
    "image/png": 8,
    "image/gif": 6,  # GIF87a / GIF89a
    "image/webp": 12,  # RIFF, a little-endian size, WEBP: printable when the size bytes happen to be
    "image/tiff": 4,
    "image/bmp": 18,  # BM ... and the DIB header size, whose high bytes are NUL
    "image/avif": 12,  # as mp4: box size, ftyp, brand
    "image/heif": 12,
    "audio/mp4": 12,
    "image/x-canon-cr3": 12,
    "video/mp4": 12,  # box size (NUL high bytes), ftyp, brand
    "video/quicktime": 8,  # box size (NUL first byte), box type
    "video/webm": 4,  # EBML: 0x1a is a control byte
    "video/x-matroska": 4,
}


def sniff(head: bytes) -> Detection | None:
    """Kind from magic bytes alone, or None when nothing is recognised."""
    if head.startswith(b"%PDF-"):  # junk before the header: the .pdf extension still routes it
        return Detection("pdf", "application/pdf")
    if head.startswith(b"PAR1"):
        return Detection("manifest", MANIFEST_EXTENSIONS[".parquet"])
    return _sniff_image(head) or _sniff_container(head)


def printable_signature(found: Detection, head: bytes) -> bool:
    """True when the signature sniff() matched in head is printable ASCII (it could start prose)."""
    span = head[: _SIGNATURE_SPAN.get(found.mime, len(head))]
    return bool(span) and all(0x20 <= b < 0x7F for b in span)


def is_clean_text(head: bytes) -> bool:
    """True when the sampled head (first HEAD_BYTES) is valid UTF-8 without a NUL byte."""
    sample = head[:HEAD_BYTES]
    if b"\x00" in sample:
        return False
    try:
        # Not final: a multi-byte character cut off by the sample's end continues past it. Were
        # it really cut off at the end of the file, text decoding fails it later, as it should.
        codecs.getincrementaldecoder("utf-8")().decode(sample, final=False)
    except UnicodeDecodeError:
        return False
    return True


def from_extension(uri: str) -> Detection:
    """Kind from the file extension alone."""
    ext = extension(uri)
    for kind, table in (("text", TEXT_EXTENSIONS), ("image", IMAGE_EXTENSIONS), ("pdf", PDF_EXTENSIONS), ("video", VIDEO_EXTENSIONS), ("manifest", MANIFEST_EXTENSIONS)):
        if ext in table:
            return Detection(kind, table[ext])
    return Detection("unsupported", "application/octet-stream")


def detect(uri: str, head: bytes) -> Detection:
    """Kind and MIME of an object from its first bytes (magic first, bar printable magic in clean text) and its name."""
    found = sniff(head)
    if found is None:
        return from_extension(uri)
    if extension(uri) in TEXT_EXTENSIONS and printable_signature(found, head) and is_clean_text(head):
        # Prose can start with "PAR1 of the novel" or "%PDF-1.7 is the header...": printable
        # magic is weak evidence against a text name. Only the first HEAD_BYTES are read before
        # routing, so the head decides. Real PDF/Parquet/GIF files nearly always have binary
        # bytes there (the PDF binary-marker comment, Parquet's Thrift page header, GIF's
        # little-endian screen size and palette); a text file whose bytes past the head are not
        # UTF-8 then fails text decoding, as any bad .txt does.
        return from_extension(uri)
    # A parquet file is only ever a manifest; named .jsonl it still parses as parquet.
    return found
