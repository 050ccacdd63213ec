"""Per-item preparation in worker processes: decoding, resizing and the HF processor off the GIL.

On a GPU the model thread launches thousands of kernels per batch, each needing the GIL;
preparation threads (chat template, qwen-vl-utils, the image processor's Python) hold the
same GIL, so threads neither prepare in parallel nor let the GPU run while they work
(bench/RESULTS.md: on an H200 our embedder ran at about prep + forward, not their maximum).
Worker processes prepare in parallel and leave the model thread its interpreter.

Each worker builds a light copy of the embedder or reranker (its settings and processor, the
model config for the rotary positions, no weights) and returns items as plain arrays, which
cross the pipe without shared-memory handles.
"""

from __future__ import annotations

import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import torch

from .preprocess import Prepared

_WORKER: Any = None  # the light runner of this worker process


class _RopeOnly:
    """Stands in for the model inside a worker: get_rope_index needs only the config."""

    def __init__(self, config: Any) -> None:
        self.config = config

    def get_rope_index(self, *args: Any) -> Any:
        """Qwen3VLModel.get_rope_index on this config."""
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

        return Qwen3VLModel.get_rope_index(self, *args)  # type: ignore[arg-type]


def _pack_tensor(t: torch.Tensor) -> tuple[str, np.ndarray]:
    if t.dtype == torch.bfloat16:  # numpy has no bfloat16: ship the bits
        return "bfloat16", t.contiguous().view(torch.int16).numpy()
    return str(t.dtype).removeprefix("torch."), t.contiguous().numpy()


def _unpack_tensor(packed: tuple[str, np.ndarray]) -> torch.Tensor:
    dtype, array = packed
    t = torch.from_numpy(array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def pack(p: Prepared | str) -> Any:
    """A picklable form of a prepared item (or its error string)."""
    if isinstance(p, str):
        return p
    return (p.input_ids, {k: _pack_tensor(v) for k, v in p.vision.items()}, p.extra, p.prompt,
            None if p.positions is None else _pack_tensor(p.positions))


def unpack(packed: Any) -> Prepared | str:
    """The prepared item (or error string) that pack() was given."""
    if isinstance(packed, str):
        return packed
    ids, vision, extra, prompt, positions = packed
    return Prepared(ids, {k: _unpack_tensor(v) for k, v in vision.items()}, extra, prompt,
                    None if positions is None else _unpack_tensor(positions))


def _init_worker(state: dict[str, Any]) -> None:
    global _WORKER
    torch.set_num_threads(1)  # the workers are the parallelism; no nested intra-op pools
    _WORKER = state["cls"].for_preparation(state)


def _prepare(args: tuple[Any, ...]) -> Any:
    return pack(_WORKER._safe_prepare(*args))


class PrepareProcesses:
    """A spawn-started process pool that prepares items with a light copy of a runner."""

    def __init__(self, processes: int, state: dict[str, Any]) -> None:
        # spawn, not fork: the parent may hold a CUDA context, which forked children cannot use.
        self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(state,))

    def submit(self, *args: Any) -> Future:
        """A future of the prepared item (or its error string) for these prepare() arguments."""
        outer: Future = Future()

        def done(f: Future) -> None:
            try:
                outer.set_result(unpack(f.result()))
            except Exception as exc:  # a dead worker: this item fails, with the reason
                outer.set_result(f"preparation worker failed: {type(exc).__name__}: {exc}")

        self._pool.submit(_prepare, args).add_done_callback(done)
        return outer

    def shutdown(self) -> None:
        """Stop the workers."""
        self._pool.shutdown(wait=False, cancel_futures=True)
