"""Read one whole object (a local path or any fsspec URL) without being hung or flooded by it.

A local path is opened without blocking and must be a regular file: opening a FIFO for reading
waits for a writer forever. A caller may cap the size (refused before a byte is read) and name
the version it expects (a changed object is refused before it is read, not after downloading it).
An http(s) medium (a manifest record's, an input's of the model wrappers) is fetched with
``stream_http``: a timeout on connecting, on each wait for bytes and on the whole download.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import time
from typing import IO, Any, Iterator

from operators.media.listing import (forget_cached_listing, fs_for, info_fingerprint, is_local_uri, local_fingerprint,
                                     local_path)

__all__ = ["HTTP_TIMEOUT_S", "HTTP_TOTAL_S", "NotARegularFileError", "ObjectTooLargeError", "SourceChangedError",
           "is_http", "open_local_file", "open_uri", "read_http", "read_with_fingerprint", "stream_http"]

HTTP_PREFIXES = ("http://", "https://")
# (connect, read) seconds for an http(s) medium: the read timeout bounds each wait for bytes, so
# a slow but live server still delivers a large video. fsspec's http has no timeout at all: one
# server that accepts and never answers held its reader for good.
HTTP_TIMEOUT_S = (10.0, 60.0)
# ...and the whole download: a server that sends a byte every few seconds never trips the read
# timeout, and held its input (and a query, and every other query of its batch) for good.
HTTP_TOTAL_S = 600.0


class ObjectTooLargeError(ValueError):
    """An object (or a file a manifest points at) is over max_object_bytes."""


class NotARegularFileError(ValueError):
    """A local path that is a folder, FIFO, socket or device, not a file (never opened for reading)."""


class SourceChangedError(RuntimeError):
    """The object is no longer the version the caller expected (found before reading it)."""

    def __init__(self, uri: str, expected: str, now: str) -> None:
        super().__init__(f"{uri} is no longer version {expected} (now {now})")
        self.uri, self.expected, self.now = uri, expected, now

    def __reduce__(self):  # picklable with its fields, so it crosses Ray and thread boundaries as itself
        return (SourceChangedError, (self.uri, self.expected, self.now))


# Exception classes of fsspec back ends (aiohttp, botocore) that say the store could not be
# reached, where they do not chain a builtin ConnectionError or TimeoutError.
# requests (stream_http) names its own ConnectionError, ConnectTimeout, ReadTimeout and a body cut
# off mid-way, ChunkedEncodingError, none of them the builtin classes; read through urllib3 directly
# (stream_http's read1), a body cut off is urllib3's ProtocolError (IncompleteRead).
_UNREACHABLE_NAMES = frozenset({"ClientConnectionError", "ClientConnectorError", "ServerDisconnectedError",
                                "ServerTimeoutError", "EndpointConnectionError", "ConnectTimeoutError",
                                "ReadTimeoutError", "ConnectionClosedError", "ConnectionError", "ConnectTimeout",
                                "ReadTimeout", "ChunkedEncodingError",
                                "ProtocolError", "IncompleteRead"})


def is_http(uri: str) -> bool:
    """Whether uri is an http(s) URL (its scheme in any case), read with stream_http's bounds."""
    return uri[:8].lower().startswith(HTTP_PREFIXES)


def stream_http(url: str, fh: IO[bytes], max_bytes: int | None = None) -> None:
    """Write the body of an http(s) URL to fh as it arrives, within HTTP_TIMEOUT_S (connect, read) per
    wait and HTTP_TOTAL_S in all.

    Raises ObjectTooLargeError past max_bytes, TimeoutError past total_s, and requests' own errors
    (ConnectionError, ReadTimeout, HTTPError for a 4xx/5xx status) otherwise: is_unreachable tells them.
    """
    import requests

    deadline = time.monotonic() + HTTP_TOTAL_S
    written = 0
    with requests.get(url, timeout=HTTP_TIMEOUT_S, stream=True) as response:
        response.raise_for_status()
        for chunk in _chunks_as_they_come(response):
            written += len(chunk)
            if max_bytes is not None and written > max_bytes:
                raise ObjectTooLargeError(f"{url} is over max_object_bytes={max_bytes}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"the download took over {HTTP_TOTAL_S:.0f} s (HTTP_TOTAL_S)")
            fh.write(chunk)


def _chunks_as_they_come(response: Any) -> Iterator[bytes]:
    """The body's bytes in whatever pieces the socket gives: iter_content waits until a whole chunk
    has arrived, so a trickling server would never let the caller look at the clock."""
    read1 = getattr(response.raw, "read1", None)  # urllib3 2
    if read1 is None:
        yield from response.iter_content(1 << 12)
        return
    while chunk := read1(1 << 20, decode_content=True):
        yield chunk


def read_http(url: str, max_bytes: int | None = None) -> bytes:
    """A whole http(s) body in memory, with stream_http's bounds."""
    buf = io.BytesIO()
    stream_http(url, buf, max_bytes)
    return buf.getvalue()


def is_unreachable(exc: BaseException) -> bool:
    """Whether an error reading an object says its store could not be reached (refused, timed out,
    5xx, throttled), as opposed to the object being gone or bad: worth trying again later.

    fsspec often wraps these (its HTTP back end raises FileNotFoundError for a refused connection),
    so the whole chain of causes counts.
    """
    seen: set[int] = set()
    node: BaseException | None = exc
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        status = getattr(node, "status", None)
        if status is None:  # requests' HTTPError holds its status on its response
            status = getattr(getattr(node, "response", None), "status_code", None)
        if isinstance(node, (ConnectionError, TimeoutError)) or type(node).__name__ in _UNREACHABLE_NAMES or (
                isinstance(status, int) and (status >= 500 or status == 429)):
            return True
        node = node.__cause__ or node.__context__
    return False


def open_local_file(path: str) -> IO[bytes]:
    """Open a local regular file for reading; a FIFO, folder or device is refused without blocking on it."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            kind = "folder" if stat.S_ISDIR(mode) else "FIFO" if stat.S_ISFIFO(mode) else "special file"
            raise NotARegularFileError(f"not a regular file ({kind}): {path}")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def open_uri(uri: str, storage_options: dict[str, Any] | None = None) -> bytes:
    """Read a whole object (local path or any fsspec URL) into memory."""
    if is_local_uri(uri):
        with open_local_file(local_path(uri)) as fh:
            return fh.read()
    fs, path = fs_for(uri, storage_options)
    with fs.open(path, "rb") as fh:
        return fh.read()


def _refuse(uri: str, fingerprint: str | None, size: Any, max_bytes: int | None, expect: str | None) -> None:
    """Raise before reading when the object is over max_bytes or not the expected version."""
    if expect is not None and fingerprint is not None and fingerprint != expect:
        raise SourceChangedError(uri, expect, fingerprint)
    if max_bytes is not None and isinstance(size, int) and size > max_bytes:
        raise ObjectTooLargeError(f"{uri} is {size} bytes, over max_object_bytes={max_bytes}")


def read_with_fingerprint(uri: str, storage_options: dict[str, Any] | None = None, *, max_bytes: int | None = None,
                          expect: str | None = None) -> tuple[bytes, str]:
    """A whole object and the fingerprint of exactly the version that was read.

    max_bytes: a larger object raises ObjectTooLargeError unread. expect: the fingerprint of the
    version wanted; another version raises SourceChangedError unread (a store that gives no
    fingerprint before reading is read, and the caller compares what this returns).
    """
    if is_local_uri(uri):
        with open_local_file(local_path(uri)) as fh:
            before = os.fstat(fh.fileno())
            _refuse(uri, local_fingerprint(before), before.st_size, max_bytes, expect)
            data = fh.read()
            after = os.fstat(fh.fileno())
        if local_fingerprint(after) != local_fingerprint(before):  # written while we read it
            raise OSError(f"{uri} changed while it was being read")
        return data, local_fingerprint(before)
    fs, path = fs_for(uri, storage_options)
    forget_cached_listing(fs, path)
    with fs.open(path, "rb") as fh:
        # A buffered file (s3fs, gcsfs, ...) holds the info it read on opening; s3fs reads
        # with If-Match on its ETag, so the bytes are that version's.
        details = getattr(fh, "details", None)
        if not isinstance(details, dict):
            details = fs.info(path)
        _refuse(uri, info_fingerprint(details), details.get("size"), max_bytes, expect)
        data = fh.read(max_bytes + 1) if max_bytes is not None else fh.read()
    if max_bytes is not None and len(data) > max_bytes:
        raise ObjectTooLargeError(f"{uri} is over max_object_bytes={max_bytes}")
    return data, info_fingerprint(details) or f"sha256:{hashlib.sha256(data).hexdigest()}"
