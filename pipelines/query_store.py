"""The collection a query reads: its layout (full and MRL vectors, quantisation), the client, and the
``query_points`` request through the MRL funnel."""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Collection, Mapping

import numpy as np
from qdrant_client import QdrantClient, models

from operators.qwen3vl.embedder import reduce_dim
from operators.units import stored_settings_digest
from sinks.qdrant_client_factory import make_client
from sinks.qdrant_schema import FULL_VECTOR, vector_name

from .config import Config
from .ingest import qdrant_settings, server_client
from .preflight import PreflightError, embedded_store_error
from .query_inputs import filter_fields

logger = logging.getLogger(__name__)

_MRL_PREFIX = "mrl_"


class QueryPreflightError(PreflightError):
    """The query cannot start: missing collection, dimension mismatch, reranker that does not load."""


# -- collection layout ----------------------------------------------------------------


@dataclass(frozen=True)
class CollectionLayout:
    """What the query needs to know about the collection: its vectors and quantisation."""

    name: str
    full_dim: int
    mrl_dims: tuple[int, ...] = ()  # ascending
    quantized: bool = False
    points: int | None = None

    @property
    def smallest(self) -> int | None:
        """The smallest MRL dimension (the prefetch vector), None without MRL vectors."""
        return self.mrl_dims[0] if self.mrl_dims else None


def read_layout(info: models.CollectionInfo, name: str) -> CollectionLayout:
    """The layout of a collection from its info (QueryPreflightError when it has no "full" vector)."""
    vectors: Any = info.config.params.vectors
    if not isinstance(vectors, dict) or FULL_VECTOR not in vectors:
        held = sorted(vectors) if isinstance(vectors, dict) else "a single unnamed vector"
        raise QueryPreflightError(
            f"collection {name!r} has no {FULL_VECTOR!r} vector (it holds {held}): it was not written by `qvl ingest`")
    mrl = sorted(int(k[len(_MRL_PREFIX):]) for k in vectors
                 if k.startswith(_MRL_PREFIX) and k[len(_MRL_PREFIX):].isdigit())
    for d in (None, *mrl):  # what the query's vectors are compared with, as `qvl ingest` creates them
        params, field = vectors[vector_name(d)], vector_name(d)
        if d is not None and params.size != d:
            raise QueryPreflightError(f"collection {name!r} vector {field!r} holds {params.size}-dimensional vectors, "
                                      f"not {d}: it was not written by `qvl ingest`")
        distance = models.Distance(params.distance)
        if distance != models.Distance.COSINE:
            raise QueryPreflightError(f"collection {name!r} vector {field!r} uses {distance.value} distance, "
                                      "not Cosine: it was not written by `qvl ingest`")
    quantized = info.config.quantization_config is not None or any(
        getattr(vectors[vector_name(d)], "quantization_config", None) is not None for d in mrl)
    return CollectionLayout(name, int(vectors[FULL_VECTOR].size), tuple(mrl), bool(quantized), info.points_count)


def collection_layout(client: QdrantClient, name: str, where: str = "") -> CollectionLayout:
    """Read the layout, with a clear error when the collection does not exist."""
    if not client.collection_exists(name):
        raise QueryPreflightError(
            f"collection {name!r} does not exist{f' in {where}' if where else ''}: ingest into it first (qvl ingest)")
    return read_layout(client.get_collection(name), name)


def check_dimension(layout: CollectionLayout, model: str, dim: int) -> None:
    """The query embedder must produce the collection's full dimension."""
    if dim != layout.full_dim:
        raise QueryPreflightError(
            f"query embedder {model!r} produces {dim}-dimensional vectors but collection {layout.name!r} holds "
            f"{layout.full_dim}-dimensional {FULL_VECTOR!r} vectors: query with the embedder that ingested it")


def stored_ingestion(client: QdrantClient, name: str) -> tuple[str | None, str | None]:
    """The embedder (model_id) and settings digest one stored point was ingested with; Nones for an empty collection."""
    records, _ = client.scroll(name, limit=1, with_payload=["model_id", "fingerprint"], with_vectors=False)
    payload = (records[0].payload or {}) if records else {}
    model = payload.get("model_id")
    return (str(model) if model else None), stored_settings_digest(str(payload.get("fingerprint") or ""))


def warn_if_other_model(client: QdrantClient, layout: CollectionLayout, model: str,
                        warn: Callable[[str], None] | None = None, digests: Collection[str] = ()) -> None:
    """Warn (default: on stderr) when the collection was ingested with another embedder than the query's,
    or with the same one and other settings (digests: pipelines/plan.py settings_digests_of_any_dtype).

    A warning, not an error: the dimensions match (check_dimension), and the same weights may go by
    two names (a hub id and a local snapshot of it). Every point of an ingested collection has the
    same model_id and digest: a change of either re-embeds every object (pipelines/plan.py).
    """
    stored, stored_digest = stored_ingestion(client, layout.name)
    if stored is not None and stored != model:
        (warn or _warn_on_stderr)(f"collection {layout.name!r} was ingested with embedder {stored!r} and this query "
                                  f"embeds with {model!r}: unless they are the same weights, the hits mean nothing")
    elif digests and stored_digest is not None and stored_digest not in digests:
        # The reranker's candidates are rebuilt with this config's expand settings (PDF dpi, video
        # frames, chunks): with other ones than the ingestion's, they are not what was embedded.
        (warn or _warn_on_stderr)(f"collection {layout.name!r} was ingested with other embedder or expand settings "
                                  f"than this config's (settings digest {stored_digest}, not this config's: embedder "
                                  "pixels, instruction, dtype, max_length, expand.*): candidates are rebuilt for "
                                  "reranking with this config's; query with the ingestion's config")


def _warn_on_stderr(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


# -- filter keys no point holds -------------------------------------------------------------


def payload_key_held(client: QdrantClient, collection: str, key: str) -> bool:
    """Whether any point of the collection has a value at payload key path ``key`` (nested, array paths too).

    Qdrant's is_empty is true for a missing key, null and [], so a key held only as those counts as
    not held (no filter value can match it either). One scroll of limit 1: it stops at the first point.
    """
    held = models.Filter(must_not=[models.IsEmptyCondition(is_empty=models.PayloadField(key=key))])
    records, _ = client.scroll(collection, scroll_filter=held, limit=1, with_payload=False, with_vectors=False)
    return bool(records)


def stored_payload_keys(client: QdrantClient, collection: str) -> list[str]:
    """The top-level payload keys of one stored point, sorted; [] for an empty collection."""
    records, _ = client.scroll(collection, limit=1, with_payload=True, with_vectors=False)
    return sorted(records[0].payload or {}) if records else []


def warn_unheld_filter_keys(client: QdrantClient, collection: str, filters: Mapping[str, Any] | models.Filter | None,
                            warn: Callable[[str], None] | None = None, checked: set[str] | None = None) -> None:
    """Warn (default: on stderr) about each filter key that no point of the collection holds.

    For a filtered search that found nothing: a misspelt or misplaced key (``lang`` for the stored
    ``metadata.lang``) otherwise just gives no hits. Keys are checked by the payload path build_filter
    matches (``source_prefix`` is ``source_prefixes``). ``checked`` holds the paths already checked:
    each is checked, and warned about, once per set (one run). Never raises: a failed check (a server
    that refuses the request) must not fail the query it only annotates, so it is skipped.
    """
    try:
        unheld = []
        for key, path in filter_fields(filters).items():
            if checked is not None:
                if path in checked:
                    continue
                checked.add(path)  # before the request: a check that fails is not retried on every query
            if not payload_key_held(client, collection, path):
                unheld.append((key, path))
        stored = stored_payload_keys(client, collection) if unheld else []
        if not stored:  # no point at all: an empty collection, not a wrong key
            return
        for key, path in unheld:
            named = f"{key!r}" if key == path else f"{key!r} (payload key {path!r})"
            (warn or _warn_on_stderr)(f"filter key {named} is on no point of collection {collection!r}; "
                                      f"payload keys of a stored point: {', '.join(stored)}")
    except Exception as exc:
        logger.debug("filter key check skipped: %s: %s", type(exc).__name__, exc)


def open_client(cfg: Config) -> QdrantClient:
    """A client for the configured store. An embedded store must exist: opening a missing folder
    would create an empty store there, and a query must not write anything."""
    settings = qdrant_settings(cfg)
    if settings.embedded and os.path.exists(settings.path) and not os.path.isdir(settings.path):
        raise QueryPreflightError(f"embedded store {settings.path} (qdrant.path) is a file, not a folder: "
                                  "fix qdrant.path")
    if settings.embedded and not os.path.isdir(settings.path):
        raise QueryPreflightError(f"embedded store {settings.path} (qdrant.path) does not exist: "
                                  "ingest into it first (qvl ingest), or fix qdrant.path")
    if not settings.embedded:  # a server that does not answer: one clear error, exit 2, as for ingest
        try:
            return server_client(cfg)
        except PreflightError as exc:
            raise QueryPreflightError(str(exc)) from None
    try:
        return make_client(settings)
    except Exception as exc:  # e.g. held by a running ingestion: one clear error, exit 2
        raise QueryPreflightError(embedded_store_error(settings.path, exc)) from None


def store_location(cfg: Config) -> str:
    """Where the store is, for messages."""
    return f"embedded store {cfg.qdrant.path}" if cfg.qdrant.path else f"Qdrant at {cfg.qdrant.url}"


# -- the search request -------------------------------------------------------------------


def query_vectors(raw: np.ndarray, layout: CollectionLayout) -> dict[str, list[float]]:
    """The query's full vector and, when the collection has MRL vectors, its smallest reduced vector."""
    raw = np.asarray(raw, np.float32)[None, :]
    out = {FULL_VECTOR: reduce_dim(raw, None)[0].tolist()}
    if layout.smallest is not None:
        out[vector_name(layout.smallest)] = reduce_dim(raw, layout.smallest)[0].tolist()
    return out


def search_request(vectors: Mapping[str, list[float]], layout: CollectionLayout, *, top_k: int,
                   prefetch_multiplier: int, query_filter: models.Filter | None,
                   funnel: bool | None = None) -> dict[str, Any]:
    """The ``query_points`` keyword arguments: the MRL funnel, or a plain full-vector search.

    funnel None = use it when the collection has MRL vectors; True without MRL vectors
    falls back to the full-vector search.
    """
    request: dict[str, Any] = dict(collection_name=layout.name, query=vectors[FULL_VECTOR], using=FULL_VECTOR,
                                   limit=int(top_k), query_filter=query_filter, with_payload=True)
    small = layout.smallest
    if (funnel is None or funnel) and small is not None:
        params = (models.SearchParams(quantization=models.QuantizationSearchParams(rescore=True))
                  if layout.quantized else None)
        request["prefetch"] = models.Prefetch(query=vectors[vector_name(small)], using=vector_name(small),
                                              limit=int(top_k) * int(prefetch_multiplier), filter=query_filter,
                                              params=params)
    return request
