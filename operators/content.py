"""Rebuild the model input of a stored point from its payload and its source object.

The reranker must see a candidate exactly as the embedder saw it at ingestion, so
every unit kind is rebuilt the way ``operators.media.expand`` built it:

- text chunk (``chunk=<i>``): the payload's ``text``; when the payload only holds an
  excerpt (``text_truncated``), the chunk is re-cut from the source by its
  ``char_start``/``char_end`` (the excerpt is kept if the source cannot be read);
- image (``image``): the source bytes through ``image_unit_bytes`` (EXIF-rotated
  images are re-encoded upright exactly as at ingestion);
- PDF page (``page=<n>``): page n rendered at the ingestion ``pdf_dpi`` (same PDFium
  calls and PNG encoding as ``render_pdf``, only that page);
- video segment (``t=<s>-<e>``): the source URI with ``video_start``/``video_end``;
- manifest record (``record=<key>``): the payload's ``text`` (the record's whole text,
  re-read from the manifest, when the payload only holds an excerpt), the ``image_uri`` bytes
  (through ``image_unit_bytes``) and the ``video_uri`` (whole video), whatever the
  record's modality (text, image, video or mixed).

A source that vanished or cannot be read raises ``CandidateUnavailable`` naming the
point and the reason: the query reports that candidate as skipped.
"""

from __future__ import annotations

import io
import os
import threading
from concurrent.futures import Future
from typing import Any, Callable, Mapping

from operators.media.expand import ExpandSettings, _options_for
from operators.media.images import image_unit_bytes
from operators.media.listing import fs_for, is_local_uri, local_path, open_uri
from operators.media.pdf import PDFIUM_LOCK, _check_pages, _open_document, _render_page
from operators.media.text_chunks import decode_text

__all__ = ["CandidateUnavailable", "SourceCache", "candidate_input", "render_pdf_page", "settings_from"]


class CandidateUnavailable(RuntimeError):
    """A candidate's content cannot be rebuilt (source vanished, unreadable, or changed shape)."""


def settings_from(settings_or_cfg: Any) -> ExpandSettings:
    """ExpandSettings from ExpandSettings, a pipelines Config, or None (defaults)."""
    if settings_or_cfg is None:
        return ExpandSettings()
    if isinstance(settings_or_cfg, ExpandSettings):
        return settings_or_cfg
    from pipelines.ingest import expand_settings  # a Config

    return expand_settings(settings_or_cfg)


class SourceCache:
    """Reads each source object once per query (a PDF with several candidate pages is fetched once).

    Thread-safe: concurrent readers of the same URI wait for the one read in flight.
    """

    def __init__(self, reader: Callable[[str, dict[str, Any] | None], bytes] = open_uri) -> None:
        self._reader = reader
        self._lock = threading.Lock()
        self._entries: dict[str, Future] = {}

    def read(self, uri: str, storage_options: dict[str, Any] | None) -> bytes:
        """The whole object at uri (raises what the reader raises, every time it is asked)."""
        with self._lock:
            fut = self._entries.get(uri)
            owner = fut is None
            if owner:
                fut = self._entries[uri] = Future()
        if owner:
            try:
                fut.set_result(self._reader(uri, storage_options))
            except BaseException as exc:
                fut.set_exception(exc)
        return fut.result()


def _read(uri: str, storage_options: dict[str, Any] | None, cache: SourceCache | None) -> bytes:
    """Object bytes, mapping every read failure to CandidateUnavailable."""
    try:
        return cache.read(uri, storage_options) if cache is not None else open_uri(uri, storage_options)
    except FileNotFoundError as exc:
        raise CandidateUnavailable(f"source object not found: {uri}") from exc
    except Exception as exc:
        raise CandidateUnavailable(f"cannot read source {uri}: {type(exc).__name__}: {exc}") from exc


def _require_exists(uri: str, storage_options: dict[str, Any] | None) -> None:
    """Raise CandidateUnavailable unless the (video) object exists; videos are read by the model wrapper."""
    try:
        if is_local_uri(uri):
            found = os.path.isfile(local_path(uri))
        else:
            fs, path = fs_for(uri, storage_options)
            try:
                fs.invalidate_cache(path)
            except Exception:  # some backends keep no cache
                pass
            found = fs.exists(path)
    except Exception as exc:
        raise CandidateUnavailable(f"cannot check source {uri}: {type(exc).__name__}: {exc}") from exc
    if not found:
        raise CandidateUnavailable(f"source object not found: {uri}")


def render_pdf_page(data: bytes, page: int, settings: ExpandSettings) -> bytes:
    """PNG bytes of one 1-based page, rendered exactly as ``render_pdf`` renders it at ingestion."""
    with PDFIUM_LOCK:
        doc = _open_document(data)
        try:
            n_pages = len(doc)
            _check_pages(n_pages, settings.max_pdf_pages)
            if not 1 <= page <= n_pages:
                raise CandidateUnavailable(f"page {page} does not exist any more (the PDF has {n_pages} pages)")
            image, _ = _render_page(doc, page - 1, settings.pdf_dpi / 72.0, settings.max_image_pixels)
        finally:
            doc.close()
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _image(uri: str, storage_options: dict[str, Any] | None, settings: ExpandSettings,
           cache: SourceCache | None) -> bytes:
    data = _read(uri, storage_options, cache)
    if not data:
        raise CandidateUnavailable(f"source is empty now: {uri}")
    try:
        return image_unit_bytes(data, settings.max_image_pixels)[0]
    except Exception as exc:
        raise CandidateUnavailable(f"source image {uri} is no longer usable: {exc}") from exc


def _position_value(position: str, key: str) -> str:
    prefix = key + "="
    if not position.startswith(prefix):
        raise CandidateUnavailable(f"position {position!r} is not a {key} position")
    return position[len(prefix):]


def _record_text(payload: Mapping[str, Any], uri: str, position: str, storage_options: dict[str, Any] | None,
                 cache: SourceCache | None) -> str:
    """A record's text: the payload's, or, where that is an excerpt, the whole text from the manifest."""
    from operators.media.manifest import ManifestRecord, parse_manifest

    text = payload["text"]
    if not payload.get("text_truncated"):
        return text
    key = position[len("record="):]
    try:
        for rec in parse_manifest(_read(uri, storage_options, cache), uri):
            if isinstance(rec, ManifestRecord) and rec.key == key and rec.text and rec.text.startswith(text):
                return rec.text
    except Exception:
        pass  # the excerpt still answers, as for a text chunk
    return text


def candidate_input(payload: Mapping[str, Any], *, storage_options: dict[str, Any] | None = None,
                    settings: Any = None, cache: SourceCache | None = None) -> dict[str, Any]:
    """The embedder/reranker input dict of a stored point, rebuilt from its payload and source.

    ``settings``: the ExpandSettings (or pipelines Config) used at ingestion: PDF dpi,
    page cap and image pixel cap. ``storage_options``: the source's fsspec options.
    Raises CandidateUnavailable when the content cannot be rebuilt.
    """
    cfg = settings_from(settings)
    uri = payload.get("source_uri")
    position = str(payload.get("position") or "")
    modality = payload.get("modality")
    if not uri:
        raise CandidateUnavailable("payload has no source_uri")

    if position.startswith("record="):  # manifest record: text inline, media by URI
        item: dict[str, Any] = {}
        if payload.get("text"):
            item["text"] = _record_text(payload, uri, position, storage_options, cache)
        if payload.get("image_uri"):
            ref = payload["image_uri"]
            item["image"] = _image(ref, _options_for(ref, uri, storage_options), cfg, cache)
        if payload.get("video_uri"):
            ref = payload["video_uri"]
            _require_exists(ref, _options_for(ref, uri, storage_options))
            item["video"] = ref
        if not item:
            raise CandidateUnavailable(f"manifest record {position} has no text, image_uri or video_uri in its payload")
        return item

    if modality == "text":
        text = payload.get("text")
        if not text:
            raise CandidateUnavailable("text point has no text in its payload")
        if payload.get("text_truncated") and payload.get("char_start") is not None:
            try:  # the payload holds an excerpt: re-cut the whole chunk from the source
                full = decode_text(_read(uri, storage_options, cache))
                chunk = full[int(payload["char_start"]):int(payload["char_end"])]
                if chunk.startswith(text):
                    return {"text": chunk}
            except Exception:
                pass  # the excerpt still answers
        return {"text": text}
    if modality == "image":
        return {"image": _image(uri, storage_options, cfg, cache)}
    if modality == "pdf_page":
        page = int(payload.get("page") or _position_value(position, "page"))
        data = _read(uri, storage_options, cache)
        try:
            return {"image": render_pdf_page(data, page, cfg)}
        except CandidateUnavailable:
            raise
        except Exception as exc:
            raise CandidateUnavailable(f"cannot render page {page} of {uri}: {type(exc).__name__}: {exc}") from exc
    if modality == "video":
        start, end = payload.get("start_s"), payload.get("end_s")
        if start is None or end is None:
            bounds = _position_value(position, "t").split("-")
            start, end = float(bounds[0]), float(bounds[1])
        video = payload.get("video_uri") or uri
        _require_exists(video, storage_options)
        return {"video": video, "video_start": float(start), "video_end": float(end)}
    raise CandidateUnavailable(f"unknown modality {modality!r} at position {position!r}")
