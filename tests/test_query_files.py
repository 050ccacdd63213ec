"""Queries and results files (`pipelines/query_files.py`): JSONL and Parquet, local and S3, bad rows named."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.query_inputs import QueryInputError
from pipelines.query_files import check_results_path, read_queries, read_results, write_results


def test_query_and_result_files_round_trip(tmp_path):
    pq.write_table(pa.table({"id": ["1", "2"], "text": ["hello", None], "image": [None, "img/x.png"],
                             "filters": [None, {"modality": "image", "page": None}],
                             "max_frames": [None, 4.0]}),  # pandas' integers with nulls: doubles
                   tmp_path / "q.parquet")
    rows = read_queries(str(tmp_path / "q.parquet"))
    assert rows[0].query == {"text": "hello"} and rows[0].filters is None
    assert rows[1].query["max_frames"] == 4 and isinstance(rows[1].query["max_frames"], int)
    assert rows[1].query == {"image": str(tmp_path / "img/x.png"), "max_frames": 4}  # relative to the queries file
    assert rows[1].filters == {"modality": "image"}
    (tmp_path / "dup.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": "1", "text": "b"}\n')
    with pytest.raises(QueryInputError, match="duplicate query id"):
        read_queries(str(tmp_path / "dup.jsonl"))
    (tmp_path / "empty.jsonl").write_text('{"id": 1}\n')
    with pytest.raises(QueryInputError, match="no text, image or video"):
        read_queries(str(tmp_path / "empty.jsonl"))
    results = [{"id": "1", "hits": [{"rank": 1, "point_id": "p", "source_uri": "u", "modality": "text",
                                     "position": "chunk=0", "vector_score": 0.5, "rerank_score": None,
                                     "payload": {"text": "t", "page": 2}}],
                "skipped": [{"point_id": "s", "source_uri": "v", "modality": "image", "position": "image",
                             "vector_score": 0.25, "reason": "gone"}], "error": None},
               {"id": "2", "hits": [], "skipped": [], "error": "bad"}]
    for name in ("r.jsonl", "r.parquet"):
        write_results(str(tmp_path / name), results)
        assert read_results(str(tmp_path / name)) == results


@pytest.mark.parametrize("name, body, message", [
    ("q.csv", "id,text\n1,a\n", r"q\.csv: unknown file type \(use \.jsonl, \.ndjson or \.json for JSON lines; \.parquet or \.pq\)"),
    ("q.jsonl", '{"id": 1, "text": "a"}\n{"id": 2, "text": \n', r"q\.jsonl line 2: invalid JSON"),
    ("q.jsonl", '{"text": "a"}\n', r"q\.jsonl line 1: missing 'id'"),
    ("q.jsonl", '[1, 2]\n', r"q\.jsonl line 1: a query row must be an object, got list"),
    ("q.jsonl", '{"id": 1, "text": "a", "filters": [1]}\n', r"line 1 \(id 1\): 'filters' must be an object"),
    ("q.jsonl", "\n\n", r"q\.jsonl: no queries"),
    # An id of the wrong type, and values a batch would only refuse later (or silently drop: NaN).
    ("q.jsonl", '{"id": true, "text": "a"}\n', r"line 1: 'id' must be a string or an integer, got bool True"),
    ("q.jsonl", '{"id": [1, 2], "text": "a"}\n', r"line 1: 'id' must be a string or an integer, got list \[1, 2\]"),
    ("q.jsonl", '{"id": 1, "text": "a", "filters": {"page": NaN}}\n', r"line 1: invalid JSON: NaN is not a JSON value"),
    ("q.jsonl", '{"id": 1, "video": "v.mp4", "fps": -1}\n', r"line 1 \(id 1\): fps must be > 0"),
    ("q.jsonl", '{"id": 1, "video": "v.mp4", "max_frames": 1.5}\n', r"line 1 \(id 1\): max_frames must be an integer"),
    ("q.jsonl", '{"id": 1, "video": "v.mp4", "video_end": 1e999}\n', r"'video_end' must be a finite number, got inf"),
    ("q.jsonl", '{"id": 1, "image": "data:text/plain;base64,aGk="}\n',
     r"line 1 \(id 1\): 'image': a data: URI of 'text/plain;base64' \(27 characters\) is not read as an image"),
    ("q.jsonl", '{"id": 1, "text": "a", "video_start": 5, "video_end": 2}\n',
     r"line 1 \(id 1\): video_start/video_end cut a video file, and this input has no video"),
])
def test_bad_queries_file_names_the_row(tmp_path, name, body, message):
    (tmp_path / name).write_text(body)
    with pytest.raises(QueryInputError, match=message):
        read_queries(str(tmp_path / name))


def test_a_reference_that_cannot_be_resolved_names_its_row(tmp_path):
    import fsspec

    fs = fsspec.filesystem("memory")
    fs.pipe("/qbucket/q.jsonl", b'{"id": "a", "text": "fine"}\n{"id": "b", "image": "../../x.png"}\n')
    try:
        with pytest.raises(QueryInputError, match=r"memory://qbucket/q\.jsonl line 2 \(id b\): 'image': reference "
                                                   r"'\.\./\.\./x\.png' climbs above the root"):
            read_queries("memory://qbucket/q.jsonl")
    finally:
        fs.rm("/qbucket", recursive=True)


def test_results_never_overwrite_the_queries_file(tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"id": 1, "text": "a"}\n')
    with pytest.raises(QueryInputError, match=r"--out .*q\.jsonl: is the queries file .*: the results would overwrite"):
        check_results_path(str(queries), str(queries))
    with pytest.raises(QueryInputError, match="is the queries file"):
        check_results_path(f"file://{queries}", str(tmp_path / "." / "q.jsonl"))
    check_results_path(str(tmp_path / "r.jsonl"), str(queries))


def test_missing_queries_file(tmp_path):
    with pytest.raises(QueryInputError, match="queries file not found: .*nope.jsonl"):
        read_queries(str(tmp_path / "nope.jsonl"))


def test_queries_file_on_s3_resolves_relative_media_there(moto_s3):
    client, opts = moto_s3["client"], moto_s3["storage_options"]
    client.create_bucket(Bucket="queries")
    client.put_object(Bucket="queries", Key="eval/q.jsonl",
                      Body=b'{"id": "a", "image": "img/cat.png", "instruction": "Find it"}\n'
                           b'{"id": "b", "text": "dogs", "filters": "{\\"modality\\": \\"text\\"}"}\n')
    rows = read_queries("s3://queries/eval/q.jsonl", opts)
    assert [(r.id, r.query, r.instruction, r.filters) for r in rows] == [
        ("a", {"image": "s3://queries/eval/img/cat.png"}, "Find it", None),
        ("b", {"text": "dogs"}, None, {"modality": "text"})]


@pytest.mark.parametrize("body, message", [
    ('{"id": 1, "text": "a"}\n{"id": 2, "text": "a", "filters": "{bad"}\n',
     r"q\.jsonl line 2 \(id 2\): 'filters' is not valid JSON"),
    ('{"id": 1, "text": 5}\n', r"q\.jsonl line 1 \(id 1\): 'text' must be a string, got int"),
    ('{"id": 1, "text": {"a": 1}}\n', r"line 1 \(id 1\): 'text' must be a string, got dict"),
    ('{"id": 1, "image": 123}\n', r"line 1 \(id 1\): 'image' must be one path or URI \(a string\), got a int"),
    ('{"id": 1, "image": ["a.png", "b.png"]}\n', r"line 1 \(id 1\): 'image' must be one path or URI .*got a list"),
    ('{"id": 1, "video": "v.mp4", "video_start": "5"}\n', r"line 1 \(id 1\): 'video_start' must be a number"),
    ('{"id": 1, "text": "a", "instruction": 5}\n', r"line 1 \(id 1\): 'instruction' must be a string, got int"),
    ('{"id": 1, "text": "a lone \\udfff surrogate"}\n', r"line 1 \(id 1\): holds a lone surrogate escape"),
    ('{"id": "x\\ud800", "text": "t"}\n', r"line 1 \(id x.\): holds a lone surrogate escape"),
    ('{"id": 1, "image": "a\\ud800.png"}\n', r"line 1 \(id 1\): holds a lone surrogate escape"),
    ('{"id": 1, "text": "t", "filters": {"source_prefix": "\\udfff"}}\n', r"holds a lone surrogate escape"),
    ('{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n{"id": "1", "text": "c"}\n',
     r"q\.jsonl line 3: duplicate query id '1' \(first on line 1\)"),
    ('{"id": 1, "text": "a"}\n{"id": 2, "text": "red", "imgae": "cat.png"}\n',
     r"q\.jsonl line 2 \(id 2\): unknown field 'imgae' \(did you mean 'image'\?\); a query row takes id, text"),
    ('{"id": 1, "text": "a", "filter": {"modality": "video"}, "score": 3}\n',
     r"line 1 \(id 1\): unknown fields 'filter' \(did you mean 'filters'\?\), 'score'; a query row takes"),
    ('{"id": 1, "text": "a"}\n{"id": "b", "text": "x", "filters": {"modality": "foo"}}\n',
     r"q\.jsonl line 2 \(id b\): unknown modality 'foo'"),
    ('{"id": 1, "text": "x", "filters": {"bad key": 1}}\n', r"line 1 \(id 1\): filter key 'bad key' is not a payload key"),
])
def test_bad_query_values_name_file_line_and_id(tmp_path, body, message):
    (tmp_path / "q.jsonl").write_text(body)
    with pytest.raises(QueryInputError, match=message):
        read_queries(str(tmp_path / "q.jsonl"))


def test_a_parquet_queries_file_may_carry_pandas_index_columns_and_nothing_else(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": ["a"], "text": ["red"], "__index_level_0__": [7]}), tmp_path / "q.parquet")
    assert [(r.id, r.query) for r in read_queries(str(tmp_path / "q.parquet"))] == [("a", {"text": "red"})]
    pq.write_table(pa.table({"id": ["a"], "text": ["red"], "note": ["x"]}), tmp_path / "q.parquet")
    with pytest.raises(QueryInputError, match=r"q\.parquet row 1 \(id a\): unknown field 'note'"):
        read_queries(str(tmp_path / "q.parquet"))


def test_non_utf8_and_corrupt_files_name_the_file(tmp_path):
    (tmp_path / "q.jsonl").write_bytes(b'{"id": 1, "text": "a"}\n{"id": 2, "text": "caf\xe9"}\n')
    with pytest.raises(QueryInputError, match=r"q\.jsonl line 2: not UTF-8 text \(byte 0xe9\)"):
        read_queries(str(tmp_path / "q.jsonl"))
    (tmp_path / "q.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(QueryInputError, match=r"q\.parquet: not a readable Parquet file"):
        read_queries(str(tmp_path / "q.parquet"))


def test_media_paths_resolved_like_qvl_query(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "q.jsonl").write_text(
        '{"id": "t", "image": "~/x.png"}\n'
        f'{{"id": "f", "image": "file://{tmp_path}/img/y.png", "video": "  "}}\n'
        '{"id": "r", "video": "../v.mp4", "text": " ", "instruction": ""}\n'
        '{"id": "s", "image": "s3://b/z.png", "text": "\\u2028 one line"}\n')
    rows = read_queries(str(tmp_path / "q.jsonl"))
    assert [r.query for r in rows] == [{"image": str(tmp_path / "home/x.png")},
                                       {"image": str(tmp_path / "img/y.png")},  # a blank video is no video
                                       {"video": str(tmp_path.parent / "v.mp4")},  # nor a blank text a text
                                       {"image": "s3://b/z.png", "text": "\u2028 one line"}]
    # "" is a given (empty) instruction, as with `qvl query --instruction ""`; absent is the default
    assert [r.instruction for r in rows] == [None, None, "", None]


def test_results_path_is_checked_before_any_work(tmp_path):
    (tmp_path / "adir.jsonl").mkdir()
    (tmp_path / "afile").write_text("x")
    for path, message in [(tmp_path / "res.csv", r"--out .*res\.csv: unknown file type"),
                          (tmp_path / "adir.jsonl", r"--out .*adir\.jsonl: is a folder"),
                          (tmp_path / "afile" / "r.jsonl", r"--out .*afile/r\.jsonl: .*afile is a file, not a folder")]:
        with pytest.raises(QueryInputError, match=message):
            check_results_path(str(path))
    check_results_path(str(tmp_path / "new" / "deeper" / "r.parquet"))  # folders that can be made are fine
    assert not (tmp_path / "new").exists()  # checking creates nothing
    with pytest.raises(QueryInputError, match="written to a local path"):
        check_results_path("s3://bucket/r.parquet")
