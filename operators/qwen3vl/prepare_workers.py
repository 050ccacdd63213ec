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

import logging
import multiprocessing
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable

import numpy as np
import torch

from .preprocess import Prepared

log = logging.getLogger(__name__)
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
    """A spawn-started process pool that prepares items with a light copy of a runner.

    If the pool breaks (a worker killed or crashed, or a script without the
    ``if __name__ == "__main__":`` guard that spawned processes need), the pending and later
    items are prepared by ``fallback`` (the runner's threads) instead of failing.
    """

    def __init__(self, processes: int, state: dict[str, Any],
                 fallback: Callable[..., Future]) -> None:
        # spawn, not fork: the parent may hold a CUDA context, which forked children cannot use.
        self._pool = ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                         initializer=_init_worker, initargs=(state,))
        self._fallback = fallback
        self.broken: str | None = None  # why the pool broke, once it has

    def submit(self, *args: Any) -> Future:
        """A future of the prepared item (or its error string) for these prepare() arguments."""
        if self.broken is not None:
            return self._fallback(*args)
        outer: Future = Future()

        def done(f: Future) -> None:
            try:
                outer.set_result(unpack(f.result()))
                return
            except BrokenProcessPool as exc:
                self._broke(exc)
            except Exception as exc:  # e.g. a result that cannot be unpickled: this item fails
                outer.set_result(f"preparation worker failed: {type(exc).__name__}: {exc}")
                return
            self._fallback(*args).add_done_callback(lambda g: outer.set_result(g.result()))

        try:
            self._pool.submit(_prepare, args).add_done_callback(done)
        except BrokenProcessPool as exc:
            self._broke(exc)
            return self._fallback(*args)
        return outer

    def _broke(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = f"{type(exc).__name__}: {exc}"
            log.warning("preparation worker processes stopped (%s); preparing in threads from now on. "
                        "A script that starts an embedder on a GPU needs the `if __name__ == \"__main__\":` "
                        "guard, or prepare_processes=0.", self.broken)

    def shutdown(self) -> None:
        """Stop the workers."""
        self._pool.shutdown(wait=False, cancel_futures=True)
