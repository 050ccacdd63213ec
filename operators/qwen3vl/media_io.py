"""Resolve image and video sources (paths, URLs, fsspec URIs, bytes, PIL) into what qwen-vl-utils reads.

qwen-vl-utils reads local paths, `file://` and PIL images itself. Everything else (raw
bytes, http(s), `s3://` and other fsspec URLs) is opened here, so the pixels that reach the
resizer are the same ones the reference would decode from a local file. http(s) is fetched
here, not by qwen-vl-utils, because its request has no timeout: one stalled server held the
whole call, every other input of it included, forever.
"""

from __future__ import annotations

import io
import os
import shutil
import tempfile
import threading
import weakref
from typing import Any, NoReturn

import fsspec
from PIL import Image

from ..media import reading
from ..media.listing import file_url_path, is_data_uri
from ..once_cache import OnceCache

_PASSTHROUGH_PREFIXES = ("file://",)  # data: URIs are checked first (_image_data_uri)


class MediaError(ValueError):
    """An input's image or video could not be read."""


# How this module's messages for a medium that could not be fetched (as opposed to decoded) begin.
_FETCH_FAILURES = ("object not found: ", "cannot read ", "image file not found: ", "video file not found: ")


def is_fetch_failure(message: str) -> bool:
    """Whether an item's error says its file could not be fetched (gone, unreachable): it may work next time.

    Only the beginning counts: the rest names the file, whose path may hold these words too.
    """
    return message.startswith(_FETCH_FAILURES)


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith(_PASSTHROUGH_PREFIXES)


def _image_data_uri(source: str) -> str:
    """A base64 image data: URI as qwen-vl-utils reads it (scheme and header in lower case); MediaError otherwise."""
    header, comma, payload = source.partition(",")
    header = header.lower()
    if not (comma and header.startswith("data:image/") and header.endswith(";base64")):
        _refuse_data_uri(source, "image")
    return f"{header},{payload}"


def _refuse_data_uri(source: str, what: str) -> NoReturn:
    """Raise MediaError for a data: URI that is not read as a `what` (named by its header, not echoed)."""
    header = source.partition(",")[0][len("data:"):][:80] or "no media type"
    readable = "a data:image/...;base64 URI" if what == "image" else "a file or URL, or a list of frames"
    # Not "cannot read ...": that begins a fetch failure (is_fetch_failure), which may pass next time.
    article = "an" if what == "image" else "a"
    raise MediaError(f"a data: URI of {header!r} ({len(source):,} characters) is not read as {article} {what}: "
                     f"give {readable}")


def _require_local_file(path: str, what: str, name: str | None = None) -> None:
    """Raise MediaError unless path is a regular file: a FIFO would hang the reader until a writer comes."""
    if not os.path.exists(path):
        raise MediaError(f"{what} file not found: {name or path}")
    if not os.path.isfile(path):
        raise MediaError(f"not a regular file: {name or path}")


def read_bytes(uri: str, storage_options: dict[str, Any] | None = None, max_bytes: int | None = None) -> bytes:
    """Read a whole object from any fsspec URL (http(s) within reading.stream_http's bounds);
    one of more than max_bytes raises MediaError."""
    if reading.is_http(uri):  # any case of the scheme: fsspec knows only "http"
        buf = io.BytesIO()
        _stream_http(uri, buf, max_bytes)
        return buf.getvalue()
    try:
        with fsspec.open(uri, "rb", **(storage_options or {})) as fh:
            data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    except FileNotFoundError as exc:
        raise MediaError(f"object not found: {uri}") from exc
    except Exception as exc:  # fsspec backends raise many types; name the input, keep the cause
        raise MediaError(f"cannot read {uri}: {type(exc).__name__}: {exc}") from exc
    if max_bytes is not None and len(data) > max_bytes:
        # Not "cannot read ...": that begins a fetch failure (is_fetch_failure), which may pass next time.
        raise MediaError(f"{uri} is over max_object_bytes={max_bytes}")
    return data


def _stream_http(url: str, fh: Any, max_bytes: int | None = None) -> None:
    """Write the body of an http(s) URL to fh (reading.stream_http, its bounds); MediaError on failure."""
    try:
        reading.stream_http(url, fh, max_bytes)
    except reading.ObjectTooLargeError as exc:  # over the cap: not a fetch failure, which may pass next time
        raise MediaError(str(exc)) from None
    except Exception as exc:
        raise MediaError(f"cannot read {url}: {type(exc).__name__}: {exc}") from exc


def open_image_bytes(data: bytes, name: str = "<bytes>") -> Image.Image:
    """Open encoded image bytes lazily, as Image.open would open a file."""
    try:
        image = Image.open(io.BytesIO(bytes(data)))
        image.load()
        return image
    except Exception as exc:
        raise MediaError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from exc


# Image.open() returns an image that decodes on first use, reading its file object: several
# preparation threads given the same unloaded image (one PIL object in several inputs) would read
# that one file at once and corrupt each other's reads.
_PIL_LOAD_LOCK = threading.Lock()


def load_image(image: Image.Image) -> Image.Image:
    """The caller's PIL image, decoded (once, whichever thread gets there first)."""
    try:
        with _PIL_LOAD_LOCK:
            image.load()
    except Exception as exc:
        name = getattr(image, "filename", "") or "<PIL image>"
        raise MediaError(f"cannot decode image {name}: {type(exc).__name__}: {exc}") from exc
    return image


def resolve_image(source: Any, storage_options: dict[str, Any] | None = None) -> Any:
    """Turn an image source into a PIL image or a string qwen-vl-utils reads identically."""
    if isinstance(source, Image.Image):
        return load_image(source)
    if isinstance(source, (bytes, bytearray, memoryview)):
        return open_image_bytes(bytes(source), getattr(source, "name", "<bytes>"))  # a query's: its URL
    if isinstance(source, str):
        if source.startswith("file://"):
            path = file_url_path(source)
            _require_local_file(path, "image", source)
            return "file://" + path  # qwen-vl-utils opens what follows the scheme as it is
        if is_data_uri(source):  # qwen-vl-utils takes any other for a file path, and echoes it whole
            return _image_data_uri(source)
        if source.startswith(_PASSTHROUGH_PREFIXES):
            return source
        if _is_remote(source):
            return open_image_bytes(read_bytes(source, storage_options), source)
        _require_local_file(source, "image")
        return "file://" + source
    raise MediaError(f"unsupported image type {type(source).__name__}")


class VideoFiles:
    """Local copies of remote videos, kept for reuse by the segments of one video (LRU).

    Preparation threads share one instance: a video is downloaded once however many of its
    segments ask at the same time, and a copy is never evicted while a thread holds it
    (acquire() until release()), so the cache may exceed max_files while all are in use.
    """

    def __init__(self, storage_options: dict[str, Any] | None = None, max_files: int = 8) -> None:
        self.storage_options = storage_options or {}
        self.max_files = max_files
        self._copies: OnceCache[str] = OnceCache(max_files, on_evict=_remove_copy)  # uri -> local path
        self._dir_lock = threading.Lock()
        self._dir: str | None = None  # created with the first remote video
        self._cleanup: weakref.finalize | None = None

    def acquire(self, uri: str) -> str:
        """A local path holding the video at uri, kept on disk until release(uri)."""
        if uri.startswith("file://"):
            uri = file_url_path(uri)
        if is_data_uri(uri):  # neither qwen-vl-utils' video readers nor ours read one
            _refuse_data_uri(uri, "video")
        if not _is_remote(uri):
            _require_local_file(uri, "video")
            return uri
        return self._copies.get(uri, lambda: self._download(uri), hold=True)

    def release(self, uri: str) -> None:
        """One acquire(uri) is done with its path: the copy may be evicted again."""
        # A source never held (a local file) changes nothing.
        self._copies.release(file_url_path(uri) if uri.startswith("file://") else uri)

    def _download(self, uri: str) -> str:
        http = reading.is_http(uri)
        data = None if http else read_bytes(uri, self.storage_options)
        suffix = os.path.splitext(uri.split("?", 1)[0] if http else uri)[1][:8]
        with self._dir_lock:
            if self._dir is None:
                self._dir = tempfile.mkdtemp(prefix="qvl-video-")
                # Removed at close(), when this object goes, or at interpreter exit, whichever is first.
                self._cleanup = weakref.finalize(self, shutil.rmtree, self._dir, ignore_errors=True)
            folder = self._dir
        fd, path = tempfile.mkstemp(dir=folder, suffix=suffix)
        try:
            with os.fdopen(fd, "wb") as fh:
                if http:
                    _stream_http(uri, fh)  # to disk as it arrives: a video is not held in memory
                else:
                    fh.write(data)
        except BaseException:
            os.remove(path)
            raise
        return path

    def close(self) -> None:
        """Remove the local copies."""
        self._copies.clear()
        with self._dir_lock:
            if self._cleanup is not None:
                self._cleanup()  # runs once
            self._dir = self._cleanup = None


def _remove_copy(uri: str, path: str) -> None:
    """Delete an evicted video copy (already gone: nothing to do)."""
    try:
        os.remove(path)
    except OSError:
        pass


def resolve_video(source: Any, files: VideoFiles, storage_options: dict[str, Any] | None = None) -> Any:
    """Turn a video source (URI or frame list) into what qwen-vl-utils reads; a URI is acquired from files."""
    if isinstance(source, list):
        if not source:
            raise MediaError("empty frame list")
        return [resolve_image(frame, storage_options) for frame in source]
    if isinstance(source, str):
        return files.acquire(source)
    raise MediaError(f"unsupported video type {type(source).__name__}")
