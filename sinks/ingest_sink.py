"""The ingestion job's datasink: writes unit rows as points and returns the run's accounting.

Rows follow operators.units.ROW_COLUMNS plus the vector columns. Unit rows are
upserted through QdrantDatasink; dead and object-status rows are not written to
Qdrant but returned from each write task, so the driver can write the dead-letter
file and the report without a second pass over the data.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Iterable

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.block import Block, BlockAccessor
from ray.data.datasource.datasink import WriteResult

from .qdrant_sink import ID_COLUMN, PAYLOAD_COLUMN, VECTOR_PREFIX, QdrantDatasink

DEAD_FIELDS = ("object_uri", "position", "error_stage", "error_type", "error_message")


class IngestDatasink(QdrantDatasink):
    """QdrantDatasink that also collects dead letters, object statuses and per-modality counts."""

    def write(self, blocks: Iterable[Block], ctx: Any) -> dict[str, Any]:
        """Upsert the unit rows; return write stats plus this task's accounting."""
        dead: list[dict[str, Any]] = []
        objects: list[dict[str, Any]] = []
        points_per_object: Counter[str] = Counter()
        points_per_modality: Counter[str] = Counter()
        seconds: Counter[str] = Counter()

        def unit_blocks() -> Iterable[pa.Table]:
            for block in blocks:
                table: pa.Table = BlockAccessor.for_block(block).to_arrow()
                kind = table.column("row_kind")
                units = table.filter(pc.equal(kind, "unit"))
                dead.extend(table.filter(pc.equal(kind, "dead")).select(list(DEAD_FIELDS)).to_pylist())
                for obj in table.filter(pc.equal(kind, "object")).select(
                        ["object_uri", "status", "n_units", "seconds"]).to_pylist():
                    objects.append(obj)
                    seconds["expand"] += obj["seconds"] or 0.0
                points_per_object.update(units.column("object_uri").to_pylist())
                points_per_modality.update(units.column("modality").to_pylist())
                seconds["embed"] += sum(s or 0.0 for s in units.column("seconds").to_pylist())
                keep = [c for c in units.column_names
                        if c in (ID_COLUMN, PAYLOAD_COLUMN) or c.startswith(VECTOR_PREFIX)]
                yield units.select(keep)

        result = super().write(unit_blocks(), ctx)
        result.update(dead=dead, objects=objects, points_per_object=dict(points_per_object),
                      points_per_modality=dict(points_per_modality), stage_seconds=dict(seconds))
        return result

    def on_write_complete(self, write_result: WriteResult[dict]) -> None:
        """Aggregate stats (base class) and the accounting of every write task."""
        super().on_write_complete(write_result)
        dead, objects = [], []
        per_object: Counter[str] = Counter()
        per_modality: Counter[str] = Counter()
        seconds: Counter[str] = Counter()
        for r in write_result.write_returns:
            if not isinstance(r, dict):
                continue
            dead += r.get("dead", [])
            objects += r.get("objects", [])
            per_object.update(r.get("points_per_object", {}))
            per_modality.update(r.get("points_per_modality", {}))
            seconds.update(r.get("stage_seconds", {}))
        seconds["write"] = self.summary.get("task_seconds", 0.0) if self.summary else 0.0
        self.summary = {**(self.summary or {}), "dead": dead, "objects": objects,
                        "points_per_object": dict(per_object), "points_per_modality": dict(per_modality),
                        "stage_seconds": dict(seconds)}
