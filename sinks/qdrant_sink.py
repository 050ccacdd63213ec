"""Ray Data side of the Qdrant sink: `QdrantDatasink`, the embedded-mode `QdrantOwner` actor, `write_rows`.

Row contract (one row = one point; other columns are ignored):

  - ``point_id``: string, the point's UUID (``operators.units.point_id(uri, position)``).
  - ``vec_<name>``: one column per named vector, e.g. ``vec_full``, ``vec_mrl_256``,
    ``vec_mrl_64`` (names from ``qdrant_schema.vector_name``). Arrow ``list<float>``,
    ``large_list``, ``fixed_size_list`` or Ray's tensor extension (numpy arrays in
    rows); float32 or float64. A null cell leaves that vector out of that point.
    When the sink has a ``CollectionSpec``, the vector columns must be exactly the
    spec's vectors, with its dimensions (checked before writing).
  - ``payload``: a JSON string holding an object (null or "" -> {}). A JSON string
    rather than a struct column, because Arrow struct columns merge their keys
    across rows and fill the gaps with nulls. A dict cell is accepted too.

Modes:

  - server (``settings.url``): each write task opens its own client.
  - embedded (``settings.path``): qdrant local mode locks its folder, so one
    ``QdrantOwner`` actor (started by the driver with ``start_owner``, pinned to
    the driver's node) opens it and every write task sends its points there.

Each write task returns ``{"points", "requests", "retries", "seconds", "rows"}``;
``on_write_complete`` sums them into ``QdrantDatasink.summary``.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import ray
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import Datasink, WriteResult

from sinks.qdrant_client_factory import QdrantSettings, make_client, tune_embedded_storage
from sinks.qdrant_schema import CollectionSpec, ensure_collection
from sinks.qdrant_writer import PointRecord, QdrantWriter, StoredObject, WriteStats

if TYPE_CHECKING:
    from ray.actor import ActorHandle
    from ray.data._internal.execution.interfaces import TaskContext

logger = logging.getLogger(__name__)

ID_COLUMN = "point_id"
PAYLOAD_COLUMN = "payload"
VECTOR_PREFIX = "vec_"
STAT_KEYS = ("points", "requests", "retries")


# -- row/block -> PointRecord ------------------------------------------------------


def _parse_payload(value: Any) -> dict[str, Any]:
    if value is None or value == "":
        return {}
    if isinstance(value, (str, bytes)):
        value = json.loads(value)
    if not isinstance(value, Mapping):
        raise ValueError(f"payload must be a JSON object, got {type(value).__name__}")
    return dict(value)


def _vector_names(columns: Iterable[str], spec: CollectionSpec | None) -> list[str]:
    names = [c[len(VECTOR_PREFIX) :] for c in columns if c.startswith(VECTOR_PREFIX)]
    if spec is not None:
        want = set(spec.vector_dims)
        if set(names) != want:
            raise ValueError(
                f"vector columns {sorted(VECTOR_PREFIX + n for n in names)} do not match collection "
                f"{spec.name!r}, which expects {sorted(VECTOR_PREFIX + n for n in want)}"
            )
    if not names:
        raise ValueError(f"no vector columns (named {VECTOR_PREFIX}<vector name>) among {sorted(columns)}")
    return names


def _check_dims(pid: str, vectors: Mapping[str, np.ndarray], spec: CollectionSpec | None) -> None:
    if spec is None:
        return
    for name, vec in vectors.items():
        if len(vec) != spec.vector_dims[name]:
            raise ValueError(
                f"point {pid}: vector {name!r} has dimension {len(vec)} but collection "
                f"{spec.name!r} expects {spec.vector_dims[name]}"
            )


def _column_vectors(col: pa.ChunkedArray) -> list[np.ndarray | None]:
    out: list[np.ndarray | None] = []
    for chunk in col.chunks:
        values = chunk.to_numpy(zero_copy_only=False)  # (n, d) for tensors, object array for lists
        if chunk.null_count:
            nulls = chunk.is_null().to_numpy(zero_copy_only=False)
        else:
            nulls = None
        for i, v in enumerate(values):
            out.append(None if (nulls is not None and nulls[i]) or v is None else np.asarray(v, dtype=np.float32))
    return out


def block_to_points(block: Block, spec: CollectionSpec | None = None) -> list[PointRecord]:
    """Convert one Ray Data block (row contract in the module docstring) into PointRecords."""
    table: pa.Table = BlockAccessor.for_block(block).to_arrow()
    if table.num_rows == 0:
        return []
    if ID_COLUMN not in table.column_names:
        raise ValueError(f"block has no {ID_COLUMN!r} column; columns: {table.column_names}")
    names = _vector_names(table.column_names, spec)
    ids = table.column(ID_COLUMN).to_pylist()
    vectors = {n: _column_vectors(table.column(VECTOR_PREFIX + n)) for n in names}
    payloads = (
        table.column(PAYLOAD_COLUMN).to_pylist()
        if PAYLOAD_COLUMN in table.column_names
        else [None] * table.num_rows
    )
    points = []
    for i, pid in enumerate(ids):
        if not pid:
            raise ValueError(f"row {i} has an empty {ID_COLUMN}")
        vecs = {n: vectors[n][i] for n in names if vectors[n][i] is not None}
        _check_dims(pid, vecs, spec)
        points.append(PointRecord(str(pid), vecs, _parse_payload(payloads[i])))
    return points


def row_to_point(row: Mapping[str, Any], spec: CollectionSpec | None = None) -> PointRecord:
    """Convert one row dict (same contract as blocks) into a PointRecord."""
    pid = row.get(ID_COLUMN)
    if not pid:
        raise ValueError(f"row has no {ID_COLUMN}")
    names = _vector_names(row.keys(), spec)
    vecs = {
        n: np.asarray(row[VECTOR_PREFIX + n], dtype=np.float32).ravel()
        for n in names
        if row[VECTOR_PREFIX + n] is not None
    }
    _check_dims(pid, vecs, spec)
    return PointRecord(str(pid), vecs, _parse_payload(row.get(PAYLOAD_COLUMN)))


# -- embedded-mode owner -----------------------------------------------------------


class StoreOpenError(RuntimeError):
    """The embedded store could not be opened by its owner (another process holds it, a read-only folder...)."""

    def __init__(self, cause_type: str, message: str) -> None:
        super().__init__(f"{cause_type}: {message}")
        self.cause_type, self.message = cause_type, message

    def __reduce__(self):  # crosses the actor boundary as itself
        return (StoreOpenError, (self.cause_type, self.message))


@ray.remote(num_cpus=0)
class QdrantOwner:
    """The one process that opens an embedded (local-mode) store; write tasks send it their points."""

    def __init__(self, settings: QdrantSettings, collection: str, writer_kwargs: dict[str, Any] | None = None):
        # A store that cannot be opened is reported by open_error(), not by dying here: an actor
        # whose constructor raises costs the driver a Ray traceback and hides the cause.
        self.client = self.writer = None
        self._open_error: StoreOpenError | None = None
        try:
            self.client = make_client(settings)
            tune_embedded_storage(self.client)
            self.writer = QdrantWriter(self.client, collection, **(writer_kwargs or {}))
        except Exception as exc:
            self._open_error = StoreOpenError(type(exc).__name__, str(exc))

    def open_error(self) -> "StoreOpenError | None":
        """Why the store could not be opened; None when it is open."""
        return self._open_error

    def upsert(self, rows: Sequence[PointRecord]) -> dict[str, int]:
        """Upsert PointRecords; return this call's stats (points, requests, retries)."""
        before = self.writer.stats.as_dict()
        self.writer.upsert_points(rows)
        after = self.writer.stats.as_dict()
        return {k: after[k] - before[k] for k in STAT_KEYS}

    def delete_by_uri(self, uris: list[str]) -> None:
        """Delete points by source_uri."""
        self.writer.delete_by_uri(uris)

    def delete_stale(self, current: dict[str, str]) -> int:
        """Delete points of each URI whose fingerprint is not the current one; how many URIs lost points."""
        return self.writer.delete_stale(current)

    def settle_object_units(self, settled: dict[str, tuple[str, int]]) -> None:
        """Record the unit count of objects whose units partly failed to embed."""
        self.writer.settle_object_units(settled)

    def fingerprints_by_uri(self, uris: list[str] | None = None) -> dict[str, str]:
        """source_uri -> fingerprint."""
        return self.writer.fingerprints_by_uri(uris)

    def stored_objects(self, uris: list[str] | None = None) -> dict[str, StoredObject]:
        """source_uri -> the points held of it."""
        return self.writer.stored_objects(uris)

    def ensure_collection(self, spec: CollectionSpec) -> list[str]:
        """Create or validate the collection; returns the storage settings it keeps that differ from spec."""
        notes = ensure_collection(self.client, spec)
        tune_embedded_storage(self.client)  # a collection created just now
        return notes

    def count(self) -> int:
        """Exact point count."""
        return self.writer.count()

    def query_points(self, **kwargs: Any) -> list[Any]:
        """`client.query_points(**kwargs).points` on the owned store (searches in embedded mode)."""
        return self.client.query_points(**kwargs).points

    def close(self) -> None:
        """Close the client (releases the folder lock)."""
        if self.client is not None:
            self.client.close()


def start_owner(
    settings: QdrantSettings, collection: str, writer_kwargs: dict[str, Any] | None = None
) -> "ActorHandle":
    """Start the QdrantOwner for an embedded store on the driver's node (where its folder is)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    if not settings.embedded:
        raise ValueError("an owner actor is only needed for embedded mode (qdrant.path)")
    node = ray.get_runtime_context().get_node_id()
    owner = QdrantOwner.options(
        scheduling_strategy=NodeAffinitySchedulingStrategy(node_id=node, soft=False)
    ).remote(settings, collection, writer_kwargs)
    error = ray.get(owner.open_error.remote())
    if error is not None:
        ray.kill(owner)
        raise error
    return owner


def stop_owner(owner: "ActorHandle") -> None:
    """Close the owner's client and end the actor (one that died already has nothing left to close)."""
    try:
        ray.get(owner.close.remote())
    except ray.exceptions.RayActorError:
        # Killed mid-job (an OOM kill): its callers failed alone and said so; raising here threw
        # away the work of the rest (a query-batch's answered queries).
        pass
    finally:
        ray.kill(owner)


# -- datasink ----------------------------------------------------------------------


class QdrantDatasink(Datasink[dict]):
    """Writes points (row contract in the module docstring) to one Qdrant collection."""

    def __init__(
        self,
        settings: QdrantSettings,
        collection: str,
        owner: "ActorHandle | None" = None,
        *,
        spec: CollectionSpec | None = None,
        writer_kwargs: dict[str, Any] | None = None,
        flush_points: int = 512,
        min_rows_per_write: int | None = None,
    ) -> None:
        if settings.embedded and owner is None:
            raise ValueError(
                "embedded Qdrant (qdrant.path) must be written through one owner actor: pass start_owner(...)"
            )
        if spec is not None and spec.name != collection:
            raise ValueError(f"spec is for collection {spec.name!r}, not {collection!r}")
        self.settings = settings
        self.collection = collection
        self.owner = owner
        self.spec = spec
        self.writer_kwargs = dict(writer_kwargs or {})
        self.flush_points = flush_points
        self._min_rows_per_write = min_rows_per_write
        self.summary: dict[str, Any] | None = None

    @property
    def min_rows_per_write(self) -> int | None:
        """Rows Ray Data bundles per write task (None: its choice)."""
        return self._min_rows_per_write

    def on_write_start(self, schema: pa.Schema | None = None) -> None:
        """Create or validate the collection (through the owner in embedded mode)."""
        if self.spec is None:
            self._check_exists()
            return
        if self.owner is not None:
            ray.get(self.owner.ensure_collection.remote(self.spec))
            return
        client = make_client(self.settings)
        try:
            ensure_collection(client, self.spec)
        finally:
            client.close()

    def _check_exists(self) -> None:
        if self.owner is not None:
            ray.get(self.owner.count.remote())  # raises if the collection is missing
            return
        client = make_client(self.settings)
        try:
            if not client.collection_exists(self.collection):
                raise ValueError(f"collection {self.collection!r} does not exist and no spec was given")
        finally:
            client.close()

    def write(self, blocks: Iterable[Block], ctx: "TaskContext") -> dict[str, Any]:
        """Convert blocks to points and upsert them in batches; return this task's stats."""
        start = time.perf_counter()
        rows = 0
        writer = None
        totals = WriteStats()
        buffer: list[PointRecord] = []

        def flush() -> None:
            nonlocal writer
            if not buffer:
                return
            if self.owner is not None:
                delta = ray.get(self.owner.upsert.remote(list(buffer)))
                for k in STAT_KEYS:
                    setattr(totals, k, getattr(totals, k) + delta[k])
            else:
                if writer is None:
                    writer = QdrantWriter(make_client(self.settings), self.collection, **self.writer_kwargs)
                writer.upsert_points(buffer)
            buffer.clear()

        try:
            for block in blocks:
                points = block_to_points(block, self.spec)
                rows += len(points)
                buffer.extend(points)
                if len(buffer) >= self.flush_points:
                    flush()
            flush()
        finally:
            if writer is not None:
                totals = writer.stats
                writer.client.close()
        return {**totals.as_dict(), "rows": rows, "seconds": time.perf_counter() - start}

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        """Sum the per-task returns (write_result.write_returns) into self.summary."""
        returns = [r for r in write_result.write_returns if isinstance(r, Mapping)]
        summary: dict[str, Any] = {k: sum(int(r.get(k, 0)) for r in returns) for k in (*STAT_KEYS, "rows")}
        seconds = [float(r.get("seconds", 0.0)) for r in returns]
        summary.update(
            tasks=len(returns),
            task_seconds=sum(seconds),
            max_task_seconds=max(seconds, default=0.0),
            num_rows=int(write_result.num_rows),
            size_bytes=int(write_result.size_bytes),
        )
        self.summary = summary
        logger.info("qdrant sink %r: %s", self.collection, summary)

    def on_write_failed(self, error: Exception) -> None:
        """Log the failure (points already upserted stay; re-running is idempotent)."""
        logger.error("qdrant sink %r failed: %s: %s", self.collection, type(error).__name__, error)


# -- driver-side fallback ----------------------------------------------------------


def write_rows(
    rows: Iterable[Mapping[str, Any]],
    target: "QdrantWriter | ActorHandle",
    spec: CollectionSpec | None = None,
) -> dict[str, int]:
    """Write row dicts (datasink contract) from the driver via a QdrantWriter or a QdrantOwner handle."""
    points = [row_to_point(r, spec) for r in rows]
    if isinstance(target, QdrantWriter):
        before = target.stats.as_dict()
        target.upsert_points(points)
        after = target.stats.as_dict()
        return {k: after[k] - before[k] for k in STAT_KEYS}
    return ray.get(target.upsert.remote(points))
