"""What one expansion task does: a few listed objects, or about RECORDS_PER_TASK manifest records.

A task over a folder holds the images of its few objects. A task over a whole manifest would
hold every image its records reference, and Ray Data caps memory by not launching tasks, not by
pausing a running one: one big manifest of images would fill the object store
(bench/RESULTS.md, section 4). So manifests are parsed before the run (pipelines/expand_plan.py)
and their records expanded RECORDS_PER_TASK to a task: a big manifest's in ranges, small
manifests' packed together.
"""

from __future__ import annotations

import pickle
import zlib
from dataclasses import dataclass
from typing import Any

from .media.manifest import ManifestRecord, RecordError
from .units import SourceObject

# About as many records as a task over a folder has objects (pipelines/expand_plan.py,
# OBJECTS_PER_EXPAND_TASK): fewer would cost more tasks' overhead, more would hold more images.
RECORDS_PER_TASK = 64


@dataclass(frozen=True)
class ObjectGroup:
    """Listed objects, each expanded whole."""

    objects: tuple[SourceObject, ...]


@dataclass(frozen=True)
class RecordRange:
    """Consecutive records of one manifest, already parsed.

    positions: the manifest's records in all (each unit's payload carries its object's point count).
    """

    obj: SourceObject
    records: tuple[ManifestRecord | RecordError, ...]
    positions: int


@dataclass(frozen=True)
class RecordRanges:
    """Ranges of manifests' records (at most RECORDS_PER_TASK records in all, or one full range)."""

    ranges: tuple[RecordRange, ...]


Work = ObjectGroup | RecordRanges


def pickled_work(work: Work) -> bytes:
    """One task's work as the bytes of its dataset row (see work_row)."""
    # Pickled: records hold free-form metadata, which an Arrow column would force into one schema.
    # Compressed: the records wait in the object store for the whole run, and their pickles
    # (repeated URIs and field names) are several times a Parquet manifest's size.
    return zlib.compress(pickle.dumps(work, protocol=pickle.HIGHEST_PROTOCOL), 1)


def work_row(work: Work | bytes) -> dict[str, Any]:
    """One task's work (or its pickled_work) as a dataset row."""
    return {"work": work if isinstance(work, bytes) else pickled_work(work)}


def read_work(row: dict[str, Any]) -> Work:
    """The work a dataset row holds (see work_row)."""
    work = pickle.loads(zlib.decompress(row["work"]))
    if not isinstance(work, (ObjectGroup, RecordRanges)):
        raise TypeError(f"not an expansion task's work: {type(work).__name__}")
    return work
