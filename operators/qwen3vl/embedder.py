"""Qwen3-VL-Embedding: exact reference vectors, batched by token budget, with per-item failures."""

from __future__ import annotations

import numbers
import time
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .formatting import DEFAULT_EMBED_INSTRUCTION, VisionSettings, embed_conversation
from .loading import Qwen3VLForEmbedding
from .preprocess import (InputError, Prepared, check_window, collate, describe_error, render_prompt,
                         resolved_sources, run_processor, token_budget_batches)
from .runner import Qwen3VLRunner, check_inputs


@dataclass
class EmbedStats:
    """Where embed() spent its time (seconds) and how much padding it ran; cumulative until reset()."""

    wait_prepare_s: float = 0.0  # waiting for preparation the model could not overlap
    collate_s: float = 0.0  # padding, concatenating and copying batches to the device
    forward_s: float = 0.0  # the model and pooling (on a GPU: launching them, and waiting for the results)
    batches: int = 0
    padded_tokens: int = 0
    real_tokens: int = 0

    def add(self, **amounts: float) -> None:
        """Add to the counters."""
        for k, v in amounts.items():
            setattr(self, k, getattr(self, k) + v)

    def reset(self) -> None:
        """Zero every counter."""
        self.__init__()  # type: ignore[misc]


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
        if not isinstance(dim, numbers.Integral) or isinstance(dim, bool) or not 1 <= dim <= t.shape[-1]:
            raise ValueError(f"dim must be an integer in 1..{t.shape[-1]} (the model's hidden size), got {dim!r}")
        t = t[..., :int(dim)]  # numpy integers too (dims read from arrays or configs)
    if normalize:
        t = F.normalize(t.float(), p=2, dim=-1)
    return t.numpy() if is_numpy else t


class Qwen3VLEmbedder(Qwen3VLRunner):
    """Embeds text, images, videos and mixed inputs exactly as the official Qwen3-VL-Embedding does."""

    def __init__(self, model_name_or_path: str, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, attn_implementation: str | None = None,
                 max_length: int = 8192, min_pixels: int = 4096, max_pixels: int = 1843200,
                 total_pixels: int = 7864320, fps: float = 1.0, max_frames: int = 64,
                 default_instruction: str = DEFAULT_EMBED_INSTRUCTION, token_budget: int = 16384,
                 max_batch_items: int = 64, prepare_workers: int | None = None,
                 prepare_processes: int | None = None, storage_options: dict[str, Any] | None = None,
                 revision: str | None = None, window_mib: int | None = None, **model_kwargs: Any) -> None:
        super().__init__(Qwen3VLForEmbedding, model_name_or_path, dtype=dtype, device=device, revision=revision,
                         attn_implementation=attn_implementation, padding_side="right", max_length=max_length,
                         vision=VisionSettings(min_pixels, max_pixels, total_pixels, fps, max_frames),
                         default_instruction=default_instruction, token_budget=token_budget,
                         max_batch_items=max_batch_items, prepare_workers=prepare_workers,
                         storage_options=storage_options, thread_name="qvl-prepare",
                         prepare_processes=prepare_processes, window_mib=window_mib, **model_kwargs)
        self.hidden_size = int(self.model.config.text_config.hidden_size)
        self.stats = EmbedStats()

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
        with resolved_sources(self.conversation(item), self._video_files, self.storage_options) as conversation:
            prompt = render_prompt(self.processor, conversation)
            ids, vision, extra = run_processor(self.processor, prompt, conversation, **self.text_kwargs())
        return self.finish(ids, vision, extra, prompt)

    def text_kwargs(self) -> dict[str, Any]:
        """Truncated to max_length, as the reference embedder does; never padded (batches pad themselves)."""
        return {"truncation": True, "max_length": self.max_length, "padding": False}

    # -- compute -------------------------------------------------------------------------
    def _collate(self, items: Sequence[Prepared]) -> dict[str, torch.Tensor]:
        """One batch padded and concatenated on the host."""
        t0 = time.perf_counter()
        batch = collate(items, self.processor.tokenizer.pad_token_id, padding_side="right")
        self.stats.add(collate_s=time.perf_counter() - t0)
        return batch

    @torch.inference_mode()
    def _launch(self, items: Sequence[Prepared], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled float32 vectors of a collated batch, left on the device (a GPU may still be computing them)."""
        t0 = time.perf_counter()
        batch = self.to_device(batch)
        t1 = time.perf_counter()
        mask = batch["attention_mask"]
        # Right padding: the last attended position is the tokenizer-appended end token.
        last = mask.shape[1] - 1 - mask.flip(dims=[1]).argmax(dim=1)
        pooled = self.hidden_at(batch, last, use_cache=False).float()
        self.stats.add(collate_s=t1 - t0, forward_s=time.perf_counter() - t1, batches=1,
                       padded_tokens=mask.numel(), real_tokens=sum(p.num_tokens for p in items))
        return pooled

    def _launch_isolating(self, items: list[Prepared], batch: dict[str, torch.Tensor]) -> list[torch.Tensor | str]:
        try:
            return list(self._launch(items, batch))
        except Exception as exc:
            if len(items) == 1:
                return [describe_error(exc)]
            # Find which item breaks the batch; the others still get vectors.
            return [r for p in items for r in self._launch_isolating([p], self._collate([p]))]

    def _store(self, launched: list[tuple[EmbedResult, torch.Tensor | str]], dim: int | None,
               normalize: bool) -> None:
        """Bring launched vectors to the host (waiting for the device) and put them in their results."""
        t0 = time.perf_counter()
        rows = [out for _, out in launched if not isinstance(out, str)]
        host = iter(reduce_dim(torch.stack(rows).cpu(), dim, normalize).numpy() if rows else ())
        for r, out in launched:
            if isinstance(out, str):
                r.error = out
            else:
                r.vector = next(host)
        self.stats.add(forward_s=time.perf_counter() - t0)

    def embed(self, inputs: Sequence[dict[str, Any]], *, normalize: bool = True,
              dim: int | None = None, window: int = 256, first_window: int | None = None) -> list[EmbedResult]:
        """Per input, its vector or its error, in input order; batches cut by token budget.

        first_window: items prepared before the first forward; None = 32 on a GPU (start it
        soon; later windows double up to ``window``), ``window`` on a CPU (the model already
        fills the cores, and larger windows sort and pad better). A window is also cut where its
        inputs would hold more than about ``window_mib`` once prepared (estimated per kind of
        input: operators/qwen3vl/windows.py), once it holds enough to fill one forward batch.
        """
        if dim is not None:
            reduce_dim(torch.zeros(1, self.hidden_size), dim)  # validate before any work
        check_window("window", window)
        check_window("first_window", first_window)
        inputs = list(check_inputs(inputs, "inputs"))
        self.model_threads()
        results = [EmbedResult(i) for i in range(len(inputs))]
        if first_window is None:
            first_window = 32 if self.device.type == "cuda" else window
        windows = self.windows(inputs, first_window, window, self.weights.estimate)

        def submit() -> tuple[list[int], list[Future]]:
            idx = windows.next()
            return idx, [self.submit_prepare(inputs[i]) for i in idx]

        idx, pending = submit()
        launched: list[tuple[EmbedResult, torch.Tensor | str]] = []
        while idx:
            t0 = time.perf_counter()
            prepared = [f.result() for f in pending]
            self.stats.add(wait_prepare_s=time.perf_counter() - t0)
            ok = [(i, p) for i, p in zip(idx, prepared) if isinstance(p, Prepared)]
            for i, p in zip(idx, prepared):
                if not isinstance(p, Prepared):
                    results[i].error = p
            for i, p in ok:
                self.weights.learn(inputs[i], nbytes=p.nbytes, tokens=p.num_tokens)
            # Prepare the next window while this one runs through the model.
            next_idx, pending = submit()
            lengths = [p.num_tokens for _, p in ok]
            for batch in token_budget_batches(lengths, self.token_budget, self.max_batch_items):
                items = [ok[b][1] for b in batch]
                collated = self._collate(items)
                # Only now wait for the batch launched before: a GPU computes it while this thread
                # collates the next one (copying results back waits for everything queued before it).
                self._store(launched, dim, normalize)
                launched = list(zip([results[ok[b][0]] for b in batch], self._launch_isolating(items, collated)))
            idx = next_idx
        self._store(launched, dim, normalize)
        return results

    def process(self, inputs: Sequence[dict[str, Any]], *, normalize: bool = True,
                dim: int | None = None) -> torch.Tensor:
        """Embeddings (n, d) as float32; raises InputError naming the first failing input."""
        results = self.embed(inputs, normalize=normalize, dim=dim)
        for r in results:
            if not r.ok:
                raise InputError(r.index, r.error or "unknown error")
        if not results:
            return torch.empty(0, dim or self.hidden_size)
        return torch.from_numpy(np.stack([r.vector for r in results]))

