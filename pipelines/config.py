"""Typed job configuration: the YAML schema, every default, loading and overrides.

Every default of the jobs lives in this file. A config is YAML validated into frozen
pydantic models that forbid unknown keys at every level::

    cfg = load_config("configs/local.yaml", ["embedder.mrl_dims=[256,64]", "qdrant.path=null"])

Errors
    Anything wrong with a config (missing file, YAML syntax, unknown key, wrong type
    or value, unknown override key, missing environment variable) raises ONE
    :class:`ConfigError` (a ``ValueError``) whose message starts with ``config <file>:``
    and lists every problem by its dotted key, e.g.
    ``config configs/x.yaml: embedder.mrl_dims.0: must be >= 1 (got 0); qdrant: unknown key 'urll' (did you mean 'url'?)``.
    Messages never contain the value of a secret: unknown keys and ``source.storage_options``
    problems are reported without their values, and the original pydantic error is not
    chained (its repr holds the inputs).

Overrides
    ``dotted.key=value`` strings. For keys that take a string the text is used as written,
    stripped, and is not YAML (``qdrant.collection=2024`` is the string ``"2024"``,
    ``source.uri=s3://b/my #1 folder/`` keeps its ``#1 folder/``, ``embedder.instruction=Find: cats``
    is not a mapping); an empty value, ``null`` or ``~`` is null, and one quoted YAML scalar
    (``'...'`` or ``"..."``) is unquoted (``"null"`` is the string ``null``). Other values are
    parsed as a YAML scalar, list or mapping (``compute.embed_actors=2``,
    ``embedder.mrl_dims=[256,64]``, ``qdrant.path=null``; an empty value is null). Glob
    patterns in lists must be quoted (``source.include=['*.jpg']``: ``*`` starts a YAML
    alias). A mapping value replaces the whole section. Keys inside ``source.storage_options``
    are free-form, so their values are YAML.

YAML
    A float key takes an exponent number such as ``6e2`` (YAML 1.2's; PyYAML, YAML 1.1, reads
    it as a string, which every other key keeps: a collection name, a password; integer keys
    take digits). A section, list
    or mapping key left empty (null) means its default, as if it were not written.

Secrets (``config_secrets.py``)
    ``${VAR}`` anywhere inside a string value of ``source.storage_options`` (nested
    mappings and lists included) is replaced from the environment when the config is
    validated; a missing variable is an error naming the variable (``$${VAR}`` stands
    for a literal ``${VAR}``), and so is any other ``${...}`` (``${VAR:-x}``, ``${ VAR }``).
    No other section is substituted. The Qdrant API key is never part of the config:
    ``qdrant.api_key_env`` names the variable that holds it (a name, checked, never shown).
    ``Config.redacted_dict()`` is the config safe to echo (secret-looking storage option
    keys show ``***``, ``${VAR}`` references are shown as written, never resolved);
    ``Config.secret_values()`` plus :func:`redact` / :func:`redact_obj` scrub text and
    records. ``repr(cfg)`` shows the redacted storage options, but ``cfg.model_dump()``
    and ``cfg.source.storage_options`` hold the resolved values (that is what fsspec
    needs): never log those. Re-validating ``model_dump()`` output loses the ``${VAR}``
    references; pass configs around as objects (they pickle) instead.

Relative paths (``source.uri``, ``qdrant.path``, ``output.dir``) are relative to the
working directory of the process, not to the config file. A leading ``~`` in ``qdrant.path``
and ``output.dir`` is expanded when the config is validated (``source.uri`` keeps it: the
listing expands it for local paths). ``output.report_file`` and ``output.dead_letter_file``
are plain file names inside each run's folder.
"""

from __future__ import annotations

import copy
import difflib
import os
import re
import types
import unicodedata
from pathlib import Path
from typing import Annotated, Any, Iterable, Literal, Mapping, Union, get_args, get_origin

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from .config_secrets import (ENV_NAME, REDACTED, BadEnvRef, MissingEnv, is_secret_key, is_secret_var, redact,
                             redact_obj, redacted_options, scrub_url, secret_leaves, substitute_env)

__all__ = [
    "ConfigError",
    "Config",
    "SourceConfig",
    "ExpandConfig",
    "LimitsConfig",
    "EmbedderConfig",
    "ComputeConfig",
    "QdrantConfig",
    "RerankerConfig",
    "QueryConfig",
    "OutputConfig",
    "load_config",
    "parse_config",
    "apply_overrides",
    "redact",
    "redact_obj",
    "is_secret_key",
    "DEFAULT_QUERY_INSTRUCTION",
    "REDACTED",
    "ATTN_IMPLEMENTATIONS",
]

# attn_implementation values transformers 4.57 accepts for Qwen3-VL (it supports flash attention
# and SDPA, not flex attention; the paged variants are for generation only).
ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2", "flash_attention_3")
DEFAULT_QUERY_INSTRUCTION = "Retrieve images or text relevant to the user's query."
DEFAULT_API_KEY_ENV = "QDRANT_API_KEY"


class ConfigError(ValueError):
    """A configuration problem: one message naming every bad key by its dotted path."""


# --------------------------------------------------------------------------- helpers


def _fspath(value: Any) -> Any:
    """Accept ``os.PathLike`` where a path string is expected (programmatic use)."""
    return os.fspath(value) if isinstance(value, os.PathLike) else value


def _tuple_to_list(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _empty_to_none(value: Any) -> Any:
    value = _fspath(value)
    return None if isinstance(value, str) and not value.strip() else value


def _expand_user(value: str | None) -> str | None:
    """A local folder path made absolute (``~`` expanded), so every consumer sees one path.

    Absolute now, in the driver: Ray workers on a joined cluster run in another folder, where a
    relative path would name another store.
    """
    return os.path.abspath(os.path.expanduser(value)) if isinstance(value, str) else value


def _local_model(value: str | None) -> str | None:
    """A model that is a local folder made absolute (for the workers, as _expand_user); a hub id unchanged."""
    return _expand_user(value) if isinstance(value, str) and os.path.isdir(os.path.expanduser(value)) else value


def _checkpoint(model: str, revision: str | None) -> str:
    from operators.qwen3vl.loading import checkpoint_id  # the one spelling; loaded only when asked for

    return checkpoint_id(model, revision)


def _check_revision(model: str | None, revision: str | None) -> None:
    """Refuse a revision for a local checkpoint: transformers would ignore it, and the pin with it."""
    if revision is not None and model is not None and os.path.isdir(model):
        raise ValueError(f"revision: applies to a hub id, but model is the local folder {model!r} "
                         f"(got {_show(revision)}); check out that revision there, or drop the key")
    if revision is not None and any(c.isspace() for c in revision):
        raise ValueError(f"revision: a branch, tag or commit has no spaces (got {_show(revision)})")


PathStr = Annotated[str, BeforeValidator(_fspath), Field(min_length=1)]
OptPathStr = Annotated[str | None, BeforeValidator(_empty_to_none)]
# Local folders the jobs create or open themselves (source.uri is expanded by the listing, which
# also takes URLs).
LocalDirStr = Annotated[str, BeforeValidator(_fspath), Field(min_length=1), AfterValidator(_expand_user)]
OptLocalDirStr = Annotated[str | None, BeforeValidator(_empty_to_none), AfterValidator(_expand_user)]
NonEmptyStr = Annotated[str, Field(min_length=1)]
StrList = Annotated[list[str], BeforeValidator(_tuple_to_list)]


def _check_mrl_dims(dims: list[int]) -> list[int]:
    seen: set[int] = set()
    for d in dims:
        if d in seen:
            raise ValueError(f"duplicate dimension {d}")
        seen.add(d)
    return sorted(dims, reverse=True)


MrlDims = Annotated[
    list[Annotated[int, Field(ge=1)]],
    BeforeValidator(_tuple_to_list),
    AfterValidator(_check_mrl_dims),
]


def _takes_null(annotation: Any) -> bool:
    """True when a field's annotation admits None (``X | None``, ``Optional[X]``, ``Any``)."""
    return annotation is Any or annotation is None or type(None) in get_args(annotation)


# YAML 1.2 floats that YAML 1.1 (PyYAML) reads as strings: an exponent without a dot or a sign.
_EXPONENT = re.compile(r"[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)[eE][-+]?[0-9]+")


def _takes_float(annotation: Any) -> bool:
    """True for a float field (``float``, ``float | None``)."""
    return annotation is float or float in get_args(annotation)


def _is_section(annotation: Any) -> bool:
    """True for a field that is a section (a nested model)."""
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def _is_container(annotation: Any) -> bool:
    """True for a section, list or mapping field (whose empty YAML key means its default)."""
    return _is_section(annotation) or annotation in (list, dict) or get_origin(annotation) in (list, dict)


class _Section(BaseModel):
    """Base of every section: strict types, unknown keys rejected, immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _as_a_user_means_it(cls, data: Any) -> Any:
        """An empty section, list or mapping key (YAML null) is its default; an exponent number
        (6e2) is a number where a float is expected."""
        if not isinstance(data, Mapping):
            return data
        out = dict(data)
        for name, field in cls.model_fields.items():
            ann, value = field.annotation, out.get(name, ...)
            if value is None and _is_container(ann) and not _takes_null(ann):
                # Commenting out every sub-key of `expand:` or `storage_options:` leaves null, not {}.
                if _is_section(ann):
                    out[name] = {}  # its defaults; a required section then names its missing keys
                else:
                    del out[name]
            elif isinstance(value, str) and _takes_float(ann) and _EXPONENT.fullmatch(value.strip()):
                # Here, not in the YAML loader: there a collection named 1e2 would fail, and a
                # password 123e4567 in storage_options would become inf.
                out[name] = float(value)
        return out


# ------------------------------------------------------------------------ sections


class SourceConfig(_Section):
    """Where the objects come from (a local folder or any fsspec URL)."""

    uri: PathStr
    """Folder, ``file://`` or fsspec URL (``s3://bucket/prefix/``). Required."""
    include: StrList = []
    """Glob patterns (relative to ``uri``) an object must match; empty = everything."""
    exclude: StrList = []
    """Glob patterns that drop an object (applied after ``include``)."""
    storage_options: dict[str, Any] = Field(default_factory=dict, repr=False)
    """fsspec options (endpoint, profile, anon, key/secret, client_kwargs, ...), with
    ``${VAR}`` references resolved from the environment at load time."""

    _raw_storage_options: dict[str, Any] = PrivateAttr(default_factory=dict)
    _resolved_env: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _resolve_env(self) -> "SourceConfig":
        raw = self.storage_options
        resolved: dict[str, str] = {}
        try:
            options = substitute_env(raw, "storage_options", resolved)
        except MissingEnv as e:
            # Names the variable, never a value; `from None` keeps the inputs out of tracebacks.
            raise ValueError(f"{e.where}: environment variable '{e.var}' is not set") from None
        except BadEnvRef as e:
            # The text is not shown: it may be part of a secret.
            raise ValueError(f"{e.where}: only ${{NAME}} references to environment variables are supported "
                             "(no defaults such as ${NAME:-x}, no spaces); write $${ for a literal ${") from None
        self._raw_storage_options = raw
        self._resolved_env = resolved
        object.__setattr__(self, "storage_options", options)
        return self

    def redacted_storage_options(self) -> dict[str, Any]:
        """Storage options as written, ``${VAR}`` kept, secret-looking keys as ``***``."""
        return redacted_options(self._raw_storage_options)

    def secret_values(self) -> list[str]:
        """Resolved values of secret-looking keys and of secret-looking ``${VAR}`` refs."""
        values = list(secret_leaves(self.storage_options))
        values += [v for k, v in self._resolved_env.items() if is_secret_var(k)]
        return values

    def __repr_args__(self):
        for name, value in super().__repr_args__():
            yield name, value
        yield "storage_options", self.redacted_storage_options()


class ExpandConfig(_Section):
    """How objects are cut into units (one vector each)."""

    chunk_tokens: int = Field(512, ge=1)
    """Text chunk length in tokenizer tokens; at most embedder.max_length - TEMPLATE_TOKENS -
    instruction_tokens(embedder.instruction)."""
    overlap_tokens: int = Field(64, ge=0)
    """Tokens shared by consecutive chunks; must be < chunk_tokens."""
    pdf_dpi: int = Field(144, ge=1, le=1200)
    """PDF page render resolution (one unit per page)."""
    video_segment_s: float = Field(30.0, gt=0)
    """Video segment length in seconds (one unit per segment)."""
    video_fps: float = Field(1.0, gt=0)
    """Frames sampled per second of video."""
    video_max_frames: int = Field(64, ge=2)
    """At most this many frames per segment (at least 2: the video reader samples at least 2)."""

    @model_validator(mode="after")
    def _overlap_lt_chunk(self) -> "ExpandConfig":
        if self.overlap_tokens >= self.chunk_tokens:
            raise ValueError(
                f"overlap_tokens: must be < chunk_tokens ({self.chunk_tokens}) (got {self.overlap_tokens})"
            )
        return self


class LimitsConfig(_Section):
    """Safety caps: an object over a cap is a dead letter, checked before decoding."""

    max_object_bytes: int = Field(536_870_912, ge=1)
    """512 MiB per object."""
    max_image_pixels: int = Field(89_478_485, ge=1, le=178_956_970)
    """Decompression-bomb cap (Pillow's default), for images, rendered PDF pages and video frames. At
    most twice that: Pillow refuses to decode larger images whatever this says (the model resizes
    every image to embedder.max_pixels anyway)."""
    max_pdf_pages: int = Field(200, ge=1)
    max_video_duration_s: float = Field(3600.0, gt=0)
    max_expand_s: float = Field(600.0, gt=0)
    """Seconds to expand one object (read, render PDF pages, probe a video), or one record of a
    manifest. Past it the worker is stopped and, on the retry, the object is a dead letter: a hung
    decoder never stalls the job. Also the limit of one parse task over manifests before the run
    (past it, its manifests are expanded whole)."""
    max_embed_batch_s: float = Field(3600.0, gt=0)
    """Seconds for one embedding batch. Past it the actor is stopped, the retry embeds the batch's
    units one at a time with this limit each, and a unit that runs past it is a dead letter."""
    max_rerank_query_s: float = Field(600.0, gt=0)
    """Seconds for `qvl query-batch` to rebuild and rerank one query's candidates. Past it the
    reranking actor is stopped, and on the retry that query fails alone (a hung decoder)."""


class EmbedderConfig(_Section):
    """Qwen3-VL-Embedding model and its input budget."""

    model: Annotated[NonEmptyStr, AfterValidator(_local_model)]
    """Hub id or local checkpoint path. Required."""
    revision: OptPathStr = None
    """Hub branch, tag or commit of ``model`` (None = the default branch); pins the weights and the
    processor alike. Part of the settings digest and of each point's ``model_id``. Hub ids only."""
    mrl_dims: MrlDims = []
    """Matryoshka dimensions stored as extra named vectors (each >= 1, unique; sorted
    descending on load; each must also be <= the model's full dimension, checked when
    the model loads). Empty = full vector only."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """``auto``: the embedder's choice (bfloat16 on GPU, float32 on CPU)."""
    attn_implementation: str | None = None
    """One of :data:`ATTN_IMPLEMENTATIONS` (the reranker uses it too); None = transformers' default."""
    max_length: int = Field(8192, ge=1)
    """Max tokens per input (longer inputs are truncated by the embedder)."""
    min_pixels: int = Field(4096, ge=1)
    max_pixels: int = Field(1_843_200, ge=1)
    """Per image / page / frame pixel budget (resized within [min_pixels, max_pixels])."""
    total_pixels: int = Field(7_864_320, ge=1)
    """Pixel budget over all frames of one video segment."""
    token_budget: int = Field(16384, ge=1)
    """Tokens per forward batch (batches are cut by summed token length)."""
    max_batch_items: int = Field(64, ge=1)
    """At most this many inputs per forward batch."""
    window_mib: int | None = Field(None, ge=1)
    """Prepared inputs (pixels above all) an embedding actor holds per preparation window, in MiB,
    as estimated before they are prepared; it holds two windows, the one in the model and the next.
    A window never holds fewer inputs than fill one forward batch. None = 64 on a CPU, 1024 on a GPU."""
    prepare_processes: int | None = Field(None, ge=0)
    """Worker processes that prepare inputs (decode, resize, tokenise) beside each model, off
    its thread's GIL; 0 = threads; None = auto: min(8, cores - 2) on a GPU, threads on a CPU.
    Also used by the reranker."""
    instruction: str | None = None
    """Document instruction; None = the model's default."""

    @field_validator("attn_implementation")
    @classmethod
    def _attn_known(cls, v: str | None) -> str | None:
        # transformers only rejects an unknown name when each actor loads the model, mid-run.
        if v is not None and v not in ATTN_IMPLEMENTATIONS:
            names = ", ".join(repr(n) for n in ATTN_IMPLEMENTATIONS)
            raise ValueError(f"must be null or one of {names} (got {_show(v)})")
        return v

    @model_validator(mode="after")
    def _revision_for_hub(self) -> "EmbedderConfig":
        _check_revision(self.model, self.revision)
        return self

    @model_validator(mode="after")
    def _flash_in_half_precision(self) -> "EmbedderConfig":
        # transformers refuses it only when each actor loads the model, mid-run; auto is bfloat16 on a GPU.
        if (self.attn_implementation or "").startswith("flash_attention") and self.dtype == "float32":
            raise ValueError(f"attn_implementation: {self.attn_implementation} runs in bfloat16 or "
                             "float16 only, and dtype is float32: use sdpa, or dtype bfloat16 (or auto)")
        return self

    @property
    def checkpoint(self) -> str:
        """The model as points and messages name it: ``org/name@revision`` when pinned."""
        return _checkpoint(self.model, self.revision)

    @model_validator(mode="after")
    def _pixel_order(self) -> "EmbedderConfig":
        if self.max_pixels < self.min_pixels:
            raise ValueError(f"max_pixels: must be >= min_pixels ({self.min_pixels}) (got {self.max_pixels})")
        if self.total_pixels < self.min_pixels:
            raise ValueError(
                f"total_pixels: must be >= min_pixels ({self.min_pixels}) (got {self.total_pixels})"
            )
        return self


class ComputeConfig(_Section):
    """Ray resources."""

    ray_address: OptPathStr = None
    """None (or blank) = start a local Ray; ``auto`` = join the running cluster; or ``ray://host:port``."""
    embed_actors: int = Field(1, ge=1)
    """Fixed size of the embedding actor pool."""
    num_gpus_per_actor: float = Field(0.0, ge=0)
    """0 = auto: 1 GPU per actor when the cluster has GPUs, else CPU (see
    :meth:`effective_num_gpus`). To force CPU on a GPU machine, hide the GPUs
    (``CUDA_VISIBLE_DEVICES=``). Fractions share a GPU between actors; above 1, a whole number."""
    cpus_per_actor: float = Field(1.0, ge=0)
    batch_size: int = Field(512, ge=1)
    """Rows per embedding-actor call (token-budget batches are cut inside it, over length-sorted
    windows: small calls sort little and pad much; 64 cost 40% more CPU than 512 in bench/RESULTS.md).
    A call holds its rows' encoded bytes, but its prepared (decoded) inputs do not grow with it: the
    embedder prepares them in windows of about ``embedder.window_mib`` (bench/RESULTS.md, section 4)."""
    prepare_concurrency: int | None = Field(None, ge=1)
    """Max parallel CPU preparation tasks; None = Ray Data decides."""
    inflight_mib_per_actor: int | None = Field(None, ge=1)
    """Object store MiB the ingestion dataset may hold per embedding actor (expanded units waiting
    for the embedder, vectors waiting for the sink): the streaming memory bound. None = 256 for a
    CPU actor (keeps it as busy as 512 did, with a lower peak: bench/RESULTS.md section 4) and
    2048 for a GPU actor, which eats batches faster."""

    @field_validator("num_gpus_per_actor")
    @classmethod
    def _whole_above_one(cls, v: float) -> float:
        # Ray refuses fractional GPU requests above 1 only when the actors start, mid-run.
        if v > 1 and not float(v).is_integer():
            raise ValueError(f"must be a fraction of one GPU (at most 1) or a whole number of GPUs (got {_show(v)})")
        return v

    def effective_num_gpus(self, cluster_gpus: float) -> float:
        """GPUs per embedding actor: the configured value, or for 0 (auto) 1 if
        ``cluster_gpus`` > 0 else 0."""
        if self.num_gpus_per_actor > 0:
            return self.num_gpus_per_actor
        return 1.0 if cluster_gpus and cluster_gpus > 0 else 0.0

    def inflight_bytes(self, gpus_per_actor: float) -> int:
        """Object store bytes the ingestion dataset may hold, for the whole actor pool."""
        mib = self.inflight_mib_per_actor or (2048 if gpus_per_actor > 0 else 256)
        return mib * 1024 * 1024 * self.embed_actors


_QDRANT_BAD_NAME = re.compile(r'[<>:"/\\|?*\x00]')
_CONVENTIONAL_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]*")


class QdrantConfig(_Section):
    """The vector store: exactly one of ``url`` (server) or ``path`` (embedded)."""

    url: OptPathStr = None
    """Server URL (``http(s)://host:6333``)."""
    path: OptLocalDirStr = None
    """Embedded (local mode) folder; only one process may open it. A leading ``~`` is expanded."""
    api_key_env: Annotated[str | None, BeforeValidator(_empty_to_none)] = DEFAULT_API_KEY_ENV
    """Name of the environment variable holding the server API key (the key is never in the config);
    None (or blank) = no key."""
    collection: NonEmptyStr
    """Collection name. Required."""
    full_datatype: Literal["float32", "float16"] = "float32"
    """Storage type of the full-dimension vector."""
    on_disk: bool = False
    """Keep the full vectors on disk (memmap) instead of RAM; the small MRL vectors the search starts on stay in RAM."""
    quantization: Literal["none", "int8", "binary"] = "none"
    """Quantisation of the reduced (MRL) vectors."""
    upsert_batch: int = Field(128, ge=1, le=4096)
    """Points per upsert request (requests are also kept under 16 MiB)."""
    timeout_s: float = Field(30.0, gt=0)
    """Per-request timeout."""
    retry_s: float = Field(120.0, ge=0)
    """How long a store request is retried through transient errors (a server restarting, HTTP 5xx, 429) before the run stops."""

    @field_validator("url")
    @classmethod
    def _url_scheme(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://\S+$", v):
            raise ValueError("must be an http:// or https:// URL")
        return v

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        # The value is never shown: a key pasted here instead of a name would leak into messages
        # and reports, and "${QDRANT_API_KEY}" would silently send no key.
        if v is None or ENV_NAME.fullmatch(v):
            return v
        ref = re.fullmatch(rf"\$\{{?\s*({ENV_NAME.pattern})\s*\}}?", v.strip())
        hint = f"; write the variable's name, {ref.group(1)}" if ref else ""
        raise ValueError("must be null or the name of an environment variable (letters, digits and _, not "
                         f"starting with a digit), not its value (not shown){hint}")

    @field_validator("collection")
    @classmethod
    def _collection_name(cls, v: str) -> str:
        if len(v) > 255 or _QDRANT_BAD_NAME.search(v):
            raise ValueError('must be at most 255 characters without any of < > : " / \\ | ? *')
        return v

    @model_validator(mode="after")
    def _one_location(self) -> "QdrantConfig":
        if (self.url is None) == (self.path is None):
            got = "both" if self.url is not None else "neither"
            raise ValueError(
                "set exactly one of qdrant.url (server mode) or qdrant.path (embedded mode); "
                f"got {got}"
            )
        return self

    @property
    def embedded(self) -> bool:
        """Whether Qdrant is embedded (local mode at qdrant.path) rather than a server at qdrant.url."""
        return self.path is not None

    def api_key(self) -> str | None:
        """The API key from the environment (None when unset or empty); never stored."""
        if not self.api_key_env:
            return None
        return os.environ.get(self.api_key_env) or None

    def shown_api_key_env(self) -> str | None:
        """api_key_env as messages and reports may show it: a conventional name (upper case), one that is
        set, or the default; else ***."""
        # A key pasted in place of the name passes the name check when it is letters and digits
        # only; keys mix cases, conventional variable names do not.
        name = self.api_key_env
        if name is None or name in os.environ or _CONVENTIONAL_ENV_NAME.fullmatch(name):
            return name
        return REDACTED


class RerankerConfig(_Section):
    """Qwen3-VL-Reranker for the last query step."""

    model: Annotated[OptPathStr, AfterValidator(_local_model)] = None
    """Hub id or path; None (or blank) = no reranking available."""
    revision: OptPathStr = None
    """Hub branch, tag or commit of ``model`` (None = the default branch). Hub ids only."""
    instruction: str | None = None
    """Reranker instruction; None = the model's default."""
    max_length: int = Field(10240, ge=1)
    batch_pairs: int | None = Field(None, ge=1)
    """(query, document) pairs per forward batch; None = the reranker's default (16 on CPU, 64 on GPU)."""
    window_mib: int | None = Field(None, ge=1)
    """Prepared pairs (pixels above all) the reranker holds per preparation window, in MiB, as
    estimated before they are prepared; it holds two windows, the one being scored and the next.
    A window never holds fewer pairs than fill one forward batch. None = 64 on a CPU, 1024 on a GPU."""

    @model_validator(mode="after")
    def _revision_for_hub(self) -> "RerankerConfig":
        if self.revision is not None and self.model is None:
            raise ValueError(f"revision: set without a model (got {_show(self.revision)})")
        _check_revision(self.model, self.revision)
        return self

    @property
    def checkpoint(self) -> str | None:
        """The model as messages name it: ``org/name@revision`` when pinned; None without a model."""
        return None if self.model is None else _checkpoint(self.model, self.revision)


class QueryConfig(_Section):
    """Retrieval defaults (the CLI flags override them per query)."""

    instruction: str = DEFAULT_QUERY_INSTRUCTION
    top_k: int = Field(100, ge=1)
    """Candidates taken from Qdrant (after the full-vector rescore)."""
    top_n: int = Field(10, ge=1)
    """Results after reranking (never more than top_k)."""
    prefetch_multiplier: int = Field(4, ge=1)
    """Prefetch limit on the smallest MRL vector = top_k * prefetch_multiplier."""


class OutputConfig(_Section):
    """Run outputs."""

    dir: LocalDirStr = Field("runs", validate_default=True)  # made absolute like a given one
    """Folder for run outputs (dead letters, report). A leading ``~`` is expanded."""
    dead_letter_file: NonEmptyStr = "dead_letters.jsonl"
    """File name (no folder part) of the dead letters, inside each run's folder."""
    report_file: NonEmptyStr = "report.json"
    """File name (no folder part) of the run report, inside each run's folder."""

    @field_validator("dead_letter_file", "report_file")
    @classmethod
    def _plain_file_name(cls, v: str) -> str:
        # Checked here, not when the run ends: a bad name would otherwise fail after all the work.
        # Both separators on every OS: the same config may run on Windows and POSIX machines.
        if "/" in v or "\\" in v or v.strip() in (".", ".."):
            raise ValueError("must be a plain file name without a folder part or '..', written inside the "
                             f"run's folder under output.dir (got {_show(v)})")
        return v

    @model_validator(mode="after")
    def _distinct_files(self) -> "OutputConfig":
        # One name for both: the report, written last, would replace the dead letters.
        if self.dead_letter_file == self.report_file:
            raise ValueError(f"dead_letter_file and report_file are both {_show(self.report_file)}: "
                             "the report would overwrite the dead letters; give them different names")
        return self


TEMPLATE_TOKENS = 64
"""Tokens kept free in embedder.max_length for the chat template and the default instruction around a
text chunk (20 with the default instruction); a configured instruction adds :func:`instruction_tokens`."""


def instruction_tokens(instruction: str | None) -> int:
    """An upper bound on the tokens of ``embedder.instruction``: its UTF-8 bytes after NFC (0 for the default)."""
    # Qwen3-VL's tokenizer is byte-level BPE after an NFC normalizer: each byte of the normalized
    # text is at most one token and merges only shrink the count, so this bounds the tokens without
    # loading a tokenizer (NFC lengthens some characters: U+FB2C is 3 bytes, its NFC 6). The embedder
    # uses a configured instruction as written (normalize_instruction keeps the default as is).
    return len(unicodedata.normalize("NFC", instruction).encode("utf-8")) if instruction else 0


class Config(_Section):
    """The whole job configuration (see configs/*.yaml)."""

    source: SourceConfig
    # Factories, not instances: output.dir is made absolute against the working directory when the
    # config is validated, not when this module is imported.
    expand: ExpandConfig = Field(default_factory=ExpandConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    embedder: EmbedderConfig
    compute: ComputeConfig = Field(default_factory=ComputeConfig)
    qdrant: QdrantConfig
    reranker: RerankerConfig = Field(default_factory=RerankerConfig)
    query: QueryConfig = Field(default_factory=QueryConfig)
    output: OutputConfig = Field(default_factory=OutputConfig)
    prune: bool = False
    """Delete points of objects that disappeared from the source."""

    @model_validator(mode="after")
    def _chunks_fit_the_model(self) -> "Config":
        # The embedder truncates each input to max_length tokens, chat template included (as the
        # reference does): the tail of a longer chunk would be stored in the payload but not embedded.
        extra = instruction_tokens(self.embedder.instruction)
        room = self.embedder.max_length - TEMPLATE_TOKENS - extra
        if self.expand.chunk_tokens > room:
            kept = f"{TEMPLATE_TOKENS}" + (f" - {extra}" if extra else "")
            why = (f"{TEMPLATE_TOKENS} tokens are kept for the chat template"
                   + (f" and up to {extra} for embedder.instruction (its UTF-8 bytes)" if extra else ""))
            fix = "lower it, raise embedder.max_length" + (" or shorten embedder.instruction" if extra else "")
            raise ValueError(
                f"expand.chunk_tokens: must be <= embedder.max_length - {kept} = {room} ({why}: a longer chunk "
                f"would lose its tail to truncation; {fix}) (got {self.expand.chunk_tokens})")
        return self

    def secret_values(self) -> list[str]:
        """Secret values to scrub from logs and reports: resolved secret storage options
        and the Qdrant API key (read now from ``qdrant.api_key_env``). Longest first."""
        values = self.source.secret_values()
        key = self.qdrant.api_key()
        if key:
            values.append(key)
        return sorted({v for v in values if v}, key=len, reverse=True)

    def redacted_dict(self) -> dict[str, Any]:
        """The config as a JSON-safe dict to echo in reports: storage options as written
        (``${VAR}`` references, never their values; secret-looking keys ``***``), URL
        passwords scrubbed, and any secret value scrubbed wherever it appears."""
        data = self.model_dump(mode="json")
        data["source"]["storage_options"] = self.source.redacted_storage_options()
        data["qdrant"]["api_key_env"] = self.qdrant.shown_api_key_env()
        return redact_obj(data, self.secret_values())


# ------------------------------------------------------------------ error messages


def _dotted(loc: Iterable[Any]) -> str:
    return ".".join(str(p) for p in loc)


def _show(value: Any) -> str:
    if isinstance(value, bool) or value is None:
        return {True: "true", False: "false", None: "null"}[value]
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        text = scrub_url(value)
        return repr(text if len(text) <= 60 else text[:57] + "...")
    if isinstance(value, (list, tuple)):
        return "a list"
    if isinstance(value, Mapping):
        return "a mapping"
    return type(value).__name__


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The section model that holds the last element of ``loc`` (None if free-form)."""
    model: Any = Config
    for part in loc[:-1]:
        field = getattr(model, "model_fields", {}).get(part)
        if field is None:
            return None
        ann = field.annotation
        if not _is_section(ann):
            return None
        model = ann
    return model


_TYPE_NAMES = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "bool_parsing": "true or false",
    "list_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
}


def _describe(err: Mapping[str, Any]) -> str:
    loc = tuple(err.get("loc", ()))
    etype = err.get("type", "")
    ctx = err.get("ctx") or {}
    path = _dotted(loc)
    # Never show values under storage_options (they may be secrets).
    # Nor qdrant.api_key_env's: a key pasted there instead of a variable name.
    secret_zone = loc[:2] == ("source", "storage_options") or loc == ("qdrant", "api_key_env")
    got = "" if secret_zone else f" (got {_show(err.get('input'))})"

    if etype == "extra_forbidden":
        key = str(loc[-1]) if loc else "?"
        model = _model_at(loc)
        allowed = list(model.model_fields) if model is not None else []
        hint = ""
        if key == "api_key" and loc[:1] == ("qdrant",):
            hint = " (the API key is never in the config: put it in the environment variable named by qdrant.api_key_env)"
        elif allowed:
            close = difflib.get_close_matches(key, allowed, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (allowed: {', '.join(allowed)})"
        where = _dotted(loc[:-1])
        return f"{where}: unknown key '{key}'{hint}" if where else f"unknown top-level key '{key}'{hint}"
    if etype == "missing":
        model = _model_at(loc)
        field = model.model_fields.get(loc[-1]) if model is not None and loc else None
        is_section = field is not None and isinstance(field.annotation, type) and issubclass(
            field.annotation, BaseModel
        )
        return f"{path}: required {'section' if is_section else 'key'} missing"
    if etype in _TYPE_NAMES:
        what = _TYPE_NAMES[etype]
        if etype in ("model_type", "model_attributes_type", "dict_type"):
            got = "" if secret_zone else f" (got {_show(err.get('input'))})"
        return f"{path}: expected {what}{got}"
    if etype == "literal_error":
        return f"{path}: must be one of {ctx.get('expected', '?')}{got}"
    bounds = {
        "greater_than_equal": (">=", "ge"),
        "greater_than": (">", "gt"),
        "less_than_equal": ("<=", "le"),
        "less_than": ("<", "lt"),
    }
    if etype in bounds:
        op, key = bounds[etype]
        return f"{path}: must be {op} {ctx.get(key)}{got}"
    if etype in ("string_too_short", "too_short") and ctx.get("min_length") == 1:
        return f"{path}: must not be empty"
    if etype == "finite_number":
        return f"{path}: must be a finite number{got}"
    if etype in ("value_error", "assertion_error"):
        msg = str(ctx.get("error", err.get("msg", "")))
        # Section validators name the offending key first ("overlap_tokens: must be ..."):
        # fold it into the dotted path.
        m = re.match(r"^([A-Za-z_][\w.]*): (.*)$", msg, re.S)
        if m:
            model = _model_at(loc + ("_",))
            if model is not None and m.group(1).split(".")[0] in model.model_fields:
                path = _dotted(loc + (m.group(1),))
                msg = m.group(2)
        return f"{path}: {msg}" if path else msg
    msg = str(err.get("msg", "invalid value"))
    msg = msg[0].lower() + msg[1:] if msg else msg
    return f"{path}: {msg}{got}" if path else f"{msg}{got}"


def _format_validation_error(exc: ValidationError) -> str:
    """Every error once, unknown keys first: a misspelt key is usually why another key seems missing
    (`qdrnt:` leaves qdrant.path unset), so the cause leads, not its consequence."""
    seen: list[str] = []
    errors = exc.errors(include_url=False)
    for err in sorted(errors, key=lambda e: e.get("type") != "extra_forbidden"):  # stable: order kept otherwise
        text = _describe(err)
        if text not in seen:
            seen.append(text)
    return "; ".join(seen)


# ------------------------------------------------------------------------ loading


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate mapping keys (PyYAML silently keeps the last)."""


def _construct_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode, deep: bool = False):
    seen: set[Any] = set()
    # Only the keys written in this mapping: a key merged in with "<<: *anchor" is one they may
    # override, as YAML says (construct_mapping flattens the merges after this check).
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":
            continue
        key = loader.construct_object(key_node, deep=deep)
        try:
            dup = key in seen
        except TypeError:
            continue
        if dup:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_mapping)


def _yaml_error(exc: yaml.YAMLError) -> str:
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or type(exc).__name__
    context = getattr(exc, "context", None)
    # The problem/context texts only, never the snippet of the offending line (it may hold a secret).
    return f"invalid YAML at {where}{problem}" + (f" ({context})" if context else "")


def _accepts_str(annotation: Any) -> bool:
    """True when a field's annotation is ``str`` or a union containing ``str``."""
    if annotation is str:
        return True
    if get_origin(annotation) in (Union, types.UnionType):
        return str in get_args(annotation)
    return False


def _override_target(keys: list[str]) -> tuple[str | None, bool]:
    """(error, takes_str) for a dotted key path; keys inside storage_options are free-form."""
    model: Any = Config
    for i, key in enumerate(keys):
        fields = model.model_fields
        field = fields.get(key)
        if field is None:
            close = difflib.get_close_matches(key, list(fields), n=1)
            hint = f" (did you mean '{'.'.join(keys[:i] + [close[0]])}'?)" if close else ""
            return f"unknown key '{'.'.join(keys)}'{hint}", False
        ann = field.annotation
        if _is_section(ann):
            model = ann
            if i == len(keys) - 1:
                return None, False  # a whole section (mapping value)
            continue
        if i == len(keys) - 1:
            return None, _accepts_str(ann)
        if ann is dict or get_origin(ann) is dict:
            return None, False  # inside a free-form mapping
        return f"unknown key '{'.'.join(keys)}' ('{'.'.join(keys[: i + 1])}' is not a section)", False
    return None, False


_YAML_NULLS = ("", "~", "null", "Null", "NULL")


def _string_override(text: str) -> str | None:
    """The value of an override whose key takes a string: the stripped text, null, or one unquoted scalar."""
    # Not YAML: `#` would start a comment and a leading `&`, `*`, `!`, `%`, `@` or backquote an
    # anchor, alias, tag or error, which cut or broke values such as "s3://bucket/my #1 folder/".
    # The null spellings still mean null; one quoted scalar ('...' or "...") is unquoted, to allow
    # surrounding spaces or a literal "null".
    value = text.strip()
    if value in _YAML_NULLS:
        return None
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        try:
            node = yaml.compose(value, Loader=yaml.SafeLoader)
        except yaml.YAMLError:
            return value  # not one quoted scalar (e.g. '"a" or "b"'): as written
        # The scalar must span the whole text: '"a" #x "b"' parses to "a" plus a comment.
        quoted = isinstance(node, yaml.ScalarNode) and node.style in ("'", '"')
        if quoted and node.end_mark.index == len(value):
            return node.value
    return value


def apply_overrides(data: Mapping[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
    """A copy of ``data`` with ``dotted.key=value`` overrides applied (see module doc).

    Raises ConfigError (without a ``config <file>:`` prefix) for a malformed override
    or an unknown key. Values are never echoed in messages.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    out: dict[str, Any] = copy.deepcopy(dict(data))
    for item in overrides:
        if not isinstance(item, str) or "=" not in item:
            raise ConfigError(f"override '{item}': expected dotted.key=value")
        key, _, text = item.partition("=")
        key = key.strip()
        keys = key.split(".")
        if not key or any(not k for k in keys):
            raise ConfigError(f"override '{key}': expected dotted.key=value")
        problem, takes_str = _override_target(keys)
        if problem:
            raise ConfigError(f"override '{key}': {problem}")
        if takes_str:
            value = _string_override(text)
        else:
            try:
                value = yaml.load(text, Loader=_UniqueKeyLoader) if text.strip() else None
            except yaml.YAMLError as exc:
                hint = "; quote glob patterns such as '*.jpg'" if "*" in text else ""  # YAML reads *x as an alias
                raise ConfigError(
                    f"override '{key}': value is not valid YAML ({getattr(exc, 'problem', None) or 'syntax error'}"
                    f"{hint})"
                ) from None
        node = out
        for part in keys[:-1]:
            child = node.get(part)
            if not isinstance(child, dict):
                child = {}
                node[part] = child
            node = child
        node[keys[-1]] = value
    return out


def parse_config(
    data: Mapping[str, Any] | None,
    overrides: Iterable[str] = (),
    *,
    origin: str = "<dict>",
) -> Config:
    """Validate an already-parsed mapping (plus overrides) into a Config.

    ``origin`` names the source in error messages (``config <origin>: ...``).
    """
    prefix = f"config {origin}: "
    if data is None:
        data = {}
    if not isinstance(data, Mapping):
        raise ConfigError(f"{prefix}expected a mapping of sections at the top level (got {_show(data)})")
    try:
        merged = apply_overrides(data, overrides)
    except ConfigError as exc:
        raise ConfigError(prefix + str(exc)) from None
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        message = _format_validation_error(exc)
    raise ConfigError(prefix + message)  # outside `except`: no chained ValidationError


def load_config(path: str | os.PathLike[str], overrides: Iterable[str] = ()) -> Config:
    """Read a YAML config file, apply ``dotted.key=value`` overrides and validate it.

    Raises ConfigError naming the file and every bad key.
    """
    shown = os.fspath(path)
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config {shown}: file not found") from None
    except IsADirectoryError:
        raise ConfigError(f"config {shown}: is a directory, expected a YAML file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"config {shown}: not UTF-8 text") from None
    except OSError as exc:
        raise ConfigError(f"config {shown}: cannot read ({exc.strerror or type(exc).__name__})") from None
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)
    except yaml.YAMLError as exc:
        message = _yaml_error(exc)
    else:
        return parse_config(data, overrides, origin=shown)
    raise ConfigError(f"config {shown}: {message}")
