"""Qwen3-VL-Embedding: exact reference vectors, batched by token budget, with per-item failures."""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .formatting import DEFAULT_EMBED_INSTRUCTION, VisionSettings, embed_conversation
from .loading import Qwen3VLForEmbedding, load_model, load_processor, resolve_device, resolve_dtype
from .media_io import VideoFiles
from .preprocess import (InputError, Prepared, chunked, collate, describe_error, render_prompt,
                         resolve_sources, run_processor, to_device, token_budget_batches)


@dataclass
class EmbedResult:
    """One input's outcome: its vector, or the reason it failed."""

    index: int
    vector: np.ndarray | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the input produced a vector."""
        return self.error is None


def reduce_dim(vectors: torch.Tensor | np.ndarray, dim: int | None, normalize: bool = True) -> Any:
    """Matryoshka reduction: keep the first dim components, then L2-normalise."""
    is_numpy = isinstance(vectors, np.ndarray)
    t = torch.from_numpy(vectors) if is_numpy else vectors
    if dim is not None:
        if not isinstance(dim, int) or isinstance(dim, bool) or not 1 <= dim <= t.shape[-1]:
            raise ValueError(f"dim must be an integer in 1..{t.shape[-1]} (the model's hidden size), got {dim!r}")
        t = t[..., :dim]
    if normalize:
        t = F.normalize(t.float(), p=2, dim=-1)
    return t.numpy() if is_numpy else t


class Qwen3VLEmbedder:
    """Embeds text, images, videos and mixed inputs exactly as the official Qwen3-VL-Embedding does."""

    def __init__(self, model_name_or_path: str, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, attn_implementation: str | None = None,
                 max_length: int = 8192, min_pixels: int = 4096, max_pixels: int = 1843200,
                 total_pixels: int = 7864320, fps: float = 1.0, max_frames: int = 64,
                 default_instruction: str = DEFAULT_EMBED_INSTRUCTION, token_budget: int = 16384,
                 max_batch_items: int = 64, prepare_workers: int | None = None,
                 storage_options: dict[str, Any] | None = None, **model_kwargs: Any) -> None:
        self.model_name_or_path = model_name_or_path
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.max_length = max_length
        self.vision = VisionSettings(min_pixels, max_pixels, total_pixels, fps, max_frames)
        self.default_instruction = default_instruction
        self.token_budget = token_budget
        self.max_batch_items = max_batch_items
        self.storage_options = storage_options or {}
        self.processor = load_processor(model_name_or_path, padding_side="right")
        self.model = load_model(Qwen3VLForEmbedding, model_name_or_path, self.device, self.dtype,
                                attn_implementation, **model_kwargs)
        self.hidden_size = int(self.model.config.text_config.hidden_size)
        self._video_files = VideoFiles(self.storage_options)
        self._pool = ThreadPoolExecutor(prepare_workers or min(8, (os.cpu_count() or 2)),
                                        thread_name_prefix="qvl-prepare")

    # -- what the model sees -------------------------------------------------------------
    def conversation(self, item: dict[str, Any]) -> list[dict[str, Any]]:
        """The chat conversation for one input (instruction in the system message)."""
        if not isinstance(item, dict):
            raise TypeError(f"an input must be a dict, got {type(item).__name__}")
        return embed_conversation(item, self.vision, self.default_instruction)

    def prompt(self, item: dict[str, Any]) -> str:
        """The rendered prompt string for one input."""
        return render_prompt(self.processor, self.conversation(item))

    def prepare(self, item: dict[str, Any]) -> Prepared:
        """Token ids and vision tensors for one input (CPU work: decoding, resizing, tokenising)."""
        conversation = resolve_sources(self.conversation(item), self._video_files, self.storage_options)
        prompt = render_prompt(self.processor, conversation)
        ids, vision, extra = run_processor(self.processor, prompt, conversation,
                                           truncation=True, max_length=self.max_length, padding=False)
        return Prepared(ids, vision, extra, prompt)

    # -- compute -------------------------------------------------------------------------
    @torch.inference_mode()
    def embed_prepared(self, items: Sequence[Prepared]) -> torch.Tensor:
        """Pooled (un-normalised, float32) vectors for one batch of prepared items."""
        pad_id = self.processor.tokenizer.pad_token_id
        batch = collate(items, pad_id, padding_side="right")
        batch = to_device(batch, self.device)
        hidden = self.model(**batch).last_hidden_state
        mask = batch["attention_mask"]
        # Right padding: the last attended position is the tokenizer-appended end token.
        last = mask.shape[1] - 1 - mask.flip(dims=[1]).argmax(dim=1)
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return pooled.float().cpu()

    def _safe_prepare(self, item: Any, index: int) -> Prepared | str:
        try:
            return self.prepare(item)
        except Exception as exc:  # one bad item must never fail its neighbours
            return describe_error(exc)

    def _forward_isolating(self, items: list[Prepared]) -> list[torch.Tensor | str]:
        try:
            return list(self.embed_prepared(items))
        except Exception as exc:
            if len(items) == 1:
                return [describe_error(exc)]
            # Find which item breaks the batch; the others still get vectors.
            return [r for p in items for r in self._forward_isolating([p])]

    def embed(self, inputs: Sequence[dict[str, Any]], normalize: bool = True,
              dim: int | None = None, window: int = 256) -> list[EmbedResult]:
        """Per input, its vector or its error, in input order; batches cut by token budget."""
        if dim is not None:
            reduce_dim(torch.zeros(1, self.hidden_size), dim)  # validate before any work
        inputs = list(inputs)
        results = [EmbedResult(i) for i in range(len(inputs))]
        windows = list(chunked(range(len(inputs)), window))

        def submit(idx: list[int]) -> list[Future]:
            return [self._pool.submit(self._safe_prepare, inputs[i], i) for i in idx]

        pending = submit(windows[0]) if windows else []
        for w, idx in enumerate(windows):
            prepared = [f.result() for f in pending]
            # Prepare the next window while this one runs through the model.
            pending = submit(windows[w + 1]) if w + 1 < len(windows) else []
            ok = [(i, p) for i, p in zip(idx, prepared) if isinstance(p, Prepared)]
            for i, p in zip(idx, prepared):
                if not isinstance(p, Prepared):
                    results[i].error = p
            lengths = [p.num_tokens for _, p in ok]
            for batch in token_budget_batches(lengths, self.token_budget, self.max_batch_items):
                outs = self._forward_isolating([ok[b][1] for b in batch])
                for b, out in zip(batch, outs):
                    r = results[ok[b][0]]
                    if isinstance(out, str):
                        r.error = out
                    else:
                        r.vector = reduce_dim(out, dim, normalize).numpy()
        return results

    def process(self, inputs: Sequence[dict[str, Any]], normalize: bool = True,
                dim: int | None = None) -> torch.Tensor:
        """Embeddings (n, d) as float32; raises InputError naming the first failing input."""
        results = self.embed(inputs, normalize=normalize, dim=dim)
        for r in results:
            if not r.ok:
                raise InputError(r.index, r.error or "unknown error")
        if not results:
            return torch.empty(0, dim or self.hidden_size)
        return torch.from_numpy(np.stack([r.vector for r in results]))

    def close(self) -> None:
        """Release worker threads and temporary video copies."""
        self._pool.shutdown(wait=False)
        self._video_files.close()
