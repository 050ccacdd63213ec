"""`qvl query`, `qvl query-batch` and `qvl eval`: retrieval from the command line.

Importing this module registers the three subcommands with ``pipelines.cli``. Heavy
imports (models, Ray) happen inside the commands, so ``qvl --help`` stays fast.

Exit codes as in ``pipelines.cli``: 0 success; 1 every query of a batch failed;
2 configuration, preflight or input error (nothing was done); 3 failure during the run.
"""

from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

from .cli import _EXTRA_COMMANDS, EXIT_CONFIG, EXIT_INFRA, EXIT_NOTHING_INGESTED, EXIT_OK, _add_config_args, _positive
from .config import load_config
from .config_secrets import redact, redact_logs

SYSTEMS = ("vector", "funnel", "funnel+rerank")
SYSTEM_LABELS = {"vector": "full-vector search", "funnel": "MRL funnel", "funnel+rerank": "funnel + rerank"}
METRIC_LABELS = {"ndcg@10": "nDCG@10", "recall@10": "Recall@10", "recall@100": "Recall@100", "mrr@10": "MRR@10"}


# -- argument helpers ---------------------------------------------------------------------


def parse_filter_args(items: Sequence[str]) -> dict[str, Any]:
    """``key=value`` strings into a filters dict. A value that parses as JSON (numbers, true/false,
    "quoted strings", a list of these: any of them) is used as such, anything else as text; a
    repeated key matches any of its values."""
    from .query_files import not_json_constant

    filters: dict[str, Any] = {}
    for item in items or []:
        key, sep, text = item.partition("=")
        key, text = key.strip(), text.strip()  # "lang = en" is lang=en, as --set reads it
        if not sep or not key:
            raise ValueError(f"--filter {item!r}: expected key=value")
        try:
            value = json.loads(text, parse_constant=not_json_constant)
        except ValueError:  # JSONDecodeError included; NaN and Infinity, which JSON has not, are text
            value = text
        if value is None:  # "null" as a filter value is that text (None would drop the condition)
            value = text
        if isinstance(value, dict) or (isinstance(value, list) and any(isinstance(v, (dict, list)) for v in value)):
            raise ValueError(f"--filter {item!r}: a value is a string, number, true/false or a list of these "
                             "(any of them); give a nested field as its dotted key (metadata.lang=en)")
        if isinstance(value, list) and not value:
            raise ValueError(f"--filter {item!r}: an empty list matches nothing")
        values = value if isinstance(value, list) else [value]
        if key in filters:
            prev = filters[key]
            filters[key] = [*(prev if isinstance(prev, list) else [prev]), *values]
        else:
            filters[key] = value
    return filters


def _run(func: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """Load the config, run a command, map errors to exit codes with secrets redacted."""
    from .preflight import PreflightError
    from .query_inputs import QueryInputError

    cfg = load_config(args.config, args.overrides)
    secrets = cfg.secret_values()
    redact_logs(secrets)  # -v: an S3 client's debug log prints signed headers, which hold the key id
    try:
        return func(cfg, args)
    except (PreflightError, QueryInputError, ValueError) as exc:
        print(f"error: {redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_CONFIG
    except Exception as exc:  # store/cluster/model failures during the run
        print(f"error: {args.command} failed: {type(exc).__name__}: {redact(str(exc), secrets)}", file=sys.stderr)
        return EXIT_INFRA


# -- qvl query ----------------------------------------------------------------------------


def _excerpt(payload: Mapping[str, Any], width: int = 48) -> str:
    text = payload.get("text") or payload.get("page_text") or ""
    text = " ".join(str(text).split())
    return text if len(text) <= width else text[: width - 1] + "…"


def _clip_left(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def format_table(result: Any) -> str:
    """A readable table of a QueryResult: rank, scores, modality, uri, position, text excerpt."""
    header = ("#", "rerank", "vector", "modality", "uri", "position", "text")
    rows = [(str(h.rank), "-" if h.rerank_score is None else f"{h.rerank_score:.4f}", f"{h.vector_score:.4f}",
             h.modality, _clip_left(h.source_uri, 60), h.position, _excerpt(h.payload)) for h in result.hits]
    widths = [max(len(header[i]), *(len(r[i]) for r in rows)) if rows else len(header[i]) for i in range(7)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(header, widths)).rstrip()]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    if not rows:
        lines.append("(no results)")
    mode = "MRL funnel" if result.funnel else "full-vector search"
    lines.append(f"{len(result.hits)} results from {result.candidates} candidates ({mode}"
                 f"{', reranked' if result.reranked else ''})")
    for s in result.skipped:
        lines.append(f"skipped {s.source_uri} {s.position}: {s.reason}")
    return "\n".join(lines)


def _cmd_query(cfg: Any, args: argparse.Namespace) -> int:
    from operators.media.manifest import is_unicode_text

    from .query import QueryEngine
    from .query_inputs import QueryInputError, build_filter

    query: dict[str, Any] = {k: v for k, v in (("text", args.text), ("image", args.image), ("video", args.video))
                             if v}
    if not query:
        raise QueryInputError("give at least one of --text, --image, --video")
    # Bytes that are not UTF-8 reach argv as lone surrogates, which no tokenizer or filter takes.
    # (A path may hold them: the file system takes them back as the same bytes.)
    for flag, value in (("--text", args.text), ("--instruction", args.instruction), *(("--filter", f) for f in args.filter or [])):
        if value and not is_unicode_text(value):
            raise QueryInputError(f"{flag} is not valid UTF-8 text (the shell passed bytes that are not): {value!r}")
    filters = parse_filter_args(args.filter)
    build_filter(filters)  # a bad filter is an input error, found before loading anything
    if not args.no_rerank and not cfg.reranker.model:
        raise QueryInputError("reranker.model is not set: set it in the config, or query with --no-rerank")
    with QueryEngine(cfg, with_reranker=not args.no_rerank) as engine:
        result = engine.search(query, instruction=args.instruction, top_k=args.top_k, top_n=args.top_n,
                               filters=filters or None, rerank=not args.no_rerank)
    if args.json:
        for h in result.hits:
            print(json.dumps({"kind": "hit", **h.to_dict()}, ensure_ascii=False, default=str))
        for s in result.skipped:
            print(json.dumps({"kind": "skipped", **s.to_dict()}, ensure_ascii=False, default=str))
    else:
        print(format_table(result))
    return EXIT_OK


# -- qvl query-batch ----------------------------------------------------------------------


def _cmd_query_batch(cfg: Any, args: argparse.Namespace) -> int:
    from .query_batch import run_query_batch
    from .query_files import check_results_path, read_queries, write_results

    check_results_path(args.out, args.queries)  # before the job: a bad --out must not lose its results
    queries = read_queries(args.queries, dict(cfg.source.storage_options))
    results = run_query_batch(cfg, queries, top_k=args.top_k, top_n=args.top_n, rerank=not args.no_rerank,
                              rerank_actors=args.rerank_actors)
    write_results(args.out, results)
    failed = [r for r in results if r.get("error")]
    skipped = sum(len(r.get("skipped") or []) for r in results)
    print(f"{len(results)} queries, {len(failed)} failed, {skipped} skipped candidates: {args.out}")
    for r in failed[:10]:
        print(f"  query {r['id']}: {r['error']}", file=sys.stderr)
    return EXIT_NOTHING_INGESTED if results and len(failed) == len(results) else EXIT_OK


# -- qvl eval -----------------------------------------------------------------------------


def run_eval(cfg: Any, queries: Sequence[Any], qrels: Mapping[str, Mapping[str, float]], *, top_k: int | None = None,
             engine: Any = None, echo: Callable[[str], None] = print, where: str = "qrels",
             doc_names: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Rank every judged query three ways and score each ranking against the qrels.

    - ``vector``: plain search on the full vector (top_k);
    - ``funnel``: prefetch on the smallest MRL vector, rescore on the full one (top_k);
    - ``funnel+rerank``: the funnel's candidates reranked (all top_k kept, skipped ones dropped).

    top_k defaults to max(query.top_k, 100), so Recall@100 is defined; a metric cut deeper than
    top_k is left out (with a note). Point ids are compared with the qrels' (normalised) corpus
    ids. A query that fails (an unreadable image...) is reported in ``failed`` and left out of
    the means; QueryInputError (``where`` names the qrels) when nothing can be scored: no
    judged query, top_k below every cutoff, a bad filter, or every query failed.
    """
    from .metrics import METRICS, cutoff, evaluate_run, relevant
    from .query import QueryEngine, vector_order
    from .query_inputs import QueryInputError, build_filter, result_count

    top_k = result_count("top_k", top_k, max(cfg.query.top_k, 100))
    metrics = [m for m in METRICS if cutoff(m) <= top_k]
    if not metrics:
        raise QueryInputError(f"top_k {top_k} is below every metric cutoff "
                              f"({', '.join(METRIC_LABELS.get(m, m) for m in METRICS)}): use --top-k 10 or more")
    ids = {q.id for q in queries}
    missing = sorted(set(qrels) - ids)
    without = sorted(q for q in qrels if q in ids and not relevant(qrels[q]))
    judged = [q for q in queries if q.id in qrels and relevant(qrels[q.id])]
    if not qrels:
        raise QueryInputError(f"{where}: no judgements (expected query-id<TAB>corpus-id<TAB>score lines)")
    if not judged:
        if len(missing) == len(qrels):
            raise QueryInputError(f"{where}: none of its {len(qrels)} judged query ids is in the queries file "
                                  f"(e.g. {missing[0]!r})")
        raise QueryInputError(f"{where}: no query of the queries file has a relevant document (grade > 0)")
    for q in judged:  # a bad filter is an input error, found before any work (as in query-batch)
        try:
            build_filter(q.filters)
        except QueryInputError as exc:
            raise QueryInputError(f"query {q.id}: {exc}") from None
    notes: list[str] = []
    if missing:
        notes.append(f"{len(missing)} judged queries are not in the queries file and were left out")
    if without:
        notes.append(f"{len(without)} queries have no relevant document in the qrels and were left out")
    dropped = [m for m in METRICS if m not in metrics]
    if dropped:
        notes.append(f"{', '.join(METRIC_LABELS.get(m, m) for m in dropped)} left out: cut deeper than "
                     f"top_k={top_k}")
    own = engine is None
    engine = engine or QueryEngine(cfg, with_reranker=bool(cfg.reranker.model))
    runs: dict[str, dict[str, list[str]]] = {s: {} for s in SYSTEMS}
    failed: dict[str, str] = {}
    skipped = 0
    try:
        absent = _absent_documents(engine, {d for q in judged for d in relevant(qrels[q.id])})
        if absent:
            total = len({d for q in judged for d in relevant(qrels[q.id])})
            example = (doc_names or {}).get(absent[0], absent[0])
            notes.append(f"{len(absent)} of {total} relevant judged documents are not in collection "
                         f"{engine.layout.name!r} and can never be retrieved (e.g. {example}); corpus-ids are "
                         "point ids or source_uri#position, relative paths taken from the qrels file's folder")
        if engine.layout.smallest is None:
            notes.append("the collection has no MRL vectors: the funnel is the full-vector search")
        if engine.reranker is None:
            notes.append("reranker.model is not set: no reranked system")
        for i, q in enumerate(judged, start=1):
            try:
                vectors = engine.embed(q.query, q.instruction)
                full = engine.retrieve(vectors, top_k=top_k, filters=q.filters, funnel=False)
                funnel = engine.retrieve(vectors, top_k=top_k, filters=q.filters, funnel=True)
                hits, skip = (engine.rerank(q.query, funnel, top_n=len(funnel) or 1)
                              if engine.reranker is not None else ([], []))
            except QueryInputError as exc:  # this query is unusable; the others are still scored
                failed[q.id] = redact(str(exc), cfg.secret_values())  # into eval.json and the console
                continue
            # In the order `qvl query --no-rerank` shows them: ties (equal to 5 decimals) by point id.
            runs["vector"][q.id] = [h.point_id for h in vector_order(full, len(full))]
            runs["funnel"][q.id] = [h.point_id for h in vector_order(funnel, len(funnel))]
            if engine.reranker is not None:
                runs["funnel+rerank"][q.id] = [h.point_id for h in hits]
                skipped += len(skip)
            if i % 50 == 0:
                echo(f"  {i}/{len(judged)} queries")
    finally:
        if own:
            engine.close()
    if len(failed) == len(judged):
        shown = "; ".join(f"query {k}: {v}" for k, v in list(failed.items())[:5])
        raise QueryInputError(f"every judged query failed ({len(failed)}): {shown}")
    if failed:
        notes.append(f"{len(failed)} of {len(judged)} judged queries failed and are left out of the means "
                     f"(see 'failed'): {', '.join(list(failed)[:10])}")
    if engine.reranker is None:
        runs.pop("funnel+rerank")
    if skipped:
        notes.append(f"{skipped} reranking candidates were skipped (source unavailable) and count as not retrieved")
    scored_qrels = {q.id: qrels[q.id] for q in judged if q.id not in failed}
    systems = {}
    per_query = {}
    for name, run in runs.items():
        scored = evaluate_run(run, scored_qrels, metrics)
        systems[name] = {"metrics": scored["metrics"], "queries": scored["queries"]}
        per_query[name] = scored["per_query"]
    return {"collection": cfg.qdrant.collection, "top_k": top_k, "queries": len(scored_qrels),
            "queries_failed": len(failed), "queries_without_relevant": len(without),
            "queries_not_in_file": len(missing), "documents_not_in_collection": len(absent),
            "metrics": metrics, "systems": systems, "per_query": per_query, "failed": failed, "notes": notes}


def _absent_documents(engine: Any, docs: set[str], chunk: int = 256) -> list[str]:
    """The point ids among ``docs`` that the collection does not hold (sorted)."""
    wanted = sorted(docs)
    present: set[str] = set()
    for start in range(0, len(wanted), chunk):
        points = engine.client.retrieve(engine.layout.name, ids=wanted[start:start + chunk], with_payload=False,
                                        with_vectors=False)
        present.update(str(p.id) for p in points)
    return [d for d in wanted if d not in present]


def format_eval_table(report: Mapping[str, Any]) -> str:
    """The metrics table: one row per system."""
    metrics = report["metrics"]
    header = ["system".ljust(20)] + [METRIC_LABELS.get(m, m).rjust(10) for m in metrics]
    lines = ["  ".join(header)]
    for name, system in report["systems"].items():
        lines.append("  ".join([SYSTEM_LABELS.get(name, name).ljust(20)]
                               + [f"{system['metrics'][m]:.4f}".rjust(10) for m in metrics]))
    failed = report.get("queries_failed") or 0
    lines.append(f"{report['queries']} judged queries{f' ({failed} more failed)' if failed else ''}, "
                 f"top_k={report['top_k']}")
    lines += [f"note: {n}" for n in report["notes"]]
    return "\n".join(lines)


def plot_eval(report: Mapping[str, Any], path: str | Path) -> None:
    """A grouped bar chart (metrics × systems) as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = report["metrics"]
    systems = list(report["systems"])
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    width = 0.8 / max(len(systems), 1)
    for j, name in enumerate(systems):
        values = [report["systems"][name]["metrics"][m] for m in metrics]
        xs = [i + (j - (len(systems) - 1) / 2) * width for i in range(len(metrics))]
        bars = ax.bar(xs, values, width, label=SYSTEM_LABELS.get(name, name))
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=2)
    ax.set_xticks(range(len(metrics)), [METRIC_LABELS.get(m, m) for m in metrics])
    ax.set_ylim(0, 1.2)
    ax.set_ylabel("score")
    ax.set_title(f"Retrieval quality on {report['collection']} ({report['queries']} queries)")
    ax.legend(loc="upper center", ncol=max(len(systems), 1), fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(str(path), format="png")
    plt.close(fig)


def _cmd_eval(cfg: Any, args: argparse.Namespace) -> int:
    from operators.media.listing import is_local_uri, local_path
    from operators.media.reading import open_uri

    from .metrics import parse_qrels
    from .query_files import check_writable, decode_text, read_queries

    storage_options = dict(cfg.source.storage_options)
    out = Path(args.out or Path(cfg.output.dir) / f"eval-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    check_writable(str(out), "--out " if args.out else "output.dir: ", folder=True)  # before any work
    queries = read_queries(args.queries, storage_options)
    try:
        data = open_uri(args.qrels, storage_options)
    except FileNotFoundError:
        raise ValueError(f"qrels file not found: {args.qrels}") from None
    names: dict[str, str] = {}
    base = local_path(args.qrels) if is_local_uri(args.qrels) else args.qrels
    qrels = parse_qrels(decode_text(data, args.qrels), args.qrels, base=base, names=names)
    report = run_eval(cfg, queries, qrels, top_k=args.top_k, where=args.qrels, doc_names=names)
    report.update(queries_file=args.queries, qrels_file=args.qrels, config=cfg.redacted_dict())
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    plot_eval(report, out / "eval.png")
    print(format_eval_table(report))
    print(f"wrote {out / 'eval.json'} and {out / 'eval.png'}")
    for qid, error in list(report["failed"].items())[:10]:
        print(f"  query {qid}: {error}", file=sys.stderr)
    return EXIT_OK


# -- registration -------------------------------------------------------------------------


def register(sub: argparse._SubParsersAction) -> None:
    """Add the query, query-batch and eval subcommands to the qvl parser."""
    p = sub.add_parser("query", help="search the collection (MRL funnel + reranking)")
    _add_config_args(p)
    p.add_argument("--text", help="query text")
    p.add_argument("--image", help="query image: local path or fsspec URI")
    p.add_argument("--video", help="query video: local path or fsspec URI")
    p.add_argument("--instruction", help="query instruction (default: query.instruction from the config)")
    p.add_argument("--top-k", type=_positive, default=None, help="candidates from Qdrant (default: query.top_k)")
    p.add_argument("--top-n", type=_positive, default=None, help="results after reranking (default: query.top_n)")
    p.add_argument("--filter", action="append", default=[], metavar="KEY=VALUE",
                   help="payload filter (repeatable): modality=image, source_prefix=s3://bucket/dir/, any payload key")
    p.add_argument("--no-rerank", action="store_true", help="return Qdrant's order, no reranker")
    p.add_argument("--json", action="store_true", help="JSON lines instead of a table")
    p.set_defaults(func=lambda a: _run(_cmd_query, a))

    p = sub.add_parser("query-batch", help="run a file of queries as a Ray Data job")
    _add_config_args(p)
    p.add_argument("--queries", required=True, help="queries file (.jsonl or .parquet)")
    p.add_argument("--out", required=True, help="results file (.jsonl or .parquet)")
    p.add_argument("--top-k", type=_positive, default=None, help="candidates per query (default: query.top_k)")
    p.add_argument("--top-n", type=_positive, default=None, help="results per query (default: query.top_n)")
    p.add_argument("--no-rerank", action="store_true", help="no reranking stage")
    p.add_argument("--rerank-actors", type=_positive, default=None,
                   help="reranker actor pool size (default: compute.embed_actors)")
    p.set_defaults(func=lambda a: _run(_cmd_query_batch, a))

    p = sub.add_parser("eval", help="nDCG/Recall/MRR of vector search, funnel and reranking on judged queries")
    _add_config_args(p)
    p.add_argument("--queries", required=True, help="queries file (.jsonl or .parquet)")
    p.add_argument("--qrels", required=True, help="BEIR qrels TSV: query-id, corpus-id, score")
    p.add_argument("--out", default=None, help="output folder (default: <output.dir>/eval-<time>)")
    p.add_argument("--top-k", type=_positive, default=None, help="candidates per query (default: max(query.top_k, 100))")
    p.set_defaults(func=lambda a: _run(_cmd_eval, a))


if register not in _EXTRA_COMMANDS:
    _EXTRA_COMMANDS.append(register)
