"""Conversation building for Qwen3-VL embedding and reranking (model-contract.md, pure functions).

Everything here decides *what the model sees*: instruction text, message layout,
content order and per-item pixel settings. A slip here moves every vector, so the
rules are kept in one small module that tests pin string-for-string.
"""

from __future__ import annotations

import numbers
import os
import unicodedata
from dataclasses import dataclass
from typing import Any, Mapping
from urllib.parse import urlparse

import numpy as np
from PIL import Image

DEFAULT_EMBED_INSTRUCTION = "Represent the user's input."
DEFAULT_RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
RERANK_SYSTEM_PROMPT = (
    'Judge whether the Document meets the requirements based on the Query and the Instruct provided. '
    'Note that the answer can only be "yes" or "no".'
)
EMPTY_TEXT = "NULL"
# What one input dict may hold (model-contract.md "Inputs", plus a video segment's bounds).
INPUT_KEYS = ("text", "image", "video", "instruction", "fps", "max_frames", "video_start", "video_end")

# Extensions that make a string in a list a frame (so the list is one frame-list video).
_FRAME_EXTENSIONS = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tiff", ".tif", ".svg"}


# qwen-vl-utils reads a video file as at least 2 frames; a max_frames of 1 rounds down to 0 there
# and every video item fails ("nframes should in interval [2, ...], but got 0").
MIN_VIDEO_FRAMES = 2


@dataclass(frozen=True)
class VisionSettings:
    """Pixel and frame settings applied to every image and video item."""

    min_pixels: int = 4096
    max_pixels: int = 1843200
    total_pixels: int = 7864320
    fps: float = 1.0
    max_frames: int = 64

    def __post_init__(self) -> None:
        """Reject a frame setting no video could be read with (these are the defaults: 0 is not one)."""
        check_input({"fps": self.fps, "max_frames": self.max_frames})
        if self.fps == 0 or self.max_frames == 0:
            raise ValueError(f"fps must be > 0 and max_frames an integer >= {MIN_VIDEO_FRAMES} for the defaults, "
                             f"got fps={self.fps!r}, max_frames={self.max_frames!r}")


def check_instruction(instruction: Any) -> None:
    """Raise TypeError unless the instruction is None or a string."""
    if instruction is not None and not isinstance(instruction, str):
        raise TypeError(f"instruction must be a string, got {type(instruction).__name__}")


def check_input(item: Mapping[str, Any]) -> None:
    """Raise naming the key when an input has an unknown key or a value of the wrong type.

    The reference drops unknown keys and formats any text with str(): a misspelt "txt" would
    embed as the empty input "NULL", and bytes as the string "b'...'", with no error at all.
    """
    unknown = [k for k in item if k not in INPUT_KEYS]
    if unknown:
        raise ValueError(f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(repr(k) for k in unknown)}: "
                         f"an input takes {', '.join(INPUT_KEYS)}")
    text = item.get("text")
    if text is not None and not isinstance(text, str) and not (
            isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text)):
        raise TypeError(f"text must be a string or a list of strings, got {_describe(text)}")
    check_instruction(item.get("instruction"))
    for key in ("fps", "video_start", "video_end"):
        value = item.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, numbers.Real)):
            raise TypeError(f"{key} must be a number, got {type(value).__name__}")
    if item.get("video_start") is not None or item.get("video_end") is not None:
        videos = split_videos(item.get("video"))
        if not any(isinstance(v, str) for v in videos):
            raise ValueError(f"video_start/video_end cut a video file, and this input has "
                             f"{'only frame lists' if videos else 'no video'}")
    # 0, like None, means the default: the reference takes `fps or self.fps` (and so for max_frames).
    if item.get("fps") is not None and not (item["fps"] > 0 or item["fps"] == 0):
        raise ValueError(f"fps must be > 0 (or 0 for the default), got {item['fps']}")
    max_frames = item.get("max_frames")
    if max_frames is not None and (isinstance(max_frames, bool) or not isinstance(max_frames, numbers.Integral)
                                   or (max_frames < MIN_VIDEO_FRAMES and max_frames != 0)):
        raise ValueError(f"max_frames must be an integer >= {MIN_VIDEO_FRAMES} (the video reader samples at least "
                         f"{MIN_VIDEO_FRAMES} frames), or 0 for the default, got {max_frames!r}")


def _describe(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        odd = next(v for v in value if not isinstance(v, str))
        return f"a {type(value).__name__} holding {type(odd).__name__}"
    return type(value).__name__


def normalize_instruction(instruction: str | None, default: str) -> str:
    """Strip a given instruction and end it with punctuation; the default is used as is."""
    check_instruction(instruction)
    if instruction:
        instruction = instruction.strip()
        if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
            instruction = instruction + "."
    return instruction or default


def as_list(value: Any) -> list:
    """An input field's values as a list: none, one, or the list or tuple given."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def _is_frame(element: Any) -> bool:
    """Whether a list element is one image (a frame), as an image field takes one, not a video."""
    if isinstance(element, (Image.Image, bytes, bytearray, memoryview)):
        return True
    if isinstance(element, str) and element[:11].lower() == "data:image/":
        return True
    if isinstance(element, str):
        path = urlparse(element).path if "://" in element else element
        return os.path.splitext(path.lower())[1] in _FRAME_EXTENSIONS
    return False


def split_videos(video: Any) -> list:
    """Normalise a `video` field to a list of videos (each a URI or a list of frames)."""
    if video is None:
        return []
    if isinstance(video, str):
        return [video]
    if isinstance(video, (list, tuple)):
        if not video:
            return []
        if _is_frame(video[0]):
            return [list(video)]
        for one in video:
            if not isinstance(one, (str, list, tuple)):
                raise TypeError(f"unsupported video type {type(one).__name__} in a list of videos: "
                                "each is a path/URI string or a list of frames")
        return list(video)
    # The reference raises too ("Unrecognized video type"); dropping it would embed the rest alone.
    raise TypeError(f"unsupported video type {type(video).__name__}: give a path/URI string or a list of frames")


def sample_frames(frames: list, max_frames: int) -> list:
    """Evenly subsample a frame list to at most max_frames (linspace indices, truncated to int)."""
    n = len(frames)
    if max_frames is None or n <= max_frames:
        return list(frames)
    # Exactly the reference's indices: numpy's float linspace truncated to int.
    return [frames[i] for i in np.linspace(0, n - 1, max_frames, dtype=int).tolist()]


def media_content(item: dict[str, Any], vs: VisionSettings, fps: float | None = None,
                  max_frames: int | None = None) -> list[dict[str, Any]]:
    """Content items for one input: videos first, then images, then texts; `NULL` when it has none.

    The input's own fps / max_frames win over the caller's (0, like None, leaves them to the caller).
    """
    check_input(item)
    fps, max_frames = item.get("fps") or fps, item.get("max_frames") or max_frames
    texts = as_list(item.get("text"))
    images = as_list(item.get("image"))
    videos = split_videos(item.get("video"))
    # As the reference: an empty string is a text (an empty user message), not a missing one.
    if not texts and not images and not videos:
        return [{"type": "text", "text": EMPTY_TEXT}]

    content: list[dict[str, Any]] = []
    for video in videos:
        if isinstance(video, list):
            content.append({"type": "video", "video": sample_frames(video, vs.max_frames),
                            "total_pixels": vs.total_pixels})
        else:
            entry = {"type": "video", "video": video, "fps": fps or vs.fps,
                     "max_frames": max_frames or vs.max_frames,
                     # Deliberate deviation from the reference, which forgets total_pixels
                     # here so long videos overflow the token limit (model-contract.md).
                     "total_pixels": vs.total_pixels}
            for key in ("video_start", "video_end"):
                if item.get(key) is not None:
                    entry[key] = float(item[key])
            content.append(entry)
    for image in images:
        content.append({"type": "image", "image": image,
                        "min_pixels": vs.min_pixels, "max_pixels": vs.max_pixels})
    for text in texts:
        content.append({"type": "text", "text": text})
    return content


def embed_conversation(item: dict[str, Any], vs: VisionSettings,
                       default_instruction: str = DEFAULT_EMBED_INSTRUCTION) -> list[dict[str, Any]]:
    """System message with the instruction, then a user message with the input's content."""
    instruction = normalize_instruction(item.get("instruction"), default_instruction)
    return [
        {"role": "system", "content": [{"type": "text", "text": instruction}]},
        {"role": "user", "content": media_content(item, vs)},
    ]


def check_rerank_item(item: Mapping[str, Any], role: str) -> None:
    """Raise ValueError when a reranker query or document carries an instruction (the reference ignores it)."""
    if item.get("instruction") is not None:
        raise ValueError(f"'instruction' in the {role}: the reranker takes one per call "
                         "(score(..., instruction=...), or process()'s 'instruction' key)")


def rerank_conversation(query: dict[str, Any], document: dict[str, Any], instruction: str,
                        vs: VisionSettings, fps: float | None = None,
                        max_frames: int | None = None) -> list[dict[str, Any]]:
    """The reranker's (query, document) conversation; the instruction is used verbatim."""
    check_instruction(instruction)
    content = [{"type": "text", "text": "<Instruct>: " + instruction},
               {"type": "text", "text": "<Query>:"}]
    for role, item in (("query", query), ("document", document)):
        check_rerank_item(item, role)
        if role == "document":
            content.append({"type": "text", "text": "\n<Document>:"})
        content += media_content(item, vs, fps, max_frames)
    return [
        {"role": "system", "content": [{"type": "text", "text": RERANK_SYSTEM_PROMPT}]},
        {"role": "user", "content": content},
    ]
