"""Batched, retrying upserts and the incremental-run queries (fingerprints, delete by URI, count).

Upserts are split into requests of at most `max_points_per_request` points and
under `max_request_bytes` of estimated JSON (the server rejects requests over
32 MiB), sent with `wait=True`. Each request is a materialised list of points,
so retrying it is idempotent (point ids are deterministic). Only transient
errors are retried (see `is_transient`), with jittered exponential backoff;
anything else is raised at once with a note of how many points were written
before it.
"""

from __future__ import annotations

import json
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence, TypeVar

import numpy as np
from qdrant_client import QdrantClient, models

logger = logging.getLogger(__name__)

T = TypeVar("T")

MAX_REQUEST_BYTES = 16 * 1024 * 1024
# a float32 printed as JSON is at most ~24 characters ("-1.2345678901234567e-05,")
_BYTES_PER_FLOAT = 24
_POINT_OVERHEAD = 128
_TRANSIENT_HTTP = frozenset({408, 429})
_SCROLL_PAGE = 1024
_URI_CHUNK = 256
_ID_CHUNK = 1024  # point ids per delete or set_payload request (about 40 KB of UUIDs)


class PointRecord(NamedTuple):
    """One point: its id, named vectors and payload (a plain 3-tuple works too)."""

    id: str
    vectors: Mapping[str, Sequence[float] | np.ndarray]
    payload: Mapping[str, Any]


class QdrantWriteError(RuntimeError):
    """A store request failed: with an error that is not transient, or with transient ones after every retry."""

    def __init__(self, message: str, points_written: int, attempts: int) -> None:
        super().__init__(message)
        self.points_written = points_written
        self.attempts = attempts

    def __reduce__(self):  # picklable, so it crosses Ray task boundaries as itself
        return (type(self), (str(self), self.points_written, self.attempts))


@dataclass
class WriteStats:
    """Cumulative counters of one writer."""

    points: int = 0
    requests: int = 0
    retries: int = 0

    def as_dict(self) -> dict[str, int]:
        """Plain dict copy."""
        return asdict(self)


def is_transient(exc: BaseException) -> bool:
    """True for errors worth retrying: timeouts, connection errors, HTTP 408/429/5xx, gRPC UNAVAILABLE/DEADLINE_EXCEEDED."""
    import httpx
    from qdrant_client.common.client_exceptions import ResourceExhaustedResponse
    from qdrant_client.http.exceptions import ResponseHandlingException, UnexpectedResponse

    if isinstance(exc, UnexpectedResponse):
        code = exc.status_code
        return code is not None and (code in _TRANSIENT_HTTP or 500 <= code <= 599)
    if isinstance(exc, ResourceExhaustedResponse):
        return True
    if isinstance(exc, ResponseHandlingException):
        return exc.source is not None and is_transient(exc.source)
    if isinstance(exc, (httpx.TimeoutException, httpx.NetworkError, httpx.RemoteProtocolError)):
        return True
    if isinstance(exc, (TimeoutError, ConnectionError)):
        return True
    try:
        import grpc
    except ImportError:  # pragma: no cover - grpcio ships with qdrant-client
        return False
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)
    return False


def _as_list(vector: Sequence[float] | np.ndarray) -> list[float]:
    if isinstance(vector, np.ndarray):
        return vector.astype(np.float32, copy=False).ravel().tolist()
    return [float(x) for x in vector]


def estimate_point_bytes(record: PointRecord | tuple) -> int:
    """Conservative JSON size of one point in an upsert request."""
    _, vectors, payload = record
    n_floats = sum(len(v) for v in vectors.values())
    payload_bytes = len(json.dumps(payload, default=str, ensure_ascii=False).encode()) if payload else 2
    return _POINT_OVERHEAD + n_floats * _BYTES_PER_FLOAT + 16 * len(vectors) + payload_bytes


def split_requests(
    points: Sequence[PointRecord | tuple], max_points: int, max_bytes: int = MAX_REQUEST_BYTES
) -> Iterator[list]:
    """Cut points into consecutive requests of <= max_points points and < max_bytes estimated bytes."""
    batch: list = []
    size = 0
    for p in points:
        b = estimate_point_bytes(p)
        if b >= max_bytes:
            raise ValueError(f"point {p[0]} alone is ~{b} bytes, over the {max_bytes}-byte request limit")
        if batch and (len(batch) >= max_points or size + b >= max_bytes):
            yield batch
            batch, size = [], 0
        batch.append(p)
        size += b
    if batch:
        yield batch


class QdrantWriter:
    """Writes PointRecords to one collection with batching and transient-error retries."""

    def __init__(
        self,
        client: QdrantClient,
        collection: str,
        *,
        max_points_per_request: int = 128,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        retry_s: float = 120.0,
        max_attempts: int | None = None,
        backoff_base_s: float = 0.5,
        backoff_cap_s: float = 10.0,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        if max_points_per_request < 1 or (max_attempts is not None and max_attempts < 1):
            raise ValueError("max_points_per_request and max_attempts must be >= 1")
        if retry_s < 0:
            raise ValueError("retry_s must be >= 0")
        self.client = client
        self.collection = collection
        self.max_points_per_request = max_points_per_request
        self.max_request_bytes = max_request_bytes
        self.retry_s = retry_s
        self.max_attempts = max_attempts
        self.backoff_base_s = backoff_base_s
        self.backoff_cap_s = backoff_cap_s
        self._sleep, self._clock = sleep, clock
        self._rng = rng or random.Random()
        self.stats = WriteStats()
        # An embedded store evaluates a filter in Python, point by point, on every request: a
        # MatchAny of 256 URIs cost 2.6 s per chunk at 20,000 points (21 s for a stopped run's
        # 2,000 URIs). There one pass over the collection, picked out with a set, finds any
        # number of URIs; a server uses its payload index, a chunk of URIs per request.
        self.one_pass = _is_embedded(client)

    # -- retry ---------------------------------------------------------------

    def backoff_s(self, attempt: int) -> float:
        """Delay before retry `attempt` (1-based): equal-jitter exponential, capped."""
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * (2 ** (attempt - 1)))
        return ceiling / 2 + self._rng.uniform(0, ceiling / 2)

    def _gave_up(self, what: str, exc: Exception, attempt: int, written_before: int, how: str) -> QdrantWriteError:
        """The error for a request given up on; `how` says why, with {} where the cause goes."""
        cause = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        return QdrantWriteError(f"{what} on collection {self.collection!r} {how.format(cause)}; "
                                f"{written_before} points were written before it",
                                points_written=written_before, attempts=attempt)

    def _with_retry(self, what: str, fn: Callable[[], T], written_before: int = 0) -> T:
        """fn(), retried through transient errors for up to retry_s seconds (and max_attempts tries)."""
        from qdrant_client.common.client_exceptions import ResourceExhaustedResponse

        started, slept, attempt = self._clock(), 0.0, 0
        while True:
            attempt += 1
            try:
                return fn()
            except Exception as exc:
                # Our own error, not the client's: an UnexpectedResponse cannot be rebuilt on the other
                # side of a Ray call, where it arrived as an UnserializableException.
                if not is_transient(exc):
                    raise self._gave_up(what, exc, attempt, written_before,
                                        "failed ({}): not a transient error, not retried") from exc
                delay = self.backoff_s(attempt)
                if isinstance(exc, ResourceExhaustedResponse):
                    # The server's own wait (HTTP 429 Retry-After), past the backoff cap: retrying
                    # sooner only earns another 429.
                    delay = max(delay, float(exc.retry_after_s))
                # A server restart takes tens of seconds: the retries are bounded by time, not by a
                # count that a fast-failing refused connection spends in seconds. (The time slept
                # counts where a test's sleep does not advance the clock.)
                spent = max(self._clock() - started, slept)
                if attempt == self.max_attempts:
                    raise self._gave_up(what, exc, attempt, written_before,
                                        f"failed after {attempt} attempts ({{}})") from exc
                if spent + delay > self.retry_s:
                    asked = (f"; the server asks to wait {delay:g} s (Retry-After)"
                             if isinstance(exc, ResourceExhaustedResponse) and delay >= exc.retry_after_s else "")
                    raise self._gave_up(what, exc, attempt, written_before,
                                        f"failed after {attempt} attempts in {spent:.0f} s ({{}}){asked}; "
                                        f"qdrant.retry_s={self.retry_s:g}") from exc
                self.stats.retries += 1
                logger.warning(
                    "%s on %r: transient %s (attempt %d), retrying in %.2fs",
                    what, self.collection, type(exc).__name__, attempt, delay,
                )
                self._sleep(delay)
                slept += delay

    # -- writes --------------------------------------------------------------

    def upsert_points(self, points: Sequence[PointRecord | tuple]) -> int:
        """Upsert points in size-bounded requests (wait=True); return how many were written."""
        written = 0
        for batch in split_requests(points, self.max_points_per_request, self.max_request_bytes):
            structs = [
                models.PointStruct(
                    id=str(pid), vector={k: _as_list(v) for k, v in vectors.items()}, payload=dict(payload or {})
                )
                for pid, vectors, payload in batch
            ]
            self._with_retry(
                "upsert",
                lambda: self.client.upsert(self.collection, points=structs, wait=True),
                written_before=written,
            )
            written += len(structs)
            self.stats.requests += 1
            self.stats.points += len(structs)
        return written

    def delete_by_uri(self, uris: Sequence[str]) -> None:
        """Delete every point whose payload source_uri is one of uris (chunked MatchAny filters)."""
        uris = list(dict.fromkeys(uris))
        if self.one_pass:
            self._delete_ids([pid for pid, _, _ in self._points_of(uris)])
            return
        for i in range(0, len(uris), _URI_CHUNK):
            selector = models.FilterSelector(filter=_uri_filter(uris[i : i + _URI_CHUNK]))
            self._with_retry(
                "delete",
                lambda: self.client.delete(self.collection, points_selector=selector, wait=True),
            )

    def delete_stale(self, current: Mapping[str, str]) -> int:
        """Delete the points of each URI whose fingerprint is not its current one (replaced units);
        returns how many URIs lost points.

        They are found by _points_of and deleted by id. A delete request per URI cost a pass over
        the whole collection each in embedded mode (0.18 s per URI at 20,000 points: an hour after
        a settings change re-embedded 20,000 objects).
        """
        stale = [(pid, uri) for pid, uri, fp in self._points_of(list(current)) if fp != current[uri]]
        self._delete_ids([pid for pid, _ in stale])
        return len({uri for _, uri in stale})

    def settle_object_units(self, settled: Mapping[str, tuple[str, int]]) -> None:
        """Set object_units on the points of each (URI, fingerprint) to the units it really has.

        An object whose units partly failed to embed has fewer points than the count its points
        were written with, so it would read as INCOMPLETE and be re-embedded by every run;
        after this it reads as complete, as an object whose bad records failed at expansion does.
        The points are found by _points_of and set by id, one request per unit count and chunk of
        ids (not one filtered request per object: see delete_stale).
        """
        by_units: dict[int, list[Any]] = {}
        for pid, uri, fp in self._points_of(list(settled)):
            fingerprint, units = settled[uri]
            if fp == fingerprint:
                by_units.setdefault(int(units), []).append(pid)
        for units, ids in by_units.items():
            for j in range(0, len(ids), _ID_CHUNK):
                batch = ids[j : j + _ID_CHUNK]
                self._with_retry(
                    "set_payload",
                    lambda: self.client.set_payload(self.collection, payload={"object_units": units},
                                                    points=batch, wait=True),
                )

    def _delete_ids(self, ids: list[Any]) -> None:
        """Delete points by id, in requests of at most _ID_CHUNK ids."""
        for j in range(0, len(ids), _ID_CHUNK):
            selector = models.PointIdsList(points=ids[j : j + _ID_CHUNK])
            self._with_retry(
                "delete",
                lambda: self.client.delete(self.collection, points_selector=selector, wait=True),
            )

    def _points_of(self, uris: list[str]) -> list[tuple[Any, str, Any]]:
        """(point id, source_uri, fingerprint) of every point of `uris`, all read before any is changed
        (changing points mid-scroll could move the scroll's offset past some)."""
        records = self._scroll_uris(uris, ["source_uri", "fingerprint"])
        return [(r.id, str(r.payload.get("source_uri")), r.payload.get("fingerprint")) for r in records if r.payload]

    def _scroll_uris(self, uris: Sequence[str], fields: list[str]) -> Iterator[Any]:
        """Every point whose source_uri is one of `uris`, with the payload `fields` (source_uri among them):
        one pass picked out with a set in an embedded store, a filtered scroll per chunk of URIs on a server."""
        unique = list(dict.fromkeys(uris))
        if not unique:
            return
        if self.one_pass:
            wanted = set(unique)
            yield from (r for r in self._scroll(None, fields) if r.payload and r.payload.get("source_uri") in wanted)
            return
        for i in range(0, len(unique), _URI_CHUNK):
            yield from self._scroll(_uri_filter(unique[i : i + _URI_CHUNK]), fields)

    # -- reads ---------------------------------------------------------------

    def fingerprints_by_uri(self, uris: Sequence[str] | None = None) -> dict[str, str]:
        """Map source_uri -> fingerprint over the collection (or only `uris`).

        An object is reported with its fingerprint only when it is complete: all its
        points carry one fingerprint and there are `object_units` of them. A
        half-replaced or half-written object maps to INCOMPLETE, which never equals
        a real fingerprint, so the next run re-embeds it.
        """
        return {uri: held.fingerprint() for uri, held in self.stored_objects(uris, by_modality=False).items()}

    def stored_objects(self, uris: Sequence[str] | None = None, by_modality: bool = True) -> dict[str, "StoredObject"]:
        """Map source_uri -> the points the collection holds of it, over the collection (or only `uris`).

        by_modality=False counts every point under modality "" and reads one payload field less
        (the plan reads the whole collection at each run's start and needs no modality).
        """
        fields = ["source_uri", "fingerprint", "object_units"] + (["modality"] if by_modality else [])
        result: dict[str, StoredObject] = {}
        records = self._scroll(None, fields) if uris is None else self._scroll_uris(uris, fields)
        for r in records:
            payload = r.payload or {}
            uri, fp = payload.get("source_uri"), payload.get("fingerprint")
            if uri is None or fp is None:
                continue
            held = result.setdefault(str(uri), StoredObject({}, payload.get("object_units")))
            key = (str(fp), str(payload.get("modality") or ""))
            held.points[key] = held.points.get(key, 0) + 1
            held.units.setdefault(str(fp), payload.get("object_units"))
        return result

    def _scroll(self, scroll_filter: models.Filter | None, fields: list[str]) -> Iterator[Any]:
        """Every point matching scroll_filter (all: None), with only the payload `fields`, page by page."""
        offset = None
        while True:
            records, offset = self._with_retry(
                "scroll",
                lambda: self.client.scroll(
                    self.collection,
                    scroll_filter=scroll_filter,
                    limit=_SCROLL_PAGE,
                    offset=offset,
                    with_payload=fields,
                    with_vectors=False,
                ),
            )
            yield from records
            if offset is None:
                break

    def count(self) -> int:
        """Exact number of points in the collection."""
        return self._with_retry("count", lambda: self.client.count(self.collection, exact=True).count)


INCOMPLETE = "incomplete"  # fingerprint reported for a partially stored object: never "unchanged"


@dataclass
class StoredObject:
    """The points the collection holds of one source object: how many per (fingerprint, modality),
    and how many units the object has (``object_units``)."""

    points: dict[tuple[str, str], int]
    expected: int | None
    units: dict[str, int | None] = field(default_factory=dict)  # fingerprint -> its points' object_units

    def fingerprint(self) -> str:
        """The object's fingerprint if it is stored completely, else INCOMPLETE.

        Complete: all of its units are there under one fingerprint (a run killed half-way
        through an object must not make it look unchanged).
        """
        fps = {fp for fp, _ in self.points}
        total = sum(self.points.values())
        if len(fps) == 1 and (self.expected is None or total >= int(self.expected)):
            return next(iter(fps))
        return INCOMPLETE

    def complete(self, fingerprint: str) -> bool:
        """Whether every unit of that version is stored (points of another version may be left too)."""
        held = sum(self.points_of(fingerprint).values())
        expected = self.units.get(fingerprint, self.expected)
        return held > 0 and (expected is None or held >= int(expected))

    def points_of(self, fingerprint: str) -> dict[str, int]:
        """Points per modality stored under fingerprint."""
        out: dict[str, int] = {}
        for (fp, modality), n in self.points.items():
            if fp == fingerprint:
                out[modality] = out.get(modality, 0) + n
        return out


def _is_embedded(client: QdrantClient) -> bool:
    """Whether the client holds an embedded (local mode) store rather than talking to a server."""
    from qdrant_client.local.qdrant_local import QdrantLocal

    return isinstance(getattr(client, "_client", None), QdrantLocal)


def _uri_filter(uris: list[str]) -> models.Filter:
    return models.Filter(must=[models.FieldCondition(key="source_uri", match=models.MatchAny(any=uris))])
