"""Retrieval: embed the query, search Qdrant through the MRL funnel, rebuild the candidates, rerank.

    query ──> embed (query instruction) ──> query_points: prefetch on the smallest MRL vector
          (limit top_k × prefetch_multiplier, quantisation rescoring when configured)
          ──> rescore on "full" (limit top_k, payload filters) ──> rebuild each candidate's
          content from its source (thread pool) ──> Qwen3VLReranker in batches ──> top_n

``QueryEngine`` is the Python API (one query at a time, on the calling process);
``pipelines.query_batch.run_query_batch`` is the same steps as a Ray Data job (embedding +
search in one fixed-size actor pool, reranking in another). Both share the functions below,
so a batch row gives the same hits as the single query. What a query asks (content, filters,
images): ``pipelines.query_inputs``; the collection and the search request:
``pipelines.query_store``; queries and results files: ``pipelines.query_files``.

Instructions. The query is embedded with ``instruction`` if given, else the query
dict's own ``"instruction"``, else ``query.instruction`` from the config (a retrieval
instruction). Documents were embedded with the embedder's default instruction
(``embedder.instruction`` or the model's ``Represent the user's input.``); a query
embedded with that same instruction (``engine.document_instruction``) and the same
content as a stored unit gets exactly that unit's vector. The reranker uses
``reranker.instruction`` (None: the model's default) unless ``rerank_instruction`` is given.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from qdrant_client import QdrantClient, models

from operators.content import CandidateUnavailable, SourceCache, candidate_input
from operators.media.expand import ExpandSettings
from operators.qwen3vl.loading import checkpoint_id
from operators.qwen3vl.media_io import MediaError

from .config import Config
from .config_secrets import redact
from .ingest import embedder_kwargs, expand_settings
from .plan import settings_digests_of_any_dtype
from .preflight import (PreflightError, check_checkpoint_kind, check_local_checkpoint_exists, hub_commit,
                        model_dimension, one_line)
from .query_inputs import (QueryInputError, build_filter, fetch_remote_images, model_ready_images, oversized_image,
                           query_content, resolve_instruction, result_count)
from .query_store import (QueryPreflightError, check_dimension, collection_layout, open_client, query_vectors,
                          search_request, store_location, warn_if_other_model, warn_unheld_filter_keys)

logger = logging.getLogger(__name__)


# -- query vectors -------------------------------------------------------------------------


def embed_queries(embedder: Any, contents: Sequence[Mapping[str, Any]], instructions: Sequence[str],
                  max_image_pixels: int | None = None, storage_options: Mapping[str, Any] | None = None,
                  max_object_bytes: int | None = None) -> list[np.ndarray | str]:
    """Raw (un-normalised) pooled vectors of queries, or the error of each query that fails."""
    out: list[np.ndarray | str] = [""] * len(contents)
    live, ready = [], {}
    for i, content in enumerate(contents):
        try:
            ready[i] = fetch_remote_images(content, max_object_bytes)
        except MediaError as exc:
            out[i] = str(exc)
            continue
        too_large = oversized_image(ready[i], max_image_pixels, storage_options) if max_image_pixels else None
        if too_large:
            out[i] = too_large
        else:
            live.append(i)
    inputs = [{**model_ready_images(ready[i], storage_options), "instruction": instructions[i]} for i in live]
    for i, r in zip(live, embedder.embed(inputs, normalize=False) if inputs else []):
        if r.ok and not np.isfinite(r.vector).all():  # Qdrant would refuse the search request
            out[i] = "the model's vector for the query has NaN or infinite components (an overflow?)"
        else:
            out[i] = r.vector if r.ok else (r.error or "unknown error")
    return out


@dataclass
class Candidate:
    """One point from Qdrant: id, vector score (cosine on the full vector), payload."""

    point_id: str
    score: float
    payload: dict[str, Any]

    @classmethod
    def from_point(cls, point: Any) -> "Candidate":
        """The candidate of one Qdrant scored point."""
        return cls(str(point.id), float(point.score), dict(point.payload or {}))


# -- results ------------------------------------------------------------------------------


@dataclass
class Hit:
    """One result: which unit, where it comes from, its vector score and rerank score."""

    rank: int
    point_id: str
    source_uri: str
    modality: str
    position: str
    vector_score: float
    rerank_score: float | None
    payload: dict[str, Any] = field(repr=False)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return asdict(self)


@dataclass
class Skipped:
    """A candidate that could not be reranked (its source vanished or cannot be read) and why."""

    point_id: str
    source_uri: str
    modality: str
    position: str
    vector_score: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return asdict(self)


def _hit(rank: int, c: Candidate, rerank_score: float | None) -> Hit:
    p = c.payload
    return Hit(rank, c.point_id, str(p.get("source_uri", "")), str(p.get("modality", "")), str(p.get("position", "")),
               c.score, rerank_score, p)


def _skipped(c: Candidate, reason: str) -> Skipped:
    p = c.payload
    return Skipped(c.point_id, str(p.get("source_uri", "")), str(p.get("modality", "")), str(p.get("position", "")),
                   c.score, reason)


@dataclass
class QueryResult:
    """Ranked hits (at most top_n), skipped candidates, and how the query ran."""

    hits: list[Hit]
    skipped: list[Skipped] = field(default_factory=list)
    candidates: int = 0  # points returned by Qdrant (<= top_k)
    funnel: bool = False  # True when the MRL prefetch was used
    reranked: bool = False
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return {"hits": [h.to_dict() for h in self.hits], "skipped": [s.to_dict() for s in self.skipped],
                "candidates": self.candidates, "funnel": self.funnel, "reranked": self.reranked,
                "seconds": self.seconds}


# Scores equal to this many decimals are a tie: a query embedded in a batch (query-batch) and alone
# (query) differ in the last bits, which must not reorder equal hits between the two.
TIE_DECIMALS = 5


def _tie_order(c: Candidate) -> tuple[float, str]:
    """The order among equal scores: higher vector score (to TIE_DECIMALS), then point id."""
    return -round(float(c.score), TIE_DECIMALS), str(c.point_id)


def vector_order(candidates: Sequence[Candidate], top_n: int) -> list[Hit]:
    """Hits in vector-score order (no reranking); ties as _tie_order."""
    ranked = sorted(candidates, key=_tie_order)
    return [_hit(i + 1, c, None) for i, c in enumerate(ranked[:top_n])]


def load_candidates(candidates: Sequence[Candidate], *, storage_options: dict[str, Any] | None,
                    settings: ExpandSettings, workers: int = 8) -> list[dict[str, Any] | str]:
    """Each candidate's rebuilt model input, or the reason it cannot be rebuilt (loaded concurrently)."""
    if not candidates:
        return []
    cache = SourceCache()

    def load(c: Candidate) -> dict[str, Any] | str:
        try:
            return candidate_input(c.payload, storage_options=storage_options, settings=settings, cache=cache)
        except CandidateUnavailable as exc:
            return str(exc)
        except Exception as exc:  # one odd payload must not fail the query
            return f"{type(exc).__name__}: {exc}"

    with ThreadPoolExecutor(max(1, min(workers, len(candidates))), thread_name_prefix="qvl-candidates") as pool:
        return list(pool.map(load, candidates))


def rerank_candidates(reranker: Any, query: Mapping[str, Any], candidates: Sequence[Candidate], *, top_n: int,
                      instruction: str | None, storage_options: dict[str, Any] | None, settings: ExpandSettings,
                      workers: int = 8) -> tuple[list[Hit], list[Skipped]]:
    """Rebuild, score with the reranker, sort by score, keep top_n.

    Ties (equal to TIE_DECIMALS) are ordered as _tie_order. Candidates whose content cannot be rebuilt, or that the
    reranker cannot read, are returned as Skipped with the reason.
    """
    docs = load_candidates(candidates, storage_options=storage_options, settings=settings, workers=workers)
    skipped = [_skipped(c, d) for c, d in zip(candidates, docs) if isinstance(d, str)]
    ready = [(c, d) for c, d in zip(candidates, docs) if not isinstance(d, str)]
    scored: list[tuple[float, Candidate]] = []
    # One call for the whole top-k: the reranker batches the pairs itself and computes the
    # query's shared prefix (and, for an image query, its vision tower) once, not once per batch.
    if ready:  # an http(s) query image read once for all pairs, and re-encoded as for its embedding
        query = model_ready_images(fetch_remote_images(query, getattr(settings, "max_object_bytes", None)),
                                   storage_options)
    results = reranker.score(query, [d for _, d in ready], instruction) if ready else []
    for (c, _), r in zip(ready, results):
        if r.ok:
            scored.append((float(r.score), c))
        else:
            skipped.append(_skipped(c, f"reranker cannot read the candidate: {r.error}"))
    scored.sort(key=lambda t: (-round(t[0], TIE_DECIMALS), *_tie_order(t[1])))
    hits = [_hit(rank + 1, c, s) for rank, (s, c) in enumerate(scored[:top_n])]
    return hits, skipped


# -- models -------------------------------------------------------------------------------


def reranker_kwargs(cfg: Config, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Qwen3VLReranker keyword arguments: the reranker section, with the embedder's pixel and
    device settings and the ingestion's video sampling (so candidates are seen as at ingestion)."""
    e, r = cfg.embedder, cfg.reranker
    kwargs: dict[str, Any] = dict(dtype=None if e.dtype == "auto" else e.dtype, max_length=r.max_length,
                                  min_pixels=e.min_pixels, max_pixels=e.max_pixels, total_pixels=e.total_pixels,
                                  fps=cfg.expand.video_fps, max_frames=cfg.expand.video_max_frames,
                                  max_batch_items=r.batch_pairs, window_mib=r.window_mib,
                                  prepare_processes=e.prepare_processes,
                                  attn_implementation=e.attn_implementation,
                                  storage_options=storage_options, revision=r.revision)
    if r.instruction:
        kwargs["default_instruction"] = r.instruction
    return kwargs


def check_reranker_checkpoint(model: str | None, revision: str | None = None) -> str | None:
    """Cheap preflight of a reranker checkpoint: its config and processor load, it is a Qwen3-VL
    model, its tokenizer has plain yes/no tokens and it is no Embedding checkpoint (without loading
    the weights). Returns the hub commit `revision` resolves to now (None for a local folder)."""
    try:
        return _check_reranker_checkpoint(model, revision)
    except QueryPreflightError:
        raise
    except PreflightError as exc:  # preflight.py's shared checks, raised as the query's own error
        raise QueryPreflightError(str(exc)) from None


def _check_reranker_checkpoint(model: str | None, revision: str | None) -> str | None:
    if not model:
        raise QueryPreflightError("reranker.model is not set: set it in the config, or query with --no-rerank")
    from transformers import AutoConfig, AutoTokenizer

    check_local_checkpoint_exists("reranker.model", model)
    name = checkpoint_id(model, revision)
    try:
        config = AutoConfig.from_pretrained(model, revision=revision)
        tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
    except Exception as exc:
        raise QueryPreflightError(f"reranker.model {name!r} cannot be loaded: {type(exc).__name__}: "
                                  f"{one_line(exc)}") from None
    if getattr(config, "model_type", None) not in ("qwen3_vl", "qwen3_vl_moe"):
        raise QueryPreflightError(
            f"reranker.model {name!r} is a {getattr(config, 'model_type', '?')!r} model, not a Qwen3-VL reranker")
    vocab = tokenizer.get_vocab()
    if "yes" not in vocab or "no" not in vocab:
        raise QueryPreflightError(f"reranker.model {name!r}: its tokenizer has no plain 'yes'/'no' tokens")
    check_checkpoint_kind("reranker.model", model, "reranker", tokenizer, revision)
    return hub_commit(model, config)


def load_reranker(cfg: Config, storage_options: dict[str, Any] | None = None) -> Any:
    """The configured Qwen3VLReranker, or QueryPreflightError naming the checkpoint and the reason."""
    from operators.qwen3vl import Qwen3VLReranker

    check_reranker_checkpoint(cfg.reranker.model, cfg.reranker.revision)
    try:
        return Qwen3VLReranker(cfg.reranker.model, **reranker_kwargs(cfg, storage_options or {}))
    except Exception as exc:
        raise QueryPreflightError(
            f"reranker.model {cfg.reranker.checkpoint!r} cannot be loaded: "
            f"{type(exc).__name__}: {exc}") from None


def load_embedder(cfg: Config, storage_options: dict[str, Any] | None = None) -> Any:
    """The configured Qwen3VLEmbedder (same settings as ingestion)."""
    from operators.qwen3vl import Qwen3VLEmbedder

    try:
        return Qwen3VLEmbedder(cfg.embedder.model, **embedder_kwargs(cfg, storage_options or {}))
    except Exception as exc:
        raise QueryPreflightError(
            f"embedder.model {cfg.embedder.checkpoint!r} cannot be loaded: "
            f"{type(exc).__name__}: {exc}") from None


# -- the engine ---------------------------------------------------------------------------


class QueryEngine:
    """Single queries against one collection: embed, MRL funnel search, rebuild candidates, rerank.

    Everything is checked at construction, before any query: the collection exists and
    has a "full" vector of the embedder's dimension, and the configured reranker loads
    (unless ``with_reranker=False``). Pass already-loaded ``embedder``/``reranker`` to share them,
    and a ``client`` to reuse an open connection (the caller then closes it; an
    embedded store can only be opened by one client at a time). ``warn`` gets the warnings
    (a collection ingested with another embedder; a filter key that no point holds, once per key
    for the engine's life, when a filtered search finds nothing); by default they go to stderr.
    """

    def __init__(self, cfg: Config, embedder: Any = None, reranker: Any = None, client: QdrantClient | None = None,
                 *, with_reranker: bool = True, warn: Callable[[str], None] | None = None) -> None:
        self.cfg = cfg
        self.storage_options = dict(cfg.source.storage_options)
        self.settings = expand_settings(cfg)
        self._own_client = client is None
        self._own_models: list[Any] = []
        self.client = client
        self.embedder = embedder
        self.reranker = reranker
        self.warn = warn
        self._checked_filter_keys: set[str] = set()  # payload paths checked by warn_unheld_filter_keys
        try:
            if self.client is None:
                self.client = open_client(cfg)
            self.layout = collection_layout(self.client, cfg.qdrant.collection, store_location(cfg))
            e = cfg.embedder
            dim = int(embedder.hidden_size) if embedder is not None else model_dimension(e.model, e.revision)
            model = e.checkpoint if embedder is None else embedder.checkpoint
            check_dimension(self.layout, model, dim)
            warn_if_other_model(self.client, self.layout, model, warn, settings_digests_of_any_dtype(cfg))
            want_reranker = reranker is None and with_reranker and cfg.reranker.model
            if want_reranker:
                check_reranker_checkpoint(cfg.reranker.model, cfg.reranker.revision)  # before the (slow) embedder load
            if self.embedder is None:
                self.embedder = load_embedder(cfg, self.storage_options)
                self._own_models.append(self.embedder)
            if want_reranker:
                self.reranker = load_reranker(cfg, self.storage_options)
                self._own_models.append(self.reranker)
        except BaseException:
            self.close()
            raise

    @property
    def document_instruction(self) -> str:
        """The instruction the documents were embedded with (a query with it and a unit's content
        gets exactly that unit's vector)."""
        return self.embedder.default_instruction

    def embed(self, query: Mapping[str, Any], instruction: str | None = None) -> dict[str, list[float]]:
        """The query's named vectors (full, and the smallest MRL one when the collection has them)."""
        content = query_content(query)
        instr = resolve_instruction(query, instruction, self.cfg.query.instruction)
        out = embed_queries(self.embedder, [content], [instr], self.cfg.limits.max_image_pixels,
                            self.cfg.source.storage_options, self.cfg.limits.max_object_bytes)[0]
        if isinstance(out, str):
            raise QueryInputError(f"the query cannot be embedded: {out}")
        return query_vectors(out, self.layout)

    def retrieve(self, vectors: Mapping[str, list[float]], *, top_k: int | None = None,
                 filters: Mapping[str, Any] | models.Filter | None = None,
                 funnel: bool | None = None) -> list[Candidate]:
        """Qdrant candidates for the query vectors (funnel None: the MRL funnel when available).

        A filtered search that finds nothing warns about each filter key no point holds (a typo, or
        ``lang`` for ``metadata.lang``); a search with candidates costs no extra request.
        """
        request = search_request(vectors, self.layout, top_k=result_count("top_k", top_k, self.cfg.query.top_k),
                                 prefetch_multiplier=self.cfg.query.prefetch_multiplier,
                                 query_filter=build_filter(filters), funnel=funnel)
        candidates = [Candidate.from_point(p) for p in self.client.query_points(**request).points]
        if not candidates and filters:
            warn_unheld_filter_keys(self.client, self.layout.name, filters, self.warn, self._checked_filter_keys)
        return candidates

    def rerank(self, query: Mapping[str, Any], candidates: Sequence[Candidate], *, top_n: int | None = None,
               instruction: str | None = None) -> tuple[list[Hit], list[Skipped]]:
        """Rerank candidates for the query; returns (hits, skipped)."""
        if self.reranker is None:
            raise QueryPreflightError("no reranker loaded: set reranker.model, or search with rerank=False "
                                      "(--no-rerank)")
        hits, skipped = rerank_candidates(self.reranker, query_content(query), candidates,
                                          top_n=result_count("top_n", top_n, self.cfg.query.top_n),
                                          instruction=instruction or self.cfg.reranker.instruction,
                                          storage_options=self.storage_options, settings=self.settings)
        # A reason quotes its store's error, which may echo a credential (a 403 naming the key id).
        secrets = self.cfg.secret_values()
        return hits, [replace(s, reason=redact(s.reason, secrets)) for s in skipped]

    def search(self, query: Mapping[str, Any], *, instruction: str | None = None, top_k: int | None = None,
               top_n: int | None = None, filters: Mapping[str, Any] | models.Filter | None = None,
               rerank: bool = True, funnel: bool | None = None,
               rerank_instruction: str | None = None) -> QueryResult:
        """Run one query: the top_n hits (reranked unless rerank=False) and the skipped candidates."""
        top_k = result_count("top_k", top_k, self.cfg.query.top_k)
        top_n = min(result_count("top_n", top_n, self.cfg.query.top_n), top_k)
        if rerank and self.reranker is None:
            raise QueryPreflightError("no reranker loaded: set reranker.model, or search with rerank=False "
                                      "(--no-rerank)")
        build_filter(filters)  # a bad filter fails before any work
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        query_content(query)  # a bad query (an unknown key) is named before its image is fetched
        try:  # an http(s) image fetched once, for the embedder and the reranker alike
            query = fetch_remote_images(query, self.cfg.limits.max_object_bytes)
        except MediaError as exc:
            raise QueryInputError(f"the query cannot be embedded: {exc}") from None
        vectors = self.embed(query, instruction)
        t1 = time.perf_counter()
        # The filters as given, not built: retrieve names their keys when nothing matches.
        candidates = self.retrieve(vectors, top_k=top_k, filters=filters, funnel=funnel)
        t2 = time.perf_counter()
        seconds.update(embed=t1 - t0, search=t2 - t1)
        used_funnel = (funnel is None or funnel) and self.layout.smallest is not None
        if not rerank:
            return QueryResult(vector_order(candidates, top_n), [], len(candidates), used_funnel, False, seconds)
        hits, skipped = self.rerank(query, candidates, top_n=top_n, instruction=rerank_instruction)
        seconds["rerank"] = time.perf_counter() - t2
        return QueryResult(hits, skipped, len(candidates), used_funnel, True, seconds)

    def close(self) -> None:
        """Close the client if this engine opened it, and release the models it loaded."""
        for model in self._own_models:
            try:
                model.close()
            except Exception:
                pass
        self._own_models = []
        if self._own_client and self.client is not None:
            self.client.close()
            self.client = None

    def __enter__(self) -> "QueryEngine":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
