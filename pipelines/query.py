"""Retrieval: embed the query, search Qdrant through the MRL funnel, rebuild the candidates, rerank.

    query ──> embed (query instruction) ──> query_points: prefetch on the smallest MRL vector
          (limit top_k × prefetch_multiplier, quantisation rescoring when configured)
          ──> rescore on "full" (limit top_k, payload filters) ──> rebuild each candidate's
          content from its source (thread pool) ──> Qwen3VLReranker in batches ──> top_n

``QueryEngine`` is the Python API (one query at a time, on the calling process);
``pipelines.query_batch.run_query_batch`` is the same steps as a Ray Data job (embedding +
search in one fixed-size actor pool, reranking in another). Both share the functions below,
so a batch row gives the same hits as the single query. Queries and results files:
``pipelines.query_files``.

Instructions. The query is embedded with ``instruction`` if given, else the query
dict's own ``"instruction"``, else ``query.instruction`` from the config (a retrieval
instruction). Documents were embedded with the embedder's default instruction
(``embedder.instruction`` or the model's ``Represent the user's input.``); a query
embedded with that same instruction (``engine.document_instruction``) and the same
content as a stored unit gets exactly that unit's vector. The reranker uses
``reranker.instruction`` (None: the model's default) unless ``rerank_instruction`` is given.
"""

from __future__ import annotations

import io
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import IO, Any, Callable, Mapping, Sequence

import numpy as np
from qdrant_client import QdrantClient, models

from operators.content import CandidateUnavailable, SourceCache, candidate_input
from operators.media.expand import ExpandSettings
from operators.media.listing import is_local_uri, local_path
from operators.qwen3vl.embedder import reduce_dim
from operators.units import MODALITIES
from sinks.qdrant_client_factory import make_client
from sinks.qdrant_schema import FULL_VECTOR, vector_name

from .config import Config
from .ingest import embedder_kwargs, expand_settings, qdrant_settings
from .preflight import PreflightError, embedded_store_error, model_dimension

logger = logging.getLogger(__name__)

QUERY_FIELDS = ("text", "image", "video", "video_start", "video_end", "fps", "max_frames")
_MRL_PREFIX = "mrl_"


class QueryPreflightError(PreflightError):
    """The query cannot start: missing collection, dimension mismatch, reranker that does not load."""


class QueryInputError(ValueError):
    """The query itself is unusable (no content, unreadable image, bad filter)."""


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
    try:
        return make_client(settings)
    except Exception as exc:
        if settings.embedded:  # e.g. held by a running ingestion: one clear error, exit 2
            raise QueryPreflightError(embedded_store_error(settings.path, exc)) from None
        raise


def store_location(cfg: Config) -> str:
    """Where the store is, for messages."""
    return f"embedded store {cfg.qdrant.path}" if cfg.qdrant.path else f"Qdrant at {cfg.qdrant.url}"


# -- filters ----------------------------------------------------------------------------


def normalise_prefix(prefix: str) -> str:
    """A source prefix as stored in ``source_prefixes``: absolute for local paths, ending in "/"."""
    prefix = str(prefix).strip()
    if not prefix:
        raise QueryInputError("source_prefix filter is empty")
    if is_local_uri(prefix):
        prefix = local_path(prefix)
    return prefix if prefix.endswith("/") else prefix + "/"


def _condition(key: str, value: Any) -> models.FieldCondition:
    values = list(value) if isinstance(value, (list, tuple, set)) else [value]
    if not values:
        raise QueryInputError(f"filter {key!r} has no value")
    if all(isinstance(v, str) for v in values) or all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        match = models.MatchValue(value=values[0]) if len(values) == 1 else models.MatchAny(any=values)
        return models.FieldCondition(key=key, match=match)
    if len(values) == 1 and isinstance(values[0], bool):
        return models.FieldCondition(key=key, match=models.MatchValue(value=values[0]))
    if len(values) == 1 and isinstance(values[0], float):
        return models.FieldCondition(key=key, range=models.Range(gte=values[0], lte=values[0]))
    raise QueryInputError(f"filter {key!r}: unsupported value {value!r} (use strings, integers, a bool or a number)")


def build_filter(filters: Mapping[str, Any] | models.Filter | None) -> models.Filter | None:
    """Payload filter: ``modality``, ``source_prefix`` (a folder or URL prefix), any other payload key.

    A list value matches any of its values; conditions are ANDed.
    """
    if filters is None or isinstance(filters, models.Filter):
        return filters
    if not isinstance(filters, Mapping):
        raise QueryInputError(f"filters must be an object (key -> value), got {type(filters).__name__}")
    must = []
    for key, value in filters.items():
        if value is None:
            continue
        if key == "modality":
            wanted = value if isinstance(value, (list, tuple)) else [value]
            bad = [m for m in wanted if m not in MODALITIES]
            if bad:
                raise QueryInputError(f"unknown modality {bad[0]!r} (one of {', '.join(MODALITIES)})")
            must.append(_condition("modality", value))
        elif key == "source_prefix":
            prefixes = value if isinstance(value, (list, tuple)) else [value]
            must.append(_condition("source_prefixes", [normalise_prefix(p) for p in prefixes]))
        else:
            must.append(_condition(str(key), value))
    return models.Filter(must=must) if must else None


# -- query content and vectors ------------------------------------------------------------


def query_content(query: Mapping[str, Any]) -> dict[str, Any]:
    """The model-visible part of a query dict (text, image, video, segment bounds), paths made absolute."""
    if not isinstance(query, Mapping):
        raise QueryInputError(f"a query must be a dict, got {type(query).__name__}")
    unknown = [k for k in query if k not in QUERY_FIELDS and k != "instruction"]
    if unknown:  # a misspelt "imgae" would otherwise search on the text alone
        raise QueryInputError(f"unknown query key{'s' if len(unknown) > 1 else ''} "
                              f"{', '.join(repr(k) for k in unknown)}: a query takes {', '.join(QUERY_FIELDS)}, "
                              "instruction")
    content = {k: query[k] for k in QUERY_FIELDS if query.get(k) is not None}
    if isinstance(content.get("text"), str) and not content["text"].strip():
        del content["text"]  # blank text is no query (ingestion, likewise, embeds no blank text)
    if not any(content.get(k) for k in ("text", "image", "video")):
        raise QueryInputError("the query has no text, image or video")
    for key in ("image", "video"):
        value = content.get(key)
        if isinstance(value, str) and "://" not in value:
            content[key] = os.path.abspath(os.path.expanduser(value))
    return content


def resolve_instruction(query: Mapping[str, Any], instruction: str | None, default: str) -> str:
    """The embedding instruction: the argument, else the query's own, else the configured default."""
    if instruction is not None:
        return instruction
    own = query.get("instruction")
    return own if isinstance(own, str) else default


def oversized_image(content: Mapping[str, Any], max_pixels: int,
                    storage_options: Mapping[str, Any] | None = None) -> str | None:
    """Why a query's image is over ``limits.max_image_pixels``, from its header alone; None if it is not.

    The same decompression-bomb guard as ingestion's: a query image is decoded in full by the
    embedder (and by every reranker pair), so a huge one must be refused before that. Each image
    of a list is checked; http(s) and data: URLs are left to qwen-vl-utils, which reads them itself.
    """
    from PIL import Image

    images = content.get("image")
    for image in images if isinstance(images, (list, tuple)) else [images]:
        opener = _image_opener(image, storage_options)
        if opener is None:
            continue  # a PIL image is decoded already
        try:
            with opener() as fh, Image.open(fh) as img:
                width, height = img.size
        except Exception:
            continue  # unreadable: the embedder names the reason
        if width * height > max_pixels:
            return (f"image {image if isinstance(image, str) else '(bytes)'} is {width}x{height} = "
                    f"{width * height} pixels, over limits.max_image_pixels={max_pixels} (decompression-bomb guard)")
    return None


def upright_images(content: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The query content with every EXIF-rotated image replaced by its upright pixels, as ingestion embeds it."""
    images = content.get("image")
    if images is None:
        return dict(content)
    many = isinstance(images, (list, tuple))
    upright = [_upright(image, storage_options) for image in (images if many else [images])]
    return {**content, "image": upright if many else upright[0]}


def _image_opener(image: Any, storage_options: Mapping[str, Any] | None) -> Callable[[], IO[bytes]] | None:
    """How to open a query image's bytes here; None for a URL qwen-vl-utils reads itself, or a PIL image."""
    from operators.media.listing import fs_for

    if isinstance(image, (bytes, bytearray)):
        return lambda: io.BytesIO(bytes(image))
    if isinstance(image, str) and not image.startswith(("http://", "https://", "data:")):
        fs, path = fs_for(image, dict(storage_options or {}))  # fsspec options normalised as the reader's
        return lambda: fs.open(path, "rb")
    return None


def _upright(image: Any, storage_options: Mapping[str, Any] | None) -> Any:
    from PIL import Image

    from operators.media.images import exif_rotated, upright_bytes

    try:
        opener = _image_opener(image, storage_options)
        if opener is None:
            return image
        with opener() as fh:
            with Image.open(fh) as img:
                if not exif_rotated(img):  # the header says so: the image is read no further
                    return image
            fh.seek(0)
            data = fh.read()
        return upright_bytes(data) or image
    except Exception:
        return image  # unreadable: the embedder names the reason


def embed_queries(embedder: Any, contents: Sequence[Mapping[str, Any]], instructions: Sequence[str],
                  max_image_pixels: int | None = None,
                  storage_options: Mapping[str, Any] | None = None) -> list[np.ndarray | str]:
    """Raw (un-normalised) pooled vectors of queries, or the error of each query that fails."""
    out: list[np.ndarray | str] = [""] * len(contents)
    live = []
    for i, content in enumerate(contents):
        too_large = oversized_image(content, max_image_pixels, storage_options) if max_image_pixels else None
        if too_large:
            out[i] = too_large
        else:
            live.append(i)
    inputs = [{**upright_images(contents[i], storage_options), "instruction": instructions[i]} for i in live]
    for i, r in zip(live, embedder.embed(inputs, normalize=False) if inputs else []):
        out[i] = r.vector if r.ok else (r.error or "unknown error")
    return out


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


@dataclass
class Candidate:
    """One point from Qdrant: id, vector score (cosine on the full vector), payload."""

    point_id: str
    score: float
    payload: dict[str, Any]

    @classmethod
    def from_point(cls, point: Any) -> "Candidate":
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


def vector_order(candidates: Sequence[Candidate], top_n: int) -> list[Hit]:
    """Hits in Qdrant's order (no reranking)."""
    return [_hit(i + 1, c, None) for i, c in enumerate(candidates[:top_n])]


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

    Ties keep the vector order. Candidates whose content cannot be rebuilt, or that the
    reranker cannot read, are returned as Skipped with the reason.
    """
    docs = load_candidates(candidates, storage_options=storage_options, settings=settings, workers=workers)
    skipped = [_skipped(c, d) for c, d in zip(candidates, docs) if isinstance(d, str)]
    ready = [(i, c, d) for i, (c, d) in enumerate(zip(candidates, docs)) if not isinstance(d, str)]
    scored: list[tuple[float, int, Candidate]] = []
    # One call for the whole top-k: the reranker batches the pairs itself and computes the
    # query's shared prefix (and, for an image query, its vision tower) once, not once per batch.
    results = (reranker.score(upright_images(query, storage_options), [d for _, _, d in ready], instruction)
               if ready else [])
    for (i, c, _), r in zip(ready, results):
        if r.ok:
            scored.append((float(r.score), i, c))
        else:
            skipped.append(_skipped(c, f"reranker cannot read the candidate: {r.error}"))
    scored.sort(key=lambda t: (-t[0], t[1]))
    hits = [_hit(rank + 1, c, s) for rank, (s, _, c) in enumerate(scored[:top_n])]
    return hits, skipped


# -- models -------------------------------------------------------------------------------


def reranker_kwargs(cfg: Config, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Qwen3VLReranker keyword arguments: the reranker section, with the embedder's pixel and
    device settings and the ingestion's video sampling (so candidates are seen as at ingestion)."""
    e, r = cfg.embedder, cfg.reranker
    kwargs: dict[str, Any] = dict(dtype=None if e.dtype == "auto" else e.dtype, max_length=r.max_length,
                                  min_pixels=e.min_pixels, max_pixels=e.max_pixels, total_pixels=e.total_pixels,
                                  fps=cfg.expand.video_fps, max_frames=cfg.expand.video_max_frames,
                                  max_batch_items=r.batch_pairs, prepare_processes=e.prepare_processes,
                                  attn_implementation=e.attn_implementation,
                                  storage_options=storage_options)
    if r.instruction:
        kwargs["default_instruction"] = r.instruction
    return kwargs


def check_reranker_checkpoint(model: str | None) -> None:
    """Cheap preflight of a reranker checkpoint: its config and processor load, it is a Qwen3-VL
    model and its tokenizer has plain yes/no tokens (without loading the weights)."""
    if not model:
        raise QueryPreflightError("reranker.model is not set: set it in the config, or query with --no-rerank")
    from transformers import AutoConfig, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(model)
        tokenizer = AutoTokenizer.from_pretrained(model)
    except Exception as exc:
        raise QueryPreflightError(f"reranker.model {model!r} cannot be loaded: {type(exc).__name__}: {exc}") from None
    if getattr(config, "model_type", None) not in ("qwen3_vl", "qwen3_vl_moe"):
        raise QueryPreflightError(
            f"reranker.model {model!r} is a {getattr(config, 'model_type', '?')!r} model, not a Qwen3-VL reranker")
    vocab = tokenizer.get_vocab()
    if "yes" not in vocab or "no" not in vocab:
        raise QueryPreflightError(f"reranker.model {model!r}: its tokenizer has no plain 'yes'/'no' tokens")


def load_reranker(cfg: Config, storage_options: dict[str, Any] | None = None) -> Any:
    """The configured Qwen3VLReranker, or QueryPreflightError naming the checkpoint and the reason."""
    from operators.qwen3vl import Qwen3VLReranker

    check_reranker_checkpoint(cfg.reranker.model)
    try:
        return Qwen3VLReranker(cfg.reranker.model, **reranker_kwargs(cfg, storage_options or {}))
    except Exception as exc:
        raise QueryPreflightError(
            f"reranker.model {cfg.reranker.model!r} cannot be loaded: {type(exc).__name__}: {exc}") from None


def load_embedder(cfg: Config, storage_options: dict[str, Any] | None = None) -> Any:
    """The configured Qwen3VLEmbedder (same settings as ingestion)."""
    from operators.qwen3vl import Qwen3VLEmbedder

    try:
        return Qwen3VLEmbedder(cfg.embedder.model, **embedder_kwargs(cfg, storage_options or {}))
    except Exception as exc:
        raise QueryPreflightError(
            f"embedder.model {cfg.embedder.model!r} cannot be loaded: {type(exc).__name__}: {exc}") from None


# -- the engine ---------------------------------------------------------------------------


class QueryEngine:
    """Single queries against one collection: embed, MRL funnel search, rebuild candidates, rerank.

    Everything is checked at construction, before any query: the collection exists and
    has a "full" vector of the embedder's dimension, and the configured reranker loads
    (unless ``with_reranker=False``). Pass already-loaded ``embedder``/``reranker`` to share them,
    and a ``client`` to reuse an open connection (the caller then closes it; an
    embedded store can only be opened by one client at a time).
    """

    def __init__(self, cfg: Config, embedder: Any = None, reranker: Any = None, client: QdrantClient | None = None,
                 *, with_reranker: bool = True) -> None:
        self.cfg = cfg
        self.storage_options = dict(cfg.source.storage_options)
        self.settings = expand_settings(cfg)
        self._own_client = client is None
        self._own_models: list[Any] = []
        self.client = client
        self.embedder = embedder
        self.reranker = reranker
        try:
            if self.client is None:
                self.client = open_client(cfg)
            self.layout = collection_layout(self.client, cfg.qdrant.collection, store_location(cfg))
            dim = int(embedder.hidden_size) if embedder is not None else model_dimension(cfg.embedder.model)
            check_dimension(self.layout, cfg.embedder.model if embedder is None else embedder.model_name_or_path, dim)
            want_reranker = reranker is None and with_reranker and cfg.reranker.model
            if want_reranker:
                check_reranker_checkpoint(cfg.reranker.model)  # before the (slow) embedder load
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
                            self.cfg.source.storage_options)[0]
        if isinstance(out, str):
            raise QueryInputError(f"the query cannot be embedded: {out}")
        return query_vectors(out, self.layout)

    def retrieve(self, vectors: Mapping[str, list[float]], *, top_k: int | None = None,
                 filters: Mapping[str, Any] | models.Filter | None = None,
                 funnel: bool | None = None) -> list[Candidate]:
        """Qdrant candidates for the query vectors (funnel None: the MRL funnel when available)."""
        request = search_request(vectors, self.layout, top_k=top_k or self.cfg.query.top_k,
                                 prefetch_multiplier=self.cfg.query.prefetch_multiplier,
                                 query_filter=build_filter(filters), funnel=funnel)
        return [Candidate.from_point(p) for p in self.client.query_points(**request).points]

    def rerank(self, query: Mapping[str, Any], candidates: Sequence[Candidate], *, top_n: int | None = None,
               instruction: str | None = None) -> tuple[list[Hit], list[Skipped]]:
        """Rerank candidates for the query; returns (hits, skipped)."""
        if self.reranker is None:
            raise QueryPreflightError("no reranker loaded: set reranker.model, or search with rerank=False "
                                      "(--no-rerank)")
        return rerank_candidates(self.reranker, query_content(query), candidates,
                                 top_n=top_n or self.cfg.query.top_n,
                                 instruction=instruction or self.cfg.reranker.instruction,
                                 storage_options=self.storage_options, settings=self.settings)

    def search(self, query: Mapping[str, Any], *, instruction: str | None = None, top_k: int | None = None,
               top_n: int | None = None, filters: Mapping[str, Any] | models.Filter | None = None,
               rerank: bool = True, funnel: bool | None = None,
               rerank_instruction: str | None = None) -> QueryResult:
        """Run one query: the top_n hits (reranked unless rerank=False) and the skipped candidates."""
        top_k = int(top_k or self.cfg.query.top_k)
        top_n = min(int(top_n or self.cfg.query.top_n), top_k)
        if rerank and self.reranker is None:
            raise QueryPreflightError("no reranker loaded: set reranker.model, or search with rerank=False "
                                      "(--no-rerank)")
        query_filter = build_filter(filters)  # a bad filter fails before any work
        seconds: dict[str, float] = {}
        t0 = time.perf_counter()
        vectors = self.embed(query, instruction)
        t1 = time.perf_counter()
        candidates = self.retrieve(vectors, top_k=top_k, filters=query_filter, funnel=funnel)
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
