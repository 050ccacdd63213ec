"""Queries and results files (`pipelines/query_files.py`): JSONL and Parquet, local and S3, bad rows named."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.query import QueryInputError
from pipelines.query_files import read_queries, read_results, write_results


def test_query_and_result_files_round_trip(tmp_path):
    pq.write_table(pa.table({"id": ["1", "2"], "text": ["hello", None], "image": [None, "img/x.png"],
                             "filters": [None, {"modality": "image", "page": None}]}),
                   tmp_path / "q.parquet")
    rows = read_queries(str(tmp_path / "q.parquet"))
    assert rows[0].query == {"text": "hello"} and rows[0].filters is None
    assert rows[1].query == {"image": str(tmp_path / "img/x.png")}  # relative to the queries file
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
    ("q.csv", "id,text\n1,a\n", r"q\.csv: unknown file type \(use \.jsonl or \.parquet\)"),
    ("q.jsonl", '{"id": 1, "text": "a"}\n{"id": 2, "text": \n', r"q\.jsonl line 2: invalid JSON"),
    ("q.jsonl", '{"text": "a"}\n', r"q\.jsonl line 1: missing 'id'"),
    ("q.jsonl", '[1, 2]\n', r"q\.jsonl line 1: a query row must be an object, got list"),
    ("q.jsonl", '{"id": 1, "text": "a", "filters": [1]}\n', r"line 1 \(id 1\): 'filters' must be an object"),
    ("q.jsonl", "\n\n", r"q\.jsonl: no queries"),
])
def test_bad_queries_file_names_the_row(tmp_path, name, body, message):
    (tmp_path / name).write_text(body)
    with pytest.raises(QueryInputError, match=message):
        read_queries(str(tmp_path / name))


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
