"""Preparation windows: how many inputs a model prepares ahead, bounded by what they weigh.

The embedder and the reranker hold two windows of prepared inputs at once (the one in the model
and the next, being prepared), and a prepared input's float pixels are 8-24x its encoded bytes. So
a window is cut by the bytes its inputs will hold once prepared, estimated before they are prepared:
  - an image given as bytes, a PIL image (every image of an ingestion) or a local file exactly, from
    its header's size resized as qwen-vl-utils resizes it;
  - another input from what recent inputs of its kind (so many images, so many videos) held;
  - an input of a kind not seen yet from the pixel budgets that bound it.
A reranker's pair is weighed as its query and document together: their images and videos are
prepared into one input.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Sequence

from PIL import Image
from qwen_vl_utils.vision_process import smart_resize

from ..media.listing import file_url_path, is_data_uri
from .formatting import VisionSettings, as_list, split_videos

# A vision patch of Qwen3-VL holds 3 channels x 2 frames x 16 x 16 values, and 4 patches merge into
# one token of 32 x 32 pixels. An image fills both frames of its patches: 6 values per pixel; a
# video's frames 3 each.
IMAGE_FACTOR = 32
VALUES_PER_IMAGE_PIXEL = 6
VALUES_PER_FRAME_PIXEL = 3
PIXELS_PER_TOKEN = IMAGE_FACTOR * IMAGE_FACTOR
# qwen-vl-utils' video frame bounds (vision_process.py): at most 768 tokens' pixels a frame, at least
# 1.05 x 128 tokens' (whatever total_pixels says), and frames in pairs.
VIDEO_FRAME_MAX_PIXELS = 768 * PIXELS_PER_TOKEN
VIDEO_FRAME_MIN_PIXELS = int(128 * PIXELS_PER_TOKEN * 1.05)
# A list of Python ints, with the positions and the prompt beside them: bytes per token, roughly.
BYTES_PER_TEXT_TOKEN = 64
TEXT_CHARS_PER_TOKEN = 3  # a text's tokens from its length (an overestimate for English)
PROMPT_TOKENS = 64  # the chat template around an input
LEARNING_RATE = 0.25  # how fast a kind's estimate follows its latest inputs (a moving average)


def _count_videos(value: Any) -> int:
    try:
        return len(split_videos(value))
    except (TypeError, ValueError):  # a bad video fails in preparation, alone; weighing must not raise
        return 1


def input_kind(item: Any) -> tuple[int, int]:
    """An input's kind, for weighing: (images, videos) it holds (none for a non-dict, which fails alone)."""
    if not isinstance(item, Mapping):
        return 0, 0
    return len(as_list(item.get("image"))), _count_videos(item.get("video"))


def _kind(items: Sequence[Any]) -> tuple[int, int]:
    """The kind of inputs prepared together: the images and videos they hold between them."""
    kinds = [input_kind(x) for x in items]
    return sum(k[0] for k in kinds), sum(k[1] for k in kinds)


def _local_path(image: Any) -> str | None:
    """The local file an image names (a path or a file:// URI), None for any other source."""
    if not isinstance(image, str) or is_data_uri(image):
        return None
    if image.startswith("file://"):
        return file_url_path(image)
    return None if "://" in image else image


def _has_header(image: Any) -> bool:
    """Whether an image's size can be read without fetching anything: given as bytes, PIL or a local file."""
    return isinstance(image, (bytes, bytearray, Image.Image)) or _local_path(image) is not None


def _by_headers(item: Any) -> bool:
    """Whether estimate() weighs this input from its images' headers alone (a type test: none is read)."""
    return (isinstance(item, Mapping) and not _count_videos(item.get("video"))
            and all(map(_has_header, as_list(item.get("image")))))


def image_pixels(image: Any, vision: VisionSettings) -> int | None:
    """Pixels an image will have once resized, read from its header; None unless given as bytes, PIL or
    a local file that opens."""
    if not _has_header(image):
        return None
    try:
        if isinstance(image, Image.Image):
            width, height = image.size
        else:
            source = io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else _local_path(image)
            with Image.open(source) as im:  # reads the header, decodes nothing
                width, height = im.size
        h, w = smart_resize(height, width, IMAGE_FACTOR, vision.min_pixels, vision.max_pixels)
    except Exception:  # not an image it can read: it fails in preparation, alone
        return None
    return h * w


def _text_tokens(item: Mapping[str, Any]) -> float:
    return PROMPT_TOKENS + sum(len(t) for t in as_list(item.get("text")) if isinstance(t, str)) / TEXT_CHARS_PER_TOKEN


@dataclass
class InputWeights:
    """Bytes and tokens an input will hold once prepared, estimated before it is prepared."""

    vision: VisionSettings
    pixel_bytes: int  # bytes per pixel value: the model's dtype (prepared pixels are cast to it)
    seen: dict[tuple[int, int], tuple[float, float]] = field(default_factory=dict)  # kind -> (bytes, tokens)

    def learn(self, *items: Any, nbytes: float, tokens: float) -> None:
        """Record what one prepared input (or pair of inputs, prepared together) held: its kind's
        estimate moves towards it."""
        if all(map(_by_headers, items)):  # it says nothing of images given by URL
            return
        kind = _kind(items)
        old = self.seen.get(kind)
        if old is None:
            self.seen[kind] = (float(nbytes), float(tokens))
        else:
            self.seen[kind] = (old[0] + LEARNING_RATE * (nbytes - old[0]), old[1] + LEARNING_RATE * (tokens - old[1]))

    def estimate(self, *items: Any) -> tuple[float, float]:
        """(bytes, tokens) this input (or pair of inputs, prepared together) will hold once prepared."""
        parts = [x for x in items if isinstance(x, Mapping)]  # any other fails in preparation, alone
        if not parts:
            return 0.0, 0.0
        images = [image_pixels(x, self.vision) for part in parts for x in as_list(part.get("image"))]
        videos = sum(_count_videos(part.get("video")) for part in parts)
        text_tokens = sum(map(_text_tokens, parts))
        known = sum(p for p in images if p is not None)
        unknown = sum(1 for p in images if p is None)
        if not unknown and not videos:  # exact: every image weighed from its header
            return self._weigh(VALUES_PER_IMAGE_PIXEL * known, text_tokens + known / PIXELS_PER_TOKEN)
        learned = self.seen.get((len(images), videos))
        if learned is not None:
            return learned
        pixels = known + unknown * self.vision.max_pixels
        frames = max(map(self._frames, parts))
        frame_pixels = max(min(VIDEO_FRAME_MAX_PIXELS, 2 * self.vision.total_pixels / frames), VIDEO_FRAME_MIN_PIXELS)
        values = VALUES_PER_IMAGE_PIXEL * pixels + videos * VALUES_PER_FRAME_PIXEL * frames * frame_pixels
        tokens = text_tokens + (pixels + videos * frames / 2 * frame_pixels) / PIXELS_PER_TOKEN
        return self._weigh(values, tokens)

    def _frames(self, item: Mapping[str, Any]) -> int:
        """The most frames a video of this input can be read as, in pairs: a file's by the input's own
        max_frames if it has one, a list of frames' by the settings'."""
        own = item.get("max_frames")
        frames = max(own if isinstance(own, int) and not isinstance(own, bool) else 0, self.vision.max_frames)
        return 2 * math.ceil(frames / 2)

    def _weigh(self, values: float, tokens: float) -> tuple[float, float]:
        return values * self.pixel_bytes + tokens * BYTES_PER_TEXT_TOKEN, tokens


Weigh = Callable[[Any], tuple[float, float]]  # an input's (bytes, tokens) once prepared


def window_end(inputs: Sequence[Any], start: int, cap: int, weigh: Weigh, window_bytes: int,
               token_budget: int, max_items: int) -> int:
    """End (exclusive) of the window from start: at most cap inputs, and no more than window_bytes of
    estimated prepared inputs once it holds enough to fill one forward batch."""
    end, held, tokens = start, 0.0, 0.0
    while end < len(inputs) and end - start < cap:
        nbytes, ntokens = weigh(inputs[end])
        one_batch = tokens + ntokens > token_budget or end - start >= max_items  # it would not fit in one
        if end > start and one_batch and held + nbytes > window_bytes:
            break
        held, tokens, end = held + nbytes, tokens + ntokens, end + 1
    return end


class Windows:
    """Consecutive windows over a call's inputs: the first of `first` inputs (a small one starts a GPU
    sooner), each next twice the last up to `cap` (larger ones sort by length and pad less), each cut
    by bytes (window_end)."""

    def __init__(self, inputs: Sequence[Any], first: int, cap: int, weigh: Weigh, window_bytes: int,
                 token_budget: int, max_items: int) -> None:
        self.inputs, self.weigh, self.window_bytes = inputs, weigh, window_bytes
        self.token_budget, self.max_items = token_budget, max_items
        self.cap, self.size, self.start = max(1, cap), max(1, min(first, cap)), 0

    def next(self) -> list[int]:
        """The next window's input indices; empty once every input has had its window."""
        end = window_end(self.inputs, self.start, self.size, self.weigh, self.window_bytes, self.token_budget,
                         self.max_items)
        idx, self.start = list(range(self.start, end)), end
        self.size = min(self.cap, self.size * 2)
        return idx
