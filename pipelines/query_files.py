"""Queries and results files for `qvl query-batch` and `qvl eval`: JSONL or Parquet, local or fsspec.

A queries file holds one query per row (``id``, ``text``/``image``/``video``, optional
``instruction`` and ``filters``); relative image and video paths are taken from the file's
folder, ``~`` is expanded as ``qvl query`` does. A results file holds one row per query:
``id``, ``hits``, ``skipped``, ``error``; it is a local file.
"""

from __future__ import annotations

import difflib
import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from operators.media.listing import is_data_uri, is_local_uri, local_path
from operators.media.reading import open_uri
from operators.media.manifest import LONE_SURROGATE, is_unicode_text
from operators.qwen3vl.formatting import check_input
from operators.qwen3vl.media_io import MediaError, resolve_image

from .metrics import normalise_source_uri
from .query_inputs import QUERY_FIELDS, QueryInputError, build_filter

_NUMBER_FIELDS = ("video_start", "video_end", "fps", "max_frames")


@dataclass
class QueryRow:
    """One row of a queries file."""

    id: str
    query: dict[str, Any]
    instruction: str | None = None
    filters: dict[str, Any] | None = None


def _file_format(path: str, what: str = "") -> str:
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise QueryInputError(f"{what}{path}: unknown file type (use .jsonl, .ndjson or .json for JSON lines; .parquet or .pq)")


def check_writable(path: str, what: str, *, folder: bool = False) -> None:
    """Fail before any work when ``path`` cannot be written: a local path only, not an existing
    folder (a file for ``folder=True``), under a folder that exists or can be made, and writable."""
    if not is_local_uri(path):
        raise QueryInputError(f"{what}{path}: results are written to a local path")
    target = local_path(path)
    from .preflight import job_copy_error  # (imports transformers: only when a path is checked)

    error = job_copy_error(target)
    if error:
        raise QueryInputError(f"{what}{path}: {error}")
    if os.path.isdir(target) and not folder:
        raise QueryInputError(f"{what}{path}: is a folder (give a file name such as results.parquet)")
    if os.path.exists(target) and not os.path.isdir(target) and folder:
        raise QueryInputError(f"{what}{path}: is a file, not a folder")
    if os.path.isfile(target) and not os.access(target, os.W_OK):
        raise QueryInputError(f"{what}{path}: the file exists and is not writable")
    parent = target if folder else os.path.dirname(target)
    while not os.path.exists(parent):  # the nearest existing ancestor decides
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise QueryInputError(f"{what}{path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise QueryInputError(f"{what}{path}: {parent} is not writable")


def check_results_path(path: str, queries: str | None = None) -> None:
    """A results file path: a known extension, writable, and not the queries file (checked before the job runs)."""
    _file_format(path, "--out ")
    check_writable(path, "--out ")
    if queries is not None and is_local_uri(queries) and os.path.exists(local_path(path)) and \
            os.path.exists(local_path(queries)) and os.path.samefile(local_path(path), local_path(queries)):
        raise QueryInputError(f"--out {path}: is the queries file {queries}: the results would overwrite the queries")


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _media(key: str, value: Any, where: str, base_uri: str) -> str | None:
    """An image/video reference resolved like ``qvl query --image`` (one path or URI; blank: absent)."""
    if not isinstance(value, str):
        what = "a list" if isinstance(value, (list, tuple)) else f"a {type(value).__name__}"
        raise QueryInputError(f"{where}: {key!r} must be one path or URI (a string), got {what}")
    value = value.strip()
    if key == "image" and is_data_uri(value):  # an inline image, as `qvl query --image` takes one
        try:
            resolve_image(value)  # only its header is read: another media type fails here, before any work
        except MediaError as exc:
            raise QueryInputError(f"{where}: 'image': {exc}") from None
        return value
    try:
        return normalise_source_uri(value, base_uri) if value else None
    except ValueError as exc:  # a data: URI, a reference climbing above its store's root
        raise QueryInputError(f"{where}: {key!r}: {exc}") from None


# pandas' index columns in a Parquet file (__index_level_0__...) are not fields and are ignored.
ROW_KEYS = ("id", *QUERY_FIELDS, "instruction", "filters")


def parse_query_row(raw: Any, where: str, base_uri: str) -> QueryRow:
    """Validate one query record; relative image/video paths are taken from the queries file's folder."""
    if not isinstance(raw, Mapping):
        raise QueryInputError(f"{where}: a query row must be an object, got {type(raw).__name__}")
    qid = raw.get("id")
    if isinstance(qid, float) and qid.is_integer():
        qid = int(qid)  # pandas writes an integer column with nulls as doubles (1.0), as in manifests
    if _absent(qid) or (isinstance(qid, str) and not qid.strip()):
        raise QueryInputError(f"{where}: missing 'id'")
    if isinstance(qid, bool) or not isinstance(qid, (str, int)):
        shown = repr(qid) if len(repr(qid)) <= 60 else f"{repr(qid)[:57]}..."
        raise QueryInputError(f"{where}: 'id' must be a string or an integer, got {type(qid).__name__} {shown}")
    where = f"{where} (id {qid})"
    unknown = [str(k) for k in raw if k not in ROW_KEYS and not str(k).startswith("__index_level_")]
    if unknown:  # a misspelt "imgae" would run a text-only query, "filter" an unfiltered one
        hints = [f"{k!r} (did you mean {m[0]!r}?)" if (m := difflib.get_close_matches(k, ROW_KEYS, n=1)) else repr(k)
                 for k in unknown]
        raise QueryInputError(f"{where}: unknown field{'s' if len(unknown) > 1 else ''} {', '.join(hints)}; "
                              f"a query row takes {', '.join(ROW_KEYS)}")
    if not is_unicode_text(raw):  # nor could a results file hold it
        raise QueryInputError(f"{where}: {LONE_SURROGATE}")
    query: dict[str, Any] = {}
    for key in QUERY_FIELDS:
        value = raw.get(key)
        if _absent(value):
            continue
        if key in ("image", "video"):
            value = _media(key, value, where, base_uri)
            if value is None:
                continue
        elif key == "text" and not isinstance(value, str):
            raise QueryInputError(f"{where}: 'text' must be a string, got {type(value).__name__}")
        elif key == "text" and not value.strip():
            continue  # blank text is no query
        elif key in _NUMBER_FIELDS and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise QueryInputError(f"{where}: {key!r} must be a number, got {type(value).__name__}")
        elif key in _NUMBER_FIELDS and not math.isfinite(value):
            raise QueryInputError(f"{where}: {key!r} must be a finite number, got {value!r}")
        if key == "max_frames" and isinstance(value, float) and value.is_integer():
            value = int(value)  # pandas writes an integer column with nulls as doubles (4.0)
        query[key] = value
    if not any(query.get(k) for k in ("text", "image", "video")):
        raise QueryInputError(f"{where}: the query has no text, image or video")
    try:
        check_input(query)  # fps <= 0, max_frames 1.5: named with its row before any work, not per batch
    except (TypeError, ValueError) as exc:
        raise QueryInputError(f"{where}: {exc}") from None
    instruction = raw.get("instruction")
    if not _absent(instruction) and not isinstance(instruction, str):
        raise QueryInputError(f"{where}: 'instruction' must be a string, got {type(instruction).__name__}")
    filters = raw.get("filters")
    if isinstance(filters, str):
        try:
            filters = json.loads(filters) if filters.strip() else None
        except json.JSONDecodeError as exc:
            raise QueryInputError(f"{where}: 'filters' is not valid JSON: {exc.msg}") from None
    if _absent(filters):
        filters = None
    if filters is not None and not isinstance(filters, Mapping):
        raise QueryInputError(f"{where}: 'filters' must be an object")
    if filters is not None:
        filters = {k: v for k, v in filters.items() if not _absent(v)}  # Parquet structs fill gaps with nulls
        try:
            build_filter(filters)  # a bad filter names its row, before any work
        except QueryInputError as exc:
            raise QueryInputError(f"{where}: {exc}") from None
    # "" is kept: an empty instruction is given (as with `qvl query --instruction ""`), None is the default.
    return QueryRow(str(qid), query, None if _absent(instruction) else instruction,
                    dict(filters) if filters else None)


def decode_text(data: bytes, path: str) -> str:
    """A text file's UTF-8 content (a BOM dropped), or a QueryInputError naming the line of the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        raise QueryInputError(f"{path} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x})") from None


def not_json_constant(constant: str) -> Any:
    """Python's json reads NaN and Infinity, which JSON has not: a NaN filter value would be dropped
    as absent and the query run unfiltered."""
    raise ValueError(f"{constant} is not a JSON value")


def read_queries(path: str, storage_options: dict[str, Any] | None = None) -> list[QueryRow]:
    """Queries from a JSONL or Parquet file (local path or fsspec URL); ids must be unique."""
    fmt = _file_format(path)
    try:
        data = open_uri(path, storage_options)
    except FileNotFoundError:
        raise QueryInputError(f"queries file not found: {path}") from None
    base = local_path(path) if is_local_uri(path) else path
    rows: list[QueryRow] = []
    if fmt == "parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(io.BytesIO(data))
        except Exception as exc:  # a truncated or non-Parquet file
            raise QueryInputError(f"{path}: not a readable Parquet file: {exc}") from None
        records = list(enumerate(table.to_pylist(), start=1))
    else:
        records = []
        # split("\n"), not splitlines(): JSON strings may hold U+2028 and friends, which are not line ends here.
        for n, line in enumerate(decode_text(data, path).split("\n"), start=1):
            if line.strip():
                try:
                    records.append((n, json.loads(line, parse_constant=not_json_constant)))
                except json.JSONDecodeError as exc:
                    raise QueryInputError(f"{path} line {n}: invalid JSON: {exc.msg}") from None
                except ValueError as exc:
                    raise QueryInputError(f"{path} line {n}: invalid JSON: {exc}") from None
    unit = "row" if fmt == "parquet" else "line"
    seen: dict[str, int] = {}
    for n, raw in records:
        row = parse_query_row(raw, f"{path} {unit} {n}", base)
        if row.id in seen:
            raise QueryInputError(f"{path} {unit} {n}: duplicate query id {row.id!r} (first on {unit} {seen[row.id]})")
        seen[row.id] = n
        rows.append(row)
    if not rows:
        raise QueryInputError(f"{path}: no queries")
    return rows


_HIT_FIELDS = ("rank", "point_id", "source_uri", "modality", "position", "vector_score", "rerank_score")


def write_results(path: str, results: Sequence[Mapping[str, Any]]) -> None:
    """Write batch results (id, hits, skipped, error) as JSONL or Parquet (payloads as JSON strings there)."""
    fmt = _file_format(path)
    check_writable(path, "")
    path = local_path(path)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as fh:
            for r in results:
                fh.write(json.dumps(r, ensure_ascii=False, default=str) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    hit = pa.struct([("rank", pa.int32()), ("point_id", pa.string()), ("source_uri", pa.string()),
                     ("modality", pa.string()), ("position", pa.string()), ("vector_score", pa.float64()),
                     ("rerank_score", pa.float64()), ("payload", pa.string())])
    skip = pa.struct([("point_id", pa.string()), ("source_uri", pa.string()), ("modality", pa.string()),
                      ("position", pa.string()), ("vector_score", pa.float64()), ("reason", pa.string())])
    schema = pa.schema([("id", pa.string()), ("hits", pa.list_(hit)), ("skipped", pa.list_(skip)),
                        ("error", pa.string())])
    rows = [{"id": r["id"],
             "hits": [{**{k: h.get(k) for k in _HIT_FIELDS},
                       "payload": json.dumps(h.get("payload") or {}, ensure_ascii=False, default=str)}
                      for h in r.get("hits") or []],
             "skipped": list(r.get("skipped") or []), "error": r.get("error")} for r in results]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)


def read_results(path: str) -> list[dict[str, Any]]:
    """Read a results file back (Parquet payloads decoded)."""
    if _file_format(path) == "jsonl":
        with open(path, encoding="utf-8") as fh:
            return [json.loads(line) for line in fh if line.strip()]
    import pyarrow.parquet as pq

    rows = pq.read_table(path).to_pylist()
    for r in rows:
        for h in r["hits"]:
            h["payload"] = json.loads(h["payload"]) if h.get("payload") else {}
    return rows
