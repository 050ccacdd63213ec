"""Rebuild the model input of a stored point from its payload and its source object.

The reranker must see a candidate exactly as the embedder saw it at ingestion, so
every unit kind is rebuilt the way ``operators.media.expand`` built it:

- text chunk (``chunk=<i>``): the payload's ``text``; when the payload only holds an
  excerpt (``text_truncated``), the chunk is re-cut from the source by its
  ``char_start``/``char_end`` (the excerpt is kept if the source cannot be read);
- image (``image``): the source bytes through ``image_unit_bytes`` (EXIF-rotated and
  16-bit images are re-encoded exactly as at ingestion);
- PDF page (``page=<n>``): page n rendered at the ingestion ``pdf_dpi`` (same PDFium
  calls and PNG encoding as ``render_pdf``, only that page);
- video segment (``t=<s>-<e>``): the source URI with ``video_start``/``video_end``;
- manifest record (``record=<key>``): the payload's ``text`` (the record's whole text,
  re-read from the manifest, when the payload only holds an excerpt), the ``image_uri`` bytes
  (through ``image_unit_bytes``) and the ``video_uri`` (whole video), whatever the
  record's modality (text, image, video or mixed).

A source that vanished or cannot be read raises ``CandidateUnavailable`` naming the
point and the reason: the query reports that candidate as skipped. So does a source that
changed since it was ingested (its fingerprint is no longer the one in the point's payload):
its new content is not what the point's vector was computed from. Content held whole in the
payload (a text chunk, a record's text) needs no source; a text excerpt whose source changed
stays the excerpt.
"""

from __future__ import annotations

import io
import os
from typing import Any, Callable, Mapping

from operators.media.expand import ExpandSettings, _options_for
from operators.media.images import image_unit_bytes
from operators.media.listing import forget_cached_listing, fs_for, is_local_uri, local_path, object_fingerprint
from operators.media.pdf import PDFIUM_LOCK, _check_pages, _open_document, _render_page
from operators.media.reading import SourceChangedError, is_http, read_http, read_with_fingerprint
from operators.media.text_chunks import decode_text
from operators.once_cache import OnceCache
from operators.units import source_fingerprint

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
    """Reads (or fingerprints) each source object once per query: a PDF with several candidate
    pages is fetched once.

    Thread-safe: concurrent readers of the same URI wait for the one read in flight. A failed read
    is kept too: the other candidates of a vanished PDF do not each try it again.
    """

    def __init__(self) -> None:
        self._outcomes: OnceCache[tuple[Any, Exception | None]] = OnceCache()
        self._read_fingerprints: dict[str, str] = {}  # uri -> fingerprint of its successful read

    def _once(self, key: tuple[str, str], fetch: Callable[[], Any]) -> Any:
        def outcome() -> tuple[Any, Exception | None]:
            try:
                return fetch(), None
            except Exception as exc:
                return None, exc

        value, error = self._outcomes.get(key, outcome)
        if error is not None:
            raise error
        return value

    def read(self, uri: str, storage_options: dict[str, Any] | None, max_bytes: int | None = None,
             expect: str | None = None) -> tuple[bytes, str]:
        """The whole object at uri and the fingerprint of what was read (raises what
        read_with_fingerprint raises for max_bytes and expect)."""
        def fetch() -> tuple[bytes, str]:
            data, now = read_with_fingerprint(uri, storage_options, max_bytes=max_bytes, expect=expect)
            self._read_fingerprints[uri] = now
            return data, now

        return self._once(("read", uri, max_bytes, expect), fetch)

    def fingerprint(self, uri: str, storage_options: dict[str, Any] | None) -> str:
        """The object's current fingerprint: that of its read, if it was read in this query."""
        read = self._read_fingerprints.get(uri)
        if read is not None:
            return read
        return self._once(("fingerprint", uri), lambda: object_fingerprint(uri, storage_options))


def _unavailable(uri: str, exc: Exception) -> CandidateUnavailable:
    """The CandidateUnavailable for a failed read or check of a source object."""
    if isinstance(exc, FileNotFoundError):
        return CandidateUnavailable(f"source object not found: {uri}")
    if isinstance(exc, SourceChangedError):
        return _changed_since_ingestion(uri, exc.expected, exc.now)
    return CandidateUnavailable(f"cannot read source {uri}: {type(exc).__name__}: {exc}")


def _changed_since_ingestion(uri: str, then: str, now: str) -> CandidateUnavailable:
    return CandidateUnavailable(f"source changed since it was ingested: {uri} (fingerprint then {then}, "
                                f"now {now}); run the ingestion again to refresh its points")


def _ingested_version(payload: Mapping[str, Any] | None) -> str | None:
    """The source fingerprint a point was ingested from (None: any version will do)."""
    stored = (payload or {}).get("fingerprint")
    return source_fingerprint(stored) if isinstance(stored, str) and stored else None


def _read(uri: str, storage_options: dict[str, Any] | None, cache: SourceCache | None, settings: ExpandSettings,
          payload: Mapping[str, Any] | None = None) -> tuple[bytes, str]:
    """Object bytes and their fingerprint, mapping every read failure to CandidateUnavailable.

    An object over ``max_object_bytes`` is refused unread, as at ingestion; with payload (the
    point's own source), so is another version than the one ingested, where the store says so
    before the read.
    """
    max_bytes, expect = settings.max_object_bytes, _ingested_version(payload)
    try:
        if cache is not None:
            return cache.read(uri, storage_options, max_bytes, expect)
        return read_with_fingerprint(uri, storage_options, max_bytes=max_bytes, expect=expect)
    except Exception as exc:
        raise _unavailable(uri, exc) from exc


def _current_fingerprint(uri: str, storage_options: dict[str, Any] | None, cache: SourceCache | None) -> str:
    """The object's fingerprint now, mapping every failure to CandidateUnavailable."""
    try:
        return cache.fingerprint(uri, storage_options) if cache is not None else object_fingerprint(uri, storage_options)
    except Exception as exc:
        raise _unavailable(uri, exc) from exc


def _changed(payload: Mapping[str, Any], now: str) -> str | None:
    """The fingerprint the point was ingested under, when its source's is no longer that; else None.

    Points without a fingerprint (written by other tools) are taken as current.
    """
    then = _ingested_version(payload)
    return then if then is not None and then != now else None


def _require_unchanged(payload: Mapping[str, Any], uri: str, now: str) -> None:
    """Raise CandidateUnavailable when the source is no longer the version the point was embedded from.

    Reranking its new content would score something the point's vector never saw.
    """
    then = _changed(payload, now)
    if then is not None:
        raise _changed_since_ingestion(uri, then, now)


def _require_exists(uri: str, storage_options: dict[str, Any] | None) -> None:
    """Raise CandidateUnavailable unless the (video) object exists; videos are read by the model wrapper."""
    try:
        if is_local_uri(uri):
            found = os.path.isfile(local_path(uri))
        else:
            fs, path = fs_for(uri, storage_options)
            forget_cached_listing(fs, path)
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
           cache: SourceCache | None, payload: Mapping[str, Any] | None = None) -> bytes:
    """An image unit's bytes from uri; with payload (uri is the point's own source), only the ingested version."""
    data, now = _read(uri, storage_options, cache, settings, payload)
    if payload is not None:
        _require_unchanged(payload, uri, now)
    return _usable_image(data, uri, settings)


def _usable_image(data: bytes, uri: str, settings: ExpandSettings) -> bytes:
    """An image's bytes as ingestion embedded them (re-encoded where it re-encodes)."""
    if not data:
        raise CandidateUnavailable(f"source is empty now: {uri}")
    try:
        return image_unit_bytes(data, settings.max_image_pixels)[0]
    except Exception as exc:
        raise CandidateUnavailable(f"source image {uri} is no longer usable: {exc}") from exc


def _http_bytes(uri: str, settings: ExpandSettings) -> bytes:
    """An http(s) object's bytes (at most max_object_bytes), mapping every failure to CandidateUnavailable."""
    try:
        return read_http(uri, settings.max_object_bytes)
    except Exception as exc:
        raise _unavailable(uri, exc) from exc


def _position_value(position: str, key: str) -> str:
    prefix = key + "="
    if not position.startswith(prefix):
        raise CandidateUnavailable(f"position {position!r} is not a {key} position")
    return position[len(prefix):]


def _record_text(payload: Mapping[str, Any], uri: str, position: str, storage_options: dict[str, Any] | None,
                 cache: SourceCache | None, settings: ExpandSettings) -> str:
    """A record's text: the payload's, or, where that is an excerpt, the whole text from the manifest."""
    from operators.media.manifest import ManifestRecord, parse_manifest

    text = payload["text"]
    if not payload.get("text_truncated"):
        return text
    key = position[len("record="):]
    try:
        data, now = _read(uri, storage_options, cache, settings, payload)
        if _changed(payload, now) is not None:
            return text  # a changed manifest's records may not be what was embedded
        for rec in parse_manifest(data, uri):
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
        if payload.get("image_uri") or payload.get("video_uri"):
            # Its media are re-read by reference: only worth it while the manifest still says
            # what it said at ingestion (the referenced files themselves are not fingerprinted).
            _require_unchanged(payload, uri, _current_fingerprint(uri, storage_options, cache))
        item: dict[str, Any] = {}
        if payload.get("text"):
            item["text"] = _record_text(payload, uri, position, storage_options, cache, cfg)
        # An http(s) reference is fetched with the bounds expansion fetched it with: fsspec's http
        # has no timeout, and a server that accepted and never answered held the whole query.
        if payload.get("image_uri"):
            ref = payload["image_uri"]
            item["image"] = (_usable_image(_http_bytes(ref, cfg), ref, cfg) if is_http(ref)
                             else _image(ref, _options_for(ref, uri, storage_options), cfg, cache))
        if payload.get("video_uri"):
            ref = payload["video_uri"]
            if not is_http(ref):  # one is fetched by the model wrapper, within the same bounds, and named if it fails
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
                data, now = _read(uri, storage_options, cache, cfg, payload)
                chunk = decode_text(data)[int(payload["char_start"]):int(payload["char_end"])]
                if _changed(payload, now) is None and chunk.startswith(text):
                    return {"text": chunk}
            except Exception:
                pass  # the excerpt still answers
        return {"text": text}
    if modality == "image":
        return {"image": _image(uri, storage_options, cfg, cache, payload)}
    if modality == "pdf_page":
        page = int(payload.get("page") or _position_value(position, "page"))
        data, now = _read(uri, storage_options, cache, cfg, payload)
        _require_unchanged(payload, uri, now)
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
        if video == uri:
            _require_unchanged(payload, uri, _current_fingerprint(uri, storage_options, cache))
        else:
            _require_exists(video, storage_options)
        return {"video": video, "video_start": float(start), "video_end": float(end)}
    raise CandidateUnavailable(f"unknown modality {modality!r} at position {position!r}")
