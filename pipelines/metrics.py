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
import uuid
from typing import Any, Iterable, Mapping, Sequence

from operators.units import POINT_NAMESPACE

METRICS: tuple[str, ...] = ("ndcg@10", "recall@10", "recall@100", "mrr@10")


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


def normalise_corpus_id(corpus_id: str) -> str:
    """A qrels corpus-id as a point id: a UUID is a point id already; anything else is read as
    ``source_uri#position`` and mapped to its point id (the UUIDv5 ingestion assigns)."""
    text = str(corpus_id).strip()
    try:
        return str(uuid.UUID(text))
    except ValueError:
        return str(uuid.uuid5(POINT_NAMESPACE, text))


def parse_qrels(text: str, where: str = "qrels") -> dict[str, dict[str, float]]:
    """BEIR qrels TSV: ``query-id<TAB>corpus-id<TAB>score`` per line, after an optional header line.

    Corpus ids go through ``normalise_corpus_id``; a repeated (query, corpus) pair keeps
    its highest grade. Blank lines are skipped; any other malformed line is an error.
    """
    qrels: dict[str, dict[str, float]] = {}
    first = True
    for n, line in enumerate(text.splitlines(), start=1):
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
            if is_first:
                continue  # the header line
            raise ValueError(f"{where} line {n}: score {score!r} is not a number") from None
        if not qid or not cid:
            raise ValueError(f"{where} line {n}: empty query-id or corpus-id")
        doc = normalise_corpus_id(cid)
        judged = qrels.setdefault(qid, {})
        judged[doc] = max(grade, judged.get(doc, grade))
    return qrels
