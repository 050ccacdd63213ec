"""What a query asks: its content and instruction, its payload filters, its images checked against the
decompression-bomb guard and re-encoded as ingestion embeds them (upright, 8-bit)."""

from __future__ import annotations

import base64
import io
import math
import numbers
import os
import re
from typing import IO, Any, Callable, Mapping

from qdrant_client import models

from operators.media.listing import is_data_uri, is_local_uri, local_path
from operators.units import MODALITIES, TEXT_PAYLOAD_FIELDS

QUERY_FIELDS = ("text", "image", "video", "video_start", "video_end", "fps", "max_frames")


class QueryInputError(ValueError):
    """The query itself is unusable (no content, unreadable image, bad filter)."""


# -- filters ----------------------------------------------------------------------------


def normalise_prefix(prefix: str) -> str:
    """A source prefix as stored in ``source_prefixes``: absolute for local paths, ending in "/"."""
    prefix = str(prefix).strip()
    if not prefix:
        raise QueryInputError("source_prefix filter is empty")
    if is_local_uri(prefix):
        prefix = local_path(prefix)
    return prefix if prefix.endswith("/") else prefix + "/"


# Qdrant's payload key paths: names (or "quoted names") joined by dots, each optionally an array ([] or [n]).
_KEY_PATH = re.compile(r'^(?:[\w-]+|"[^"]+")(?:\[\d*\])?(?:\.(?:[\w-]+|"[^"]+")(?:\[\d*\])?)*$')


def _listed(value: Any) -> list[Any]:
    """A filter value as the list of values it matches any of."""
    return list(value) if isinstance(value, (list, tuple, set)) else [value]


def _number_range(key: str, number: float) -> models.FieldCondition:
    """key equal to a number, whether the payload holds it as an integer or a float (2 matches 2.0)."""
    return models.FieldCondition(key=key, range=models.Range(gte=number, lte=number))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _condition(key: str, value: Any) -> models.FieldCondition | models.Filter:
    if not _KEY_PATH.match(key):  # the store's own answer is "Invalid path", naming nothing
        raise QueryInputError(f"filter key {key!r} is not a payload key (letters, digits, '_' and '-', dotted "
                              "for a nested field, [] for an array)")
    values = _listed(value)
    if not values:
        raise QueryInputError(f"filter {key!r} has no value")
    # A non-finite number would reach Qdrant as null: a range without bounds, which matches every
    # point holding a number there (1e400 parses to inf).
    bad = [v for v in values if not isinstance(v, (str, bool)) and not (_is_number(v) and math.isfinite(v))]
    if bad:
        raise QueryInputError(f"filter {key!r}: unsupported value {bad[0]!r} (use strings, integers, booleans "
                              "or finite numbers, or a list of them)")
    texts = [v for v in values if isinstance(v, str)]
    conditions: list[models.FieldCondition | models.Filter] = []
    if texts:
        match = models.MatchValue(value=texts[0]) if len(texts) == 1 else models.MatchAny(any=texts)
        conditions.append(models.FieldCondition(key=key, match=match))
    conditions += [models.FieldCondition(key=key, match=models.MatchValue(value=v)) for v in values
                   if isinstance(v, bool)]
    # Numbers by value, not by type: an exact integer match never matches a float payload
    # (start_s=2 would miss 2.0), so each number is a closed range.
    conditions += [_number_range(key, v) for v in values if _is_number(v)]
    return conditions[0] if len(conditions) == 1 else models.Filter(should=conditions)


def _as_text(value: Any) -> Any:
    """A number as the text the job stores for it (3 and 3.0 as "3"); anything else unchanged."""
    if not _is_number(value):
        return value
    return str(int(value)) if float(value).is_integer() else str(value)


# Filter keys that build_filter matches on another payload field than the key itself.
_FIELD_OF_KEY = {"source_prefix": "source_prefixes"}
_URI_FIELDS = ("source_uri", "image_uri", "video_uri")  # a manifest record's media: where it points


def filter_fields(filters: Mapping[str, Any] | models.Filter | None) -> dict[str, str]:
    """Each key of a filters mapping and the payload key path build_filter matches it on ({} for a Filter)."""
    if not isinstance(filters, Mapping):  # a ready models.Filter is the caller's own: its keys are not ours to name
        return {}
    return {str(k): _FIELD_OF_KEY.get(str(k), str(k)) for k, v in filters.items() if v is not None}


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
            bad = [m for m in _listed(value) if m not in MODALITIES]
            if bad:
                raise QueryInputError(f"unknown modality {bad[0]!r} (one of {', '.join(MODALITIES)})")
            must.append(_condition("modality", value))
        elif key == "source_prefix":
            must.append(_condition(_FIELD_OF_KEY[key], [normalise_prefix(p) for p in _listed(value)]))
        elif key in _URI_FIELDS:  # stored absolute for local files, as source_prefix is matched
            must.append(_condition(key, [local_path(u) if isinstance(u, str) and is_local_uri(u) else u
                                         for u in _listed(value)]))
        elif key in TEXT_PAYLOAD_FIELDS:  # a manifest's {"id": 3} is stored as record_id "3"
            must.append(_condition(key, [_as_text(v) for v in _listed(value)]))
        else:
            must.append(_condition(str(key), value))
    return models.Filter(must=must) if must else None


# -- query content and images --------------------------------------------------------------


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
        if isinstance(value, str) and "://" not in value and not is_data_uri(value):
            content[key] = os.path.abspath(os.path.expanduser(value))
    return content


def result_count(name: str, value: int | None, default: int) -> int:
    """A top_k / top_n argument: the configured default when None, else an integer of at least 1."""
    if value is None:
        return int(default)
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        # 0 once fell back to the default and a negative top_n sliced candidates[:-n] ("all but n")
        raise QueryInputError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def resolve_instruction(query: Mapping[str, Any], instruction: str | None, default: str) -> str:
    """The embedding instruction: the argument, else the query's own, else the configured default."""
    if instruction is not None:
        return instruction
    own = query.get("instruction")
    return own if isinstance(own, str) else default


class FetchedImage(bytes):
    """The bytes of a query image fetched from an http(s) URL, and that URL (its name in messages)."""

    name: str


def fetch_remote_images(content: Mapping[str, Any], max_bytes: int | None) -> dict[str, Any]:
    """The query content with each http(s) image fetched once (at most max_bytes), so that it is checked
    against the pixel limit and re-encoded like any other image; MediaError names an image that cannot be."""
    from operators.media.reading import is_http
    from operators.qwen3vl.media_io import read_bytes

    def fetched(image: Any) -> Any:
        if not (isinstance(image, str) and is_http(image)):
            return image
        data = FetchedImage(read_bytes(image, max_bytes=max_bytes))
        data.name = image
        return data

    return _each_image(content, fetched)


def oversized_image(content: Mapping[str, Any], max_pixels: int,
                    storage_options: Mapping[str, Any] | None = None) -> str | None:
    """Why a query's image is over ``limits.max_image_pixels``, from its header alone; None if it is not.

    The same decompression-bomb guard as ingestion's: a query image is decoded in full by the
    embedder (and by every reranker pair), so a huge one must be refused before that. Each image
    of a list is checked; http(s) URLs once fetched (fetch_remote_images).
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
            named = (getattr(image, "name", "(bytes)") if not isinstance(image, str)
                     else "(a data: URI)" if is_data_uri(image) else image)
            return (f"image {named} is {width}x{height} = "
                    f"{width * height} pixels, over limits.max_image_pixels={max_pixels} (decompression-bomb guard)")
    return None


def model_ready_images(content: Mapping[str, Any], storage_options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The query content with each image re-encoded where ingestion re-encodes it (EXIF rotation, deep samples)."""
    return _each_image(content, lambda image: _model_ready(image, storage_options))


def _each_image(content: Mapping[str, Any], change: Callable[[Any], Any]) -> dict[str, Any]:
    """The query content with change() applied to its image, or to each image of its list."""
    images = content.get("image")
    if images is None:
        return dict(content)
    many = isinstance(images, (list, tuple))
    ready = [change(image) for image in (images if many else [images])]
    return {**content, "image": ready if many else ready[0]}


def _image_opener(image: Any, storage_options: Mapping[str, Any] | None) -> Callable[[], IO[bytes]] | None:
    """How to open a query image's bytes here; None for a PIL image, or an http(s) URL not fetched yet."""
    from operators.media.listing import fs_for, is_local_uri, local_path
    from operators.media.reading import open_local_file

    if isinstance(image, (bytes, bytearray)):
        return lambda: io.BytesIO(bytes(image))
    if isinstance(image, str) and is_data_uri(image):
        header, _, payload = image.partition(",")
        if not (header.lower().startswith("data:image/") and header.lower().endswith(";base64")):
            return None  # the embedder refuses it, named by its media type
        return lambda: io.BytesIO(base64.b64decode(payload))
    if isinstance(image, str) and not image.startswith(("http://", "https://")):
        if is_local_uri(image):  # a FIFO is refused, not waited on
            return lambda: open_local_file(local_path(image))
        fs, path = fs_for(image, dict(storage_options or {}))  # fsspec options normalised as the reader's
        return lambda: fs.open(path, "rb")
    return None


def _model_ready(image: Any, storage_options: Mapping[str, Any] | None) -> Any:
    from PIL import Image

    from operators.media.images import model_ready_bytes, needs_reencoding

    try:
        opener = _image_opener(image, storage_options)
        if opener is None:
            return image
        with opener() as fh:
            with Image.open(fh) as img:
                if not needs_reencoding(img):  # the header says so: the image is read no further
                    return image
            fh.seek(0)
            data = fh.read()
        return model_ready_bytes(data) or image
    except Exception:
        return image  # unreadable: the embedder names the reason
