"""Turn one listed object into units (what gets one vector), dead letters and a status.

Status is ``ok`` (at least one unit; a manifest may still have per-record dead
letters, a PDF per-page ones), ``skipped_unsupported`` (not a kind we embed: no units, no dead letter)
or ``failed`` (no units; a dead letter naming why: exactly one, except a manifest
with no usable record, which gets one per bad record plus an ``EmptyManifest``
summary). ``expand_object`` never raises for a bad object. A zero-byte object
fails with "empty file" unless its extension is unsupported (then it is skipped:
with no bytes to sniff, the name decides).

Units per kind (position / modality / payload meta):
- text: ``chunk=<i>`` / text / ``chunk_index``, ``char_start``, ``char_end``
- image: ``image`` / image / ``width``, ``height`` (+ ``frames`` when animated)
- pdf: ``page=<n>`` (1-based) / pdf_page / ``page``, ``page_text``; ``Unit.image`` is the RGB PNG
- video: ``t=<start:.3f>-<end:.3f>`` / video / ``start_s``, ``end_s``, ``duration_s``, ``fps``;
  ``Unit.video`` is the object URI, ``video_start``/``video_end`` set
- manifest record: ``record=<id or line>`` / the record's single modality or mixed /
  ``metadata``, ``line``, ``record_id``, ``image_uri``/``video_uri`` (+ image size,
  video duration). Images are loaded into ``Unit.image``; videos stay URIs (whole
  video, no segment bounds).

Manifest units carry the manifest's fingerprint: a changed referenced file is not
noticed until the manifest itself changes.
"""

from __future__ import annotations

import contextlib
import math
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from operators.media.detect import HEAD_BYTES, Detection, detect, from_extension
from operators.media.images import PILLOW_DECODE_LIMIT, inspect_image
from operators.media.listing import fs_for, is_local_uri, local_path
from operators.media.manifest import ManifestRecord, RecordError, parse_manifest
from operators.media.pdf import PageFailure, render_pdf
from operators.media.reading import ObjectTooLargeError, is_http, is_unreachable, open_local_file, stream_http
from operators.media.text_chunks import chunk_spans, decode_text
from operators.media.video import probe_video, video_segments
from operators.units import DeadLetter, SourceObject, Unit

OK, SKIPPED, FAILED = "ok", "skipped_unsupported", "failed"


class EmptyFileError(ValueError):
    """A zero-byte object."""


class TokenizerUnavailableError(RuntimeError):
    """The embedder's tokenizer could not be loaded where a text object is expanded."""


@dataclass(frozen=True)
class TokenizerUnavailable:
    """Stands for the tokenizer when it could not be loaded: text objects fail with its error.

    Not cut on word pieces instead: their chunks would differ from those of the workers that
    have the tokenizer, and, their fingerprint unchanged, stay so at every later run.
    """

    error: BaseException


@dataclass(frozen=True)
class ExpandSettings:
    """How objects are cut into units, and the limits that protect the workers."""

    chunk_tokens: int = 512
    overlap_tokens: int = 64
    pdf_dpi: int = 144
    max_pdf_pages: int = 200
    video_segment_s: float = 30.0
    max_video_duration_s: float = 3600.0
    max_object_bytes: int = 512 * 1024 * 1024
    max_image_pixels: int = 89_478_485  # Pillow's default MAX_IMAGE_PIXELS; Pillow decodes at most twice that
    tokenizer_fallback: bool = True  # no tokenizer given: chunk on regex word pieces (else: fail text objects)

    def __post_init__(self) -> None:
        """Reject settings that cannot work."""
        if self.chunk_tokens <= 0 or not 0 <= self.overlap_tokens < self.chunk_tokens:
            raise ValueError(f"need chunk_tokens > 0 and 0 <= overlap_tokens < chunk_tokens, got {self.chunk_tokens}/{self.overlap_tokens}")
        for name in ("pdf_dpi", "max_pdf_pages", "video_segment_s", "max_video_duration_s", "max_object_bytes", "max_image_pixels"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.max_image_pixels > PILLOW_DECODE_LIMIT:
            raise ValueError(f"max_image_pixels must be <= {PILLOW_DECODE_LIMIT} (Pillow decodes nothing larger), "
                             f"got {self.max_image_pixels}")


def most_units(uri: str, size: int, cfg: ExpandSettings) -> int | None:
    """The most units an object can expand into, judged by its name and size; None when they tell nothing.

    A manifest has as many units as records, and an object without a known extension may turn
    out to be anything (its magic bytes decide): no bound. The bound trusts the name: a .txt file
    that holds Parquet still parses as a manifest, which costs that run's parallelism, nothing else.
    """
    kind = from_extension(uri).kind
    if kind == "image":
        return 1
    if kind == "text":
        # Every token is at least one byte and windows start every chunk - overlap tokens.
        return size // (cfg.chunk_tokens - cfg.overlap_tokens) + 2
    if kind == "pdf":
        return cfg.max_pdf_pages
    if kind == "video":
        return math.ceil(cfg.max_video_duration_s / cfg.video_segment_s)
    return None


# error_type of a manifest record whose media could not be reached (pipelines/ingest.py retries it).
UNREACHABLE = "Unreachable"


def _dead(uri: str, exc: BaseException, position: str | None = None, prefix: str = "") -> DeadLetter:
    """An expand-stage dead letter for an exception."""
    return DeadLetter(uri=uri, stage="expand", error_type=type(exc).__name__, message=f"{prefix}{exc}", position=position)


def _options_for(uri: str, base_uri: str, storage_options: dict[str, Any] | None) -> dict[str, Any] | None:
    """The storage options to use for `uri`: the base's when both share a scheme."""
    scheme = uri.split("://", 1)[0] if "://" in uri else "file"
    base = base_uri.split("://", 1)[0] if "://" in base_uri else "file"
    return storage_options if scheme == base else None


@contextlib.contextmanager
def _open(uri: str, storage_options: dict[str, Any] | None) -> Iterator[IO[bytes]]:
    """Open an object for binary reading (local files: regular files only, see open_local_file)."""
    if is_local_uri(uri):
        with open_local_file(local_path(uri)) as fh:
            yield fh
    else:
        fs, path = fs_for(uri, storage_options)
        with fs.open(path, "rb") as fh:
            yield fh


@contextlib.contextmanager
def _open_reference(uri: str, storage_options: dict[str, Any] | None, limit: int) -> Iterator[IO[bytes]]:
    """Open a manifest record's image or video; an http(s) URL is fetched whole first, at most limit bytes."""
    if is_http(uri):
        # fsspec's http has no timeout: a server that accepted and never answered held the record
        # until the watchdog took it for a hung decoder (a final letter, where an unreachable store
        # is tried again next run). stream_http bounds each wait and the whole download; it is the
        # model wrappers' fetch (qwen3vl/media_io.py), which reads the same URL at embedding, also
        # without storage options. To a file: a video is not held in memory.
        with tempfile.TemporaryFile(prefix="qvl-fetch-") as fh:
            stream_http(uri, fh, limit)
            fh.seek(0)
            yield fh
    else:
        with _open(uri, storage_options) as fh:
            yield fh


def _read_capped(fh: IO[bytes], head: bytes, limit: int, uri: str, listed: bool = True) -> bytes:
    """The rest of an open object after `head`, refusing to read more than `limit` bytes.

    listed: the object's listed size was under the limit already (a manifest's reference was not listed).
    """
    want = limit + 1 - len(head)
    size = _size_of(fh)
    if size is not None:  # read(n) reserves n bytes first: 512 MiB for each small image otherwise
        want = min(want, max(size - len(head), 0) + 1)  # one byte more notices a file that grew
    data = head + _read_fully(fh, want)
    if size is not None and len(data) > size:  # it grew since: the rest, up to the limit
        data += _read_fully(fh, limit + 1 - len(data))
    if len(data) > limit:
        raise ObjectTooLargeError(f"{uri} grew past max_object_bytes={limit} after listing" if listed
                                  else f"{uri} is over max_object_bytes={limit}")
    return data


def _read_fully(fh: IO[bytes], n: int) -> bytes:
    """Up to n bytes, fewer only at the end: a stream (HTTP without a length) returns what has arrived."""
    parts, got = [], 0
    while got < n:
        chunk = fh.read(n - got)
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _size_of(fh: IO[bytes]) -> int | None:
    """An open object's size (fsspec files know it; local files are stat'ed), or None."""
    size = getattr(fh, "size", None)
    if isinstance(size, int):
        return size
    try:
        return os.fstat(fh.fileno()).st_size
    except (AttributeError, OSError, ValueError):
        return None


def _check_size(fh: IO[bytes], limit: int, uri: str) -> None:
    """Refuse an open object over `limit` bytes without reading it."""
    size = _size_of(fh)
    if size is not None and size > limit:  # size unknown: the reader's own limits still apply
        raise ObjectTooLargeError(f"{uri} is {size} bytes, over max_object_bytes={limit}")


def _text_units(obj: SourceObject, det: Detection, data: bytes, cfg: ExpandSettings, tokenizer: Any) -> list[Unit]:
    """Token chunks of a text object."""
    if isinstance(tokenizer, TokenizerUnavailable):
        error = tokenizer.error
        raise TokenizerUnavailableError(
            f"the embedder's tokenizer cannot be loaded on this worker ({type(error).__name__}: {error}); the text is "
            "cut into its tokens only, and is tried again at the next run") from error
    if tokenizer is None and not cfg.tokenizer_fallback:
        raise ValueError("no tokenizer given and tokenizer_fallback is off")
    text = decode_text(data)
    spans = chunk_spans(text, tokenizer, cfg.chunk_tokens, cfg.overlap_tokens)
    return [
        Unit(obj.uri, obj.fingerprint, f"chunk={i}", "text", det.mime, text=text[s:e], meta={"chunk_index": i, "char_start": s, "char_end": e})
        for i, (s, e) in enumerate(spans)
    ]


def _image_units(obj: SourceObject, data: bytes, cfg: ExpandSettings) -> list[Unit]:
    """One unit for an image object."""
    info = inspect_image(data, cfg.max_image_pixels)
    meta: dict[str, Any] = {"width": info.width, "height": info.height}
    if info.frames > 1:
        meta["frames"] = info.frames
    return [Unit(obj.uri, obj.fingerprint, "image", "image", info.mime, image=info.data, meta=meta)]


# A dense page holds a few thousand characters. The cap keeps a page whose text layer is huge (a
# broken or hostile PDF) from making its point too large for an upsert, which fails the whole batch.
MAX_PAGE_TEXT = 65_536


def page_meta(number: int, text: str) -> dict[str, Any]:
    """A PDF page unit's payload fields: its number and text (cut at MAX_PAGE_TEXT characters, flagged)."""
    meta: dict[str, Any] = {"page": number, "page_text": text[:MAX_PAGE_TEXT]}
    if len(text) > MAX_PAGE_TEXT:
        meta["page_text_truncated"] = True
    return meta


def _pdf_units(obj: SourceObject, data: bytes, cfg: ExpandSettings) -> list[Unit | DeadLetter]:
    """One rendered-page unit per PDF page, a dead letter for a page that cannot be rendered; raises
    the first page's error when no page can be (the document fails as a whole)."""
    items: list[Unit | DeadLetter] = []
    failures: list[PageFailure] = []
    for page in render_pdf(data, cfg.pdf_dpi, cfg.max_pdf_pages, cfg.max_image_pixels):
        if isinstance(page, PageFailure):
            failures.append(page)
            items.append(_dead(obj.uri, page.error, f"page={page.number}"))
            continue
        n, png, text = page
        items.append(Unit(obj.uri, obj.fingerprint, f"page={n}", "pdf_page", "image/png", image=png,
                          meta=page_meta(n, text)))
    if len(failures) == len(items):
        raise failures[0].error
    return items


def _video_source(uri: str, fh: IO[bytes]) -> str | IO[bytes]:
    """What PyAV should read: the local path, or the open remote file (an http(s) one's fetched copy) from its start."""
    if is_local_uri(uri):
        return local_path(uri)
    fh.seek(0)
    return fh


def _video_units(obj: SourceObject, det: Detection, fh: IO[bytes], cfg: ExpandSettings) -> list[Unit]:
    """One unit per time segment of a video object."""
    info = probe_video(_video_source(obj.uri, fh), cfg.max_video_duration_s, cfg.max_image_pixels)
    units = []
    for start, end in video_segments(info.duration_s, cfg.video_segment_s, info.fps):
        meta = {"start_s": start, "end_s": end, "duration_s": info.duration_s, "fps": info.fps}
        units.append(
            Unit(obj.uri, obj.fingerprint, f"t={start:.3f}-{end:.3f}", "video", det.mime, video=obj.uri, video_start=start, video_end=end, meta=meta)
        )
    return units


def _record_unit(obj: SourceObject, rec: ManifestRecord, cfg: ExpandSettings, storage_options: dict[str, Any] | None) -> Unit:
    """The unit of one manifest record (loads and validates its image, probes its video)."""
    meta: dict[str, Any] = {"metadata": rec.metadata, "line": rec.line, "record_id": rec.id}
    image = None
    mime = "text/plain"
    if rec.video is not None:
        meta["video_uri"] = rec.video
        opts = _options_for(rec.video, obj.uri, storage_options)
        with _open_reference(rec.video, opts, cfg.max_object_bytes) as fh:
            # A remote video is copied whole to the embedding actor: the object cap applies to it too.
            _check_size(fh, cfg.max_object_bytes, rec.video)
            info = probe_video(_video_source(rec.video, fh), cfg.max_video_duration_s, cfg.max_image_pixels)
        meta["duration_s"] = info.duration_s
        mime = from_extension(rec.video).mime
    if rec.image is not None:
        meta["image_uri"] = rec.image
        with _open_reference(rec.image, _options_for(rec.image, obj.uri, storage_options), cfg.max_object_bytes) as fh:
            data = _read_capped(fh, b"", cfg.max_object_bytes, rec.image, listed=False)
        if not data:
            raise EmptyFileError(f"empty file: {rec.image}")
        info_img = inspect_image(data, cfg.max_image_pixels)
        image, mime = info_img.data, info_img.mime
        meta.update(width=info_img.width, height=info_img.height)
    return Unit(obj.uri, obj.fingerprint, f"record={rec.key}", rec.modality, mime, text=rec.text, image=image, video=rec.video, meta=meta)


def record_position(rec: ManifestRecord | RecordError) -> str:
    """A manifest record's unit position (``record=<id or line>``), its point's and its dead letter's."""
    if isinstance(rec, RecordError):
        return f"record={rec.id if rec.id is not None else rec.line}"
    return f"record={rec.key}"


def empty_manifest_letter(uri: str, bad: int) -> DeadLetter:
    """The summary letter of a manifest none of whose records gave a unit."""
    return DeadLetter(uri, "expand", "EmptyManifest", f"manifest yielded no usable record ({bad} bad records)")


class Expansion:
    """One object's expansion: its units and dead letters, or, for a manifest, its records to read one by one.

    A manifest's records are read by the caller, one at a time (read_record), so that it can pass
    each unit on before the next image is read, and watch and journal each record on its own.
    positions: how many units and per-unit dead letters the object has in all, known before any
    record is read, so each unit's payload can carry its object's point count (given when records
    are one range of the manifest's).
    """

    def __init__(self, obj: SourceObject, status: str, items: list[Unit | DeadLetter] | None = None,
                 records: list[ManifestRecord | RecordError] | None = None, cfg: ExpandSettings | None = None,
                 storage_options: dict[str, Any] | None = None, positions: int | None = None) -> None:
        self.obj, self.status = obj, status
        self.items = items or []
        self.records = records
        self._cfg, self._storage_options = cfg or ExpandSettings(), storage_options
        if positions is not None:  # records: one range of a manifest's (operators/expand_work.py)
            self.positions = positions
        elif records is not None:
            self.positions = len(records)
        else:
            self.positions = sum(1 for i in self.items if isinstance(i, Unit) or i.position is not None)

    def read_record(self, rec: ManifestRecord | RecordError) -> Unit | DeadLetter:
        """A manifest record's unit (its image loaded and checked, its video probed), or its dead letter; never raises."""
        uri = self.obj.uri
        if isinstance(rec, RecordError):
            return DeadLetter(uri, "expand", rec.error_type, f"line {rec.line}: {rec.message}", record_position(rec))
        try:
            return _record_unit(self.obj, rec, self._cfg, self._storage_options)
        except Exception as exc:  # one bad record never fails the manifest
            ref = rec.video if rec.video is not None else rec.image
            if is_unreachable(exc):  # not the record's fault: its object stays incomplete, retried next run
                return DeadLetter(uri, "expand", UNREACHABLE, f"line {rec.line}: cannot reach {ref}: "
                                  f"{type(exc).__name__}: {exc}", record_position(rec))
            named = "" if ref is None or ref in str(exc) else f"{ref}: "  # "The specified bucket does not exist"
            return _dead(uri, exc, record_position(rec), f"line {rec.line}: {named}")

    def read_all(self) -> tuple[list[Unit], list[DeadLetter], str]:
        """Units, dead letters and status, every record read."""
        items = self.items if self.records is None else [self.read_record(rec) for rec in self.records]
        units = [i for i in items if isinstance(i, Unit)]
        dead = [i for i in items if isinstance(i, DeadLetter)]
        if self.records is not None and not units:
            return [], [*dead, empty_manifest_letter(self.obj.uri, len(dead))], FAILED
        return units, dead, self.status


def _expand(obj: SourceObject, cfg: ExpandSettings, storage_options: dict[str, Any] | None, tokenizer: Any) -> Expansion:
    """start_expansion without the catch-all."""
    if obj.size > cfg.max_object_bytes:
        raise ObjectTooLargeError(f"object is {obj.size} bytes, over max_object_bytes={cfg.max_object_bytes}")
    if obj.size == 0:
        if from_extension(obj.uri).kind == "unsupported":
            return Expansion(obj, SKIPPED)
        raise EmptyFileError("empty file")
    with _open(obj.uri, storage_options) as fh:
        head = fh.read(HEAD_BYTES)
        if not head:
            raise EmptyFileError("empty file")
        det = detect(obj.uri, head)
        if det.kind == "unsupported":
            return Expansion(obj, SKIPPED)
        if det.kind == "video":
            return Expansion(obj, OK, _video_units(obj, det, fh, cfg))
        data = _read_capped(fh, head, cfg.max_object_bytes, obj.uri)
    if det.kind == "text":
        return Expansion(obj, OK, _text_units(obj, det, data, cfg, tokenizer))
    if det.kind == "image":
        return Expansion(obj, OK, _image_units(obj, data, cfg))
    if det.kind == "pdf":
        return Expansion(obj, OK, _pdf_units(obj, data, cfg))
    return Expansion(obj, OK, records=parse_manifest(data, obj.uri), cfg=cfg, storage_options=storage_options)


def start_expansion(obj: SourceObject, cfg: ExpandSettings, storage_options: dict[str, Any] | None = None,
                    tokenizer: Any = None) -> Expansion:
    """One object read and cut into units, or a manifest parsed into records to read; never raises."""
    try:
        return _expand(obj, cfg, storage_options, tokenizer)
    except FileNotFoundError as exc:  # listed, then gone: deleted (or renamed) after listing
        return Expansion(obj, FAILED, [_dead(obj.uri, exc, prefix="object not found: it was listed but is gone now (deleted after listing?): ")])
    except Exception as exc:
        return Expansion(obj, FAILED, [_dead(obj.uri, exc)])


def read_manifest(obj: SourceObject, cfg: ExpandSettings,
                  storage_options: dict[str, Any] | None = None) -> list[ManifestRecord | RecordError] | None:
    """A manifest object's records; None when it is empty, over the cap or not a manifest after all.

    Raises what reading or parsing it raises (start_expansion turns that into its dead letter).
    """
    if not 0 < obj.size <= cfg.max_object_bytes:
        return None
    with _open(obj.uri, storage_options) as fh:
        head = fh.read(HEAD_BYTES)
        if detect(obj.uri, head).kind != "manifest":
            return None
        data = _read_capped(fh, head, cfg.max_object_bytes, obj.uri)
    return parse_manifest(data, obj.uri)


def expand_object(obj: SourceObject, cfg: ExpandSettings, storage_options: dict[str, Any] | None = None,
                  tokenizer: Any = None) -> tuple[list[Unit], list[DeadLetter], str]:
    """Units, dead letters and status (ok / skipped_unsupported / failed) for one object, all read; never raises."""
    return start_expansion(obj, cfg, storage_options, tokenizer).read_all()
