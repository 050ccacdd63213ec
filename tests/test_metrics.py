"""Retrieval metrics against hand-computed values, and BEIR qrels parsing."""

import math
import uuid

import pytest

from operators.units import point_id
from pipelines.metrics import (dcg_at_k, evaluate_run, ideal_dcg_at_k, metric, mrr_at_k, ndcg_at_k,
                               normalise_corpus_id, parse_qrels, recall_at_k)

QRELS = {"a": 3, "b": 2, "c": 1, "z": 0, "n": -1}


def test_dcg_and_ndcg_by_hand():
    ranking = ["b", "x", "a", "n", "c"]
    # gains 2, 0, 3, 0 (negative counts 0), 1 at ranks 1..5; discount log2(rank + 1)
    dcg = 2 / 1 + 0 + 3 / 2 + 0 + 1 / math.log2(6)
    assert dcg_at_k(ranking, QRELS, 10) == pytest.approx(dcg)
    assert dcg_at_k(ranking, QRELS, 3) == pytest.approx(3.5)
    ideal = 3 / 1 + 2 / math.log2(3) + 1 / 2
    assert ideal_dcg_at_k(QRELS, 10) == pytest.approx(ideal)
    assert ndcg_at_k(ranking, QRELS, 10) == pytest.approx(dcg / ideal)
    assert ndcg_at_k(ranking, QRELS, 1) == pytest.approx(2 / 3)
    assert ndcg_at_k(["a", "b", "c"], QRELS, 10) == pytest.approx(1.0)
    assert ndcg_at_k(["x"], QRELS, 10) == 0.0
    assert ndcg_at_k(["a"], {"a": 0}, 10) == 0.0  # nothing relevant: defined as 0


def test_recall_and_mrr_by_hand():
    ranking = ["x", "y", "c", "a"]
    assert recall_at_k(ranking, QRELS, 2) == 0.0
    assert recall_at_k(ranking, QRELS, 3) == pytest.approx(1 / 3)
    assert recall_at_k(ranking, QRELS, 100) == pytest.approx(2 / 3)
    assert mrr_at_k(ranking, QRELS, 10) == pytest.approx(1 / 3)
    assert mrr_at_k(ranking, QRELS, 2) == 0.0
    assert mrr_at_k(["z", "n", "b"], QRELS, 10) == pytest.approx(1 / 3)  # grade 0 and -1 are not relevant


def test_duplicates_count_once():
    # the repeated "a" is dropped before cutting at k: b moves up to rank 2
    assert dcg_at_k(["a", "a", "b"], QRELS, 2) == pytest.approx(3 + 2 / math.log2(3))
    assert mrr_at_k(["x", "x", "x", "c"], QRELS, 2) == pytest.approx(1 / 2)
    assert recall_at_k(["c", "c", "c"], QRELS, 3) == pytest.approx(1 / 3)


def test_metric_names_and_evaluate_run():
    assert metric("nDCG@10", ["a"], QRELS) == ndcg_at_k(["a"], QRELS, 10)
    with pytest.raises(ValueError):
        metric("map@10", ["a"], QRELS)
    qrels = {"q1": {"d1": 1}, "q2": {"d2": 2, "d3": 1}, "q3": {"d4": 0}, "q4": {"d5": 1}}
    run = {"q1": ["d1", "x"], "q2": ["x", "d3", "d2"], "q3": ["d4"]}  # q4 unanswered: an empty ranking
    out = evaluate_run(run, qrels, ["ndcg@10", "recall@1", "mrr@10"])
    assert out["queries"] == 3 and out["queries_without_relevant"] == 1
    ndcg_q2 = (1 / math.log2(3) + 2 / 2) / (2 + 1 / math.log2(3))
    assert out["per_query"]["q2"] == pytest.approx({"ndcg@10": ndcg_q2, "recall@1": 0.0, "mrr@10": 0.5})
    assert out["metrics"] == pytest.approx({"ndcg@10": (1 + ndcg_q2 + 0) / 3, "recall@1": 1 / 3,
                                            "mrr@10": (1 + 0.5 + 0) / 3})
    assert evaluate_run({}, {})["metrics"]["ndcg@10"] == 0.0


def test_parse_qrels_header_ids_and_errors():
    pid = point_id("s3://b/x.pdf", "page=2")
    text = ("query-id\tcorpus-id\tscore\n"
            f"q1\t{pid.upper()}\t1\n"
            "q1\ts3://b/x.pdf#page=2\t2\n"  # the same point by its URI and position: the higher grade wins
            "\n"
            "q2\t/data/a.txt#chunk=0\t1\n")
    qrels = parse_qrels(text)
    assert qrels == {"q1": {pid: 2.0}, "q2": {point_id("/data/a.txt", "chunk=0"): 1.0}}
    assert parse_qrels("q1\td#image\t1\n") == {"q1": {normalise_corpus_id("d#image"): 1.0}}  # no header
    assert normalise_corpus_id(str(uuid.UUID(int=5))) == str(uuid.UUID(int=5))
    with pytest.raises(ValueError, match="line 2: expected"):
        parse_qrels("query-id\tcorpus-id\tscore\nq1 d1 1\n")
    with pytest.raises(ValueError, match="line 3: score 'high'"):
        parse_qrels("query-id\tcorpus-id\tscore\nq1\td1\t1\nq1\td2\thigh\n")


def test_a_mistyped_first_grade_is_an_error_not_a_header():
    """Without a header, "1O" (letter O) on line 1 used to be skipped as the header: a judgement lost."""
    with pytest.raises(ValueError, match=r"q\.tsv line 1: score '1O' is not a number"):
        parse_qrels("q1\td1#image\t1O\nq2\td2#image\t1\n", "q.tsv")
    assert list(parse_qrels("query-id\tcorpus-id\trelevance-score\nq1\td1#image\t1\n")) == ["q1"]
    # An empty or worded grade on line 1 was skipped as a header too.
    for grade in ("", "yes"):
        with pytest.raises(ValueError, match=rf"line 1: score '{grade}' is not a number"):
            parse_qrels(f"q1\td1#image\t{grade}\nq2\td2#image\t1\n")


def test_qrels_lines_break_at_newlines_only():
    """A file name may hold U+2028 or a form feed, which str.splitlines() also breaks at."""
    for odd in ("\u2028", "\x0c", "\x1e"):
        qrels = parse_qrels(f"q1\t/data/a{odd}b.png#image\t1\r\nq2\t/data/c.png#image\t2\n")
        assert qrels == {"q1": {point_id(f"/data/a{odd}b.png", "image"): 1.0},
                         "q2": {point_id("/data/c.png", "image"): 2.0}}


@pytest.mark.parametrize("score", ["nan", "inf", "-inf", "NaN"])
def test_parse_qrels_rejects_non_finite_grades(score):
    with pytest.raises(ValueError, match=rf"qrels\.tsv line 3: score '{score}' is not a finite number"):
        parse_qrels(f"query-id\tcorpus-id\tscore\nq1\td1#image\t1\nq1\td2#image\t{score}\n", "qrels.tsv")


def test_qrels_corpus_ids_are_normalised_like_source_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    base = str(tmp_path / "eval" / "qrels.tsv")
    doc = tmp_path / "eval" / "data" / "a.png"
    want = point_id(str(doc), "image")
    # a relative path is taken from the qrels file's folder; file:// URIs, "~" and ".." are resolved
    for cid in ("data/a.png#image", f"file://{doc}#image", f"{doc}#image", f"{tmp_path}/eval/x/../data/a.png#image",
                "./data/a.png#image"):
        assert normalise_corpus_id(cid, base) == want, cid
    assert normalise_corpus_id("~/b.txt#chunk=0", base) == point_id(str(tmp_path / "home/b.txt"), "chunk=0")
    monkeypatch.chdir(tmp_path)
    assert normalise_corpus_id("data/a.png#image") == point_id(str(tmp_path / "data/a.png"), "image")  # no base: CWD
    # remote URIs are left alone, or taken from a remote qrels file's folder when relative
    assert normalise_corpus_id("s3://b/x.pdf#page=2", base) == point_id("s3://b/x.pdf", "page=2")
    assert normalise_corpus_id("d/x.pdf#page=2", "s3://b/eval/q.tsv") == point_id("s3://b/eval/d/x.pdf", "page=2")
    # a record id may hold "#"; the path is the part before the first "#record="
    assert normalise_corpus_id("m.jsonl#record=a#b", base) == point_id(str(tmp_path / "eval/m.jsonl"), "record=a#b")
    assert normalise_corpus_id("data/v.mp4#t=0.000-30.000", base) == \
        point_id(str(tmp_path / "eval/data/v.mp4"), "t=0.000-30.000")
    names = {}
    qrels = parse_qrels("q\tdata/a.png#image\t1\nq\tnot-a-doc\t1\n", "qrels.tsv", base=base, names=names)
    assert qrels == {"q": {want: 1.0, normalise_corpus_id("not-a-doc"): 1.0}}
    assert names[want] == f"{doc}#image" and names[normalise_corpus_id("not-a-doc")] == "not-a-doc"
