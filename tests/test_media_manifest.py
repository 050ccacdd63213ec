"""Manifest parsing: JSONL and Parquet, URI resolution, per-record errors."""

from __future__ import annotations

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.media.expand import ExpandSettings, expand_object
from operators.media.manifest import PARQUET_BATCH_ROWS, ManifestError, ManifestRecord, RecordError, parse_manifest, resolve_uri
from operators.units import SourceObject
from tests.media_gen import string_array_from_bytes


@pytest.mark.parametrize(
    ("ref", "manifest", "expected"),
    [
        ("img/a.png", "/data/m/list.jsonl", "/data/m/img/a.png"),
        ("../v/b.mp4", "/data/m/list.jsonl", "/data/v/b.mp4"),
        ("/abs/c.png", "/data/m/list.jsonl", "/abs/c.png"),
        ("file:///abs/c.png", "s3://bucket/m/list.jsonl", "/abs/c.png"),
        ("img/a.png", "s3://bucket/m/list.jsonl", "s3://bucket/m/img/a.png"),
        ("../a.png", "s3://bucket/m/list.jsonl", "s3://bucket/a.png"),
        ("/other/a.png", "s3://bucket/m/list.jsonl", "s3://other/a.png"),
        ("s3://elsewhere/x.png", "/data/m/list.jsonl", "s3://elsewhere/x.png"),
        ("img/a.png", "memory:///root/list.jsonl", "memory:///root/img/a.png"),
        ("img/a.png", "file:///data/list.jsonl", "/data/img/a.png"),
        # Object keys may hold "//" (a different key from "/"); ".." and "." resolve, nothing else merges.
        ("a//double.png", "s3://bucket/m/list.jsonl", "s3://bucket/m/a//double.png"),
        ("./a/../b.png", "s3://bucket/m//list.jsonl", "s3://bucket/m//b.png"),
        ("../../other/o.png", "s3://bucket/m/list.jsonl", "s3://other/o.png"),
        ("../x/./y.png", "memory:///root/sub/list.jsonl", "memory:///root/x/y.png"),
        # A file URL is percent-encoded (Path.as_uri()).
        ("file:///data/my%20pic%20%C3%A9.png", "s3://bucket/m/list.jsonl", "/data/my pic é.png"),
        # A file URL's scheme in any case, and RFC 8089's file:/path (Hadoop, Spark and Java write it).
        ("FILE:///data/c.png", "/data/m/list.jsonl", "/data/c.png"),
        ("file:/data/c%201.png", "s3://bucket/m/list.jsonl", "/data/c 1.png"),
        ("file://localhost/data/c.png", "/data/m/list.jsonl", "/data/c.png"),
        # Over http(s), as a web page's links: "/" is the host's root, ".." stops there, no query kept.
        ("/static/a.png", "https://host/data/m.jsonl", "https://host/static/a.png"),
        ("../../../a.png", "https://host/data/m.jsonl", "https://host/a.png"),
        ("img/a.png", "https://host/data/m.jsonl?token=abc", "https://host/data/img/a.png"),
        ("img/a.png", "http://host:8080/m.jsonl", "http://host:8080/img/a.png"),
    ],
)
def test_resolve_uri(ref: str, manifest: str, expected: str) -> None:
    assert resolve_uri(ref, manifest) == expected


def test_a_reference_climbing_above_the_store_root_fails_its_record_naming_it() -> None:
    with pytest.raises(ValueError, match=r"reference '../../../o.png' climbs above the root of s3://b/m/l.jsonl"):
        resolve_uri("../../../o.png", "s3://b/m/l.jsonl")
    lines = [{"id": "up", "image": "../../../o.png"}, {"id": "ok", "text": "fine"}]
    rows = list(parse_manifest("\n".join(json.dumps(r) for r in lines).encode(), "s3://b/m/l.jsonl"))
    assert isinstance(rows[0], RecordError) and rows[0].error_type == "BadReference" and rows[0].id == "up"
    assert "climbs above the root" in rows[0].message and isinstance(rows[1], ManifestRecord)


def test_an_inline_data_uri_fails_its_record_without_echoing_it() -> None:
    """A data: URI has no '://': it was taken for a relative path and its whole text echoed as 'not found'."""
    inline = "data:image/png;base64," + "A" * 50_000
    lines = [{"id": "inline", "image": inline}, {"id": "clip", "video": "DATA:video/mp4;base64,AAAA"},
             {"id": "ok", "text": "data: not a reference in a text field"}]
    rows = list(parse_manifest("\n".join(json.dumps(r) for r in lines).encode(), "/m/l.jsonl"))
    for row in rows[:2]:
        assert isinstance(row, RecordError) and row.error_type == "BadReference", row
        assert "inline data: URI" in row.message and "store the media as a file" in row.message
        assert len(row.message) < 300, row.message
    assert isinstance(rows[2], ManifestRecord)


def test_jsonl_good_and_bad_records() -> None:
    lines = [
        json.dumps({"id": "a", "text": "hello", "lang": "en", "score": 0.5}),
        json.dumps({"id": 7, "image": "img/x.png"}),
        "",  # blank lines are skipped but counted
        "{not json",
        json.dumps(["a", "list"]),
        json.dumps({"id": "b", "meta": 1}),  # nothing to embed
        json.dumps({"id": "c", "text": 42}),  # non-string field
        json.dumps({"id": "a", "text": "duplicate id"}),
        json.dumps({"text": "no id", "video": "v/clip.mp4", "image": "img/y.png"}),
        json.dumps({"id": True, "text": "bool id"}),
        json.dumps({"text": "   "}),
    ]
    data = "\n".join(lines).encode()
    out = parse_manifest(data, "s3://bkt/dir/m.jsonl")
    good = [r for r in out if isinstance(r, ManifestRecord)]
    bad = {r.line: r for r in out if isinstance(r, RecordError)}
    assert [(r.line, r.key, r.modality) for r in good] == [(1, "a", "text"), (2, "7", "image"), (9, "9", "mixed")]
    assert good[0].metadata == {"lang": "en", "score": 0.5}
    assert good[1].image == "s3://bkt/dir/img/x.png"
    assert good[2].video == "s3://bkt/dir/v/clip.mp4"
    assert {line: r.error_type for line, r in bad.items()} == {
        4: "InvalidJSON",
        5: "InvalidRecord",
        6: "InvalidRecord",
        7: "InvalidRecord",
        8: "DuplicateId",
        10: "InvalidRecord",
        11: "InvalidRecord",
    }
    assert "none of text, image, video" in bad[6].message and "'text' must be a string" in bad[7].message


def test_jsonl_invalid_utf8_line_only_fails_that_line() -> None:
    data = b'{"text": "ok"}\n{"text": "\xff"}\n\xef\xbb\xbf'
    out = parse_manifest(b"\xef\xbb\xbf" + data, "/m.jsonl")
    assert isinstance(out[0], ManifestRecord) and isinstance(out[1], RecordError) and out[1].error_type == "InvalidUTF8"


def test_json_that_python_refuses_fails_only_its_line() -> None:
    """An integer past Python's digit limit or nesting past the recursion limit is one bad line."""
    lines = [json.dumps({"id": "a", "text": "first"}),
             '{"id": "big", "text": "x", "checksum": ' + "9" * 5000 + "}",
             '{"id": "deep", "text": "x", "meta": ' + "[" * 100_000 + "]" * 100_000 + "}",
             json.dumps({"id": "b", "text": "last"})]
    out = parse_manifest("\n".join(lines).encode(), "/m.jsonl")
    assert [r.key for r in out if isinstance(r, ManifestRecord)] == ["a", "b"]
    bad = [r for r in out if isinstance(r, RecordError)]
    assert [(r.line, r.error_type) for r in bad] == [(2, "InvalidJSON"), (3, "InvalidJSON")]
    assert "digits" in bad[0].message and "RecursionError" in bad[1].message


def test_a_record_whose_metadata_cannot_fit_a_point_fails_alone() -> None:
    """Metadata goes into every point's payload: over MAX_METADATA_BYTES the record is a dead letter."""
    from operators.media.manifest import MAX_METADATA_BYTES

    lines = [json.dumps({"id": "a", "text": "fits", "note": "x" * (MAX_METADATA_BYTES - 100)}),
             json.dumps({"id": "b", "text": "too big", "ocr": "é" * MAX_METADATA_BYTES}),
             json.dumps({"id": "b", "text": "the id is still free"})]
    out = parse_manifest("\n".join(lines).encode(), "/m.jsonl")
    assert isinstance(out[0], ManifestRecord) and isinstance(out[2], ManifestRecord)
    assert out[1].error_type == "MetadataTooLarge" and out[1].id == "b"
    assert "2,097,16" in out[1].message and "1,048,576-byte limit" in out[1].message


def test_a_huge_id_or_deeply_nested_metadata_fails_its_record_alone() -> None:
    """An id is in every payload twice: a huge one would make its point too large for any upsert (and
    fail the run). Metadata nested past MAX_METADATA_DEPTH (yet within the JSON parser's reach) would
    exhaust a worker's stack while being read, and a server refuses it."""
    from operators.media.manifest import MAX_ID_CHARS, MAX_METADATA_DEPTH

    deep = "[" * (MAX_METADATA_DEPTH + 1) + "]" * (MAX_METADATA_DEPTH + 1)
    ok = "[" * MAX_METADATA_DEPTH + "]" * MAX_METADATA_DEPTH
    lines = [json.dumps({"id": "a", "text": "first"}),
             json.dumps({"id": "x" * (MAX_ID_CHARS + 1), "text": "named at length"}),
             json.dumps({"id": "y" * MAX_ID_CHARS, "text": "named at the limit"}),
             '{"id": "deep", "text": "x", "meta": ' + deep + "}",
             '{"id": "deeper", "text": "x", "meta": ' + "[" * 900 + "]" * 900 + "}",
             '{"id": "ok", "text": "x", "meta": ' + ok + "}",
             json.dumps({"id": list(range(10_000)), "text": "an id that is a list"}),
             json.dumps({"id": "b", "text": "last"})]
    out = parse_manifest("\n".join(lines).encode(), "/m.jsonl")
    assert [r.key for r in out if isinstance(r, ManifestRecord)] == ["a", "y" * MAX_ID_CHARS, "ok", "b"]
    bad = [r for r in out if isinstance(r, RecordError)]
    assert [(r.line, r.error_type, r.id) for r in bad] == [
        (2, "InvalidRecord", None), (4, "MetadataTooDeep", "deep"), (5, "MetadataTooDeep", "deeper"),
        (7, "InvalidRecord", None)]
    assert bad[0].message == "field 'id' is 1,025 characters, over the 1,024-character limit for a record's name"
    assert "more than 64 levels deep" in bad[1].message
    assert len(bad[3].message) < 200 and bad[3].message.endswith("...")


def test_an_id_less_record_never_takes_another_records_id() -> None:
    """Line numbers key id-less records, but a record's own id wins, wherever it comes in the file."""
    data = (b'{"text": "line one"}\n{"id": "1", "text": "names itself 1"}\n{"id": 0, "text": "zero"}\n'
            b'{"text": "line four"}\n{"id": 2, "text": "two"}\n{"id": "1", "text": "a real duplicate"}\n')
    out = parse_manifest(data, "/m.jsonl")
    assert [r.key for r in out[:5]] == ["line:1", "1", "0", "4", "2"]
    assert isinstance(out[5], RecordError) and out[5].error_type == "DuplicateId"


def test_pandas_integer_ids_with_nulls_are_integers() -> None:
    """pandas stores an integer column with nulls as doubles: 1.0 is the id 1."""
    table = pa.table({"id": pa.array([1.0, None, 3.0]), "text": ["a", "b", "c"]})
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out = parse_manifest(buf.getvalue(), "/m.parquet")
    assert [r.key for r in out] == ["1", "2", "3"] and [r.id for r in out] == ["1", None, "3"]
    bad = pa.table({"id": pa.array([1.5]), "text": ["a"]})
    buf = io.BytesIO()
    pq.write_table(bad, buf)
    assert parse_manifest(buf.getvalue(), "/m.parquet")[0].error_type == "InvalidRecord"


def test_parquet_with_nulls_and_metadata() -> None:
    table = pa.table(
        {
            "id": ["p1", "p2", None],
            "text": ["t", None, None],
            "image": [None, "i.png", None],
            "extra": [{"k": 1}, {"k": 2}, {"k": 3}],
            "when": pa.array([0, 1, 2], pa.timestamp("s")),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    out = parse_manifest(buf.getvalue(), "/data/m.parquet")
    assert [type(r).__name__ for r in out] == ["ManifestRecord", "ManifestRecord", "RecordError"]
    assert out[0].metadata == {"extra": {"k": 1}, "when": "1970-01-01T00:00:00"}
    assert out[1].image == "/data/i.png" and out[1].modality == "image"
    assert out[2].line == 3
    json.dumps(out[0].metadata)


def test_whole_manifest_errors() -> None:
    with pytest.raises(ManifestError, match="Parquet"):
        parse_manifest(b"PAR1 not really", "/m.parquet")
    with pytest.raises(ManifestError, match="no records"):
        parse_manifest(b"\n\n", "/m.jsonl")


@pytest.mark.parametrize(("encoding", "told"), [
    ("utf-16", r"the manifest is UTF-16 \(little-endian, byte-order mark FF FE\)"),  # PowerShell 5's Out-File
    ("utf-16-le", r"the manifest is UTF-16 \(little-endian, no byte-order mark"),
    ("utf-16-be", r"the manifest is UTF-16 \(big-endian, no byte-order mark"),
    ("utf-32", r"the manifest is UTF-32 \(little-endian, byte-order mark FF FE 00 00\)"),
    ("utf-32-be", r"the manifest is UTF-32 \(big-endian, no byte-order mark"),
])
def test_a_utf16_or_utf32_jsonl_is_one_manifest_error_naming_its_encoding(tmp_path, encoding: str, told: str) -> None:
    """Each of its 1,000 lines used to be an InvalidJSON/InvalidUTF8 record of its own, none saying UTF-16."""
    body = "\r\n".join(json.dumps({"id": i, "text": f"row {i} café"}, ensure_ascii=False) for i in range(1000))
    path = tmp_path / "m.jsonl"
    path.write_bytes(body.encode(encoding))
    with pytest.raises(ManifestError, match=told + r".*save it as UTF-8"):
        parse_manifest(path.read_bytes(), str(path))
    units, dead, status = expand_object(SourceObject(str(path), path.stat().st_size, "fp"), ExpandSettings())
    assert (status, units, [d.error_type for d in dead]) == ("failed", [], ["ManifestError"])
    assert dead[0].uri == str(path) and "save it as UTF-8" in dead[0].message


def test_a_binary_jsonl_is_one_manifest_error_and_a_latin1_one_is_still_read_line_by_line(tmp_path) -> None:
    """1 MiB of random bytes named .jsonl used to give 3,985 bad records; a few bad lines still fail alone."""
    path = tmp_path / "m.jsonl"
    path.write_bytes(np.random.default_rng(0).bytes(1 << 20))
    with pytest.raises(ManifestError, match=r"not a text manifest: \d+% of its first .* are not UTF-8 text"):
        parse_manifest(path.read_bytes(), str(path))
    units, dead, status = expand_object(SourceObject(str(path), path.stat().st_size, "fp"), ExpandSettings())
    assert (status, units, [d.error_type for d in dead]) == ("failed", [], ["ManifestError"])
    # Latin-1 accents and one NUL are a few bad bytes among text: their lines fail, the others land.
    lines = [json.dumps({"id": i, "text": f"row {i} café"}, ensure_ascii=False) for i in range(20)]
    lines[3] = lines[3].replace('"id"', '"i\x00d"')
    out = parse_manifest("\n".join(lines).encode("latin-1"), "/m.jsonl")
    assert [r.error_type for r in out if isinstance(r, RecordError)] == ["InvalidUTF8"] * 20
    good = "\n".join(lines).encode()
    out = parse_manifest(good, "/m.jsonl")
    assert [(r.line, r.error_type) for r in out if isinstance(r, RecordError)] == [(4, "InvalidJSON")]


def _write_parquet(path, columns: dict, **kwargs) -> bytes:
    """Write a real Parquet file and return its bytes, as the expand stage reads them."""
    pq.write_table(pa.table(columns), path, **kwargs)
    return path.read_bytes()


def test_parquet_invalid_utf8_cell_fails_only_its_row(tmp_path) -> None:
    """Row 2's metadata string is not UTF-8: row 2 is an InvalidUTF8 error naming the column, rows 1 and 3 land."""
    note = string_array_from_bytes([b"hello", b"\xff\xfe", b"world"])
    data = _write_parquet(tmp_path / "m.parquet", {"id": ["a", "b", "c"], "text": ["good a", "good b", "good c"], "note": note})
    out = parse_manifest(data, str(tmp_path / "m.parquet"))
    assert [type(r).__name__ for r in out] == ["ManifestRecord", "RecordError", "ManifestRecord"]
    assert [(r.line, r.key, r.metadata) for r in (out[0], out[2])] == [(1, "a", {"note": "hello"}), (3, "c", {"note": "world"})]
    assert (out[1].line, out[1].error_type, out[1].id) == (2, "InvalidUTF8", "b")
    assert out[1].message == "column 'note': invalid UTF-8 at byte 0 of the value"


def test_parquet_out_of_range_timestamp_fails_only_its_row(tmp_path) -> None:
    """A timestamp past year 9999 cannot be a Python datetime: its row fails with the column and why."""
    when = pa.array([0, 10**15, 86400], pa.timestamp("s"))
    data = _write_parquet(tmp_path / "m.parquet", {"id": ["a", "b", "c"], "text": ["t a", "t b", "t c"], "when": when})
    out = parse_manifest(data, "/m.parquet")
    assert [r.key for r in out if isinstance(r, ManifestRecord)] == ["a", "c"]
    assert out[2].metadata == {"when": "1970-01-02T00:00:00"}
    assert (out[1].line, out[1].error_type, out[1].id) == (2, "InvalidValue", "b")
    assert out[1].message.startswith("column 'when' (timestamp[") and "outside Python's date/time range" in out[1].message


def test_parquet_row_with_several_bad_cells_names_each_column(tmp_path) -> None:
    """Every bad cell of a row is named; an unreadable id leaves the error id-less (its row still names it)."""
    data = _write_parquet(tmp_path / "m.parquet", {
        "id": string_array_from_bytes([b"a", b"\xc3("]),
        "text": ["ok", "also ok"],
        "note": string_array_from_bytes([b"fine", b"bad \x80"]),
        "when": pa.array([0, -(10**15)], pa.timestamp("s")),
    })
    out = parse_manifest(data, "/m.parquet")
    assert isinstance(out[0], ManifestRecord) and out[0].metadata["note"] == "fine"
    bad = out[1]
    assert (bad.line, bad.error_type, bad.id) == (2, "InvalidUTF8", None)
    assert [part.split(":")[0] for part in bad.message.split("; ")] == ["column 'id'", "column 'note'", "column 'when' (timestamp[ms])"]
    assert "invalid UTF-8 at byte 4 of the value" in bad.message


def test_parquet_bad_rows_across_batches_and_row_groups_keep_their_numbers(tmp_path) -> None:
    """Conversion goes batch by batch: bad rows deep in later row groups fail alone, under their own row numbers."""
    n = 3 * PARQUET_BATCH_ROWS + 17
    bad_rows = {2, PARQUET_BATCH_ROWS + 1, 2 * PARQUET_BATCH_ROWS + 500, n}  # 1-based
    notes = [b"\xff" if i in bad_rows else f"note {i}".encode() for i in range(1, n + 1)]
    data = _write_parquet(tmp_path / "m.parquet", {"id": [f"r{i}" for i in range(1, n + 1)], "text": ["x"] * n,
                                                   "note": string_array_from_bytes(notes)}, row_group_size=5000)
    assert pq.ParquetFile(tmp_path / "m.parquet").num_row_groups > 1
    out = parse_manifest(data, "/m.parquet")
    assert [r.line for r in out] == list(range(1, n + 1))
    errors = [r for r in out if isinstance(r, RecordError)]
    assert [(r.line, r.id, r.error_type) for r in errors] == [(i, f"r{i}", "InvalidUTF8") for i in sorted(bad_rows)]
    good = [r for r in out if isinstance(r, ManifestRecord)]
    assert len(good) == n - len(bad_rows) and all(r.metadata == {"note": f"note {r.line}"} for r in good)


def test_parquet_bad_row_is_a_dead_letter_naming_row_and_column(tmp_path) -> None:
    """Through expand_object: the good rows become units, the bad row one dead letter (as a bad JSONL line is)."""
    from operators.media.expand import ExpandSettings, expand_object
    from operators.media.listing import list_objects

    _write_parquet(tmp_path / "badutf8_meta.parquet", {"id": ["a", "b", "c"], "text": ["good a", "good b", "good c"],
                                                       "note": string_array_from_bytes([b"hello", b"\xff\xfe", b"world"])})
    _write_parquet(tmp_path / "bigts.parquet", {"id": ["a", "b", "c"], "text": ["t a", "t b", "t c"],
                                                "when": pa.array([0, 10**15, 86400], pa.timestamp("s"))})
    objects, _ = list_objects(str(tmp_path))
    results = {obj.uri.rsplit("/", 1)[-1]: expand_object(obj, ExpandSettings()) for obj in objects}
    for name, column, error_type in (("badutf8_meta.parquet", "note", "InvalidUTF8"), ("bigts.parquet", "when", "InvalidValue")):
        units, dead, status = results[name]
        assert status == "ok" and [u.position for u in units] == ["record=a", "record=c"], name
        assert [(d.error_type, d.position) for d in dead] == [(error_type, "record=b")], name
        assert dead[0].message.startswith(f"line 2: column '{column}'"), dead[0].message
