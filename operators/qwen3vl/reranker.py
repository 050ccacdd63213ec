"""Qwen3-VL-Reranker: the reference's yes/no relevance score, batched, with the query's prefix computed once.

Every pair of one query starts with the same tokens (system prompt, instruction, query,
often ``\\n<Document>:``). The model is causal, so the keys/values of that shared prefix
do not depend on the document: :meth:`Qwen3VLReranker.score` runs the prefix once
(with the query's images/videos) and then only the documents' suffixes, batched with
right padding on top of the prefix cache expanded to the batch (on a CPU: packed into one
row of real tokens, attending to the prefix and to themselves apart; prefix_attention.py).
Qwen3-VL's 3-D rotary positions (mrope) are computed for each FULL pair sequence with the model's own
``get_rope_index`` and the suffix slice is passed explicitly, so every token sees exactly
the positions and keys/values it sees in the plain path. Scores equal the plain
(left-padded, whole-sequence) path's to float tolerance; ``prefix_cache=False`` turns it off.

The pairs are scored in windows while the next window is prepared: on a GPU they grow from 16
pairs; each is cut at about ``window_mib`` of prepared pairs (windows.py). The prefix is planned
on the first window together with two probe documents, so it ends where documents start and the
later windows' pairs share it too (any that do not take the plain path).
"""

from __future__ import annotations

import threading
import uuid
from concurrent.futures import Future
from dataclasses import dataclass, replace
from typing import Any, Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from transformers import DynamicCache, Qwen3VLForConditionalGeneration

from .formatting import (DEFAULT_RERANK_INSTRUCTION, VisionSettings, check_input, check_instruction,
                         check_rerank_item, media_content, rerank_conversation)
from .loading import ModelLoadError, resolve_device
from .media_io import MediaError
from .prefix_attention import KWARG as PREFIX_PACK
from .prefix_attention import SuffixPack, attention_is_sdpa, install_prefix_attention, suffix_mask
from .preprocess import (InputError, Prepared, VisionCache, cached_image, check_window, collate, describe_error,
                         joined, render_prompt, resolved_sources, rope_positions, run_processor,
                         run_processor_cached, same_tensor, token_budget_batches)
from .runner import Qwen3VLRunner, check_inputs
from .windows import Tally, Weigh, input_kind

# `<|im_end|>\n<|im_start|>assistant\n`: the tail that must survive truncation.
_TAIL_TOKENS = 5
# Two documents that differ in their first token: their common prefix with the query is where
# any document starts, so a prefix planned on the first pairs never reaches into document text.
_PROBE_DOCUMENTS = ({"text": "0"}, {"text": "1"})


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


@dataclass
class _PrefixPlan:
    """The shared prefix of one query's pairs: its length and the query vision items it holds whole."""

    length: int
    n_images: int  # leading rows of image_grid_thw (the query's images) inside the prefix
    n_videos: int  # leading rows of video_grid_thw (the query's videos) inside the prefix
    image_rows: int  # leading rows of pixel_values belonging to those images
    video_rows: int  # leading rows of pixel_values_videos belonging to those videos


@dataclass
class _SharedPrefix:
    """A planned prefix with its keys/values, and the pair it was taken from."""

    plan: _PrefixPlan
    ids: list[int]
    ref: Prepared
    kv: list[tuple[torch.Tensor, torch.Tensor]]


def _pair_arguments(args: tuple[Any, ...]) -> list[Any]:
    """prepare()'s six arguments (query, document, instruction, fps, max_frames, query_scope), defaults filled."""
    return (list(args) + [None] * 6)[:6]


def _common_prefix_length(seqs: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix shared by every sequence."""
    ref = np.asarray(seqs[0], dtype=np.int64)
    length = min(len(x) for x in seqs)
    for x in seqs[1:]:
        if length == 0:
            break
        diff = np.nonzero(np.asarray(x[:length], dtype=np.int64) != ref[:length])[0]
        if diff.size:
            length = int(diff[0])
    return length


def _vision_spans(ids: np.ndarray, pad_id: int, grid: torch.Tensor | None, merge: int) -> list[tuple[int, int]]:
    """(first, last) token position of each vision item's placeholder tokens, in grid order."""
    if grid is None or grid.numel() == 0:
        return []
    positions = np.nonzero(ids == pad_id)[0]
    sizes = (grid.prod(dim=-1) // (merge * merge)).tolist()
    spans, start = [], 0
    for n in sizes:
        if n <= 0 or start + n > len(positions):
            raise ValueError("vision placeholders do not match the grid")
        spans.append((int(positions[start]), int(positions[start + n - 1])))
        start += n
    if start != len(positions):
        raise ValueError("vision placeholders do not match the grid")
    return spans


class Qwen3VLReranker(Qwen3VLRunner):
    """Scores (query, document) pairs exactly as the official Qwen3-VL-Reranker does."""

    def __init__(self, model_name_or_path: str, *, dtype: str | torch.dtype | None = None,
                 device: str | torch.device | None = None, attn_implementation: str | None = None,
                 max_length: int = 10240, min_pixels: int = 4096, max_pixels: int = 1843200,
                 total_pixels: int = 7864320, fps: float = 1.0, max_frames: int = 64,
                 default_instruction: str = DEFAULT_RERANK_INSTRUCTION, token_budget: int = 32768,
                 max_batch_items: int | None = None, prepare_workers: int | None = None,
                 prepare_processes: int | None = None, storage_options: dict[str, Any] | None = None,
                 prefix_cache: bool = True, revision: str | None = None, window_mib: int | None = None,
                 **model_kwargs: Any) -> None:
        # Pairs per forward batch. On a CPU, batches of ~16 run faster than 32 (smaller activations stay
        # in cache; bench/RESULTS.md); a GPU wants larger ones.
        on_gpu = resolve_device(device).type == "cuda"
        super().__init__(Qwen3VLForConditionalGeneration, model_name_or_path, dtype=dtype, device=device,
                         revision=revision,
                         attn_implementation=attn_implementation, padding_side="left", max_length=max_length,
                         vision=VisionSettings(min_pixels, max_pixels, total_pixels, fps, max_frames),
                         default_instruction=default_instruction, token_budget=token_budget,
                         max_batch_items=max_batch_items or (64 if on_gpu else 16),
                         prepare_workers=prepare_workers, storage_options=storage_options,
                         thread_name="qvl-rerank-prepare", prepare_processes=prepare_processes,
                         window_mib=window_mib, **model_kwargs)
        self.prefix_cache = prefix_cache
        # Length of the shared prefix the last score() call reused (0: it took the plain path).
        self.last_prefix_length = 0
        vocab = self.processor.tokenizer.get_vocab()
        if "yes" not in vocab or "no" not in vocab:
            raise ModelLoadError(f"{model_name_or_path!r}: tokenizer has no plain 'yes'/'no' tokens")
        lm = self.model
        weight = lm.lm_head.weight.detach()
        # sigmoid(h.(W_yes - W_no)) == softmax over {yes, no}; in float32 so scores do not tie.
        self.score_vector = (weight[vocab["yes"]].float() - weight[vocab["no"]].float()).to(self.device)
        self.model = lm.model
        del lm, weight  # the full LM head is not needed beyond the two rows above
        config = self.model.config
        self._image_id = int(config.image_token_id)
        self._video_id = int(config.video_token_id)
        self._merge = int(config.vision_config.spatial_merge_size)
        # On a CPU, suffix batches run packed and attend to the prefix and to themselves apart
        # (prefix_attention.py); the final layer's read-positions path reads them back.
        self.split_prefix_attention = self.read_positions_only and install_prefix_attention(self.model, self.device)
        self._light_init()

    def text_kwargs(self) -> dict[str, Any]:
        """Untruncated (prepare() truncates, keeping special tokens and the answer tail); never padded."""
        return {"truncation": False, "padding": False}

    def _light_init(self) -> None:
        self._special_ids = set(self.processor.tokenizer.all_special_ids)
        self._vision_cache = VisionCache()
        self._cache_scope: Hashable | None = None
        self._scope_lock = threading.Lock()

    def _enter_scope(self, scope: Hashable | None) -> None:
        """The vision cache holds one score() call's query images: the first pair of a new call drops
        the last call's, whose keys no later call can use (its pixels, hundreds of MiB for large
        query images, stayed until 16 newer entries pushed them out). Calls running at once on one
        reranker still get right results; they only process their query images again."""
        if scope is None or scope == self._cache_scope:
            return
        with self._scope_lock:
            if scope != self._cache_scope:
                self._vision_cache.clear()
                self._cache_scope = scope

    def conversation(self, query: dict[str, Any], document: dict[str, Any], instruction: str | None = None,
                     fps: float | None = None, max_frames: int | None = None) -> list[dict[str, Any]]:
        """The reranker conversation for one pair."""
        return rerank_conversation(query, document, instruction or self.default_instruction, self.vision,
                                   fps, max_frames)

    def prompt(self, query: dict[str, Any], document: dict[str, Any], instruction: str | None = None) -> str:
        """The rendered prompt string for one pair."""
        return render_prompt(self.processor, self.conversation(query, document, instruction))

    def prepare(self, query: dict[str, Any], document: dict[str, Any], instruction: str | None = None,
                fps: float | None = None, max_frames: int | None = None,
                query_scope: Hashable | None = None) -> Prepared:
        """Token ids (truncated as the reference does) and vision tensors for one pair.

        query_scope: pairs prepared with the same scope share one processing of the query's images
        (score() gives each call its own scope, so a query image is read once per call).
        """
        if not isinstance(document, Mapping):
            raise TypeError(f"a document must be a dict such as {{'text': ...}}, got {type(document).__name__}")
        raw = self.conversation(query, document, instruction, fps, max_frames)
        keys = self._cache_keys(raw, query, fps, max_frames, query_scope)
        if keys is not None:
            self._enter_scope(query_scope)
            prompt = render_prompt(self.processor, raw)  # sources do not enter the prompt string
            ids, vision, extra = run_processor_cached(self.processor, prompt, raw, self.storage_options,
                                                      self._vision_cache, keys, self.dtype,
                                                      **self.text_kwargs())
        else:
            with resolved_sources(raw, self._video_files, self.storage_options) as conversation:
                prompt = render_prompt(self.processor, conversation)
                ids, vision, extra = run_processor(self.processor, prompt, conversation, **self.text_kwargs())
        head, tail = ids[:-_TAIL_TOKENS], ids[-_TAIL_TOKENS:]
        kept = truncate_keeping_special(head, self.max_length, self._special_ids)
        if len(kept) < len(head):
            keep_idx = kept + list(range(len(head), len(ids)))
            ids = [ids[i] for i in keep_idx]
            # Per-token fields must follow the ids they describe (transformers >= 5.3).
            extra = {k: [v[i] for i in keep_idx] for k, v in extra.items()}
        else:
            ids = head + tail
        return self.finish(ids, vision, extra, prompt)

    def _cache_keys(self, raw: list[dict[str, Any]], query: dict[str, Any], fps: float | None,
                    max_frames: int | None, query_scope: Hashable | None) -> list[Hashable | None] | None:
        """Per image of the pair, its cache key (the query's images) or None; None when nothing is cached."""
        if query_scope is None or any(e.get("type") == "video" for m in raw for e in m["content"]):
            return None
        n_images = sum(1 for m in raw for e in m["content"] if e.get("type") == "image")
        n_query = sum(1 for e in media_content(query, self.vision, fps, max_frames) if e.get("type") == "image")
        return [(query_scope, i) if i < n_query else None for i in range(n_images)]

    def detach_shared(self, item: Prepared, args: tuple[Any, ...]) -> tuple[Prepared, Any]:
        """In a worker: the pair less its query images' pixel rows, which the model process processes once.

        An 896x672 query image is 7 MB of bf16 pixels in every one of its pairs; the model process
        rebuilds them from its own single processing of that image (attach_shared).
        """
        query, document, instruction, fps, max_frames, scope = _pair_arguments(args)
        raw = self.conversation(query, document, instruction, fps, max_frames)
        n = sum(k is not None for k in self._cache_keys(raw, query, fps, max_frames, scope) or ())
        if not n or "image_grid_thw" not in item.vision:
            return item, None
        rows = int(item.vision["image_grid_thw"][:n].prod(dim=-1).sum())
        return replace(item, vision={**item.vision, "pixel_values": item.vision["pixel_values"][rows:]}), (n, rows)

    def attach_shared(self, item: Prepared, marker: Any, args: tuple[Any, ...]) -> Prepared:
        """In the model process: the pair's query pixel rows put back, processed here once per score() call."""
        n, rows = marker
        query, _, _, fps, max_frames, scope = _pair_arguments(args)
        # The query's images lead the pair's (rerank_conversation), keyed as prepare() keys them.
        entries = [e for e in media_content(query, self.vision, fps, max_frames) if e.get("type") == "image"][:n]
        keys = [(scope, i) for i in range(len(entries))]
        self._enter_scope(scope)

        def query_rows() -> tuple[torch.Tensor, torch.Tensor]:
            parts = [cached_image(self.processor, e, self.storage_options, self._vision_cache, k, self.dtype)
                     for k, e in zip(keys, entries)]
            return joined([p for p, _ in parts]), joined([g for _, g in parts])

        pixels, grids = self._vision_cache.get(("in model dtype", tuple(keys), self.dtype), query_rows)
        if len(keys) != n or pixels.shape[0] != rows or not torch.equal(grids, item.vision["image_grid_thw"][:n]):
            raise ValueError("the query's images here differ from the preparation worker's")
        rest = item.vision["pixel_values"]
        # A document without images gets the query's rows themselves (no copy, and no cost to compare).
        return replace(item, vision={**item.vision, "pixel_values": torch.cat([pixels, rest]) if len(rest) else pixels})

    @torch.inference_mode()
    def score_prepared(self, items: Sequence[Prepared]) -> list[float]:
        """Scores for one batch of prepared pairs (left padded, last position)."""
        batch = self.to_device(collate(items, self.processor.tokenizer.pad_token_id, padding_side="left"))
        rows, width = batch["input_ids"].shape
        hidden = self.hidden_at(batch, torch.full((rows,), width - 1, device=self.device), use_cache=False)
        return torch.sigmoid(hidden.float() @ self.score_vector).cpu().tolist()

    # -- prefix reuse ----------------------------------------------------------------------
    def _plan_prefix(self, items: Sequence[Prepared], n_query_images: int, n_query_videos: int) -> _PrefixPlan | None:
        """The longest prefix shared by all pairs that keeps whole query vision items and no document ones.

        None when there is nothing worth sharing or the pairs cannot be split exactly.
        """
        if len(items) < 2 or any(p.extra for p in items):
            # transformers >= 5.3 carries per-token mm_token_type_ids into get_rope_index with a
            # different signature; that version is not what this project pins, so use the plain path.
            return None
        ids = [np.asarray(p.input_ids, dtype=np.int64) for p in items]
        # Every pair keeps at least one suffix token (its score is read at the last one).
        length = min(_common_prefix_length(ids), min(len(x) for x in ids) - 1)
        spans = []
        for p, x in zip(items, ids):
            img = _vision_spans(x, self._image_id, p.vision.get("image_grid_thw"), self._merge)
            vid = _vision_spans(x, self._video_id, p.vision.get("video_grid_thw"), self._merge)
            if len(img) < n_query_images or len(vid) < n_query_videos:
                return None
            spans.append((img, vid))
        changed = True
        while changed and length > 0:
            changed = False
            for img, vid in spans:
                for group, n_query in ((img, n_query_images), (vid, n_query_videos)):
                    for k, (first, last) in enumerate(group):
                        # Document items never enter the prefix; query items enter it whole or not at all.
                        cut = first < length if k >= n_query else first < length <= last
                        if cut:
                            length, changed = first, True
        if length <= 0:
            return None
        img0, vid0 = spans[0]
        n_img = sum(1 for _, last in img0 if last < length)
        n_vid = sum(1 for _, last in vid0 if last < length)
        ref = items[0].vision
        rows = {}
        for key, grid_key, n in (("pixel_values", "image_grid_thw", n_img),
                                 ("pixel_values_videos", "video_grid_thw", n_vid)):
            rows[key] = int(ref[grid_key][:n].prod(dim=-1).sum()) if n else 0
            for p in items[1:]:  # the prefix's vision inputs must be the same in every pair
                if n and not (torch.equal(p.vision[grid_key][:n], ref[grid_key][:n])
                              and same_tensor(p.vision[key][:rows[key]], ref[key][:rows[key]])):
                    return None
        return _PrefixPlan(length, n_img, n_vid, rows["pixel_values"], rows["pixel_values_videos"])

    @torch.inference_mode()
    def _run_prefix(self, item: Prepared, plan: _PrefixPlan,
                    positions: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Keys/values of the shared prefix, per layer, shape (1, kv_heads, P, head_dim)."""
        batch: dict[str, torch.Tensor] = {
            "input_ids": torch.tensor([item.input_ids[:plan.length]], dtype=torch.long),
            "attention_mask": torch.ones((1, plan.length), dtype=torch.long),
            "position_ids": positions[:, None, :plan.length].clone(),
        }
        if plan.n_images:
            batch["pixel_values"] = item.vision["pixel_values"][:plan.image_rows]
            batch["image_grid_thw"] = item.vision["image_grid_thw"][:plan.n_images]
        if plan.n_videos:
            batch["pixel_values_videos"] = item.vision["pixel_values_videos"][:plan.video_rows]
            batch["video_grid_thw"] = item.vision["video_grid_thw"][:plan.n_videos]
        out = self.model(**self.to_device(batch), use_cache=True)
        return [(layer.keys, layer.values) for layer in out.past_key_values.layers]

    @torch.inference_mode()
    def score_suffixes(self, items: Sequence[Prepared], positions: Sequence[torch.Tensor], plan: _PrefixPlan,
                       prefix_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> list[float]:
        """Scores for one batch of pairs whose shared prefix is already in prefix_kv (right padded suffixes)."""
        n, p_len = len(items), plan.length
        lengths = [len(p.input_ids) - p_len for p in items]
        width = max(lengths)
        batch: dict[str, torch.Tensor] = {"cache_position": torch.arange(p_len, p_len + width)}
        for key, grid_key, n_skip, row_skip in (
                ("pixel_values", "image_grid_thw", plan.n_images, plan.image_rows),
                ("pixel_values_videos", "video_grid_thw", plan.n_videos, plan.video_rows)):
            grids = [p.vision[grid_key][n_skip:] for p in items if grid_key in p.vision]
            pixels = [p.vision[key][row_skip:] for p in items if key in p.vision]
            if grids and sum(g.shape[0] for g in grids):
                batch[grid_key] = torch.cat(grids, dim=0)
                batch[key] = torch.cat(pixels, dim=0)
        last = torch.tensor(lengths, device=self.device) - 1
        if self.split_prefix_attention and attention_is_sdpa(self.model):
            # One row of the suffixes' real tokens; the full mask is for the final layer's read rows.
            batch["input_ids"] = torch.tensor([[t for p in items for t in p.input_ids[p_len:]]], dtype=torch.long)
            batch["position_ids"] = torch.cat([full[:, p_len:] for full in positions], dim=1)[:, None, :]
            batch["attention_mask"] = suffix_mask(lengths, p_len, width)
            hidden = self.hidden_at(self.to_device(batch), last, use_cache=False,
                                    **{PREFIX_PACK: SuffixPack(prefix_kv, lengths)})
            return torch.sigmoid(hidden.float() @ self.score_vector).cpu().tolist()
        ids = torch.full((n, width), self.processor.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((n, p_len + width), dtype=torch.long)
        mask[:, :p_len] = 1
        pos = torch.zeros((positions[0].shape[0], n, width), dtype=torch.long)
        for row, (p, s, full) in enumerate(zip(items, lengths, positions)):
            ids[row, :s] = torch.tensor(p.input_ids[p_len:], dtype=torch.long)
            mask[row, p_len:p_len + s] = 1
            pos[:, row, :s] = full[:, p_len:]
        batch.update(input_ids=ids, attention_mask=mask, position_ids=pos)
        cache = DynamicCache(ddp_cache_data=[(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prefix_kv])
        hidden = self.hidden_at(self.to_device(batch), last, past_key_values=cache, use_cache=True)
        return torch.sigmoid(hidden.float() @ self.score_vector).cpu().tolist()

    def _score_isolating(self, items: list[Prepared]) -> list[float | str]:
        try:
            return list(self.score_prepared(items))
        except Exception as exc:
            if len(items) == 1:
                return [describe_error(exc)]
            return [r for p in items for r in self._score_isolating([p])]

    def score(self, query: dict[str, Any], documents: Sequence[dict[str, Any]], instruction: str | None = None,
              fps: float | None = None, max_frames: int | None = None,
              first_window: int | None = None) -> list[ScoreResult]:
        """Per document, its score or its error, in input order.

        first_window: pairs prepared before the first forward; None = 16 on a GPU (later windows
        double, and are scored while the next one is prepared), all of them on a CPU (the model
        already fills the cores, and one window sorts and pads best). Every window is also cut
        where its pairs would hold more than about ``window_mib`` once prepared, once it holds
        enough to fill one forward batch.
        """
        if not isinstance(query, Mapping):
            raise TypeError(f"query must be a dict such as {{'text': ...}}, got {type(query).__name__}")
        try:
            check_input(query)
            check_rerank_item(query, "query")
        except (TypeError, ValueError) as exc:
            raise type(exc)(f"query: {exc}") from None
        check_instruction(instruction)
        check_input({"fps": fps, "max_frames": max_frames})  # the call's, for every video of every pair
        check_window("first_window", first_window)
        self.model_threads()
        documents = list(check_inputs(documents, "documents"))
        scope = uuid.uuid4().hex  # this call's query images are processed once, for all its pairs
        if first_window is None:
            first_window = 16 if self.device.type == "cuda" else len(documents)
        weigh, learn = self._pair_weights(query, max_frames)
        windows = self.windows(documents, first_window, 256, weigh)

        def submit() -> tuple[list[int], list[Future]]:
            idx = windows.next()
            return idx, [self.submit_prepare(query, documents[i], instruction, fps, max_frames, scope) for i in idx]

        idx, pending = submit()
        use_prefix = self.prefix_cache and len(documents) >= 2
        probes = [self.submit_prepare(query, doc, instruction, fps, max_frames, scope)
                  for doc in (_PROBE_DOCUMENTS if use_prefix else ())]
        results = [ScoreResult(i) for i in range(len(documents))]
        self.last_prefix_length = 0
        shared: _SharedPrefix | None = None
        first = True
        while idx:
            ok = []
            for i, f in zip(idx, pending):
                p = f.result()
                if isinstance(p, Prepared):
                    ok.append((i, p))
                    learn(documents[i], p)
                else:
                    results[i].error = p
            # Prepare the next window while this one is scored.
            next_idx, pending = submit()
            if first and use_prefix:
                planned = [p for _, p in ok] + [p for p in (f.result() for f in probes) if isinstance(p, Prepared)]
                shared = self._open_prefix(query, planned, fps, max_frames)
                self.last_prefix_length = shared.plan.length if shared else 0
            if shared is None:
                self._score_plain(ok, results)
            else:
                # The plan already checked the first window's pairs (3.6 MB of query pixels each, for a 448x336 image).
                shares = [first or self._shares_prefix(p, shared) for _, p in ok]
                self._score_on_prefix([x for x, s in zip(ok, shares) if s], shared, results)
                self._score_plain([x for x, s in zip(ok, shares) if not s], results)
            idx, first = next_idx, False
        if results and not any(r.ok for r in results):
            reason = self._query_failure(query, instruction, fps, max_frames)
            if reason is not None:  # no document is at fault: say so, instead of failing each one
                raise MediaError(f"query: {reason}")
        return results

    def _pair_weights(self, query: dict[str, Any], max_frames: int | None
                      ) -> tuple[Weigh, Callable[[Any, Prepared], None]]:
        """How much a document's pair with this query will hold once prepared, and how to learn from
        what a prepared pair held (the query's headers read once, each document's once)."""
        weights = self.weights
        # The query's images (not its videos) are processed once per call (the query-scoped cache,
        # attach_shared): a pair with no media of its own holds them as a tensor all such pairs share.
        query_videos = input_kind(query)[1] > 0
        query_tally = weights.tally(query)
        query_tokens = weights.weigh(query_tally, max_frames)[1]
        tallies: dict[int, Tally] = {}  # by id: the call's documents live until it returns

        def shares_pixels(document: Any) -> bool:
            return not query_videos and input_kind(document) == (0, 0)

        def tally(document: Any) -> Tally:
            key = id(document)
            if key not in tallies:
                own = weights.tally(document)
                tallies[key] = own if shares_pixels(document) else query_tally + own
            return tallies[key]

        def weigh(document: Any) -> tuple[float, float]:
            nbytes, tokens = weights.weigh(tally(document), max_frames)
            return (nbytes, tokens + query_tokens) if shares_pixels(document) else (nbytes, tokens)

        def learn(document: Any, prepared: Prepared) -> None:
            if not shares_pixels(document):  # a shared query tensor says nothing of a pair's own bytes
                weights.learn_tally(tally(document), nbytes=prepared.nbytes, tokens=prepared.num_tokens,
                                    max_frames=max_frames)

        return weigh, learn

    def _query_failure(self, query: dict[str, Any], instruction: str | None, fps: float | None,
                       max_frames: int | None) -> str | None:
        """Why the query cannot be prepared with an empty document, if it cannot."""
        item = self._safe_prepare(query, {}, instruction, fps, max_frames, None)
        return None if isinstance(item, Prepared) else item

    def _record(self, results: list[ScoreResult], index: int, out: float | str) -> None:
        if isinstance(out, str):
            results[index].error = out
        else:
            results[index].score = out

    def _score_plain(self, ok: list[tuple[int, Prepared]], results: list[ScoreResult]) -> None:
        """Whole pair sequences, left padded, batched by token budget."""
        for batch in token_budget_batches([p.num_tokens for _, p in ok], self.token_budget, self.max_batch_items):
            for b, out in zip(batch, self._score_isolating([ok[b][1] for b in batch])):
                self._record(results, ok[b][0], out)

    def _positions(self, item: Prepared) -> torch.Tensor:
        return item.positions if item.positions is not None else rope_positions(self.backbone, item.input_ids,
                                                                                item.vision)

    def _open_prefix(self, query: dict[str, Any], items: list[Prepared], fps: float | None,
                     max_frames: int | None) -> _SharedPrefix | None:
        """The prefix shared by these pairs, run once; None when the plain path must be used."""
        content = media_content(query, self.vision, fps, max_frames)
        n_query_images = sum(1 for c in content if c.get("type") == "image")
        n_query_videos = sum(1 for c in content if c.get("type") == "video")
        try:
            plan = self._plan_prefix(items, n_query_images, n_query_videos)
            if plan is None:
                return None
            ref = items[0]
            kv = self._run_prefix(ref, plan, self._positions(ref))
        except Exception:
            return None  # e.g. an unusual layout: the plain path scores (or reports) every pair
        return _SharedPrefix(plan, list(ref.input_ids[:plan.length]), ref, kv)

    def _shares_prefix(self, item: Prepared, shared: _SharedPrefix) -> bool:
        """True when the pair starts with the shared prefix: its tokens and the query's vision inputs."""
        plan, ref = shared.plan, shared.ref
        if item.extra or len(item.input_ids) <= plan.length or item.input_ids[:plan.length] != shared.ids:
            return False
        for key, grid_key, n, rows in (("pixel_values", "image_grid_thw", plan.n_images, plan.image_rows),
                                       ("pixel_values_videos", "video_grid_thw", plan.n_videos, plan.video_rows)):
            if n and not (grid_key in item.vision and torch.equal(item.vision[grid_key][:n], ref.vision[grid_key][:n])
                          and same_tensor(item.vision[key][:rows], ref.vision[key][:rows])):
                return False
        return True

    def _score_on_prefix(self, ok: list[tuple[int, Prepared]], shared: _SharedPrefix,
                         results: list[ScoreResult]) -> None:
        """Pairs that share the prefix: only their suffixes run, batched on its keys/values."""
        items = [p for _, p in ok]
        # Batches are cut on what they hold in memory: each row's keys/values cover prefix + suffix.
        for batch in token_budget_batches([p.num_tokens for p in items], self.token_budget, self.max_batch_items):
            try:
                outs: list[float | str] = list(self.score_suffixes(
                    [items[b] for b in batch], [self._positions(items[b]) for b in batch], shared.plan, shared.kv))
            except Exception:
                # Find the pair that breaks the batch: the plain path scores or explains each one.
                outs = [r for b in batch for r in self._score_isolating([items[b]])]
            for b, out in zip(batch, outs):
                self._record(results, ok[b][0], out)

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

