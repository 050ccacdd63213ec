"""Retrieval metrics (pure functions) and BEIR-style qrels parsing.

Definitions (as in BEIR / pytrec_eval; a ranking is a list of document ids, best first,
duplicates counted once at their first position; qrels map document id -> graded
relevance, and a document is relevant when its grade is > 0):

- DCG@k  = sum over ranks i = 1..k of rel_i / log2(i + 1)   (linear gain, rel < 0 counts 0)
- nDCG@k = DCG@k / IDCG@k, IDCG@k the DCG of the judged grades sorted best first
- Recall@k = |relevant in the top k| / |relevant|
- MRR@k = 1 / rank of the first relevant document in the top k (0 if none)

A query without any relevant document has no defined recall or nDCG: ``evaluate_run``
leaves it out of the means and counts it in ``queries_without_relevant``. A judged
query the run did not answer counts as an empty ranking (all metrics 0).
"""

from __future__ import annotations

import math
import os
import re
import uuid
from typing import Any, Iterable, Mapping, MutableMapping, Sequence

from operators.media.listing import is_local_uri, local_path
from operators.media.manifest import resolve_uri
from operators.units import POINT_NAMESPACE

METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


def cutoff(name: str) -> int:
    """The rank cutoff k of a metric name such as ``recall@100``."""
    kind, _, k = name.partition("@")
    if not k.isdigit():
        raise ValueError(f"unknown metric {name!r} (ndcg@k, recall@k, mrr@k)")
    return int(k)


def dedupe(ranking: Iterable[str]) -> list[str]:
    """The ranking with repeated ids removed (first occurrence kept)."""
    seen: set[str] = set()
    out = []
    for doc in ranking:
        if doc not in seen:
            seen.add(doc)
            out.append(doc)
    return out


def _gain(qrels: Mapping[str, float], doc: str) -> float:
    return max(float(qrels.get(doc, 0.0)), 0.0)


def dcg_at_k(ranking: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """Discounted cumulative gain of the top k (linear gain, log2(rank + 1) discount)."""
    return sum(_gain(qrels, doc) / math.log2(i + 2) for i, doc in enumerate(dedupe(ranking)[:k]))


def ideal_dcg_at_k(qrels: Mapping[str, float], k: int) -> float:
    """DCG of the best possible ranking of the judged documents."""
    grades = sorted((g for g in (max(float(v), 0.0) for v in qrels.values()) if g > 0), reverse=True)[:k]
    return sum(g / math.log2(i + 2) for i, g in enumerate(grades))


def ndcg_at_k(ranking: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """Normalised DCG@k (0 when there is no relevant document)."""
    ideal = ideal_dcg_at_k(qrels, k)
    return dcg_at_k(ranking, qrels, k) / ideal if ideal > 0 else 0.0


def relevant(qrels: Mapping[str, float]) -> set[str]:
    """The ids with a grade > 0."""
    return {doc for doc, grade in qrels.items() if float(grade) > 0}


def recall_at_k(ranking: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """Share of the relevant documents found in the top k (0 when there is none)."""
    rel = relevant(qrels)
    return len(rel & set(dedupe(ranking)[:k])) / len(rel) if rel else 0.0


def mrr_at_k(ranking: Sequence[str], qrels: Mapping[str, float], k: int) -> float:
    """Reciprocal rank of the first relevant document in the top k (0 if none)."""
    rel = relevant(qrels)
    for i, doc in enumerate(dedupe(ranking)[:k]):
        if doc in rel:
            return 1.0 / (i + 1)
    return 0.0


def metric(name: str, ranking: Sequence[str], qrels: Mapping[str, float]) -> float:
    """One metric by name: ``ndcg@k``, ``recall@k`` or ``mrr@k``."""
    kind, _, k = name.partition("@")
    fn = {"ndcg": ndcg_at_k, "recall": recall_at_k, "mrr": mrr_at_k}.get(kind.lower())
    if fn is None or not k.isdigit():
        raise ValueError(f"unknown metric {name!r} (ndcg@k, recall@k, mrr@k)")
    return fn(ranking, qrels, int(k))


def evaluate_run(run: Mapping[str, Sequence[str]], qrels: Mapping[str, Mapping[str, float]],
                 metrics: Sequence[str] = METRICS) -> dict[str, Any]:
    """Mean of each metric over the judged queries that have a relevant document.

    Returns ``{"metrics": {name: mean}, "per_query": {qid: {name: value}}, "queries": n,
    "queries_without_relevant": m}``.
    """
    per_query: dict[str, dict[str, float]] = {}
    without = 0
    for qid, judged in qrels.items():
        if not relevant(judged):
            without += 1
            continue
        ranking = list(run.get(qid, []))
        per_query[qid] = {m: metric(m, ranking, judged) for m in metrics}
    n = len(per_query)
    means = {m: (sum(v[m] for v in per_query.values()) / n if n else 0.0) for m in metrics}
    return {"metrics": means, "per_query": per_query, "queries": n, "queries_without_relevant": without}


# -- qrels ------------------------------------------------------------------------------------


# A unit position as ingestion writes it (operators/media/expand.py); a record id may hold
# anything, so "#record=" is taken at its first occurrence, the others at the end.
_POSITION = re.compile(r"^(?P<uri>.+?)#(?P<pos>record=.*)$"
                       r"|^(?P<uri2>.+)#(?P<pos2>chunk=\d+|page=\d+|image|t=[0-9.]+-[0-9.]+)$")


def normalise_source_uri(uri: str, base: str | None = None) -> str:
    """A source URI as ingestion stores it: local paths absolute (``file://`` stripped, ``~``
    expanded, relative ones taken from ``base``'s folder, or the working directory without a
    base); other URIs unchanged. ``base`` is a file's path or URI (a qrels or queries file)."""
    uri = str(uri).strip()
    if not is_local_uri(uri):
        return uri
    if uri.startswith(("file://", "local://")):
        return local_path(uri)
    uri = os.path.expanduser(uri)
    if os.path.isabs(uri) or base is None:
        return local_path(uri)
    return resolve_uri(uri, base)


def split_corpus_id(corpus_id: str) -> tuple[str, str] | None:
    """``(source_uri, position)`` of a ``source_uri#position`` corpus id, None when it has no known position."""
    m = _POSITION.match(str(corpus_id).strip())
    if m is None:
        return None
    return (m["uri"], m["pos"]) if m["uri"] is not None else (m["uri2"], m["pos2"])


def corpus_name(corpus_id: str, base: str | None = None) -> str:
    """A qrels corpus-id in canonical text form: a point id (UUID) lower-cased, or
    ``source_uri#position`` with the source URI normalised like ingestion's (``normalise_source_uri``)."""
    text = str(corpus_id).strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        pass
    parts = split_corpus_id(text)
    if parts is None:
        return text  # not a unit of any ingested object: kept, so it can be reported as absent
    return f"{normalise_source_uri(parts[0], base)}#{parts[1]}"


def normalise_corpus_id(corpus_id: str, base: str | None = None) -> str:
    """A qrels corpus-id as a point id: a UUID is a point id already; anything else is read as
    ``source_uri#position`` (local paths made absolute: see ``corpus_name``) and mapped to its
    point id (the UUIDv5 ingestion assigns)."""
    name = corpus_name(corpus_id, base)
    try:
        return str(uuid.UUID(name))
    except ValueError:
        return str(uuid.uuid5(POINT_NAMESPACE, name))


# The words a qrels header calls its third column with (BEIR writes "score").
_HEADER_WORDS = frozenset({"score", "scores", "relevance", "rel", "grade", "label", "judgment", "judgement"})


def _is_header_score(score: str) -> bool:
    """Whether a first line's third field names the column ("score", "relevance-score"): an empty,
    mistyped ("1O") or worded ("yes") grade is a judgement to report, not a header to skip."""
    words = re.findall(r"[a-z]+", score.lower())
    return bool(words) and not any(ch.isdigit() for ch in score) and all(w in _HEADER_WORDS for w in words)


def parse_qrels(text: str, where: str = "qrels", base: str | None = None,
                names: MutableMapping[str, str] | None = None) -> dict[str, dict[str, float]]:
    """BEIR qrels TSV: ``query-id<TAB>corpus-id<TAB>score`` per line, after an optional header line.

    Corpus ids go through ``normalise_corpus_id`` (relative paths taken from ``base``'s folder,
    normally the qrels file; the working directory without one); ``names``, when given, is
    filled with point id -> the corpus id as written (normalised), for messages. A repeated
    (query, corpus) pair keeps its highest grade. Blank lines are skipped; any other malformed
    line, and a grade that is not a finite number, is an error naming the line.
    """
    qrels: dict[str, dict[str, float]] = {}
    first = True
    # "\n" only, as read_queries: splitlines() also breaks at U+2028, \x0c and others, which a
    # corpus id (a file name) may hold.
    for n, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        is_first, first = first, False
        parts = line.rstrip("\r\n").split("\t")
        if len(parts) != 3:
            raise ValueError(f"{where} line {n}: expected query-id<TAB>corpus-id<TAB>score, got {len(parts)} fields")
        qid, cid, score = (p.strip() for p in parts)
        try:
            grade = float(score)
        except ValueError:
            if is_first and _is_header_score(score):
                continue  # the header line ("score"); an empty or mistyped grade ("yes", "1O") is not one
            raise ValueError(f"{where} line {n}: score {score!r} is not a number") from None
        if not math.isfinite(grade):  # nan/inf would turn every mean into nan
            raise ValueError(f"{where} line {n}: score {score!r} is not a finite number")
        if not qid or not cid:
            raise ValueError(f"{where} line {n}: empty query-id or corpus-id")
        name = corpus_name(cid, base)
        doc = normalise_corpus_id(name)
        if names is not None:
            names.setdefault(doc, name)
        judged = qrels.setdefault(qid, {})
        judged[doc] = max(grade, judged.get(doc, grade))
    return qrels
