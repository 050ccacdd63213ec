"""Preparation windows: how many inputs the embedder prepares ahead, bounded by what they weigh.

The embedder holds two windows of prepared inputs at once (the one in the model and the next,
being prepared), and a prepared input's float pixels are 8-24x its encoded bytes. So a window is
cut by the bytes its inputs will hold once prepared, estimated per kind of input before it is
prepared: from what that kind weighed so far, or, for a kind not seen yet, from the pixel
budgets that bound it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from .formatting import VisionSettings

# A vision patch of Qwen3-VL holds 3 channels x 2 frames x 16 x 16 values, and 4 patches merge
# into one token. An image fills both frames: 6 values per pixel. A video segment's frames are
# at most total_pixels / frames * 2 pixels (qwen-vl-utils' frame factor): 3 x 2 x total_pixels at most.
VALUES_PER_PIXEL = 6
PATCH_VALUES = 1536
PATCHES_PER_TOKEN = 4
# A list of Python ints, with the positions and the prompt beside them: bytes per token, roughly.
BYTES_PER_TEXT_TOKEN = 64
TEXT_CHARS_PER_TOKEN = 3  # an unseen text's tokens, from its length (an overestimate for English)


def media_count(value: Any) -> int:
    """How many images (or videos) an input's key holds: a list holds many, anything else one."""
    if value is None:
        return 0
    return len(value) if isinstance(value, (list, tuple)) else 1


def input_kind(item: Any) -> tuple[int, int]:
    """An input's kind, for weighing: (images, videos) it holds (none for a non-dict, which fails alone)."""
    if not isinstance(item, Mapping):
        return 0, 0
    return media_count(item.get("image")), media_count(item.get("video"))


@dataclass
class Weight:
    """What inputs of one kind held once prepared, summed."""

    bytes: float = 0.0
    tokens: float = 0.0
    count: int = 0


@dataclass
class InputWeights:
    """Bytes and tokens an input will hold once prepared, learned per kind of input."""

    vision: VisionSettings
    pixel_bytes: int  # bytes per pixel value: the model's dtype (prepared pixels are cast to it)
    seen: dict[tuple[int, int], Weight] = field(default_factory=dict)

    def learn(self, item: Any, nbytes: int, tokens: int) -> None:
        """Record what one prepared input held."""
        w = self.seen.setdefault(input_kind(item), Weight())
        w.bytes += nbytes
        w.tokens += tokens
        w.count += 1

    def estimate(self, item: Any) -> tuple[float, float]:
        """(bytes, tokens) this input will hold once prepared: its kind's mean so far, or its ceiling."""
        kind = input_kind(item)
        w = self.seen.get(kind)
        if w is not None and w.count:
            return w.bytes / w.count, w.tokens / w.count
        images, videos = kind
        # The pixel budgets bound every image and video segment (see VALUES_PER_PIXEL).
        values = VALUES_PER_PIXEL * (images * self.vision.max_pixels + videos * self.vision.total_pixels)
        text = item.get("text") if isinstance(item, Mapping) else None
        text_tokens = 64 + (len(text) // TEXT_CHARS_PER_TOKEN if isinstance(text, str) else 0)
        tokens = text_tokens + values / (PATCH_VALUES * PATCHES_PER_TOKEN)
        return values * self.pixel_bytes + tokens * BYTES_PER_TEXT_TOKEN, tokens


def window_end(inputs: Sequence[Any], start: int, cap: int, weights: InputWeights, window_bytes: int,
               token_budget: int, max_items: int) -> int:
    """End (exclusive) of the window from start: at most cap inputs, and no more than window_bytes of
    estimated prepared inputs once it holds enough to fill one forward batch."""
    end, held, tokens = start, 0.0, 0.0
    while end < len(inputs) and end - start < cap:
        nbytes, ntokens = weights.estimate(inputs[end])
        one_batch = tokens + ntokens > token_budget or end - start >= max_items  # it would not fit in one
        if end > start and one_batch and held + nbytes > window_bytes:
            break
        held, tokens, end = held + nbytes, tokens + ntokens, end + 1
    return end
