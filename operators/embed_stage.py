"""The Ray Data embedding stage: a callable class run in a fixed-size actor pool.

Input rows follow operators.units.ROW_COLUMNS. Unit rows get one vector column per
named vector (`vec_full`, `vec_mrl_<d>`), L2-normalised; a unit that fails here
becomes a dead row (never an exception). Other rows pass through. Image bytes are
dropped after this stage: only vectors and payloads travel on to the sink.

A unit that crashes a native decoder kills the actor's process (one that hangs it past
limits.max_embed_batch_s gets it killed); Ray restarts the actor and retries the batch,
which then runs one unit at a time, so that the culprit is named and becomes a dead row
on the next retry (operators/crash_journal.py).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from .crash_journal import CRASH_ERROR_TYPE, WHOLE_BATCH, TaskGuard, batch_key
from .model_actor import ClosesModel
from .qwen3vl.embedder import EmbedResult, Qwen3VLEmbedder, reduce_dim
from .qwen3vl.prepare_workers import WORKER_DIED
from .units import model_input_from_row

_INPUT_COLUMNS = ("text", "image", "video", "video_start", "video_end")
_TEXT_COLUMNS = {"row_kind", "point_id", "object_uri", "fingerprint", "position", "modality", "text", "video",
                 "payload", "status", "error_stage", "error_type", "error_message"}


def vector_column(dim: int | None) -> str:
    """Column name of the full vector (dim None) or of one MRL-reduced vector."""
    return "vec_full" if dim is None else f"vec_mrl_{dim}"


@dataclass
class _Crashed(EmbedResult):
    """A unit left out because it killed or hung the actor's process (its dead letter says so)."""

    error_type: str = CRASH_ERROR_TYPE


class EmbedStage(ClosesModel):
    """Loads the embedder once per actor and embeds the unit rows of each batch."""

    def __init__(self, model: str, mrl_dims: list[int], embedder_kwargs: dict[str, Any] | None = None,
                 crash_journal: Any = None, max_batch_s: float | None = None) -> None:
        self.embedder = Qwen3VLEmbedder(model, **(embedder_kwargs or {}))
        self.crash_journal = crash_journal
        self.max_batch_s = max_batch_s  # with a journal: a batch (after a crash, a unit) that runs longer is stopped
        self.embedder.use_every_core()  # on a CPU: Ray starts actors with one thread
        self.mrl_dims = list(mrl_dims)
        for d in self.mrl_dims:  # a bad dimension fails the actor at start, before any row
            reduce_dim(np.zeros((1, self.embedder.hidden_size), np.float32), d)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        """Embed the batch's unit rows; carry the other rows through."""
        start = time.perf_counter()
        kinds = batch["row_kind"]
        n = len(kinds)
        live = [i for i in range(n) if kinds[i] == "unit"]
        inputs = [model_input_from_row({k: batch[k][i] for k in _INPUT_COLUMNS}) for i in live]
        point_ids = [str(batch["point_id"][i]) for i in live]
        # Keyed by content: Ray Data resubmits a batch whose actor died under a new task id.
        guard = (TaskGuard(self.crash_journal, batch_key(point_ids), self.max_batch_s, "limits.max_embed_batch_s")
                 if self.crash_journal is not None and live else None)
        if guard is None:
            results = self.embedder.embed(inputs, normalize=False)
        elif guard.careful:
            results = self._embed_carefully(inputs, point_ids, guard)
        else:
            with guard.reading(WHOLE_BATCH):  # watched as a whole: a hang makes the retry careful
                results = self.embedder.embed(inputs, normalize=False)

        # numpy batches turn all-None string columns into NaN floats; keep them None.
        out = {k: [x if isinstance(x, str) else None for x in v] if k in _TEXT_COLUMNS
               else list(v) for k, v in batch.items() if k != "image"}
        # Dense (n, d) arrays become tensor columns; non-unit rows keep zeros and are never written.
        vectors = {vector_column(None): np.zeros((n, self.embedder.hidden_size), np.float32)}
        vectors.update({vector_column(d): np.zeros((n, d), np.float32) for d in self.mrl_dims})
        # A vector with a NaN or infinite component (an overflow in a half-precision forward) would
        # reach Qdrant as null and fail its whole write request, and so the run: it fails alone here.
        finite = [not r.ok or bool(np.isfinite(r.vector).all()) for r in results]
        ok = [(i, r.vector) for i, r, fine in zip(live, results, finite) if r.ok and fine]
        if ok:
            rows, raw = [i for i, _ in ok], np.stack([v for _, v in ok])
            for d in (None, *self.mrl_dims):  # one normalisation per dimension, not per row
                vectors[vector_column(d)][rows] = reduce_dim(raw, d)
        for i, r, fine in zip(live, results, finite):
            if not fine:
                out["row_kind"][i], out["error_stage"][i] = "dead", "embed"
                out["error_type"][i] = "NonFiniteVector"
                out["error_message"][i] = ("the model's vector has NaN or infinite components (an overflow in "
                                           f"{str(self.embedder.dtype).removeprefix('torch.')} arithmetic?)")
            elif not r.ok:
                out["row_kind"][i] = "dead"
                out["error_stage"][i] = "embed"
                out["error_type"][i] = (r.error_type if isinstance(r, _Crashed) else
                                        CRASH_ERROR_TYPE if WORKER_DIED in r.error else "InputError")
                out["error_message"][i] = r.error
        per_row = (time.perf_counter() - start) / max(len(live), 1)
        for i in live:
            out["seconds"][i] = per_row
        out.update(vectors)
        if guard is not None:
            guard.end()
        return out

    def _embed_carefully(self, inputs: list[dict[str, Any]], point_ids: list[str],
                         guard: TaskGuard) -> list[EmbedResult]:
        """After this batch killed or hung an actor: one unit at a time, each named first and watched; a unit
        that killed or hung one is skipped.

        So is every unit that reads the same video file: a video's segments all open that file, and
        finding each of them by another crash would spend the batch's retries on one bad file.
        """
        letters = {pid: guard.letter(pid, "preparing or embedding") for pid in point_ids if guard.skip(pid)}
        bad_videos = {item["video"]: letters[pid][0] for item, pid in zip(inputs, point_ids)
                      if pid in letters and item.get("video")}
        results: list[EmbedResult] = []
        for k, (item, pid) in enumerate(zip(inputs, point_ids)):
            if pid in letters:
                error_type, message = letters[pid]
                results.append(_Crashed(k, error=message, error_type=error_type))
            elif item.get("video") in bad_videos:
                results.append(_Crashed(k, error=f"skipped: another segment of {item['video']} killed or hung the "
                                                 "worker process", error_type=bad_videos[item["video"]]))
            else:
                with guard.reading(pid):
                    results.append(self.embedder.embed([item], normalize=False)[0])
        return results
