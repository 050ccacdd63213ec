"""How the objects to ingest are cut into expansion tasks: groups of objects, and manifests' records.

Each task holds the images of what it expands until Ray Data takes its rows, and Ray Data keeps
memory in bounds by launching fewer tasks, not by pausing a running one. So no task may be much
bigger than another: objects go about OBJECTS_PER_EXPAND_TASK to a task, and manifests (``.jsonl``,
``.parquet``) are parsed before the run, in parallel Ray tasks, their records going
RECORDS_PER_TASK to a task (a big manifest's in ranges, small ones' packed together;
operators/expand_work.py). A manifest that cannot be parsed there (not one after all, or
unreadable) is expanded whole, as any other object: the expansion stage's dead letters and crash
journal deal with it. So is one whose parse crashes its worker, or hangs past
limits.max_expand_s (its worker's watchdog stops it); the other manifests of its parse task
(up to PARSE_TASK_MANIFESTS, PARSE_TASK_BYTES in all) are parsed again one per task.

The parsed records travel pickled and compressed in the work rows, which Ray keeps in its
object store for the run (spilled to disk under pressure).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

import ray

from operators.crash_journal import JOURNAL_TIMEOUT_S, WATCHDOG
from operators.expand_work import RECORDS_PER_TASK, ObjectGroup, RecordRange, RecordRanges, pickled_work, work_row
from operators.media.detect import from_extension
from operators.media.expand import FAILED, OK, ExpandSettings, empty_manifest_letter, read_manifest
from operators.media.manifest import ManifestRecord
from operators.media.reading import is_unreachable
from operators.units import SourceObject, dead_row
from sinks.ingest_sink import DEAD_FIELDS

from .preflight import first_line

logger = logging.getLogger(__name__)

OBJECTS_PER_EXPAND_TASK = 64
MAX_EXPAND_BLOCKS = 4096  # groups of objects
# Work rows in all: past this many, several share a task (pipelines/ingest.py allows for it). A
# million manifest records are 15,625 rows; each row costs the driver a block.
MAX_WORK_BLOCKS = 65_536
# A parse task takes manifests up to this many bytes and this many manifests (or one bigger one):
# thousands of small manifests cost a few tasks, not one each.
PARSE_TASK_BYTES = 16 * 1024 * 1024
PARSE_TASK_MANIFESTS = 256


def input_blocks(n_objects: int) -> int:
    """Expand tasks for the listed objects: about 64 objects per task, at least two per CPU.

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
    try:
        records = read_manifest(obj, settings, storage_options)
    except Exception as exc:  # its expansion reads it again, and says why in a dead letter
        if is_unreachable(exc):  # a store that did not answer: worth a word, the manifest may be big
            logger.warning("manifest %s could not be read before the run (%s: %s); it is expanded whole",
                           obj.uri, type(exc).__name__, exc)
        return None
    # Not a manifest after all, or no record to read: its expansion says why, as before.
    if records is None or not any(isinstance(r, ManifestRecord) for r in records):
        return None
    return [RecordRange(obj, tuple(records[i:i + RECORDS_PER_TASK]), len(records))
            for i in range(0, len(records), RECORDS_PER_TASK)]


def pack_manifests(objects: list[SourceObject], settings: ExpandSettings, storage_options: dict[str, Any] | None,
                   limit_s: float | None = None, journal: Any = None,
                   key: str = "parse") -> tuple[list[str], list[bytes], int, float]:
    """(the manifests parsed, their records' work packed RECORDS_PER_TASK to a task and pickled, the most
    rows one such task makes, seconds taken).

    limit_s: a manifest whose parse runs longer kills this worker process (a hung parser; the
    caller sees the task fail), as the expansion's watchdog does, after telling `journal` (a
    CrashJournal) which manifest it was, under `key`.
    """
    start = time.perf_counter()
    parsed: list[str] = []
    work: list[bytes] = []
    pack: list[RecordRange] = []
    held = most_rows = 0

    def flush() -> None:
        nonlocal pack, held, most_rows
        work.append(pickled_work(RecordRanges(tuple(pack))))
        most_rows = max(most_rows, held + len(pack))  # each range adds its status row
        pack, held = [], 0

    for obj in objects:
        if limit_s is not None:
            WATCHDOG.arm(journal, key, obj.uri, limit_s)
        try:
            ranges = record_ranges(obj, settings, storage_options)
        finally:
            WATCHDOG.disarm()
        if ranges is None:
            continue
        parsed.append(obj.uri)
        for rng in ranges:
            if pack and held + len(rng.records) > RECORDS_PER_TASK:
                flush()
            pack.append(rng)
            held += len(rng.records)
    if pack:
        flush()
    return parsed, work, most_rows, time.perf_counter() - start


# No retry: a parse that crashes its worker is redone by the expansion, under the crash journal.
_pack_task = ray.remote(max_retries=0)(pack_manifests)


def parse_batches(manifests: list[SourceObject], max_bytes: int = PARSE_TASK_BYTES,
                  max_count: int = PARSE_TASK_MANIFESTS) -> list[list[SourceObject]]:
    """The manifests in listing order, cut into parse tasks' shares."""
    batches: list[list[SourceObject]] = []
    size = 0
    for obj in manifests:
        if not batches or len(batches[-1]) >= max_count or size + obj.size > max_bytes:
            batches.append([])
            size = 0
        batches[-1].append(obj)
        size += obj.size
    return batches


@dataclass
class SplitManifests:
    """The manifests whose records go RECORDS_PER_TASK to a task, that work, the most rows one task
    of it makes, and the seconds the parse tasks took."""

    uris: set[str] = field(default_factory=set)
    work: list[bytes] = field(default_factory=list)
    most_rows: int = 0
    seconds: float = 0.0


def split_manifests(todo: list[SourceObject], settings: ExpandSettings, storage_options: dict[str, Any] | None,
                    limit_s: float | None, cpus: float = 1, concurrency: int | None = None,
                    batch_bytes: int = PARSE_TASK_BYTES, journal: Any = None) -> SplitManifests:
    """Parse the listed manifests (by name) in Ray tasks, and pack their records into expansion work.

    No more parse tasks run at once than the cluster has CPUs for (or `concurrency`). A manifest
    whose parse runs past limit_s is stopped by its worker's watchdog and expanded whole, where
    the expansion's watchdog names it; journal (the run's CrashJournal) tells which one it was.
    The other manifests of a task that failed (that one, or a crash) are parsed again one per task.
    """
    out = SplitManifests()
    # By name: reading every extensionless object's head to find manifests would cost a request each.
    queue = deque(parse_batches([o for o in todo if from_extension(o.uri).kind == "manifest"], batch_bytes))
    if not queue:
        return out
    total = ray.cluster_resources().get("CPU", 1)
    slots = concurrency or max(1, int(total // cpus) if cpus > 0 else int(total))
    task = _pack_task.options(num_cpus=cpus)
    running: dict[Any, tuple[list[SourceObject], str]] = {}
    started = 0
    try:
        while queue or running:
            while queue and len(running) < slots:
                batch, key = queue.popleft(), f"parse:{started}"
                started += 1
                running[task.remote(batch, settings, storage_options, limit_s, journal, key)] = (batch, key)
            # A timeout, so that a stop signal's handler gets to run (pipelines/interrupts.py).
            done, _ = ray.wait(list(running), num_returns=1, timeout=1.0)
            for ref in done:
                batch, key = running.pop(ref)
                try:
                    parsed, work, most_rows, seconds = ray.get(ref)
                except Exception as exc:  # its worker died: a crashing parser, or one its watchdog stopped
                    queue.extend(_after_failure(batch, _timed_out(journal, key), limit_s, exc))
                    continue
                out.uris.update(parsed)
                out.work += work
                out.most_rows = max(out.most_rows, most_rows)
                out.seconds += seconds
    finally:
        for ref in running:  # a stop signal, or the cluster failing
            try:
                ray.cancel(ref, force=True)
            except Exception:  # the cluster is gone: so are its tasks
                pass
    return out


def _timed_out(journal: Any, key: str) -> set[str]:
    """The manifests the journal heard a parse task's watchdog stop (none when it cannot be asked)."""
    if journal is None:
        return set()
    try:
        _, skipped, _ = ray.get(journal.begin.remote(key), timeout=JOURNAL_TIMEOUT_S)
        journal.end.remote(key)
    except Exception:  # a lost journal: every manifest of the task is parsed again alone
        return set()
    return {item for item, why in skipped.items() if why.startswith("timeout:")}


def _after_failure(batch: list[SourceObject], hung: set[str], limit_s: float | None,
                   exc: BaseException) -> list[list[SourceObject]]:
    """What to parse again after a parse task died: each of its manifests that did not hang, alone
    (a single one that did not hang crashed: it is expanded whole, as is one that hung)."""
    why = f"{type(exc).__name__}: {first_line(exc)}" if first_line(exc) else type(exc).__name__
    for obj in batch:
        if obj.uri in hung:
            logger.warning("parsing %s took over limits.max_expand_s=%g s; it is expanded whole", obj.uri, limit_s)
    rest = [obj for obj in batch if obj.uri not in hung]
    if len(batch) == 1 and rest:
        logger.warning("parsing %s before the run failed (%s); it is expanded whole", batch[0].uri, why)
    if len(batch) == 1 or not rest:
        return []
    logger.warning("parsing %s before the run failed (%s); %s parsed again alone", _names(batch),
                   "a manifest took over limits.max_expand_s" if hung else why,
                   "the others are" if hung else "each is")
    return [[obj] for obj in rest]


def _names(batch: list[SourceObject]) -> str:
    """A parse task's manifests, for a log line."""
    return batch[0].uri if len(batch) == 1 else f"{len(batch)} manifests ({batch[0].uri}, ...)"


def work_rows(todo: list[SourceObject], split: SplitManifests) -> list[dict[str, Any]]:
    """The expansion tasks' work rows: the other objects evenly in input_blocks groups, then the records' work."""
    whole = [o for o in todo if o.uri not in split.uris]
    rows = []
    if whole:
        k = input_blocks(len(whole))
        bounds = [i * len(whole) // k for i in range(k + 1)]
        rows += [work_row(ObjectGroup(tuple(whole[a:b]))) for a, b in zip(bounds, bounds[1:])]
    return rows + [work_row(w) for w in split.work]


def merge_ranges(summary: dict[str, Any], split: Collection[str], parse_seconds: float = 0.0) -> dict[str, Any]:
    """The sink's summary with the status rows of each split manifest's ranges added up into one,
    its EmptyManifest letter when none of its records gave a unit (as a whole manifest's), and
    the parse's seconds in the expansion's."""
    if not split and not parse_seconds:
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
    bad: dict[str, int] = defaultdict(int)
    for d in dead:
        if d.get("position") and d.get("error_stage") == "expand":
            bad[d["object_uri"]] += 1
    for uri, total in merged.items():
        if not total["n_units"]:
            row = dead_row(empty_manifest_letter(uri, bad[uri]))
            dead.append({key: row[key] for key in DEAD_FIELDS})
    seconds = dict(summary.get("stage_seconds", {}))
    seconds["expand"] = seconds.get("expand", 0.0) + parse_seconds
    return {**summary, "objects": objects + list(merged.values()), "dead": dead, "stage_seconds": seconds}
