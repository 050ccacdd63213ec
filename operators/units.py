"""The pipeline's data model: objects, units (what gets one vector) and dead letters.

Rows travel through Ray Data as flat dicts of Arrow-friendly scalars; these
dataclasses give them names and one place for their schema.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any

# Fixed namespace so point ids are stable across runs, machines and versions.
POINT_NAMESPACE = uuid.UUID("6f1c2d3e-8a4b-5c6d-9e0f-112233445566")

MODALITIES = ("text", "image", "pdf_page", "video", "mixed")

# A stored fingerprint is the source object's, then this, then the digest of the settings
# that shape its vectors (pipelines.plan.settings_digest).
SETTINGS_SEPARATOR = "|embed:"


def source_fingerprint(stored: str) -> str:
    """The source object's part of a stored fingerprint (without the settings digest)."""
    return stored.split(SETTINGS_SEPARATOR, 1)[0]


def stored_settings_digest(stored: str) -> str | None:
    """The settings digest part of a stored fingerprint; None when it has none (written by other tools)."""
    return stored.rpartition(SETTINGS_SEPARATOR)[2] if SETTINGS_SEPARATOR in stored else None


@dataclass
class SourceObject:
    """One listed object: a file, or a manifest, at a URI with its fingerprint."""

    uri: str
    size: int
    fingerprint: str
    mtime: float | None = None


@dataclass
class Unit:
    """What gets one vector: a text chunk, an image, a PDF page, a video segment or a manifest record."""

    object_uri: str
    fingerprint: str
    position: str  # canonical position key inside the object, e.g. "chunk=3", "page=2", "t=0.0-10.0"
    modality: str
    mime: str = ""
    text: str | None = None
    image: bytes | None = None  # encoded image bytes (original file, or a rendered PDF page as PNG)
    video: str | None = None  # URI of the video file (local path or any fsspec URL)
    video_start: float | None = None
    video_end: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)  # extra payload: page text, manifest metadata, ...

    @property
    def point_id(self) -> str:
        """Deterministic point id for this unit."""
        return point_id(self.object_uri, self.position)

    def model_input(self) -> dict[str, Any]:
        """The embedder input dict for this unit."""
        return model_input_from_row(self.to_row())

    def to_row(self) -> dict[str, Any]:
        """Flat Arrow-friendly row."""
        row = asdict(self)
        row["meta"] = json.dumps(self.meta, ensure_ascii=False, sort_keys=True)
        row["point_id"] = self.point_id
        return row

    @classmethod
    def from_row(cls, row: dict[str, Any]) -> "Unit":
        """Inverse of to_row."""
        kwargs = {k: row.get(k) for k in cls.__dataclass_fields__ if k != "meta"}
        meta = row.get("meta")
        kwargs["meta"] = json.loads(meta) if isinstance(meta, str) and meta else {}
        return cls(**kwargs)


def point_id(object_uri: str, position: str) -> str:
    """UUIDv5 of (object URI, unit position): re-running never duplicates."""
    return str(uuid.uuid5(POINT_NAMESPACE, f"{object_uri}#{position}"))


def model_input_from_row(row: dict[str, Any]) -> dict[str, Any]:
    """Build the Qwen3VLEmbedder input dict from a unit row."""
    # Type checks, not truthiness: numpy batches turn missing values into NaN floats.
    item: dict[str, Any] = {}
    if isinstance(row.get("text"), str) and row["text"]:
        item["text"] = row["text"]
    if isinstance(row.get("image"), (bytes, bytearray)) and row["image"]:
        item["image"] = bytes(row["image"])
    if isinstance(row.get("video"), str) and row["video"]:
        item["video"] = row["video"]
        for key in ("video_start", "video_end"):
            value = row.get(key)
            if isinstance(value, (int, float)) and not math.isnan(float(value)):
                item[key] = float(value)
    return item


@dataclass
class DeadLetter:
    """One failure: which object and unit, at which stage, and why."""

    uri: str
    stage: str  # list | expand | prepare | embed | write
    error_type: str
    message: str
    position: str | None = None

    def to_row(self) -> dict[str, Any]:
        """Flat row."""
        return asdict(self)


# -- rows through the ingestion dataset ------------------------------------------------
# Every row has every column below (None where absent) so Arrow blocks always unify.
# row_kind: "unit" (to embed and write), "dead" (a dead letter), "object" (one per
# expanded object: its status and unit count, for the run's accounting).
ROW_COLUMNS = ("row_kind", "point_id", "object_uri", "fingerprint", "position", "modality", "text", "image",
               "video", "video_start", "video_end", "payload", "status", "n_units", "error_stage",
               "error_type", "error_message", "seconds")

MAX_PAYLOAD_TEXT = 8000  # characters of text kept in the payload (full chunks are usually shorter)


def _row(**values: Any) -> dict[str, Any]:
    row = dict.fromkeys(ROW_COLUMNS)
    row.update(values)
    return row


def unit_row(unit: Unit, payload: dict[str, Any]) -> dict[str, Any]:
    """Row of a unit to embed, with its payload as JSON."""
    return _row(row_kind="unit", point_id=unit.point_id, object_uri=unit.object_uri, fingerprint=unit.fingerprint,
                position=unit.position, modality=unit.modality, text=unit.text, image=unit.image,
                video=unit.video, video_start=unit.video_start, video_end=unit.video_end,
                payload=json.dumps(payload, ensure_ascii=False, default=str))


def dead_row(dead: DeadLetter) -> dict[str, Any]:
    """Row of a dead letter."""
    return _row(row_kind="dead", object_uri=dead.uri, position=dead.position, error_stage=dead.stage,
                error_type=dead.error_type, error_message=dead.message)


def object_row(uri: str, status: str, n_units: int, seconds: float) -> dict[str, Any]:
    """Row with one object's expansion status (ok / failed / skipped_unsupported)."""
    return _row(row_kind="object", object_uri=uri, status=status, n_units=n_units, seconds=seconds)


def uri_prefixes(uri: str) -> list[str]:
    """Every ancestor folder of a URI, each ending in '/' (so a prefix filter is a keyword match)."""
    head, sep, rest = uri.partition("://")
    base, path = (head + sep, rest) if sep else ("", uri)
    parts = path.split("/")[:-1]
    return [base + "/".join(parts[:i]) + "/" for i in range(1, len(parts) + 1) if "/".join(parts[:i]) or not base]


# Payload fields the job always writes as text (a filter's number for one matches its text).
TEXT_PAYLOAD_FIELDS = frozenset({"source_uri", "fingerprint", "modality", "position", "mime", "model_id",
                                 "ingested_at", "text", "page_text", "video_uri", "image_uri", "record_id"})


def payload_for(unit: Unit, model_id: str, dim: int, ingested_at: str, object_units: int) -> dict[str, Any]:
    """The point payload: where the unit comes from, what it is, and how it was embedded."""
    payload: dict[str, Any] = {
        "source_uri": unit.object_uri, "fingerprint": unit.fingerprint, "modality": unit.modality,
        "position": unit.position, "mime": unit.mime, "model_id": model_id, "dim": dim,
        "ingested_at": ingested_at, "source_prefixes": uri_prefixes(unit.object_uri),
        "object_units": object_units,  # the object's unit count: a complete object has this many points
    }
    if unit.text:
        payload["text"] = unit.text[:MAX_PAYLOAD_TEXT]
        payload["text_truncated"] = len(unit.text) > MAX_PAYLOAD_TEXT
    if unit.video_start is not None:
        payload["start_s"], payload["end_s"] = unit.video_start, unit.video_end
    if unit.video and unit.video != unit.object_uri:
        payload["video_uri"] = unit.video
    for key, value in unit.meta.items():
        payload.setdefault(key, value)
    return payload
