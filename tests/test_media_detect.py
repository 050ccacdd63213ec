"""Content-type sniffing: magic bytes first, extension second."""

from __future__ import annotations

import io

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.media.detect import HEAD_BYTES, Detection, detect, extension, from_extension, is_clean_text, sniff
from operators.media.expand import ExpandSettings, expand_object
from operators.media.listing import list_objects
from operators.units import SourceObject
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


def test_mp4_containers_are_told_by_their_brands(tmp_path) -> None:
    """ISO-BMFF also holds photos and audio: AVIF is an image, HEIF, .m4a audio and CR3 raw are not
    media this job embeds (skipped, not failed as broken video); a video stays a video."""
    import av
    import numpy as np

    def ftyp(major: bytes, *compatible: bytes) -> bytes:
        body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
        return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\x00\x00\x00\x08free"

    assert detect("IMG_0001.HEIC", ftyp(b"heic", b"mif1", b"heic")) == Detection("unsupported", "image/heif")
    assert detect("photo.mp4", ftyp(b"mif1", b"heic")) == Detection("unsupported", "image/heif")
    assert detect("raw.cr3", ftyp(b"crx ", b"isom")) == Detection("unsupported", "image/x-canon-cr3")
    assert detect("x.bin", ftyp(b"mif1", b"avif")) == Detection("image", "image/avif")
    assert detect("clip.mp4", ftyp(b"isom", b"iso2", b"mif1", b"mp41")) == Detection("video", "video/mp4")

    photo = tmp_path / "holiday.avif"
    pattern(3, (96, 64)).save(photo, format="AVIF")
    song = tmp_path / "song.m4a"
    with av.open(str(song), "w", format="ipod") as container:
        stream = container.add_stream("aac", rate=44100)
        for _ in range(10):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate = 44100
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    units, dead, status = expand_object(SourceObject(str(photo), photo.stat().st_size, "fp"), ExpandSettings())
    assert status == "ok" and [(u.modality, u.mime, u.meta["width"]) for u in units] == [("image", "image/avif", 96)]
    assert expand_object(SourceObject(str(song), song.stat().st_size, "fp"), ExpandSettings()) == (
        [], [], "skipped_unsupported")


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


# Prose that begins with a printable-ASCII signature, one file per such signature in detect.py.
PROSE_WITH_MAGIC = {
    "par1.txt": b"PAR1 of the novel: it was a dark and stormy night.\n",
    "pdfnote.md": b"%PDF-1.7 is the header every PDF starts with; this note explains it.\n",
    "gif.txt": b"GIF89a was the 1989 revision of the GIF format.\n",
    "gif87.rst": b"GIF87a came first.\n",
    "riff.markdown": b"RIFF1234WEBP looks like a WebP header but this is a sentence.\n",
    "accents.text": "PAR1 : le premier chapitre, écrit à Zürich — «café».\n".encode(),
}


def _head(path) -> bytes:
    """The bytes the expand stage hands to detect: the first HEAD_BYTES of the file."""
    with open(path, "rb") as fh:
        return fh.read(HEAD_BYTES)


@pytest.mark.parametrize("name", sorted(PROSE_WITH_MAGIC))
def test_printable_magic_does_not_override_a_text_extension_on_clean_text(tmp_path, name: str) -> None:
    path = tmp_path / name
    path.write_bytes(PROSE_WITH_MAGIC[name])
    head = _head(path)
    assert sniff(head) is not None  # the head really does spell a signature
    assert detect(str(path), head) == from_extension(str(path))
    assert detect(str(path), head).kind == "text"


@pytest.mark.parametrize("name", ["par1.bin", "par1", "pdfnote.jpg", "gif.pdf"])
def test_printable_magic_still_wins_without_a_text_extension(tmp_path, name: str) -> None:
    """Only a text extension yields to clean text: elsewhere magic wins, as documented."""
    body = {"par1": PROSE_WITH_MAGIC["par1.txt"], "pdfnote": PROSE_WITH_MAGIC["pdfnote.md"], "gif": PROSE_WITH_MAGIC["gif.txt"]}
    path = tmp_path / name
    path.write_bytes(body[name.split(".")[0]])
    assert detect(str(path), _head(path)) == sniff(_head(path))


def _parquet_bytes() -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table({"id": ["a"], "text": ["hello"]}), buf)
    return buf.getvalue()


@pytest.mark.parametrize(
    ("name", "make", "kind", "mime"),
    [
        ("png.txt", lambda: PNG, "image", "image/png"),
        ("jpeg.md", lambda: encode(pattern(3, (8, 8)), "JPEG"), "image", "image/jpeg"),
        ("tiff.txt", lambda: encode(pattern(3, (8, 8)), "TIFF"), "image", "image/tiff"),
        ("bmp.txt", lambda: encode(pattern(3, (8, 8)), "BMP"), "image", "image/bmp"),
        ("webp.txt", lambda: encode(pattern(3, (8, 8)), "WEBP"), "image", "image/webp"),
        ("real.gif.txt", lambda: encode(pattern(3, (8, 8)), "GIF"), "image", "image/gif"),
        ("real.pdf.md", lambda: make_pdf(["x"]), "pdf", "application/pdf"),
        ("real.parquet.txt", _parquet_bytes, "manifest", "application/vnd.apache.parquet"),
        ("mp4.txt", lambda: b"\x00\x00\x00\x18ftypisom" + b"\x00" * 20, "video", "video/mp4"),
        ("webm.txt", lambda: b"\x1a\x45\xdf\xa3\x9f\x42\x86\x81\x01\x42\x82\x84webm", "video", "video/webm"),
    ],
)
def test_real_media_named_as_text_is_still_media(tmp_path, name: str, make, kind: str, mime: str) -> None:
    """Binary signatures win over a text name; so do printable ones when the head is not clean text."""
    path = tmp_path / name
    path.write_bytes(make())
    assert detect(str(path), _head(path)) == Detection(kind, mime)


@pytest.mark.parametrize(
    "body",
    [
        b"PAR1 of the novel\x00 with a NUL byte",  # NUL: not text
        b"%PDF-1.7 then \xff\xfe bytes that are not UTF-8",
        b"GIF89a\x0a\x00\x0a\x00\xf7\x00\x00",  # a real GIF's screen descriptor
    ],
)
def test_printable_magic_with_an_unclean_head_still_wins(tmp_path, body: bytes) -> None:
    path = tmp_path / "note.txt"
    path.write_bytes(body)
    assert detect(str(path), _head(path)).kind != "text"


def test_clean_text_is_decided_on_the_sampled_head_only(tmp_path) -> None:
    """A character cut off by the HEAD_BYTES sample is not a decoding error; bytes past the head are not read."""
    cut = b"PAR1 " + "é".encode() * HEAD_BYTES  # 2-byte characters: byte HEAD_BYTES splits one
    with pytest.raises(UnicodeDecodeError, match="unexpected end of data"):
        cut[:HEAD_BYTES].decode("utf-8")  # the sample does split a character
    (tmp_path / "cut.txt").write_bytes(cut)
    assert detect(str(tmp_path / "cut.txt"), _head(tmp_path / "cut.txt")).kind == "text"
    late = b"PAR1 " + b"x" * HEAD_BYTES + b"\xff\x00 binary after the head"
    (tmp_path / "late.txt").write_bytes(late)
    assert detect(str(tmp_path / "late.txt"), _head(tmp_path / "late.txt")).kind == "text"
    assert is_clean_text(cut[:HEAD_BYTES]) and not is_clean_text(b"PAR1\xff")


def test_prose_with_magic_expands_to_text_chunks(tmp_path) -> None:
    """End to end through expand_object: the reviewer's files become text units, not dead letters."""
    for name, body in PROSE_WITH_MAGIC.items():
        (tmp_path / name).write_bytes(body)
    (tmp_path / "png.txt").write_bytes(PNG)
    objects, dead = list_objects(str(tmp_path))
    assert dead == [] and len(objects) == len(PROSE_WITH_MAGIC) + 1
    for obj in objects:
        units, dead, status = expand_object(obj, ExpandSettings(chunk_tokens=64, overlap_tokens=8))
        assert (status, dead) == ("ok", []), obj.uri
        want = "image" if obj.uri.endswith("png.txt") else "text"
        assert [u.modality for u in units] == [want], obj.uri
        if want == "text":
            assert units[0].text.strip() == PROSE_WITH_MAGIC[obj.uri.rsplit("/", 1)[-1]].decode().strip()
