"""Preparation windows: how many inputs a model prepares ahead, bounded by what they weigh.

The embedder and the reranker hold two windows of prepared inputs at once (the one in the model
and the next, being prepared), and a prepared input's float pixels are 8-24x its encoded bytes. So
a window is cut by the bytes its inputs will hold once prepared, estimated before they are prepared:
  - an image given as bytes, a PIL image (every image of an ingestion) or a local file exactly, from
    its header's size resized as qwen-vl-utils resizes it;
  - the rest of an input (images by URL, videos) from what that rest held in recent inputs of its
    kind (so many images by URL, so many videos of so many frames at most); its text from its length;
  - the rest of an input of a kind not seen yet from the pixel budgets that bound it.
A reranker's pair is weighed as its query and document together: their images and videos are
prepared into one input.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Mapping, Sequence

from PIL import Image
from qwen_vl_utils.vision_process import smart_resize

from ..media.listing import is_data_uri, local_path
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


def _videos(value: Any) -> list:
    """The videos of a `video` field: each a URI or a list of frames."""
    try:
        return split_videos(value)
    except (TypeError, ValueError):  # a bad video fails in preparation, alone; weighing must not raise
        return [value]


def _count_videos(value: Any) -> int:
    return len(_videos(value))


def input_kind(item: Any) -> tuple[int, int]:
    """An input's kind, for weighing: (images, videos) it holds (none for a non-dict, which fails alone)."""
    if not isinstance(item, Mapping):
        return 0, 0
    return len(as_list(item.get("image"))), _count_videos(item.get("video"))


def _local_path(image: Any) -> str | None:
    """The local file an image names (a path or a file:// URI), None for any other source."""
    if not isinstance(image, str) or is_data_uri(image) or ("://" in image and not image.startswith("file://")):
        return None
    return local_path(image)


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
            if isinstance(source, str) and not os.path.isfile(source):  # a FIFO would block until written
                return None
            with Image.open(source) as im:  # reads the header, decodes nothing
                width, height = im.size
        h, w = smart_resize(height, width, IMAGE_FACTOR, vision.min_pixels, vision.max_pixels)
    except Exception:  # not an image it can read: it fails in preparation, alone
        return None
    return h * w


def _text_tokens(item: Mapping[str, Any]) -> float:
    return PROMPT_TOKENS + sum(len(t) for t in as_list(item.get("text")) if isinstance(t, str)) / TEXT_CHARS_PER_TOKEN


def _own_max_frames(item: Mapping[str, Any]) -> int:
    own = item.get("max_frames")  # a bad one (0, negative, not an int) fails in preparation, alone
    return own if isinstance(own, int) and not isinstance(own, bool) and own > 0 else 0


@dataclass(frozen=True)
class Tally:
    """What weighing an input (or several, prepared together) needs, its image headers read once."""

    known_pixels: int = 0  # resized pixels of the images weighed from their headers
    unknown_images: int = 0  # images that cannot be weighed so (given by URL, or unreadable)
    videos: int = 0
    text_tokens: float = 0.0
    own_frames: int = 0  # the largest frame bound an input with video files gives itself
    default_frames: bool = False  # whether an input with video files gives none (the call's or settings' then)
    listed_frames: bool = False  # whether a video is a list of frames (sampled to the settings' bound)

    def __add__(self, other: "Tally") -> "Tally":
        return Tally(self.known_pixels + other.known_pixels, self.unknown_images + other.unknown_images,
                     self.videos + other.videos, self.text_tokens + other.text_tokens,
                     max(self.own_frames, other.own_frames), self.default_frames or other.default_frames,
                     self.listed_frames or other.listed_frames)

    @property
    def exact(self) -> bool:
        """Whether its bytes follow from its headers alone (no image by URL, no video)."""
        return not self.unknown_images and not self.videos


Kind = tuple[int, int, int]  # images by URL, videos, and the most frames a video may be read as (0: none)


@dataclass
class InputWeights:
    """Bytes and tokens an input will hold once prepared, estimated before it is prepared.

    Images weighed from their headers and the text count exactly; the rest (images by URL, videos)
    by what it held in recent inputs of its kind."""

    vision: VisionSettings
    pixel_bytes: int  # bytes per pixel value: the model's dtype (prepared pixels are cast to it)
    max_length: int | None = None  # tokens an input is truncated to (its text is counted up to it)
    seen: dict[Kind, tuple[float, float]] = field(default_factory=dict)  # kind -> its rest's (bytes, tokens)

    def tally(self, *items: Any) -> Tally:
        """The inputs' images (weighed from their headers where they can be), videos and text."""
        total = Tally()
        for item in items:
            if not isinstance(item, Mapping):  # it fails in preparation, alone
                continue
            pixels = [image_pixels(x, self.vision) for x in as_list(item.get("image"))]
            videos, own = _videos(item.get("video")), _own_max_frames(item)
            files = sum(not isinstance(v, list) for v in videos)
            total += Tally(sum(p for p in pixels if p is not None), sum(p is None for p in pixels), len(videos),
                           _text_tokens(item), own if files else 0, bool(files and not own), files < len(videos))
        if self.max_length is not None:  # a long text is cut there (and vision tokens would be too)
            total = replace(total, text_tokens=min(total.text_tokens, self.max_length))
        return total

    def learn(self, *items: Any, nbytes: float, tokens: float) -> None:
        """Record what one prepared input (or inputs prepared together) held: the estimate for its
        kind moves towards what its exactly weighed images and text leave of it."""
        if not all(map(_by_headers, items)):  # else weighed exactly: nothing to learn (and no header read)
            self.learn_tally(self.tally(*items), nbytes=nbytes, tokens=tokens)

    def learn_tally(self, t: Tally, *, nbytes: float, tokens: float, max_frames: int | None = None) -> None:
        """learn() for the inputs this tally was taken from (max_frames: as for estimate())."""
        if t.exact or (self.max_length is not None and tokens >= self.max_length):
            return  # a truncated input says little of what its kind's media hold
        exact_bytes, exact_tokens = self._exact(t)
        rest = (max(0.0, nbytes - exact_bytes), max(0.0, tokens - exact_tokens))
        kind = self._kind(t, max_frames)
        old = self.seen.get(kind)
        self.seen[kind] = rest if old is None else (old[0] + LEARNING_RATE * (rest[0] - old[0]),
                                                    old[1] + LEARNING_RATE * (rest[1] - old[1]))

    def estimate(self, *items: Any, max_frames: int | None = None) -> tuple[float, float]:
        """(bytes, tokens) this input (or inputs prepared together) will hold once prepared.

        max_frames: a call's own bound on every video's frames, where it has one (the reranker's)."""
        return self.weigh(self.tally(*items), max_frames)

    def weigh(self, t: Tally, max_frames: int | None = None) -> tuple[float, float]:
        """(bytes, tokens) for a tally: estimate() of the inputs it was taken from."""
        exact_bytes, exact_tokens = self._exact(t)
        if t.exact:
            return exact_bytes, exact_tokens
        learned = self.seen.get(self._kind(t, max_frames))
        if learned is not None:
            return exact_bytes + learned[0], exact_tokens + learned[1]
        frames = self._frames(t, max_frames)
        frame_pixels = max(min(VIDEO_FRAME_MAX_PIXELS, 2 * self.vision.total_pixels / frames), VIDEO_FRAME_MIN_PIXELS)
        pixels = t.unknown_images * self.vision.max_pixels
        rest_bytes, rest_tokens = self._weigh(
            VALUES_PER_IMAGE_PIXEL * pixels + t.videos * VALUES_PER_FRAME_PIXEL * frames * frame_pixels,
            (pixels + t.videos * frames / 2 * frame_pixels) / PIXELS_PER_TOKEN)
        return exact_bytes + rest_bytes, exact_tokens + rest_tokens

    def _exact(self, t: Tally) -> tuple[float, float]:
        """(bytes, tokens) of what weighs exactly: the images weighed from their headers, and the text."""
        return self._weigh(VALUES_PER_IMAGE_PIXEL * t.known_pixels, t.text_tokens + t.known_pixels / PIXELS_PER_TOKEN)

    def _frames(self, t: Tally, max_frames: int | None) -> int:
        """The most frames a video of these inputs may be read as, in pairs, as formatting reads them: a
        file by the input's own bound, else the call's, else the settings'; a list of frames by the settings'."""
        bounds = [t.own_frames]
        if t.default_frames:
            bounds.append(max_frames or self.vision.max_frames)
        if t.listed_frames or not t.videos:
            bounds.append(self.vision.max_frames)
        return 2 * math.ceil(max(max(bounds), 1) / 2)

    def _kind(self, t: Tally, max_frames: int | None) -> Kind:
        # Videos read as up to 8 frames and as up to 256 are different kinds.
        return t.unknown_images, t.videos, self._frames(t, max_frames) if t.videos else 0

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
