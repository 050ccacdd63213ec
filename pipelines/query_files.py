"""Queries and results files for `qvl query-batch` and `qvl eval`: JSONL or Parquet, local or fsspec.

A queries file holds one query per row (``id``, ``text``/``image``/``video``, optional
``instruction`` and ``filters``); relative image and video paths are taken from the file's
folder. A results file holds one row per query: ``id``, ``hits``, ``skipped``, ``error``.
"""

from __future__ import annotations

import io
import json
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from operators.media.listing import is_local_uri, local_path, open_uri

from .query import QUERY_FIELDS, QueryInputError


@dataclass
class QueryRow:
    """One row of a queries file."""

    id: str
    query: dict[str, Any]
    instruction: str | None = None
    filters: dict[str, Any] | None = None


def _file_format(path: str) -> str:
    lower = path.lower()
    if lower.endswith((".parquet", ".pq")):
        return "parquet"
    if lower.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    raise QueryInputError(f"{path}: unknown file type (use .jsonl or .parquet)")


def _absent(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def parse_query_row(raw: Any, where: str, base_uri: str) -> QueryRow:
    """Validate one query record; relative image/video paths are taken from the queries file's folder."""
    from operators.media.manifest import resolve_uri

    if not isinstance(raw, Mapping):
        raise QueryInputError(f"{where}: a query row must be an object, got {type(raw).__name__}")
    qid = raw.get("id")
    if _absent(qid) or isinstance(qid, bool) or not str(qid).strip():
        raise QueryInputError(f"{where}: missing 'id'")
    query: dict[str, Any] = {}
    for key in QUERY_FIELDS:
        value = raw.get(key)
        if _absent(value):
            continue
        if key in ("image", "video") and isinstance(value, str):
            value = resolve_uri(value.strip(), base_uri)
        query[key] = value
    if not any(query.get(k) for k in ("text", "image", "video")):
        raise QueryInputError(f"{where} (id {qid}): the query has no text, image or video")
    instruction = raw.get("instruction")
    filters = raw.get("filters")
    if isinstance(filters, str):
        filters = json.loads(filters) if filters.strip() else None
    if _absent(filters):
        filters = None
    if filters is not None and not isinstance(filters, Mapping):
        raise QueryInputError(f"{where} (id {qid}): 'filters' must be an object")
    if filters is not None:
        filters = {k: v for k, v in filters.items() if not _absent(v)}  # Parquet structs fill gaps with nulls
    return QueryRow(str(qid), query, None if _absent(instruction) else str(instruction),
                    dict(filters) if filters else None)


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

        records = list(enumerate(pq.read_table(io.BytesIO(data)).to_pylist(), start=1))
    else:
        records = []
        for n, line in enumerate(data.decode("utf-8-sig").splitlines(), start=1):
            if line.strip():
                try:
                    records.append((n, json.loads(line)))
                except json.JSONDecodeError as exc:
                    raise QueryInputError(f"{path} line {n}: invalid JSON: {exc.msg}") from None
    seen: set[str] = set()
    for n, raw in records:
        row = parse_query_row(raw, f"{path} {'row' if fmt == 'parquet' else 'line'} {n}", base)
        if row.id in seen:
            raise QueryInputError(f"{path}: duplicate query id {row.id!r}")
        seen.add(row.id)
        rows.append(row)
    if not rows:
        raise QueryInputError(f"{path}: no queries")
    return rows


_HIT_FIELDS = ("rank", "point_id", "source_uri", "modality", "position", "vector_score", "rerank_score")


def write_results(path: str, results: Sequence[Mapping[str, Any]]) -> None:
    """Write batch results (id, hits, skipped, error) as JSONL or Parquet (payloads as JSON strings there)."""
    fmt = _file_format(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
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
