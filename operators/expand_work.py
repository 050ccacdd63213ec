"""What one expansion task does: a few listed objects, or one range of a manifest's records.

A task over a folder holds the images of its few objects. A task over a whole manifest would
hold every image its records reference, and Ray Data caps memory by not launching tasks, not by
pausing a running one: one big manifest of images would fill the object store
(bench/RESULTS.md, section 4). So a big manifest is parsed before the run
(pipelines/expand_plan.py) and its records are expanded RECORDS_PER_TASK at a time, each range
by a task of its own, as that many objects would be.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass
from typing import Any

from .media.manifest import ManifestRecord, RecordError
from .units import SourceObject

# As many records as a task has objects (pipelines/expand_plan.py OBJECTS_PER_EXPAND_TASK): fewer
# would cost more tasks' overhead, more would hold more images per task.
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


Work = ObjectGroup | RecordRange


def work_row(work: Work) -> dict[str, Any]:
    """One task's work as a dataset row."""
    # Pickled: records hold free-form metadata, which an Arrow column would force into one schema.
    return {"work": pickle.dumps(work, protocol=pickle.HIGHEST_PROTOCOL)}


def read_work(row: dict[str, Any]) -> Work:
    """The work a dataset row holds (see work_row)."""
    work = pickle.loads(row["work"])
    if not isinstance(work, (ObjectGroup, RecordRange)):
        raise TypeError(f"not an expansion task's work: {type(work).__name__}")
    return work
