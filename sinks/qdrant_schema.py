"""Collection layout: one full-dimension named vector plus one per MRL dimension, cosine.

`ensure_collection` creates a missing collection (named vectors, payload indexes) or
validates an existing one; it never recreates or alters vectors of an existing
collection. A missing vector, another dimension or another distance raises
`CollectionMismatchError` before anything is written.

Layout:
  - "full": `full_dim`, `full_datatype` (float32|float16), on disk when `on_disk`.
  - f"mrl_{d}" for each d in `mrl_dims`: float32, in RAM, with the optional
    quantization (int8 = scalar INT8 always in RAM, binary = binary quantization).
  - payload indexes (KEYWORD): source_uri, modality, fingerprint, model_id: the
    fields incremental runs and queries filter on. `position` is a string key
    ("page=2", "chunk=3"), so there is no INTEGER index.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal

from qdrant_client import QdrantClient, models

logger = logging.getLogger(__name__)

FULL_VECTOR = "full"

DEFAULT_PAYLOAD_INDEXES: tuple[tuple[str, str], ...] = (
    ("source_uri", "keyword"),
    ("modality", "keyword"),
    ("fingerprint", "keyword"),
    ("model_id", "keyword"),
    ("source_prefixes", "keyword"),  # every ancestor folder of source_uri: prefix filters
)


class CollectionMismatchError(RuntimeError):
    """An existing collection does not match what the embedder produces."""


@dataclass(frozen=True)
class HnswSpec:
    """Optional HNSW settings for the collection (None keeps the server default)."""

    m: int | None = None
    ef_construct: int | None = None
    full_scan_threshold: int | None = None
    on_disk: bool | None = None


@dataclass(frozen=True)
class CollectionSpec:
    """What the collection must look like for this embedder configuration."""

    name: str
    full_dim: int
    mrl_dims: tuple[int, ...] = ()
    full_datatype: Literal["float32", "float16"] = "float32"
    on_disk: bool = False
    quantization: Literal["none", "int8", "binary"] = "none"
    hnsw: HnswSpec | None = None
    payload_indexes: tuple[tuple[str, str], ...] = field(default=DEFAULT_PAYLOAD_INDEXES)

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("collection name must not be empty")
        if self.full_dim <= 0:
            raise ValueError(f"full_dim must be positive, got {self.full_dim}")
        object.__setattr__(self, "mrl_dims", tuple(int(d) for d in self.mrl_dims))
        for d in self.mrl_dims:
            if not 0 < d < self.full_dim:
                raise ValueError(f"MRL dimension {d} must be in (0, {self.full_dim})")
        if len(set(self.mrl_dims)) != len(self.mrl_dims):
            raise ValueError(f"duplicate MRL dimensions: {self.mrl_dims}")
        if self.full_datatype not in ("float32", "float16"):
            raise ValueError(f"full_datatype must be float32 or float16, got {self.full_datatype!r}")
        if self.quantization not in ("none", "int8", "binary"):
            raise ValueError(f"quantization must be none, int8 or binary, got {self.quantization!r}")

    @property
    def vector_dims(self) -> dict[str, int]:
        """Vector name -> dimension, full vector first."""
        dims = {FULL_VECTOR: self.full_dim}
        dims.update({vector_name(d): d for d in self.mrl_dims})
        return dims


def vector_name(dim: int | None) -> str:
    """Named-vector name: "full" for the full vector (None), f"mrl_{dim}" for a reduced one."""
    return FULL_VECTOR if dim is None else f"mrl_{int(dim)}"


def _quantization_config(kind: str) -> models.QuantizationConfig | None:
    if kind == "int8":
        return models.ScalarQuantization(
            scalar=models.ScalarQuantizationConfig(type=models.ScalarType.INT8, always_ram=True)
        )
    if kind == "binary":
        return models.BinaryQuantization(binary=models.BinaryQuantizationConfig(always_ram=True))
    return None


def vectors_config(spec: CollectionSpec) -> dict[str, models.VectorParams]:
    """The named-vector parameters for a new collection."""
    config = {
        FULL_VECTOR: models.VectorParams(
            size=spec.full_dim,
            distance=models.Distance.COSINE,
            datatype=models.Datatype(spec.full_datatype),
            on_disk=spec.on_disk or None,
        )
    }
    quant = _quantization_config(spec.quantization)
    for d in spec.mrl_dims:
        config[vector_name(d)] = models.VectorParams(
            size=d, distance=models.Distance.COSINE, quantization_config=quant
        )
    return config


def _hnsw_config(spec: CollectionSpec) -> models.HnswConfigDiff | None:
    if spec.hnsw is None:
        return None
    h = spec.hnsw
    return models.HnswConfigDiff(
        m=h.m, ef_construct=h.ef_construct, full_scan_threshold=h.full_scan_threshold, on_disk=h.on_disk
    )


def validate_collection(info: models.CollectionInfo, spec: CollectionSpec) -> None:
    """Raise CollectionMismatchError unless the collection holds every vector of spec as specified."""
    existing: Any = info.config.params.vectors
    if not isinstance(existing, dict):
        # a single unnamed vector (or none): the named layout cannot be written into it
        size = getattr(existing, "size", None)
        raise CollectionMismatchError(
            f"collection {spec.name!r} has a single unnamed vector"
            f"{f' of dimension {size}' if size is not None else ''}, but the embedder writes named vectors "
            f"{sorted(spec.vector_dims)}; use another collection name or migrate it"
        )
    for name, dim in spec.vector_dims.items():
        params = existing.get(name)
        if params is None:
            raise CollectionMismatchError(
                f"collection {spec.name!r} has no vector {name!r} (dimension {dim} expected); "
                f"it holds {sorted(existing)}"
            )
        if params.size != dim:
            raise CollectionMismatchError(
                f"collection {spec.name!r} vector {name!r} has dimension {params.size} "
                f"but the embedder produces {dim}"
            )
        distance = models.Distance(params.distance)
        if distance != models.Distance.COSINE:
            raise CollectionMismatchError(
                f"collection {spec.name!r} vector {name!r} uses distance {distance.value} "
                f"but the embedder expects {models.Distance.COSINE.value}"
            )
        # Found here, not at the first upsert after the embedding work is spent: a multivector takes
        # a list of vectors per point, and uint8 storage casts the unit vectors' components in
        # [-1, 1] to the integers 0..255 (a server does so silently).
        if params.multivector_config is not None:
            raise CollectionMismatchError(
                f"collection {spec.name!r} vector {name!r} is a multivector (several vectors per point) "
                "but the embedder writes one vector per point; use another collection name"
            )
        if params.datatype is not None and models.Datatype(params.datatype) == models.Datatype.UINT8:
            raise CollectionMismatchError(
                f"collection {spec.name!r} vector {name!r} stores uint8 but the embedder writes unit vectors "
                "(float components in [-1, 1]); use another collection name"
            )
    # Points written without one of the collection's MRL vectors are invisible to a query that
    # prefetches on it (the query funnels on the collection's smallest MRL vector).
    unwritten = sorted(n for n in existing if n.startswith("mrl_") and n not in spec.vector_dims)
    if unwritten:
        held = sorted((int(n[4:]) for n in existing if n.startswith("mrl_") and n[4:].isdigit()), reverse=True)
        raise CollectionMismatchError(
            f"collection {spec.name!r} holds MRL vectors {unwritten} that embedder.mrl_dims "
            f"{list(spec.mrl_dims)} would not write: new points would lack them and queries, which "
            f"prefetch on the smallest, would never find those points; set embedder.mrl_dims to "
            f"{held} or use another collection"
        )


def storage_differences(info: models.CollectionInfo, spec: CollectionSpec) -> list[str]:
    """The existing collection's storage settings that differ from spec (the collection keeps its own)."""
    existing: Any = info.config.params.vectors
    full = existing.get(FULL_VECTOR) if isinstance(existing, dict) else None
    if full is None:
        return []
    notes = []
    have_type = models.Datatype(full.datatype).value if full.datatype else "float32"
    if have_type != spec.full_datatype:
        notes.append(f"qdrant.full_datatype is {spec.full_datatype} but the collection stores {have_type}")
    if bool(full.on_disk) != spec.on_disk:
        notes.append(f"qdrant.on_disk is {str(spec.on_disk).lower()} but the collection keeps its full vectors "
                     f"{'on disk' if full.on_disk else 'in RAM'}")
    have_quant = {_quantization_kind(existing[vector_name(d)].quantization_config) for d in spec.mrl_dims
                  if vector_name(d) in existing} or {spec.quantization}
    if have_quant != {spec.quantization}:
        notes.append(f"qdrant.quantization is {spec.quantization} but the collection's MRL vectors use "
                     f"{', '.join(sorted(have_quant))}")
    return [f"collection {spec.name!r}: {n} (an existing collection's storage is left as it is)" for n in notes]


def _quantization_kind(config: Any) -> str:
    if isinstance(config, models.ScalarQuantization):
        return "int8"
    if isinstance(config, models.BinaryQuantization):
        return "binary"
    return "none" if config is None else type(config).__name__


def ensure_payload_indexes(client: QdrantClient, spec: CollectionSpec) -> list[str]:
    """Create the payload indexes that are missing (or have another type); return the fields created."""
    schema = client.get_collection(spec.name).payload_schema or {}
    created = []
    for field_name, kind in spec.payload_indexes:
        want = models.PayloadSchemaType(kind)
        have = schema.get(field_name)
        if have is not None and models.PayloadSchemaType(have.data_type) == want:
            continue
        with warnings.catch_warnings():
            # local mode warns that payload indexes have no effect there; they do on a server
            warnings.filterwarnings("ignore", message="Payload indexes have no effect")
            client.create_payload_index(spec.name, field_name=field_name, field_schema=want, wait=True)
        created.append(field_name)
    return created


def ensure_collection(client: QdrantClient, spec: CollectionSpec) -> list[str]:
    """Create the collection if missing, else validate it; then create missing payload indexes.

    Returns the existing collection's storage settings that differ from spec, for a warning.
    """
    notes: list[str] = []
    if client.collection_exists(spec.name):
        info = client.get_collection(spec.name)
        validate_collection(info, spec)
        notes = storage_differences(info, spec)
    else:
        logger.info("creating collection %r with vectors %s", spec.name, spec.vector_dims)
        try:
            client.create_collection(
                spec.name,
                vectors_config=vectors_config(spec),
                hnsw_config=_hnsw_config(spec),
            )
        except Exception:
            # another process may have created it meanwhile: then it must match
            if not client.collection_exists(spec.name):
                raise
            validate_collection(client.get_collection(spec.name), spec)
    ensure_payload_indexes(client, spec)
    return notes
