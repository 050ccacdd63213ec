"""Parse ``.jsonl`` and ``.parquet`` manifests of mixed records.

A record has any of ``text`` (inline string), ``image`` and ``video`` (URIs:
absolute ``scheme://...``, an absolute path on the manifest's filesystem, or a
path relative to the manifest's folder: the folder it is listed in, so a symlinked
manifest resolves from the link's folder, as a relative link's target does not;
``.`` and ``..`` are resolved, ``//`` in an object key is kept, and a ``file://``
URL (its scheme in any case, or RFC 8089's ``file:/path``) is percent-decoded; in a
manifest read over http(s) a reference resolves as a web page's link does; an inline
``data:`` URI is refused), an optional ``id`` (string or integer),
and anything else, which becomes ``metadata`` (made JSON-safe).

A JSONL manifest that is UTF-16/32 (PowerShell's default) or mostly not UTF-8 text (a binary or
compressed file named ``.jsonl``) raises one ManifestError for the whole file.

Each record yields a ``ManifestRecord`` or, when it is unusable (bad JSON, not an
object, none of text/image/video, a non-string field, empty text, duplicate id, a
Parquet cell Python cannot hold such as invalid UTF-8 or a timestamp past year
9999), a ``RecordError``; one bad record never hides the good ones. ``line`` is 1-based:
the line number in a JSONL file, the row number in a Parquet file.
"""

from __future__ import annotations

import io
import json
import math
import posixpath
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from operators.media.detect import extension
from operators.media.listing import is_data_uri, is_local_uri, local_path
from operators.media.text_chunks import wide_encoding

CONTENT_FIELDS = ("text", "image", "video")
# A record's other fields go into the payload of each of its points. A point must fit one upsert
# request (16 MiB in sinks/qdrant_writer.py), and a batch fails as a whole when one does not:
# a record carrying an OCR dump or a base64 thumbnail fails alone here instead.
MAX_METADATA_BYTES = 1 << 20
# The id is in each point's payload twice (record_id, position) and names its dead letters: an id
# is a name, and one of megabytes would make its point too large for any upsert.
MAX_ID_CHARS = 1024
# A Qdrant server refuses JSON nested past about a hundred levels, and walking deeper values
# recursively can exhaust a worker's stack: a record nested deeper fails alone.
MAX_METADATA_DEPTH = 64


@dataclass(frozen=True)
class ManifestRecord:
    """One usable manifest record with resolved URIs."""

    line: int
    id: str | None
    text: str | None = None
    image: str | None = None
    video: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    # An id-less record's key when its line number is another record's id ("line:<n>").
    line_key: str | None = None

    @property
    def key(self) -> str:
        """The record's key in unit positions: its id, else its line number."""
        if self.id is not None:
            return self.id
        return self.line_key or str(self.line)

    @property
    def modality(self) -> str:
        """text, image or video for one content field; mixed for several."""
        present = [name for name in CONTENT_FIELDS if getattr(self, name) is not None]
        return present[0] if len(present) == 1 else "mixed"


@dataclass(frozen=True)
class RecordError:
    """One unusable manifest record."""

    line: int
    error_type: str
    message: str
    id: str | None = None


class ManifestError(ValueError):
    """The manifest as a whole cannot be read."""


class BadReferenceError(ValueError):
    """A record's reference that names no object (it climbs above the store's root)."""


def resolve_uri(ref: str, manifest_uri: str) -> str:
    """Absolute URI of a record reference, relative ones taken from the manifest's folder."""
    if is_data_uri(ref):  # it would be taken for a relative path, and echoed whole in "not found"
        raise BadReferenceError(f"an inline data: URI ({len(ref):,} characters) is not a reference to a file: "
                                "store the media as a file and give its path or URI")
    ref = _file_url(ref)
    if ref.startswith(("file://", "local://")):  # a file URL percent-decoded, a plain path never
        return local_path(ref)
    if "://" in ref:
        return ref
    if manifest_uri[:8].lower().startswith(("http://", "https://")):
        # A web page's rules: "/x" is the host's root, ".." stops there, the query is not a folder.
        return urllib.parse.urljoin(manifest_uri, ref)
    if is_local_uri(manifest_uri):
        base = posixpath.dirname(local_path(manifest_uri))
        return posixpath.normpath(posixpath.join(base, ref))
    scheme, rest = manifest_uri.split("://", 1)
    rooted = rest.startswith("/")
    base = "" if ref.startswith("/") else rest.rpartition("/")[0]  # not dirname: it merges "m//" into "m"
    path = _resolve_dots(base, ref, ref, manifest_uri)
    return f"{scheme}://{'/' + path if rooted else path}"


def _file_url(ref: str) -> str:
    """A file URL as ``file://...`` whatever its scheme's case, and RFC 8089's ``file:/path`` (which
    Hadoop, Spark and Java write) as ``file:///path``; any other reference as it is."""
    if ref[:5].lower() != "file:":
        return ref
    rest = ref[5:]
    if rest.startswith("//"):
        return "file:" + rest
    return "file://" + rest if rest.startswith("/") else ref


def _resolve_dots(base: str, ref: str, shown: str, manifest_uri: str) -> str:
    """base/ref with "." and ".." resolved, every other segment kept: an object key may hold "//"
    (posixpath.normpath would merge it into another key) and ".." must not climb above the root."""
    parts = base.lstrip("/").split("/") if base.strip("/") else []  # kept verbatim: "m//" is a folder too
    tail = ref.lstrip("/").split("/")
    for i, part in enumerate(tail):
        if part == "." or (part == "" and i == 0):
            continue
        if part == "..":
            if not parts:
                raise BadReferenceError(f"reference {shown!r} climbs above the root of {manifest_uri}")
            parts.pop()
        else:
            parts.append(part)
    return "/".join(parts)


class MetadataTooDeepError(ValueError):
    """A metadata value nested past MAX_METADATA_DEPTH."""


def _json_safe(value: Any, depth: int = 1) -> Any:
    """Metadata value made JSON-serialisable (NaN → None, bytes/dates → strings)."""
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (dict, list, tuple)) and depth > MAX_METADATA_DEPTH:
        raise MetadataTooDeepError(f"the record's other fields nest lists or objects more than {MAX_METADATA_DEPTH} "
                                   "levels deep, past what a point's payload may hold")
    if isinstance(value, dict):
        return {str(k): _json_safe(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v, depth + 1) for v in value]
    if isinstance(value, (bytes, bytearray)):
        return f"<{len(value)} bytes>"
    if hasattr(value, "isoformat"):
        return value.isoformat()
    return str(value)


LONE_SURROGATE = "holds a lone surrogate escape (\\ud800-\\udfff): not valid Unicode text"


def is_unicode_text(value: Any) -> bool:
    """False when a decoded JSON value holds a lone surrogate anywhere (JSON may escape one as
    \\ud800): no id, payload, Arrow column or tokenizer takes it."""
    try:
        json.dumps(value, ensure_ascii=False, default=str).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _absent(value: Any) -> bool:
    """None, or a Parquet null that arrived as NaN."""
    return value is None or (isinstance(value, float) and math.isnan(value))


def _integral(value: Any) -> Any:
    """An integral float as an int: pandas writes an integer column with nulls as doubles (1.0)."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def _usable_id(rid: Any) -> bool:
    """A non-empty string or an integer (not a bool)."""
    return isinstance(rid, (str, int)) and not isinstance(rid, bool) and bool(str(rid).strip())


def explicit_ids(rows: list[tuple[int, Any] | RecordError]) -> set[str]:
    """The ids that records give themselves, as keys."""
    ids = set()
    for row in rows:
        raw = None if isinstance(row, RecordError) else row[1]
        rid = _integral(raw.get("id")) if isinstance(raw, dict) else None
        if _usable_id(rid):
            ids.add(str(rid))
    return ids


def build_record(line: int, raw: Any, manifest_uri: str, seen_keys: set[str],
                 ids: set[str] | frozenset[str] = frozenset()) -> ManifestRecord | RecordError:
    """Validate one decoded record and resolve its URIs (ids: every record's own id, see explicit_ids)."""
    if not isinstance(raw, dict):
        return RecordError(line, "InvalidRecord", f"record is a {type(raw).__name__}, not an object")
    rid = _integral(raw.get("id"))
    if _absent(rid):
        rid = None
    elif not _usable_id(rid):
        shown = repr(rid) if len(repr(rid)) <= 100 else f"{repr(rid)[:97]}..."  # a list of a million items
        return RecordError(line, "InvalidRecord", f"field 'id' must be a non-empty string or an integer, got {shown}")
    elif len(str(rid)) > MAX_ID_CHARS:
        return RecordError(line, "InvalidRecord", f"field 'id' is {len(str(rid)):,} characters, over the "
                           f"{MAX_ID_CHARS:,}-character limit for a record's name")
    else:
        rid = str(rid)
    content: dict[str, str] = {}
    for name in CONTENT_FIELDS:
        value = raw.get(name)
        if _absent(value):
            continue
        if not isinstance(value, str):
            return RecordError(line, "InvalidRecord", f"field {name!r} must be a string, got {type(value).__name__}", rid)
        if not value.strip():
            return RecordError(line, "InvalidRecord", f"field {name!r} is empty", rid)
        try:
            content[name] = value if name == "text" else resolve_uri(value.strip(), manifest_uri)
        except BadReferenceError as exc:
            return RecordError(line, "BadReference", f"field {name!r}: {exc}", rid)
    if not content:
        return RecordError(line, "InvalidRecord", "record has none of text, image, video", rid)
    try:
        metadata = {str(k): _json_safe(v) for k, v in raw.items() if k not in CONTENT_FIELDS and k != "id"}
    except MetadataTooDeepError as exc:
        return RecordError(line, "MetadataTooDeep", str(exc), rid)
    size = len(json.dumps(metadata, ensure_ascii=False).encode("utf-8"))
    if size > MAX_METADATA_BYTES:
        return RecordError(line, "MetadataTooLarge",
                           f"the record's other fields are {size:,} bytes as JSON, over the {MAX_METADATA_BYTES:,}-byte "
                           "limit for a point's payload: keep large values out of the manifest (store a reference)", rid)
    line_key = None
    if rid is None and str(line) in ids:
        # Ids and line numbers share the position namespace: an id-less record must not take the
        # key of a record that names itself, wherever that record comes in the file.
        line_key = f"line:{line}"
    key = rid if rid is not None else (line_key or str(line))
    if key in seen_keys:
        return RecordError(line, "DuplicateId", f"record key {key!r} already used by an earlier record", rid)
    seen_keys.add(key)
    return ManifestRecord(line=line, id=rid, metadata=metadata, line_key=line_key, **content)


# Bytes of a JSONL manifest looked at to tell it from a file that is not text at all.
TEXT_SAMPLE_BYTES = 65_536
# The share of that sample that may be undecodable (invalid UTF-8, control characters) in a text
# manifest: a Latin-1 line's accents are a few percent; random or compressed bytes are over half.
MAX_UNDECODABLE_SHARE = 0.25


def check_text_manifest(data: bytes) -> None:
    """Raise ManifestError when JSONL bytes are UTF-16/32 or mostly undecodable: one letter for the
    file, where every line of it would be a bad record of its own (thousands, none saying why)."""
    wide = wide_encoding(data)
    if wide is not None:
        raise ManifestError(f"the manifest is {wide[0]} ({wide[1]}): only UTF-8 is read, save it as UTF-8 "
                            "(PowerShell: Out-File -Encoding utf8, or Set-Content -Encoding utf8)")
    sample = data[:TEXT_SAMPLE_BYTES].decode("utf-8", errors="replace")
    if not sample:
        return
    bad = sum(1 for ch in sample if ch == "\ufffd" or (ch < " " and ch not in "\t\n\r"))
    if bad / len(sample) > MAX_UNDECODABLE_SHARE:
        raise ManifestError(f"not a text manifest: {bad / len(sample):.0%} of its first {len(sample):,} characters "
                            "are not UTF-8 text (binary or compressed data, or a legacy encoding: save it as UTF-8)")


def _jsonl_rows(data: bytes) -> list[tuple[int, Any] | RecordError]:
    """Decoded JSONL lines (blank lines skipped), bad lines as RecordError."""
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    check_text_manifest(data)
    rows: list[tuple[int, Any] | RecordError] = []
    for number, raw_line in enumerate(data.split(b"\n"), start=1):
        if not raw_line.strip():
            continue
        try:
            value = json.loads(raw_line.decode("utf-8"))
            if not is_unicode_text(value):
                rows.append(RecordError(number, "InvalidUnicode", f"the record {LONE_SURROGATE}"))
                continue
            rows.append((number, value))
        except UnicodeDecodeError as exc:
            rows.append(RecordError(number, "InvalidUTF8", f"invalid UTF-8 at byte {exc.start} of the line"))
        except json.JSONDecodeError as exc:
            rows.append(RecordError(number, "InvalidJSON", f"invalid JSON: {exc.msg} (column {exc.colno})"))
        except (ValueError, RecursionError) as exc:
            # Valid JSON that Python refuses: an integer over its digit limit, nesting past the
            # recursion limit. One such line must not hide the manifest's good records.
            rows.append(RecordError(number, "InvalidJSON", f"unreadable JSON: {type(exc).__name__}: {exc}"))
    return rows


# Rows converted to Python per Arrow batch: the Arrow side of a manifest is held one batch at a
# time (never the whole table next to its Python rows), and a batch that fails to convert is
# redone cell by cell, which costs one batch, not the file.
PARQUET_BATCH_ROWS = 4096


def _cell_error(column: str, arrow_type: Any, exc: Exception) -> tuple[str, str]:
    """Error type and message for one Parquet cell that Python cannot hold."""
    import pyarrow as pa

    if isinstance(exc, UnicodeDecodeError):
        return "InvalidUTF8", f"column {column!r}: invalid UTF-8 at byte {exc.start} of the value"
    if pa.types.is_temporal(arrow_type) and isinstance(exc, (OverflowError, ValueError)):
        # pyarrow's own message ("Python int too large to convert to C int") names no date.
        return "InvalidValue", (f"column {column!r} ({arrow_type}): the value is outside Python's "
                                f"date/time range (years 1 to 9999): {type(exc).__name__}: {exc}")
    return "InvalidValue", f"column {column!r} ({arrow_type}): unreadable value: {type(exc).__name__}: {exc}"


def _salvage_batch(batch: Any, first_line: int) -> list[tuple[int, Any] | RecordError]:
    """Rows of a batch whose conversion failed: column by column, then cell by cell in a column
    that fails, so each bad row is its own RecordError naming its row (line) and column(s)."""
    names = batch.schema.names
    columns: list[list[Any]] = []
    bad: dict[int, list[tuple[str, str, str]]] = {}  # row offset -> (column, error type, message) per bad cell
    for name, column in zip(names, batch.columns):
        try:
            # Whole columns first: a cell-by-cell pass over every column of a 4096-row batch
            # for one bad cell would cost thousands of conversions per column.
            columns.append(column.to_pylist())
            continue
        except Exception:
            pass  # which cells, and why: found one by one below
        values: list[Any] = []
        for i in range(batch.num_rows):
            try:
                values.append(column[i].as_py())
            except Exception as exc:  # any unconvertible cell fails its row only
                values.append(None)
                bad.setdefault(i, []).append((name, *_cell_error(name, column.type, exc)))
        columns.append(values)
    rows: list[tuple[int, Any] | RecordError] = []
    for i in range(batch.num_rows):
        raw = {name: values[i] for name, values in zip(names, columns)}
        line = first_line + i
        if i not in bad:
            rows.append((line, raw))
            continue
        cells = bad[i]
        # The id, when readable, names the record in its dead letter's position.
        rid = None if any(name == "id" for name, _, _ in cells) else _integral(raw.get("id"))
        message = "; ".join(msg for _, _, msg in cells)
        named = _usable_id(rid) and len(str(rid)) <= MAX_ID_CHARS
        rows.append(RecordError(line, cells[0][1], message, str(rid) if named else None))
    return rows


def _parquet_rows(data: bytes) -> list[tuple[int, Any] | RecordError]:
    """Parquet rows as dicts, numbered from 1; a row with a cell Python cannot hold is a RecordError."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(io.BytesIO(data)).iter_batches(batch_size=PARQUET_BATCH_ROWS)
    except Exception as exc:
        raise ManifestError(f"cannot read Parquet manifest: {type(exc).__name__}: {exc}") from exc
    rows: list[tuple[int, Any] | RecordError] = []
    while True:
        try:
            batch = next(batches, None)
        except Exception as exc:  # a corrupt page: the file, not one value, is unreadable
            raise ManifestError(f"cannot read Parquet manifest: {type(exc).__name__}: {exc}") from exc
        if batch is None:
            return rows
        first_line = len(rows) + 1
        try:
            rows.extend(enumerate(batch.to_pylist(), start=first_line))
        except Exception:  # a cell Python cannot hold (invalid UTF-8, a date past 9999...): find it
            rows.extend(_salvage_batch(batch, first_line))


def manifest_format(uri: str, data: bytes) -> str:
    """'parquet' (PAR1 magic or .parquet) or 'jsonl'."""
    return "parquet" if data.startswith(b"PAR1") or extension(uri) == ".parquet" else "jsonl"


def parse_manifest(data: bytes, manifest_uri: str, fmt: str | None = None) -> list[ManifestRecord | RecordError]:
    """Records of a JSONL or Parquet manifest, in file order, with per-record errors in place."""
    fmt = fmt or manifest_format(manifest_uri, data)
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"unknown manifest format {fmt!r}")
    rows = _parquet_rows(data) if fmt == "parquet" else _jsonl_rows(data)
    seen: set[str] = set()
    ids = explicit_ids(rows)
    out: list[ManifestRecord | RecordError] = []
    for row in rows:
        out.append(row if isinstance(row, RecordError) else build_record(row[0], row[1], manifest_uri, seen, ids))
    if not out:
        raise ManifestError("manifest has no records")
    return out
