"""How the objects to ingest are cut into expansion tasks: groups of objects, and ranges of manifests' records.

Each task holds the images of what it expands until Ray Data takes its rows, and Ray Data keeps
memory in bounds by launching fewer tasks, not by pausing a running one. So no task may be much
bigger than another: objects go about OBJECTS_PER_EXPAND_TASK to a task, and a manifest
(``.jsonl``, ``.parquet``) is parsed before the run, in parallel tasks, and its records are cut
into ranges of RECORDS_PER_TASK, each expanded by a task of its own (operators/expand_work.py). A manifest that
cannot be parsed there (not one after all, unreadable, or its parse crashed or hung) is expanded
whole, as any other object: the expansion stage's dead letters and crash journal deal with it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection
from typing import Any

import ray

from operators.expand_work import RECORDS_PER_TASK, ObjectGroup, RecordRange, Work, work_row
from operators.media.detect import from_extension
from operators.media.expand import FAILED, OK, ExpandSettings, empty_manifest_letter, read_manifest
from operators.media.manifest import ManifestRecord
from operators.units import SourceObject, dead_row

logger = logging.getLogger(__name__)

OBJECTS_PER_EXPAND_TASK = 64
MAX_EXPAND_BLOCKS = 4096


def input_blocks(n_objects: int) -> int:
    """Blocks (= expand tasks) for the listed objects: about 64 objects per task.

    Each Ray task costs a few milliseconds of driver, raylet and worker CPU: 256 tasks of a few
    files each take CPU from a CPU embedder on a small machine (bench/RESULTS.md). A task's
    memory grows with its objects, so tasks stay small (bounded memory whatever the corpus
    size), and a cluster still gets at least two tasks per CPU.
    """
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return max(1, min(n_objects, MAX_EXPAND_BLOCKS, max(2 * cpus, -(-n_objects // OBJECTS_PER_EXPAND_TASK))))


def record_ranges(obj: SourceObject, settings: ExpandSettings,
                  storage_options: dict[str, Any] | None) -> list[RecordRange] | None:
    """A manifest's records in ranges of RECORDS_PER_TASK; None when it is to be expanded whole."""
    records = read_manifest(obj, settings, storage_options)
    # Not a manifest after all, unreadable, or no record to read: its expansion says why, as before.
    if records is None or not any(isinstance(r, ManifestRecord) for r in records):
        return None
    return [RecordRange(obj, tuple(records[i:i + RECORDS_PER_TASK]), len(records))
            for i in range(0, len(records), RECORDS_PER_TASK)]


# No retry: a parse that crashes its worker is redone by the expansion, under the crash journal.
_record_ranges_task = ray.remote(max_retries=0)(record_ranges)


def split_manifests(todo: list[SourceObject], settings: ExpandSettings, storage_options: dict[str, Any] | None,
                    stall_s: float | None, cpus: float = 1) -> dict[str, list[RecordRange]]:
    """The record ranges of each listed manifest that parses, by URI (in parallel Ray tasks).

    stall_s: when no parse has finished for this long, the ones still running are cancelled
    (a parse that hangs) and their manifests expanded whole, where the watchdog names them.
    """
    # By name: reading every extensionless object's head to find manifests would cost a request each.
    candidates = [o for o in todo if from_extension(o.uri).kind == "manifest"]
    if not candidates:
        return {}
    task = _record_ranges_task.options(num_cpus=cpus)
    refs = {task.remote(o, settings, storage_options): o for o in candidates}
    pending, ranges = list(refs), {}
    progress = time.monotonic()
    try:
        while pending:
            done, pending = ray.wait(pending, num_returns=len(pending), timeout=1.0)
            if done:
                progress = time.monotonic()
            for ref in done:
                try:
                    parsed = ray.get(ref)
                except Exception as exc:  # its worker died (a crashing parser): expanded whole
                    logger.warning("manifest %s: its parse failed (%s); it is expanded whole",
                                   refs[ref].uri, type(exc).__name__)
                    continue
                if parsed:
                    ranges[refs[ref].uri] = parsed
            if pending and stall_s is not None and time.monotonic() - progress > stall_s:
                logger.warning("%d manifest(s) took over %ss to parse; they are expanded whole",
                               len(pending), stall_s)
                break
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)
    return ranges


def work_rows(todo: list[SourceObject], ranges: dict[str, list[RecordRange]]) -> list[dict[str, Any]]:
    """The expansion tasks' work rows: the objects in groups (input_blocks of them), then the record ranges."""
    whole = [o for o in todo if o.uri not in ranges]
    work: list[Work] = []
    if whole:
        per_task = -(-len(whole) // input_blocks(len(whole)))
        work += [ObjectGroup(tuple(whole[i:i + per_task])) for i in range(0, len(whole), per_task)]
    work += [r for o in todo for r in ranges.get(o.uri, ())]
    return [work_row(w) for w in work]


def merge_ranges(summary: dict[str, Any], split: Collection[str]) -> dict[str, Any]:
    """The sink's summary with the status rows of each split manifest's ranges added up into one,
    and its EmptyManifest letter when none of its records gave a unit (as a whole manifest's)."""
    if not split:
        return summary
    objects, merged = [], {}
    for obj in summary.get("objects", []):
        uri = obj["object_uri"]
        if uri not in split:
            objects.append(obj)
            continue
        total = merged.setdefault(uri, {"object_uri": uri, "status": FAILED, "n_units": 0, "seconds": 0.0})
        total["n_units"] += int(obj["n_units"] or 0)
        total["seconds"] += obj["seconds"] or 0.0
        if obj["status"] == OK:
            total["status"] = OK
    dead = list(summary.get("dead", []))
    for uri, total in merged.items():
        if not total["n_units"]:
            bad = sum(1 for d in dead if d["object_uri"] == uri and d.get("position") and d.get("error_stage") == "expand")
            row = dead_row(empty_manifest_letter(uri, bad))
            dead.append({key: row[key] for key in ("object_uri", "position", "error_stage", "error_type", "error_message")})
    return {**summary, "objects": objects + list(merged.values()), "dead": dead}
