"""Manifest parsing: JSONL and Parquet, URI resolution, per-record errors."""

from __future__ import annotations

import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from operators.media.manifest import ManifestError, ManifestRecord, RecordError, parse_manifest, resolve_uri


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
    ],
)
def test_resolve_uri(ref: str, manifest: str, expected: str) -> None:
    assert resolve_uri(ref, manifest) == expected


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
