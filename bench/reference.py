"""The baselines: the official Qwen3-VL-Embedding / -Reranker way of running the models.

Written after the official ``Qwen3VLEmbedder.process`` / ``Qwen3VLReranker.process``
(Qwen3-VL-Embedding repository, transformers 4.57.3 + qwen-vl-utils 0.0.14): format the
conversations, ``apply_chat_template`` on the list, ``process_vision_info`` on the list,
one processor call (``padding=True``) and one forward over whatever padding results,
serially, in input order. The reranker scores one pair at a time. They reuse our loaded
model and processor (same weights, same dtype, same attention kernel) and our conversation
builders (which tests pin string for string against the reference), so only the way the
work is organised differs.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch
import torch.nn.functional as F
from qwen_vl_utils import process_vision_info

from operators.qwen3vl.fast_text import set_fast_text
from operators.qwen3vl.fast_vision import set_fast_vision
from operators.qwen3vl.reranker import _TAIL_TOKENS, truncate_keeping_special


@contextmanager
def stock_model(runner: Any) -> Iterator[None]:
    """transformers' own vision tower, norms and MLPs while inside (the official code has no fast path)."""
    set_fast_vision(runner.model, False)
    set_fast_text(runner.model, False)
    try:
        yield
    finally:
        set_fast_vision(runner.model, True)
        set_fast_text(runner.model, True)


def _vision(conversations: list[list[dict[str, Any]]]) -> tuple[Any, Any, Any, dict[str, Any]]:
    images, video_inputs, video_kwargs = process_vision_info(
        conversations, image_patch_size=16, return_video_metadata=True, return_video_kwargs=True)
    videos = metadata = None
    if video_inputs is not None:
        videos, metadata = (list(x) for x in zip(*video_inputs))
    return images, videos, metadata, video_kwargs


@torch.no_grad()
def reference_embed(embedder: Any, batch: Sequence[dict[str, Any]], normalize: bool = True) -> torch.Tensor:
    """Official ``Qwen3VLEmbedder.process`` on one batch: serial preprocessing, padding=True, one forward."""
    conversations = [embedder.conversation(item) for item in batch]
    text = embedder.processor.apply_chat_template(conversations, add_generation_prompt=True, tokenize=False)
    images, videos, metadata, video_kwargs = _vision(conversations)
    inputs = embedder.processor(text=text, images=images, videos=videos, video_metadata=metadata,
                                truncation=True, max_length=embedder.max_length, padding=True,
                                do_resize=False, return_tensors="pt", **video_kwargs)
    inputs = {k: v.to(embedder.device) for k, v in inputs.items()}
    hidden = embedder.model(**inputs).last_hidden_state
    mask = inputs["attention_mask"]
    # _pooling_last: the last position whose mask is 1 (right padding).
    flipped = mask.flip(dims=[1])
    last = mask.shape[1] - flipped.argmax(dim=1) - 1
    emb = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    return F.normalize(emb, p=2, dim=-1) if normalize else emb


def reference_embed_all(embedder: Any, items: Sequence[dict[str, Any]], batch_size: int = 16) -> torch.Tensor:
    """A notebook loop over the official process(): fixed batches of batch_size in input order."""
    with stock_model(embedder):
        out = [reference_embed(embedder, items[i:i + batch_size]) for i in range(0, len(items), batch_size)]
    return torch.cat(out).float().cpu()


@torch.no_grad()
def reference_rerank_one(reranker: Any, query: dict[str, Any], document: dict[str, Any],
                         instruction: str | None = None) -> float:
    """Official ``Qwen3VLReranker`` for one pair: tokenize([pair]) then compute_scores."""
    pairs = [reranker.conversation(query, document, instruction)]
    text = reranker.processor.apply_chat_template(pairs, tokenize=False, add_generation_prompt=True)
    images, videos, metadata, video_kwargs = _vision(pairs)
    inputs = reranker.processor(text=text, images=images, videos=videos, video_metadata=metadata,
                                truncation=False, padding=False, do_resize=False, **video_kwargs)
    special = set(reranker.processor.tokenizer.all_special_ids)
    for i, ids in enumerate(inputs["input_ids"]):
        head = ids[:-_TAIL_TOKENS]
        kept = truncate_keeping_special(head, reranker.max_length, special)
        inputs["input_ids"][i] = [head[j] for j in kept] + ids[-_TAIL_TOKENS:]
    padded = reranker.processor.tokenizer.pad({"input_ids": inputs["input_ids"]}, padding=True,
                                              return_tensors="pt", max_length=reranker.max_length)
    batch = {k: torch.as_tensor(inputs[k]) for k in ("pixel_values", "image_grid_thw", "pixel_values_videos",
                                                     "video_grid_thw") if k in inputs}
    batch.update(padded)
    batch = {k: v.to(reranker.device) for k, v in batch.items()}
    hidden = reranker.model(**batch).last_hidden_state[:, -1]
    return float(torch.sigmoid(hidden.float() @ reranker.score_vector)[0])


def reference_rerank(reranker: Any, query: dict[str, Any], documents: Sequence[dict[str, Any]],
                     instruction: str | None = None) -> list[float]:
    """Official ``process``: one pair at a time, in order."""
    with stock_model(reranker):
        return [reference_rerank_one(reranker, query, d, instruction) for d in documents]
