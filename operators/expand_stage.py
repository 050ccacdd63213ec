"""The Ray Data expansion stage: one listed object in, its unit rows (plus status and dead rows) out.

Runs as CPU tasks (flat_map). Reads the object once through fsspec, detects its
type from content, and cuts it into units; it never raises, so one bad file
becomes rows that say so instead of a failed job. A file that crashes a native
decoder (which no ``except`` catches) or hangs it becomes such rows on the task's
retry (operators/crash_journal.py).
"""

from __future__ import annotations

import os
import time
from datetime import datetime, timezone
from functools import lru_cache
from typing import Any

from .crash_journal import WATCHDOG, TaskGuard, current_task_id, reading
from .media.expand import FAILED, ExpandSettings, expand_object
from .units import DeadLetter, SourceObject, dead_row, object_row, payload_for, unit_row


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


def object_to_row(obj: SourceObject) -> dict[str, Any]:
    """A listed object as a dataset row."""
    return {"uri": obj.uri, "size": obj.size, "fingerprint": obj.fingerprint, "mtime": obj.mtime}


_GUARD: TaskGuard | None = None  # this worker process's current task attempt (tasks run one at a time)


def _task_guard(journal: Any, limit_s: float | None) -> TaskGuard | None:
    """The crash journal's guard for the running task attempt: one journal call per attempt, not per row."""
    global _GUARD
    task = current_task_id() if journal is not None else None
    if task is None:
        return None
    if _GUARD is None or _GUARD.task != task:  # task ids are unique across runs
        _GUARD = TaskGuard(journal, task, limit_s, setting="limits.max_expand_s")
    return _GUARD


def expand_rows(row: dict[str, Any], *, settings: ExpandSettings, storage_options: dict[str, Any] | None,
                model: str, model_id: str, dim: int, revision: str | None = None, ingested_at: str | None = None,
                crash_journal: Any = None, max_expand_s: float | None = None) -> list[dict[str, Any]]:
    """Unit rows, dead-letter rows and one object-status row for one listed object.

    crash_journal: a CrashJournal actor; an object that killed this task's worker process, or
    took longer than max_expand_s to expand, is then a dead letter on the retry instead of a crash
    loop or a stalled job (operators/crash_journal.py).
    """
    start = time.perf_counter()
    obj = SourceObject(row["uri"], int(row["size"]), row["fingerprint"], row.get("mtime"))
    stamp = ingested_at or datetime.now(timezone.utc).isoformat()
    guard = _task_guard(crash_journal, max_expand_s)
    if guard is not None and guard.skip(obj.uri):
        error_type, message = guard.letter(obj.uri, "expanding")
        dead = DeadLetter(uri=obj.uri, stage="expand", error_type=error_type, message=message)
        return [dead_row(dead), object_row(obj.uri, FAILED, 0, time.perf_counter() - start)]
    try:
        tokenizer = tokenizer_for(model, revision)
    except Exception:  # chunking falls back to word pieces; the embed stage reports a bad model loudly
        tokenizer = None
    with reading(guard, obj.uri):
        # max_expand_s then bounds each manifest record, not the sum of them (WATCHDOG.extend is a
        # no-op when nothing is armed).
        units, dead, status = expand_object(obj, settings, storage_options, tokenizer, progress=WATCHDOG.extend)
    # A unit that failed here (a bad manifest record) counts until the run ends and settles the
    # count (pipelines/ingest.py: partly_embedded): a run stopped before then leaves the object
    # incomplete, so the next one expands it again and its dead letters are reported.
    unit_letters = sum(1 for d in dead if d.position is not None)
    try:
        rows = [unit_row(u, payload_for(u, model_id, dim, stamp, len(units) + unit_letters)) for u in units]
    except Exception as exc:  # a unit that cannot become a point fails its object, not the job
        units, rows, status = [], [], "failed"
        dead.append(DeadLetter(uri=obj.uri, stage="expand", error_type=type(exc).__name__,
                               message=f"cannot build the object's points: {exc}"))
    rows += [dead_row(d) for d in dead]
    rows.append(object_row(obj.uri, status, len(units), time.perf_counter() - start))
    return rows
