"""Qwen3-VL-Reranker: the reference's yes/no relevance score, batched with left padding."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from transformers import Qwen3VLForConditionalGeneration

from .formatting import DEFAULT_RERANK_INSTRUCTION, VisionSettings, rerank_conversation
from .loading import ModelLoadError, load_model, load_processor, resolve_device, resolve_dtype
from .media_io import VideoFiles
from .preprocess import (InputError, Prepared, collate, describe_error, render_prompt, resolve_sources,
                         run_processor, token_budget_batches)

# `<|im_end|>\n<|im_start|>assistant\n`: the tail that must survive truncation.
_TAIL_TOKENS = 5


@dataclass
class ScoreResult:
    """One pair's outcome: its score, or the reason it failed."""

    index: int
    score: float | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        """True when the pair was scored."""
        return self.error is None


def truncate_keeping_special(ids: list[int], max_length: int, special_ids: set[int]) -> list[int]:
    """Indices kept: every special token, then the first non-special tokens that fit max_length."""
    if len(ids) <= max_length:
        return list(range(len(ids)))
    budget = max_length - sum(1 for t in ids if t in special_ids)
    kept, used = [], 0
    for i, t in enumerate(ids):
        if t in special_ids:
            kept.append(i)
        elif used < budget:
            kept.append(i)
            used += 1
    return kept


class Qwen3VLReranker:
    """Scores (query, document) pairs exactly as the official Qwen3-VL-Reranker does."""

    def __init__(self, model_name_or_path: str, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, attn_implementation: str | None = None,
                 max_length: int = 10240, min_pixels: int = 4096, max_pixels: int = 1843200,
                 total_pixels: int = 7864320, fps: float = 1.0, max_frames: int = 64,
                 default_instruction: str = DEFAULT_RERANK_INSTRUCTION, token_budget: int = 32768,
                 max_batch_items: int = 32, prepare_workers: int | None = None,
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
        self.processor = load_processor(model_name_or_path, padding_side="left")
        lm = load_model(Qwen3VLForConditionalGeneration, model_name_or_path, self.device, self.dtype,
                        attn_implementation, **model_kwargs)
        vocab = self.processor.tokenizer.get_vocab()
        if "yes" not in vocab or "no" not in vocab:
            raise ModelLoadError(f"{model_name_or_path!r}: tokenizer has no plain 'yes'/'no' tokens")
        weight = lm.lm_head.weight.detach()
        # sigmoid(h.(W_yes - W_no)) == softmax over {yes, no}; in float32 so scores do not tie.
        self.score_vector = (weight[vocab["yes"]].float() - weight[vocab["no"]].float()).to(self.device)
        self.model = lm.model
        del lm  # the full LM head is not needed beyond the two rows above
        self._special_ids = set(self.processor.tokenizer.all_special_ids)
        self._video_files = VideoFiles(self.storage_options)
        self._pool = ThreadPoolExecutor(prepare_workers or min(8, (os.cpu_count() or 2)),
                                        thread_name_prefix="qvl-rerank-prepare")

    def conversation(self, query: dict[str, Any], document: dict[str, Any], instruction: str | None = None,
                     fps: float | None = None, max_frames: int | None = None) -> list[dict[str, Any]]:
        """The reranker conversation for one pair."""
        return rerank_conversation(query, document, instruction or self.default_instruction, self.vision,
                                   fps, max_frames)

    def prompt(self, query: dict[str, Any], document: dict[str, Any], instruction: str | None = None) -> str:
        """The rendered prompt string for one pair."""
        return render_prompt(self.processor, self.conversation(query, document, instruction))

    def prepare(self, query: dict[str, Any], document: dict[str, Any], instruction: str | None = None,
                fps: float | None = None, max_frames: int | None = None) -> Prepared:
        """Token ids (truncated as the reference does) and vision tensors for one pair."""
        conversation = resolve_sources(self.conversation(query, document, instruction, fps, max_frames),
                                       self._video_files, self.storage_options)
        prompt = render_prompt(self.processor, conversation)
        ids, vision, extra = run_processor(self.processor, prompt, conversation, truncation=False, padding=False)
        head, tail = ids[:-_TAIL_TOKENS], ids[-_TAIL_TOKENS:]
        kept = truncate_keeping_special(head, self.max_length, self._special_ids)
        if len(kept) < len(head):
            keep_idx = kept + list(range(len(head), len(ids)))
            ids = [ids[i] for i in keep_idx]
            # Per-token fields must follow the ids they describe (transformers >= 5.3).
            extra = {k: [v[i] for i in keep_idx] for k, v in extra.items()}
        else:
            ids = head + tail
        return Prepared(ids, vision, extra, prompt)

    @torch.inference_mode()
    def score_prepared(self, items: Sequence[Prepared]) -> list[float]:
        """Scores for one batch of prepared pairs (left padded, last position)."""
        batch = collate(items, self.processor.tokenizer.pad_token_id, padding_side="left")
        pin = self.device.type == "cuda"
        batch = {k: (v.pin_memory() if pin else v).to(self.device, non_blocking=pin) for k, v in batch.items()}
        hidden = self.model(**batch).last_hidden_state[:, -1]
        return torch.sigmoid(hidden.float() @ self.score_vector).cpu().tolist()

    def _safe_prepare(self, *args: Any) -> Prepared | str:
        try:
            return self.prepare(*args)
        except Exception as exc:  # one bad document must never fail the others
            return describe_error(exc)

    def _score_isolating(self, items: list[Prepared]) -> list[float | str]:
        try:
            return list(self.score_prepared(items))
        except Exception as exc:
            if len(items) == 1:
                return [describe_error(exc)]
            return [r for p in items for r in self._score_isolating([p])]

    def score(self, query: dict[str, Any], documents: Sequence[dict[str, Any]], instruction: str | None = None,
              fps: float | None = None, max_frames: int | None = None) -> list[ScoreResult]:
        """Per document, its score or its error, in input order."""
        futures = [self._pool.submit(self._safe_prepare, query, doc, instruction, fps, max_frames)
                   for doc in documents]
        prepared = [f.result() for f in futures]
        results = [ScoreResult(i) for i in range(len(prepared))]
        ok = [(i, p) for i, p in enumerate(prepared) if isinstance(p, Prepared)]
        for i, p in enumerate(prepared):
            if not isinstance(p, Prepared):
                results[i].error = p
        for batch in token_budget_batches([p.num_tokens for _, p in ok], self.token_budget, self.max_batch_items):
            for b, out in zip(batch, self._score_isolating([ok[b][1] for b in batch])):
                if isinstance(out, str):
                    results[ok[b][0]].error = out
                else:
                    results[ok[b][0]].score = out
        return results

    def process(self, inputs: dict[str, Any]) -> list[float]:
        """Scores for {"instruction", "query", "documents", "fps"}; raises naming the first failing document."""
        query = inputs.get("query") or {}
        documents = inputs.get("documents") or []
        if not query or not documents:
            return []
        results = self.score(query, documents, inputs.get("instruction"), inputs.get("fps"),
                             inputs.get("max_frames"))
        for r in results:
            if not r.ok:
                raise InputError(r.index, r.error or "unknown error")
        return [float(r.score) for r in results]

    def close(self) -> None:
        """Release worker threads and temporary video copies."""
        self._pool.shutdown(wait=False)
        self._video_files.close()
