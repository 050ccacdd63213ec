"""Per-item preprocessing (chat template, vision resizing, HF processor) and batch collation.

Each input is prepared on its own, so one unreadable image fails only its own item,
and prepared items can be regrouped into batches by token length. Collating
per-item processor outputs is exactly what the processor does for a batch:
image/video patches are concatenated in order and ids are padded.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Hashable, Iterator, Sequence

import torch
from PIL import Image
from qwen_vl_utils import process_vision_info

from ..once_cache import OnceCache
from . import plain_text
from .media_io import MediaError, VideoFiles, resolve_image, resolve_video

IMAGE_PATCH_SIZE = 16
VISION_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


class InputError(ValueError):
    """One input could not be turned into model inputs; names the input and the reason."""

    def __init__(self, index: int, reason: str) -> None:
        super().__init__(f"input {index}: {reason}")
        self.index = index
        self.reason = reason


@dataclass
class Prepared:
    """One item's model inputs: token ids plus its own vision tensors."""

    input_ids: list[int]
    vision: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, list[int]] = field(default_factory=dict)  # per-token fields, e.g. mm_token_type_ids
    prompt: str = ""
    positions: torch.Tensor | None = None  # (3, L) multimodal rotary positions, as the model computes them

    @property
    def num_tokens(self) -> int:
        """Sequence length after the vision placeholders are expanded."""
        return len(self.input_ids)

    @property
    def nbytes(self) -> int:
        """Host memory its tensors and token ids hold (pixels dominate)."""
        tensors = [*self.vision.values(), *([self.positions] if self.positions is not None else [])]
        return sum(t.nbytes for t in tensors) + 8 * len(self.input_ids)

    @property
    def num_patches(self) -> int:
        """Vision patches the vision tower will encode."""
        total = 0
        for key in ("image_grid_thw", "video_grid_thw"):
            if key in self.vision:
                total += int(self.vision[key].prod(dim=-1).sum())
        return total


_SOURCE_KEY = "qvl_source_uri"


@contextmanager
def resolved_sources(conversation: list[dict[str, Any]], files: VideoFiles,
                     storage_options: dict[str, Any] | None) -> Iterator[list[dict[str, Any]]]:
    """A copy of a conversation whose image/video sources qwen-vl-utils can read; local copies of
    remote videos stay on disk until the block ends."""
    held: list[str] = []
    try:
        out = []
        for message in conversation:
            content = []
            for entry in message["content"]:
                if entry.get("type") == "image":
                    entry = {**entry, "image": resolve_image(entry["image"], storage_options)}
                elif entry.get("type") == "video":
                    source = entry["video"]
                    entry = {**entry, "video": resolve_video(source, files, storage_options)}
                    if isinstance(source, str):
                        held.append(source)
                        if entry["video"] != source:
                            entry[_SOURCE_KEY] = source  # a local copy: errors name the original (qwen-vl-utils ignores it)
                content.append(entry)
            out.append({"role": message["role"], "content": content})
        yield out
    finally:
        for source in held:
            files.release(source)


def render_prompt(processor: Any, conversation: list[dict[str, Any]]) -> str:
    """The chat-template string for one conversation, ending with the assistant prompt."""
    return processor.apply_chat_template([conversation], add_generation_prompt=True, tokenize=False)[0]


def video_reader_error(conversation: list[dict[str, Any]]) -> str | None:
    """Why the video reader rejects this conversation's first undecodable video, if one does.

    qwen-vl-utils retries a video that its reader (decord, torchcodec) fails on with
    torchvision's ``read_video``, which torchvision >= 0.22 no longer has: the error that
    reaches the caller is then an AttributeError about torchvision, not the video's own
    problem (a corrupt file, a range past its end). Reading it again here, on failure only,
    recovers the reader's reason.
    """
    from qwen_vl_utils import vision_process

    for message in conversation:
        for entry in message.get("content", ()):
            if not (isinstance(entry, dict) and isinstance(entry.get("video"), str)):
                continue
            try:
                vision_process.VIDEO_READER_BACKENDS[vision_process.get_video_reader_backend()](entry)
            except Exception as exc:
                detail = str(exc).strip().splitlines()
                name = entry.get(_SOURCE_KEY, entry["video"])
                return f"video {name} cannot be read: {type(exc).__name__}: {detail[0] if detail else ''}"
    return None


def image_reader_error(conversation: list[dict[str, Any]]) -> str | None:
    """Why the first undecodable local image file of this conversation cannot be read, if one cannot.

    PIL's errors for a corrupt or truncated file ("Truncated File Read", "image file is
    truncated") do not name the file; reading each local image again, on failure only, does.
    """
    for message in conversation:
        for entry in message.get("content", ()):
            if not isinstance(entry, dict):
                continue
            frames = entry.get("video") if isinstance(entry.get("video"), list) else []
            for source in [entry.get("image"), *frames]:  # a frame list's frames are images too
                if not isinstance(source, str) or source.startswith("data:") or (
                        "://" in source and not source.startswith("file://")):
                    continue
                path = source[len("file://"):] if source.startswith("file://") else source
                try:
                    with Image.open(path) as image:
                        image.load()
                except Exception as exc:
                    return f"cannot decode image {path}: {type(exc).__name__}: {exc}"
    return None


def vision_info(conversation: list[dict[str, Any]]) -> tuple[Any, Any, dict[str, Any]]:
    """qwen-vl-utils' resized images, videos and video kwargs; a failure names the image or video it is about."""
    try:
        return process_vision_info([conversation], image_patch_size=IMAGE_PATCH_SIZE,
                                   return_video_metadata=True, return_video_kwargs=True)
    except Exception as exc:
        # The torchvision fallback's symptom hides the video reader's reason; PIL's hide the file.
        reason = video_reader_error(conversation) if "read_video" in str(exc) else image_reader_error(conversation)
        if reason is None:
            raise
        raise MediaError(reason) from exc


def run_processor(processor: Any, prompt: str, conversation: list[dict[str, Any]],
                  **text_kwargs: Any) -> tuple[list[int], dict[str, torch.Tensor], dict[str, list[int]]]:
    """Resize vision inputs with qwen-vl-utils and run the HF processor for one conversation."""
    images, video_inputs, video_kwargs = vision_info(conversation)
    videos = metadata = None
    if video_inputs is not None:
        videos, metadata = (list(x) for x in zip(*video_inputs))
    processor_prompt, plain = plain_text_prompt(processor, prompt, conversation)
    out = processor(text=[processor_prompt], images=images, videos=videos, video_metadata=metadata,
                    do_resize=False, return_tensors="pt", **text_kwargs, **video_kwargs)
    ids = out["input_ids"][0].tolist()
    vision = {k: out[k] for k in VISION_KEYS if k in out}
    # transformers >= 5.3 returns per-token multimodal types; keep them aligned with the ids.
    extra = {k: out[k][0].tolist() for k in ("mm_token_type_ids",) if k in out}
    if plain is not None:
        ids, extra = plain_text.restore(processor, plain, ids, extra, text_kwargs)
    return ids, vision, extra


def plain_text_prompt(processor: Any, prompt: str,
                      conversation: list[dict[str, Any]]) -> tuple[str, plain_text.Skeleton | None]:
    """The prompt for the processor, and the skeleton to restore its ids from (None: the caller's prompt as is)."""
    plain = plain_text.skeleton(processor, conversation)
    if plain is None:
        return prompt, None
    skeleton_prompt = render_prompt(processor, plain.conversation)
    # The texts must come back exactly where the template put them (a template that looked
    # inside a text would render the skeleton differently).
    if plain.unescape(skeleton_prompt) != prompt:
        raise ValueError("the chat template renders this input's texts differently when they are replaced; "
                         "cannot keep their special-token strings as plain text")
    return skeleton_prompt, plain


class VisionCache(OnceCache[tuple[torch.Tensor, torch.Tensor]]):
    """Processed images (pixel rows, grid) by key, least recently used first out.

    The reranker keys a query's images by its score() call, so an image query is read,
    decoded and processed once for all its pairs instead of once per pair.
    """

    def __init__(self, max_items: int = 16) -> None:
        super().__init__(max_items)


def process_image(processor: Any, entry: dict[str, Any],
                  storage_options: dict[str, Any] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(pixel rows, grid) of one unresolved image content entry: qwen-vl-utils resizing, then the image processor."""
    resolved = {**entry, "image": resolve_image(entry["image"], storage_options)}
    images, _, _ = vision_info([{"role": "user", "content": [resolved]}])
    out = processor.image_processor(images=images, do_resize=False, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def cached_image(processor: Any, entry: dict[str, Any], storage_options: dict[str, Any] | None,
                 cache: VisionCache, key: Hashable | None,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """process_image (pixels cast to dtype when given), through the cache where a key is given."""
    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        pixels, grid = process_image(processor, entry, storage_options)
        return (pixels if dtype is None else pixels.to(dtype)), grid

    return compute() if key is None else cache.get((key, dtype), compute)


def run_processor_cached(processor: Any, prompt: str, conversation: list[dict[str, Any]],
                         storage_options: dict[str, Any] | None, cache: VisionCache,
                         keys: Sequence[Hashable | None], dtype: torch.dtype | None = None,
                         **text_kwargs: Any) -> tuple[list[int], dict[str, torch.Tensor], dict[str, list[int]]]:
    """run_processor for a conversation of texts and images (no videos), each image processed on its own
    and, where keys gives a key, taken from or put in the cache; pixels in dtype when given.

    A pair whose images are all cached ones gets a cached tensor itself, not a copy: 100 pairs of
    one image query (or of one query's images) then hold one copy of its pixels, and comparing them
    costs nothing.

    What the HF processor does for a list of images, item by item: qwen-vl-utils resizing, the image
    processor (its outputs are per image, concatenated in order), then each image placeholder expanded
    to grid/merge^2 tokens and the text tokenised. conversation is unresolved; keys has one entry per image.
    """
    entries = [e for m in conversation for e in m["content"] if e.get("type") == "image"]
    if len(keys) != len(entries):
        raise ValueError("one cache key (or None) per image is needed")

    def each() -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        hits = [cached_image(processor, e, storage_options, cache, k, dtype) for e, k in zip(entries, keys)]
        return [p for p, _ in hits], [g for _, g in hits]

    if len(entries) > 1 and all(k is not None for k in keys):
        # Every image a cached one (a query's images, with a text document): the joined rows are one
        # entry, looked up first, so such pairs share one tensor as pairs of one cached image do (and
        # a query of more images than the cache holds is not processed again for every pair).
        rows, grid = cache.get(("joined", tuple(keys), dtype), lambda: tuple(map(joined, each())))
        vision = {"pixel_values": rows, "image_grid_thw": grid}
    else:
        pixels, grids = each()
        vision = {"pixel_values": joined(pixels), "image_grid_thw": joined(grids)} if pixels else {}
    text, plain = plain_text_prompt(processor, prompt, conversation)
    merge = processor.image_processor.merge_size ** 2
    for grid in (vision["image_grid_thw"] if vision else ()):  # as the processor expands them: in order
        text = text.replace(processor.image_token, plain_text.EXPANSION_PLACEHOLDER * int(grid.prod() // merge), 1)
    text = text.replace(plain_text.EXPANSION_PLACEHOLDER, processor.image_token)
    out = processor.tokenizer([text], return_tensors="pt", return_token_type_ids=False, **text_kwargs)
    ids = out["input_ids"][0].tolist()
    if plain is not None:
        ids, _ = plain_text.restore(processor, plain, ids, {}, text_kwargs)
    return ids, vision, {}


def joined(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    """The parts concatenated; a single part is returned as it is (no copy)."""
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def same_tensor(a: torch.Tensor, b: torch.Tensor) -> bool:
    """torch.equal, without reading the data when both are the same view of the same memory."""
    if (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype
            and a.device == b.device):
        return True
    return torch.equal(a, b)


def rope_positions(model: Any, input_ids: list[int], vision: dict[str, torch.Tensor]) -> torch.Tensor:
    """The (3, L) multimodal rotary positions of one unpadded sequence, by the model's own get_rope_index.

    A sequence's positions depend only on its own tokens and grids, so they are computed here,
    per item, on the CPU (in the preparation threads) instead of inside every forward, where
    transformers loops over the batch with a GPU->host sync per row and per image.
    """
    ids = torch.tensor([input_ids], dtype=torch.long)
    positions, _ = model.get_rope_index(ids, vision.get("image_grid_thw"), vision.get("video_grid_thw"),
                                        torch.ones_like(ids))
    return positions[:, 0]


def cast_pixels(vision: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Pixel tensors in the model's dtype (the vision tower casts them first anyway; half the bytes to copy)."""
    return {k: (v.to(dtype) if k.startswith("pixel_values") else v) for k, v in vision.items()}


def describe_error(exc: BaseException) -> str:
    """A short reason for an item failure."""
    if isinstance(exc, (MediaError, InputError)):
        return str(exc)
    return f"{type(exc).__name__}: {exc}"


def collate(items: Sequence[Prepared], pad_id: int, padding_side: str) -> dict[str, torch.Tensor]:
    """Pad ids (and per-token fields) to one length and concatenate vision tensors in order."""
    length = max(p.num_tokens for p in items)
    ids = torch.full((len(items), length), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), length), dtype=torch.long)
    extra_keys = set().union(*(p.extra.keys() for p in items))
    extras = {k: torch.zeros((len(items), length), dtype=torch.long) for k in extra_keys}
    # Padding positions are 1, as get_rope_index leaves them; no real token attends to them.
    positions = (torch.ones((3, len(items), length), dtype=torch.long)
                 if all(p.positions is not None for p in items) else None)
    for row, p in enumerate(items):
        n = p.num_tokens
        sl = slice(0, n) if padding_side == "right" else slice(length - n, length)
        ids[row, sl] = torch.tensor(p.input_ids, dtype=torch.long)
        mask[row, sl] = 1
        for k in extra_keys:
            extras[k][row, sl] = torch.tensor(p.extra[k], dtype=torch.long)
        if positions is not None:
            positions[:, row, sl] = p.positions
    batch: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask, **extras}
    if positions is not None:
        batch["position_ids"] = positions
    for key in VISION_KEYS:
        parts = [p.vision[key] for p in items if key in p.vision]
        if parts:
            batch[key] = torch.cat(parts, dim=0)
    return batch


def to_device(batch: dict[str, torch.Tensor], device: torch.device, pin: bool = False) -> dict[str, torch.Tensor]:
    """Move a collated batch to the device (optionally through pinned memory, non-blocking)."""
    pin = pin and device.type == "cuda"
    return {k: (v.pin_memory() if pin else v).to(device, non_blocking=pin) for k, v in batch.items()}


def check_window(name: str, value: int | None) -> None:
    """Raise ValueError unless a window size argument is None or an integer >= 1."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def token_budget_batches(lengths: Sequence[int], token_budget: int, max_items: int,
                         window: int = 1024, max_padding: float = 0.25) -> Iterator[list[int]]:
    """Index batches: sort a window by length, cut where padded tokens would pass the budget
    or padding would pass max_padding of the batch's real tokens."""
    order = list(range(len(lengths)))
    for start in range(0, len(order), window):
        chunk = sorted(order[start:start + window], key=lambda i: lengths[i])
        batch: list[int] = []
        longest = real = 0
        for i in chunk:
            longest_if_added = max(longest, lengths[i])
            padded = longest_if_added * (len(batch) + 1)
            # Sorted lengths: adding a longer item pads every earlier one up to it, so a short
            # head followed by a long tail is cut where the padding would start to dominate.
            if batch and (padded > token_budget or len(batch) >= max_items
                          or padded > (1.0 + max_padding) * (real + lengths[i])):
                yield batch
                batch, longest_if_added, real = [], lengths[i], 0
            batch.append(i)
            longest = longest_if_added
            real += lengths[i]
        if batch:
            yield batch
