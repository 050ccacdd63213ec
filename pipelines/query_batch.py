"""`qvl query-batch` as a Ray Data job: many queries, the same hits as `QueryEngine` gives each one.

    queries ──> EmbedSearchStage (actor pool: embed + Qdrant search) ──> RerankStage (actor
            pool holding the reranker: rebuild candidates, rerank) ──> one result per query

Both stages call the functions of ``pipelines.query``, so a batch row gives the same hits as
the single query. In embedded mode one QdrantOwner actor opens the store and every search
goes through it.
"""

from __future__ import annotations

import base64
import contextlib
import json
import math
import sys
from dataclasses import asdict
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from operators.crash_journal import TaskGuard, batch_key, reading, retries_needed, start_journal, stop_journal
from operators.model_actor import ClosesModel
from sinks.qdrant_client_factory import make_client

from .actor_fit import ActorPool, check_pools_fit
from .config import Config
from .config_secrets import redact
from .ingest import expand_settings, map_on_actor_pool, qdrant_settings
from .interrupts import deferral_ends_on_error, stop_on_signals
from .plan import settings_digests_of_any_dtype
from .preflight import check_attention, embedding_checkpoint, gpu_nodes_without_package
from .query import (Candidate, Hit, Skipped, check_reranker_checkpoint, embed_queries, load_embedder, load_reranker,
                    rerank_candidates, vector_order)
from .query_files import QueryRow
from .query_inputs import (QueryInputError, build_filter, filter_fields, query_content, resolve_instruction,
                           result_count)
from .query_store import (CollectionLayout, check_dimension, collection_layout, open_client, query_vectors,
                          search_request, store_location, warn_if_other_model, warn_unheld_filter_keys)

# Queries travel through Ray Data as JSON strings (bytes as {"$b64": ...}): nested, optional
# fields survive Arrow without schema unification surprises.


def _encode(obj: Any) -> str:
    def default(o: Any) -> Any:
        if isinstance(o, (bytes, bytearray, memoryview)):
            return {"$b64": base64.b64encode(bytes(o)).decode()}
        return str(o)

    return json.dumps(obj, ensure_ascii=False, default=default)


def _decode(text: str) -> Any:
    def hook(o: dict) -> Any:
        return base64.b64decode(o["$b64"]) if set(o) == {"$b64"} else o

    return json.loads(text, object_hook=hook)


def _owner_search(owner: Any) -> Callable[[dict[str, Any]], list[Any]]:
    import ray

    return lambda request: ray.get(owner.query_points.remote(**request))


class EmbedSearchStage(ClosesModel):
    """Ray Data actor: embeds a batch of queries and searches Qdrant for each (the owner actor in
    embedded mode, its own client in server mode). Adds a ``candidates`` JSON column and ``error``."""

    def __init__(self, cfg: Config, layout: CollectionLayout, owner: Any = None, *, top_k: int,
                 funnel: bool | None = None) -> None:
        self.cfg, self.layout, self.top_k, self.funnel = cfg, layout, top_k, funnel
        self.embedder = load_embedder(cfg, dict(cfg.source.storage_options))
        self.embedder.use_every_core()  # on a CPU: Ray starts actors with one thread
        if owner is not None:
            self.search = _owner_search(owner)
        else:
            self.client = client = make_client(qdrant_settings(cfg))
            # The client, not self: a lambda holding self is a cycle, and Ray Data's release of the
            # actor (it deletes the stage) would not reach __del__, which closes the model.
            self.search = lambda request: client.query_points(**request).points

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        n = len(batch["id"])
        rows = [QueryRow(str(batch["id"][i]), _decode(batch["query"][i]), _decode(batch["instruction"][i]),
                         _decode(batch["filters"][i])) for i in range(n)]
        candidates, errors = [""] * n, [""] * n
        contents: list[dict[str, Any] | None] = []
        for i, row in enumerate(rows):
            try:
                build_filter(row.filters)
                contents.append(query_content(row.query))
            except Exception as exc:
                contents.append(None)
                errors[i] = f"{type(exc).__name__}: {exc}"
        live = [i for i in range(n) if contents[i] is not None]
        raws = embed_queries(self.embedder, [contents[i] for i in live],
                             [resolve_instruction(rows[i].query, rows[i].instruction, self.cfg.query.instruction)
                              for i in live], self.cfg.limits.max_image_pixels, self.cfg.source.storage_options,
                             self.cfg.limits.max_object_bytes)
        for i, raw in zip(live, raws):
            if isinstance(raw, str):
                errors[i] = f"the query cannot be embedded: {raw}"
                continue
            try:
                request = search_request(query_vectors(raw, self.layout), self.layout, top_k=self.top_k,
                                         prefetch_multiplier=self.cfg.query.prefetch_multiplier,
                                         query_filter=build_filter(rows[i].filters), funnel=self.funnel)
                points = [Candidate.from_point(p) for p in self.search(request)]
                candidates[i] = _encode([asdict(c) for c in points])
            except Exception as exc:
                errors[i] = f"search failed: {type(exc).__name__}: {exc}"
        return {"idx": batch["idx"], "id": batch["id"], "query": batch["query"], "candidates": candidates,
                "error": errors}


class RerankStage(ClosesModel):
    """Ray Data actor holding a Qwen3VLReranker: rebuilds each query's candidates and reranks them.

    A query whose candidates crash a native decoder kills the actor; with a crash journal, the retry
    names each query before reranking it, and the query it died on fails alone on the next retry. A
    query that takes longer than limits.max_rerank_query_s (a hung decoder) gets the actor stopped,
    and fails alone on the retry (operators/crash_journal.py).
    """

    model_attr = "reranker"

    def __init__(self, cfg: Config, top_n: int, crash_journal: Any = None) -> None:
        self.cfg, self.top_n = cfg, top_n
        self.storage_options = dict(cfg.source.storage_options)
        self.settings = expand_settings(cfg)
        self.reranker = load_reranker(cfg, self.storage_options)
        # Every core on a CPU too: the two pools' models take turns more than they overlap
        # (96 queries, top 30 reranked, small checkpoints, 2 cores: 24-27 s against 32-33 s with one
        # thread each; bench/RESULTS.md section 3).
        self.reranker.use_every_core()
        self.crash_journal = crash_journal

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        keys = [str(i) for i in batch["idx"]]
        guard = (TaskGuard(self.crash_journal, batch_key(keys), self.cfg.limits.max_rerank_query_s,
                           "limits.max_rerank_query_s") if self.crash_journal is not None and keys else None)
        results = []
        for i, key in enumerate(keys):
            error = batch["error"][i] or None
            hits: list[Hit] = []
            skipped: list[Skipped] = []
            if not error and guard is not None and guard.skip(key):
                error = "rerank failed: {}: {}".format(*guard.letter(key, "reranking the candidates of"))
            elif not error:
                try:
                    with reading(guard, key):
                        hits, skipped = self._rerank(batch, i)
                except Exception as exc:
                    error = f"rerank failed: {type(exc).__name__}: {exc}"
            results.append(_encode({"hits": [h.to_dict() for h in hits],
                                    "skipped": [s.to_dict() for s in skipped], "error": error}))
        if guard is not None:
            guard.end()
        return {"idx": batch["idx"], "id": batch["id"], "result": results}

    def _rerank(self, batch: dict[str, np.ndarray], i: int) -> tuple[list[Hit], list[Skipped]]:
        candidates = [Candidate(**c) for c in _decode(batch["candidates"][i])]
        return rerank_candidates(self.reranker, query_content(_decode(batch["query"][i])), candidates,
                                 top_n=self.top_n, instruction=self.cfg.reranker.instruction,
                                 storage_options=self.storage_options, settings=self.settings)


def _unreranked(row: Mapping[str, Any], top_n: int) -> dict[str, Any]:
    """One query's result without reranking: its best top_n candidates in vector order."""
    if row["error"]:
        return {"hits": [], "skipped": [], "error": row["error"]}
    candidates = [Candidate(**c) for c in _decode(row["candidates"])]
    return {"hits": [h.to_dict() for h in vector_order(candidates, top_n)], "skipped": [], "error": None}


def _vector_results(batch: dict[str, np.ndarray], top_n: int) -> dict[str, Any]:
    """A batch of searched queries cut to their top_n hits: the ``result`` column RerankStage gives."""
    results = [_encode(_unreranked({"error": batch["error"][i], "candidates": batch["candidates"][i]}, top_n))
               for i in range(len(batch["id"]))]
    return {"idx": batch["idx"], "id": batch["id"], "result": results}


def vector_results(ds: Any, top_n: int) -> Any:
    """The searched queries' results without reranking, cut to top_n in Ray Data tasks.

    Cut before the driver collects them: each row otherwise carries its query and all top_k
    candidates with their payloads (up to 8,000 characters of text each), top_k / top_n times
    what the results file keeps, all held by the driver at once.
    """
    # A sliver of a CPU: the embedding actors may hold every CPU, and this is a cheap cut.
    return ds.map_batches(_vector_results, fn_kwargs=dict(top_n=top_n), batch_format="numpy", num_cpus=0.1)


def run_query_batch(cfg: Config, queries: Sequence[QueryRow], *, top_k: int | None = None, top_n: int | None = None,
                    rerank: bool = True, funnel: bool | None = None, rerank_actors: int | None = None,
                    batch_size: int | None = None, warn: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """Run many queries as a Ray Data job; one result per query, in input order:
    ``{"id", "hits": [Hit dicts], "skipped": [Skipped dicts], "error": str | None}``.

    Preflight (before any actor starts): the collection, the embedder dimension and the
    reranker checkpoint. In embedded mode the store is opened by one QdrantOwner actor.
    ``warn`` gets the warnings (a collection ingested with another embedder; a filter key that no
    point holds, once per key, when filtered queries found nothing; default: stderr).
    """
    import ray

    from sinks.qdrant_sink import stop_owner

    from .ingest import check_workers_hold_api_key, ensure_ray, open_owner

    top_k = result_count("top_k", top_k, cfg.query.top_k)
    top_n = min(result_count("top_n", top_n, cfg.query.top_n), top_k)
    for row in queries:  # bad filters are a user error: say so before any work
        try:
            build_filter(row.filters)
        except QueryInputError as exc:
            raise QueryInputError(f"query {row.id}: {exc}") from None
    settings = qdrant_settings(cfg)
    client = open_client(cfg)
    try:
        layout = collection_layout(client, cfg.qdrant.collection, store_location(cfg))
        e = cfg.embedder
        model = e.checkpoint
        dim, embedder_commit = embedding_checkpoint(e.model, e.revision)
        check_dimension(layout, model, dim)
        warn_if_other_model(client, layout, model, warn, settings_digests_of_any_dtype(cfg))
    finally:
        client.close()  # releases an embedded folder for the owner actor
    reranker_commit = check_reranker_checkpoint(cfg.reranker.model, cfg.reranker.revision) if rerank else None
    if not queries:
        return []
    # Every actor loads the commits resolved here: a branch moved on the hub mid-job would otherwise
    # give the queries of one run two models (as ingestion pins its workers).
    actor_cfg = pinned_to(cfg, embedder_commit, reranker_commit)

    with deferral_ends_on_error():  # ensure_ray defers stop signals to the job's gate, below
        ensure_ray(cfg)
        check_workers_hold_api_key(cfg)
        embed_actors = cfg.compute.embed_actors
        rerank_actors = int(rerank_actors or cfg.compute.embed_actors)
        gpus = _gpus_per_actor(cfg, embed_actors + (rerank_actors if rerank else 0))
        pools = [ActorPool("embedding", embed_actors, cfg.compute.cpus_per_actor, gpus)]
        if rerank:
            pools.append(ActorPool("reranking", rerank_actors, cfg.compute.cpus_per_actor, gpus))
        check_pools_fit(cfg, pools, 0, "", lambda line: print(line, file=sys.stderr))
        check_attention(cfg.embedder.attn_implementation, gpus, gpu_nodes_without_package)
    # After ray.init, whose SIGTERM handler (an abort in Ray's core worker) this replaces: a stop
    # signal ends the job with one line, its actors and the store's owner stopped.
    with stop_on_signals() as gate, gate.interruptible():
        # (the store may have been taken by another process since the layout was read)
        owner = open_owner(settings, cfg.qdrant.collection) if settings.embedded else None
        journal = None
        try:
            # The instruction travels JSON-encoded: "" (given, empty) and None (the default) stay apart.
            items = [{"idx": i, "id": r.id, "query": _encode(r.query), "instruction": _encode(r.instruction),
                      "filters": _encode(r.filters)} for i, r in enumerate(queries)]
            size = int(batch_size or cfg.compute.batch_size)
            ds = ray.data.from_items(items, override_num_blocks=max(1, min(len(items) // max(size, 1) + 1, 64)))
            ds = map_on_actor_pool(ds, EmbedSearchStage, actors=embed_actors,
                                   fn_constructor_args=(actor_cfg, layout, owner),
                                   fn_constructor_kwargs=dict(top_k=top_k, funnel=funnel), batch_size=size,
                                   batch_format="numpy", num_gpus=gpus, num_cpus=cfg.compute.cpus_per_actor)
            if rerank:
                journal = start_journal()  # a query whose candidate crashes or hangs a decoder fails alone
                per_batch = max(1, min(size, 4))
                ds = map_on_actor_pool(ds, RerankStage, actors=rerank_actors, fn_constructor_args=(actor_cfg, top_n),
                                       fn_constructor_kwargs=dict(crash_journal=journal),
                                       retries=retries_needed(per_batch),
                                       batch_size=per_batch, batch_format="numpy", num_gpus=gpus,
                                       num_cpus=cfg.compute.cpus_per_actor)
            else:
                ds = vector_results(ds, top_n)
            rows = {int(r["idx"]): _decode(r["result"]) for r in ds.take_all()}
        finally:
            if owner is not None:
                stop_owner(owner)
            if journal is not None:
                stop_journal(journal)
    results = [scrubbed({"id": q.id, **rows[i]}, cfg.secret_values()) for i, q in enumerate(queries)]
    warn_unheld_batch_filter_keys(cfg, layout.name, queries, results, warn)
    return results


def scrubbed(result: dict[str, Any], secrets: Sequence[str]) -> dict[str, Any]:
    """A query's result with the config's secrets scrubbed from its error and skip reasons (they quote
    store errors, which may echo a credential: a 403 naming the key id)."""
    if not secrets:
        return result
    if result.get("error"):
        result["error"] = redact(result["error"], secrets)
    for s in result.get("skipped") or ():
        s["reason"] = redact(s["reason"], secrets)
    return result


def pinned_to(cfg: Config, embedder_commit: str | None, reranker_commit: str | None) -> Config:
    """The config with each model's revision replaced by the hub commit resolved for it (kept when None)."""
    update: dict[str, Any] = {}
    if embedder_commit:
        update["embedder"] = cfg.embedder.model_copy(update={"revision": embedder_commit})
    if reranker_commit:
        update["reranker"] = cfg.reranker.model_copy(update={"revision": reranker_commit})
    return cfg.model_copy(update=update) if update else cfg


def _found_nothing(result: Mapping[str, Any]) -> bool:
    """A query that ran and got no candidate at all (none reranked, none skipped)."""
    return not result.get("error") and not result.get("hits") and not result.get("skipped")


def warn_unheld_batch_filter_keys(cfg: Config, collection: str, queries: Sequence[QueryRow],
                                  results: Sequence[Mapping[str, Any]], warn: Callable[[str], None] | None) -> None:
    """After the job: warn once per filter key that no point holds, among the filtered queries that found nothing.

    On the driver, after the owner actor has released an embedded store: a client is opened only
    when some filtered query found nothing. Never raises (a failed check only loses the warning).
    """
    empty = [q.filters for q, r in zip(queries, results) if filter_fields(q.filters) and _found_nothing(r)]
    if not empty:
        return
    client = None
    try:
        client = open_client(cfg)
        checked: set[str] = set()  # one run: each key checked and warned about once, not once per query
        for filters in empty:
            warn_unheld_filter_keys(client, collection, filters, warn, checked)
    except Exception:
        pass  # the store cannot be opened again (taken meanwhile): the results stand, without the warning
    finally:
        if client is not None:
            with contextlib.suppress(Exception):
                client.close()


def _gpus_per_actor(cfg: Config, actors: int) -> float:
    """GPUs per query actor: the configured/auto value, shared when the cluster has fewer GPUs than
    actors (the embedding and reranking pools run at the same time)."""
    import ray

    from .ingest import num_gpus_per_actor

    return shared_gpus(num_gpus_per_actor(cfg), float(ray.cluster_resources().get("GPU", 0)), actors)


def shared_gpus(per: float, total: float, actors: int) -> float:
    """GPUs per actor when `actors` actors asking `per` each share `total` GPUs: as asked when they fit."""
    if per <= 0 or total <= 0 or per * actors <= total:
        return per
    share = total / actors
    # Ray takes a fraction of one GPU, or whole GPUs: 3 GPUs for 2 actors is 1 each, not 1.5.
    return share if share < 1 else float(math.floor(share))
