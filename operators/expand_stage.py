"""The Ray Data expansion stage: one task's work in, its unit rows (plus status and dead rows) out.

Runs as CPU tasks (flat_map) over work rows (operators/expand_work.py): a few listed objects,
or one range of a big manifest's records. Reads each object once through fsspec, detects its
type from content, and cuts it into units; it never raises, so one bad file
becomes rows that say so instead of a failed job. A file that crashes a native
decoder (which no ``except`` catches) or hangs it becomes such rows on the task's
retry (operators/crash_journal.py).
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from .crash_journal import TaskGuard, current_task_id, reading
from .expand_work import RecordRange, RecordRanges, read_work
from .media.expand import (FAILED, OK, Expansion, ExpandSettings, TokenizerUnavailable, empty_manifest_letter,
                           record_position, start_expansion)
from .media.manifest import RecordError
from .units import DeadLetter, SourceObject, Unit, dead_row, object_row, payload_for, unit_row


@lru_cache(maxsize=4)
def chunking_tokenizer(model: str, revision: str | None = None) -> Any:
    """tokenizer_for, or TokenizerUnavailable with its error: this worker's text objects then fail
    (and are tried again next run), its other objects are expanded. Once per worker process, as
    a hub that cannot be reached would otherwise be asked again for every object."""
    try:
        return tokenizer_for(model, revision)
    except Exception as exc:
        return TokenizerUnavailable(exc)


@lru_cache(maxsize=4)
def tokenizer_for(model: str, revision: str | None = None) -> Any:
    """The embedder's tokenizer, loaded once per worker process (text is chunked in its tokens).

    The fast tokenizer's own `tokenizers.Tokenizer` (tokenizer.json) is all chunking uses, so
    an expand worker loads just that: importing transformers imports torch, which cost each
    expand worker about 3 CPU-seconds and a few hundred MB (bench/RESULTS.md). Checkpoints
    without a tokenizer.json fall back to transformers' AutoTokenizer.
    """
    from tokenizers import Tokenizer

    local = os.path.join(model, "tokenizer.json")
    if os.path.isfile(local):
        return _for_chunking(Tokenizer.from_file(local))
    if not os.path.isdir(model):
        try:
            from huggingface_hub import hf_hub_download

            # cache- and offline-aware
            return _for_chunking(Tokenizer.from_file(hf_hub_download(model, "tokenizer.json", revision=revision)))
        except Exception:  # no tokenizer.json on the hub, or not reachable: let transformers decide
            pass
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model, revision=revision)


def _for_chunking(tokenizer: Any) -> Any:
    """The tokenizer without the truncation and padding its tokenizer.json may ship: chunking needs every token."""
    tokenizer.no_truncation()
    tokenizer.no_padding()
    return tokenizer


_GUARD: TaskGuard | None = None  # this worker process's current task attempt (tasks run one at a time)


def _task_guard(journal: Any, limit_s: float | None) -> TaskGuard | None:
    """The crash journal's guard for the running task attempt: one journal call per attempt, not per row."""
    global _GUARD
    task = current_task_id() if journal is not None else None
    if task is None:
        return None
    if _GUARD is None or _GUARD.task != task:  # task ids are unique across runs
        # Never giving up on its items: Ray keeps the rows an attempt passed on (see _manifest_rows).
        _GUARD = TaskGuard(journal, task, limit_s, setting="limits.max_expand_s", give_up=False)
    return _GUARD


# How many bytes of a manifest's rows (mostly its images) a task holds before it passes them on.
HANDOVER_BYTES = 16 * 1024 * 1024


def expand_work(row: dict[str, Any], **kwargs: Any) -> Iterator[dict[str, Any]]:
    """The rows of one task's work (a work row): each of its objects' (see object_rows), or of its record ranges'.

    kwargs: object_rows's keyword arguments.
    """
    work = read_work(row)
    if isinstance(work, RecordRanges):
        for rng in work.ranges:
            yield from _range_rows(rng, **kwargs)
        return
    for obj in work.objects:
        yield from object_rows(obj, **kwargs)


def _range_rows(work: RecordRange, *, settings: ExpandSettings, storage_options: dict[str, Any] | None,
                model_id: str, dim: int, ingested_at: str | None = None, crash_journal: Any = None,
                max_expand_s: float | None = None, **_: Any) -> Iterator[dict[str, Any]]:
    """The rows of one range of a manifest's records, and the range's status row (its units, not the manifest's)."""
    start = time.perf_counter()
    stamp = ingested_at or datetime.now(timezone.utc).isoformat()
    expansion = Expansion(work.obj, OK, records=list(work.records), cfg=settings, storage_options=storage_options,
                          positions=work.positions)
    guard = _task_guard(crash_journal, max_expand_s)
    yield from _manifest_rows(expansion, guard, model_id, dim, stamp, start, whole=False)


def object_rows(obj: SourceObject, *, settings: ExpandSettings, storage_options: dict[str, Any] | None,
                model: str, model_id: str, dim: int, revision: str | None = None, ingested_at: str | None = None,
                crash_journal: Any = None, max_expand_s: float | None = None) -> Iterator[dict[str, Any]]:
    """Unit rows, dead-letter rows and one object-status row (the last) for one listed object.

    A manifest's records are read one at a time and their rows passed on every HANDOVER_BYTES, so
    the task holds a few of the images they reference, not all of them.
    crash_journal: a CrashJournal actor; an object (a manifest's record) that killed this task's
    worker process, or took longer than max_expand_s to expand, is then a dead letter on the retry
    instead of a crash loop or a stalled job (operators/crash_journal.py).
    """
    start = time.perf_counter()
    stamp = ingested_at or datetime.now(timezone.utc).isoformat()
    guard = _task_guard(crash_journal, max_expand_s)
    if guard is not None and guard.skip(obj.uri):
        yield dead_row(_skipped(guard, obj.uri, obj.uri))
        yield object_row(obj.uri, FAILED, 0, time.perf_counter() - start)
        return
    tokenizer = chunking_tokenizer(model, revision)
    with reading(guard, obj.uri):
        expansion = start_expansion(obj, settings, storage_options, tokenizer)
    if expansion.records is not None:
        yield from _manifest_rows(expansion, guard, model_id, dim, stamp, start)
        return
    units, dead, status = expansion.read_all()
    try:
        rows = [unit_row(u, payload_for(u, model_id, dim, stamp, expansion.positions)) for u in units]
    except Exception as exc:  # a unit that cannot become a point fails its object, not the job
        units, rows, status = [], [], FAILED
        dead.append(DeadLetter(uri=obj.uri, stage="expand", error_type=type(exc).__name__,
                               message=f"cannot build the object's points: {exc}"))
    done = object_row(obj.uri, status, len(units), time.perf_counter() - start)  # not the time Ray Data holds us
    yield from rows
    yield from (dead_row(d) for d in dead)
    yield done


def _manifest_rows(expansion: Expansion, guard: TaskGuard | None, model_id: str, dim: int, stamp: str,
                   start: float, whole: bool = True) -> Iterator[dict[str, Any]]:
    """A manifest's rows, its records read one at a time, each watched and journalled on its own.

    whole: the records are all the manifest's; else they are one range of them, whose status row
    counts the range's units and which never says the manifest is empty (the driver adds the
    ranges up: pipelines/expand_plan.py).

    Ray keeps what a task attempt already passed on and drops a retry's outputs up to there: the
    retry must make the same rows up to the record that killed the first attempt. So the journal
    blames that record, not the manifest, and the retry leaves out that record alone.
    """
    uri = expansion.obj.uri
    pending: list[dict[str, Any]] = []
    held = units = bad = 0
    waited = 0.0  # while Ray Data held us at a handover: not the expansion's time
    for rec in expansion.records or ():
        # Named by line, unique in the manifest (ids may repeat, or equal another record's line);
        # NUL never occurs in a path, so no object of the task shares the name.
        item = f"{uri}\0line={rec.line}"
        if isinstance(rec, RecordError):  # it did not parse and reads nothing: nothing to watch or blame
            result: Unit | DeadLetter = expansion.read_record(rec)
        elif guard is not None and guard.skip(item):
            result = _skipped(guard, item, uri, record_position(rec))
        else:
            with reading(guard, item):  # max_expand_s bounds each record, not the sum of them
                result = expansion.read_record(rec)
        out = _record_row(result, model_id, dim, stamp, expansion.positions)
        units += out["row_kind"] == "unit"
        bad += out["row_kind"] == "dead"
        pending.append(out)
        held += _size(out)
        if held >= HANDOVER_BYTES:
            handed = time.perf_counter()
            yield from pending
            waited += time.perf_counter() - handed
            pending, held = [], 0
    seconds = time.perf_counter() - start - waited
    yield from pending
    if units or not whole:
        yield object_row(uri, OK if units else FAILED, units, seconds)
    else:
        yield dead_row(empty_manifest_letter(uri, bad))
        yield object_row(uri, FAILED, 0, seconds)


def _skipped(guard: TaskGuard, item: str, uri: str, position: str | None = None) -> DeadLetter:
    """The dead letter of an item the journal says to leave out (it killed or hung an earlier attempt)."""
    error_type, message = guard.letter(item, "expanding")
    return DeadLetter(uri=uri, stage="expand", error_type=error_type, message=message, position=position)


def _size(row: dict[str, Any]) -> int:
    """About how many bytes a row holds: its image, text, payload and message."""
    return sum(len(row.get(key) or "") for key in ("image", "text", "payload", "error_message"))


def _record_row(item: Unit | DeadLetter, model_id: str, dim: int, stamp: str, positions: int) -> dict[str, Any]:
    """A manifest record's row: its unit's, or a dead letter's (also when the unit cannot become a point)."""
    if isinstance(item, DeadLetter):
        return dead_row(item)
    try:
        return unit_row(item, payload_for(item, model_id, dim, stamp, positions))
    except Exception as exc:  # this record fails, not the manifest
        return dead_row(DeadLetter(uri=item.object_uri, stage="expand", error_type=type(exc).__name__,
                                   message=f"cannot build the record's point: {exc}", position=item.position))
