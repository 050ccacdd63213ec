"""Per-item preparation in worker processes: decoding, resizing and the HF processor off the GIL.

On a GPU the model thread launches thousands of kernels per batch, each needing the GIL;
preparation threads (chat template, qwen-vl-utils, the image processor's Python) hold the
same GIL, so threads neither prepare in parallel nor let the GPU run while they work
(bench/RESULTS.md: on an H200 our embedder ran at about prep + forward, not their maximum).
Worker processes prepare in parallel and leave the model thread its interpreter.

Each worker builds a light copy of the embedder or reranker (its settings and processor, the
model config for the rotary positions, no weights) and returns items as plain arrays. Large
arrays (pixels) are handed over in a /dev/shm file instead of the result pipe: through the
pipe, the model process read about 0.6-0.9 GB/s on one thread, unpickling while holding the
GIL (bench/RESULTS.md, GPU run 3); a file is read with one system call that releases it. The
worker reserves the file's space first, so a full /dev/shm (64 MB in a default container)
means the pipe, never a crash; the model process deletes each file as it reads it.
"""

from __future__ import annotations

import glob
import logging
import multiprocessing
import os
import queue
import sys
import threading
import time
import uuid
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, Callable, NamedTuple

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


SHM_DIR = "/dev/shm"
SHM_MIN_BYTES = 1 << 20  # smaller arrays cross the pipe as fast
_SHM_PREFIX = "qvl-prep-"


class ShmArray(NamedTuple):
    """An array's bytes in a file under SHM_DIR, read (and deleted) by unpack()."""

    path: str
    dtype: str
    shape: tuple[int, ...]


def _to_shm(array: np.ndarray, owner: int) -> ShmArray | None:
    """The array in a new SHM_DIR file; None when there is no room or no SHM_DIR."""
    if not hasattr(os, "posix_fallocate"):
        return None
    path = os.path.join(SHM_DIR, f"{_SHM_PREFIX}{owner}-{uuid.uuid4().hex}")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError:
        return None
    try:
        # Reserve the pages now: a full tmpfs then fails here (ENOSPC), not with SIGBUS mid-write.
        os.posix_fallocate(fd, 0, array.nbytes)
        with open(fd, "wb", closefd=False) as f:
            f.write(memoryview(np.ascontiguousarray(array)).cast("B"))
    except OSError:
        os.close(fd)
        os.unlink(path)
        return None
    os.close(fd)
    return ShmArray(path, array.dtype.str, tuple(array.shape))


def _from_shm(ref: ShmArray) -> np.ndarray:
    """The array a worker left in ref.path; the file is deleted."""
    try:
        array = np.empty(ref.shape, dtype=np.dtype(ref.dtype))
        view, done = memoryview(array).cast("B"), 0
        with open(ref.path, "rb", buffering=0) as f:
            while done < len(view):  # readinto releases the GIL while the kernel copies
                n = f.readinto(view[done:])
                if not n:
                    raise OSError(f"{ref.path}: {done} of {len(view)} bytes")
                done += n
        return array
    finally:
        os.unlink(ref.path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # exists, owned by someone else
    return True


def remove_shm_files(owner: int | None = None, stale_s: float = 600.0) -> None:
    """Delete hand-over files nobody collected: owner's, or (None) old ones of model processes that are gone."""
    for path in glob.glob(os.path.join(SHM_DIR, f"{_SHM_PREFIX}{'*' if owner is None else owner}-*")):
        try:
            if owner is None:
                pid = os.path.basename(path)[len(_SHM_PREFIX):].split("-", 1)[0]
                # Old as well as orphaned: another container sharing /dev/shm has other pids.
                if not pid.isdigit() or _alive(int(pid)) or time.time() - os.stat(path).st_mtime < stale_s:
                    continue
            os.unlink(path)
        except OSError:
            pass


def _pack_tensor(t: torch.Tensor, shm_owner: int | None = None) -> tuple[str, np.ndarray | ShmArray]:
    dtype = str(t.dtype).removeprefix("torch.")
    # numpy has no bfloat16: ship the bits.
    array = (t.contiguous().view(torch.int16) if t.dtype == torch.bfloat16 else t.contiguous()).numpy()
    if shm_owner is not None and array.nbytes >= SHM_MIN_BYTES:
        ref = _to_shm(array, shm_owner)
        if ref is not None:
            return dtype, ref
    return dtype, array


def _unpack_tensor(packed: tuple[str, np.ndarray | ShmArray]) -> torch.Tensor:
    dtype, array = packed
    t = torch.from_numpy(_from_shm(array) if isinstance(array, ShmArray) else array)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def pack(p: Prepared | str, shm_owner: int | None = None) -> Any:
    """A picklable form of a prepared item (or its error string); large arrays via SHM_DIR for shm_owner."""
    if isinstance(p, str):
        return p
    return (p.input_ids, {k: _pack_tensor(v, shm_owner) for k, v in p.vision.items()}, p.extra, p.prompt,
            None if p.positions is None else _pack_tensor(p.positions))


def unpack(packed: Any) -> Prepared | str:
    """The prepared item (or error string) that pack() was given."""
    if isinstance(packed, str):
        return packed
    ids, vision, extra, prompt, positions = packed
    return Prepared(ids, {k: _unpack_tensor(v) for k, v in vision.items()}, extra, prompt,
                    None if positions is None else _unpack_tensor(positions))


def die_with_parent() -> None:
    """Have the kernel kill this process when its parent dies (Linux; elsewhere nothing).

    An idle worker notices a dead parent through its pipe, but one stuck in a hung decoder never
    reads it: when the model process is stopped (the ingestion's watchdog, a killed actor) such a
    worker would live on, an orphan busy forever.
    """
    try:
        import ctypes
        import signal

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the pipe still ends idle workers
        return
    parent = multiprocessing.parent_process()
    if parent is not None and os.getppid() != parent.pid:  # it died before the signal was set
        os._exit(1)


def _init_worker(state: dict[str, Any]) -> None:
    global _WORKER
    die_with_parent()
    torch.set_num_threads(1)  # the workers are the parallelism; no nested intra-op pools
    _WORKER = state["cls"].for_preparation(state)


def _prepare(args: tuple[Any, ...]) -> tuple[Any, Any]:
    item, marker = _WORKER._safe_prepare(*args), None
    if isinstance(item, Prepared):
        try:
            item, marker = _WORKER.detach_shared(item, args)
        except Exception:  # nothing detached: the whole item travels
            marker = None
    return pack(item, shm_owner=os.getppid()), marker


STOP_WAIT_S = 5.0  # idle workers exit within a second of being told to
_STOPPED = "preparation stopped: the runner was closed"
WORKER_DIED = ("the preparation worker process died while preparing this input, twice (a crash in a native "
               "decoder, or out of memory)")


_SPAWNER: tuple[int, queue.SimpleQueue[Callable[[], None]]] | None = None  # (pid, jobs)
_SPAWNER_LOCK = threading.Lock()


def on_spawner_thread(job: Callable[[], None]) -> None:
    """Run job on this process's one pool-feeding thread, which lives as long as the process.

    A pool spawns its workers from the thread that submits to it, and die_with_parent's signal
    fires when that *thread* ends, not the process: a caller's short-lived thread (a server's
    request) took its workers with it, and a worker killed while holding the pool's queue lock
    left the others waiting on it for good (the interpreter then hung at exit).
    """
    global _SPAWNER
    with _SPAWNER_LOCK:
        if _SPAWNER is None or _SPAWNER[0] != os.getpid():  # a forked child has the queue but not the thread
            jobs: queue.SimpleQueue[Callable[[], None]] = queue.SimpleQueue()
            threading.Thread(target=_spawner_loop, args=(jobs,), daemon=True, name="qvl-prepare-spawner").start()
            _SPAWNER = (os.getpid(), jobs)
        _SPAWNER[1].put(job)


def _spawner_loop(jobs: "queue.SimpleQueue[Callable[[], None]]") -> None:
    while True:
        try:
            jobs.get()()
        except Exception:  # jobs resolve their own futures; nothing may stop this thread
            log.exception("preparation hand-over failed")


class PrepareProcesses:
    """A spawn-started process pool that prepares items with a light copy of a runner.

    A worker that dies (a native decoder crashing on one file, an OOM kill) breaks the whole
    pool and fails every item in flight. The pool is then started afresh for new items, and the
    items that were in flight are prepared again one at a time, in a one-worker quarantine pool:
    the one that kills that worker twice fails alone with WORKER_DIED, the others get their
    results. The model process never runs the culprit itself, so it survives it.

    A pool that breaks before it has prepared anything (a script without the
    ``if __name__ == "__main__":`` guard that spawned processes need), or that breaks more than
    MAX_RESTARTS times, hands the pending and later items to ``fallback`` (the runner's
    threads) instead.

    A runner may leave out of an item what the model process can rebuild itself
    (``detach_shared`` in the worker); ``attach`` puts it back here. If that fails, the item
    is prepared again by ``fallback``.
    """

    MAX_RESTARTS = 8

    def __init__(self, processes: int, state: dict[str, Any], fallback: Callable[..., Future],
                 attach: Callable[[Prepared, Any, tuple[Any, ...]], Prepared] | None = None) -> None:
        self._processes, self._state = processes, state
        self._pool = self._new_pool(processes)
        self._fallback = fallback
        self._attach = attach
        self.broken: str | None = None  # why the pool broke for good, once it has
        self.restarts = 0  # pools started afresh after a worker died
        self.crashed = 0  # items that killed a quarantine worker twice
        self._delivered = False  # a worker has prepared an item: the pool can start
        self._closed = False
        self._lock = threading.Lock()
        self._suspects: queue.SimpleQueue[tuple[tuple[Any, ...], Future] | None] | None = None
        remove_shm_files()  # left by model processes that died before reading them

    def _new_pool(self, processes: int) -> ProcessPoolExecutor:
        # spawn, not fork: the parent may hold a CUDA context, which forked children cannot use.
        return ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(self._state,))

    def submit(self, *args: Any) -> Future:
        """A future of the prepared item (or its error string) for these prepare() arguments."""
        if self.broken is not None:
            return self._fallback(*args)
        outer: Future = Future()
        if self._closed:
            outer.set_result(_STOPPED)
        else:
            on_spawner_thread(lambda: self._to_pool_or_fail(args, outer))
        return outer

    def _to_pool_or_fail(self, args: tuple[Any, ...], outer: Future) -> None:
        try:
            self._to_pool(args, outer)
        except Exception as exc:  # never leave the caller waiting
            if not outer.done():
                outer.set_result(f"preparation worker failed: {type(exc).__name__}: {exc}")

    def _to_pool(self, args: tuple[Any, ...], outer: Future) -> None:
        if self.broken is not None:
            self._to_fallback(args, outer)
            return
        pool = self._pool
        try:
            pool.submit(_prepare, args).add_done_callback(lambda f: self._done(f, pool, args, outer))
        except BrokenProcessPool as exc:  # broke while idle: nothing was running, nothing is suspect
            if self._restart(pool, exc):
                self._to_pool(args, outer)
            else:
                self._to_fallback(args, outer)
        except RuntimeError:  # "cannot schedule new futures after shutdown"
            outer.set_result(_STOPPED)

    def _to_fallback(self, args: tuple[Any, ...], outer: Future) -> None:
        """Resolve outer with the fallback's (the runner's threads') result for args."""
        self._fallback(*args).add_done_callback(lambda g: outer.set_result(g.result()))

    def _done(self, f: Future, pool: ProcessPoolExecutor, args: tuple[Any, ...], outer: Future) -> None:
        try:
            result = f.result()
        except BrokenProcessPool as exc:  # this item may be the one that killed a worker
            if self._restart(pool, exc):
                self._quarantine(args, outer)
            elif self._closed:
                outer.set_result(_STOPPED)
            else:
                self._to_fallback(args, outer)
            return
        except Exception as exc:  # e.g. a result that cannot be unpickled: this item fails
            outer.set_result(f"preparation worker failed: {type(exc).__name__}: {exc}")
            return
        self._delivered = True
        self._deliver(result, args, outer)

    def _deliver(self, result: tuple[Any, Any], args: tuple[Any, ...], outer: Future) -> None:
        """Resolve outer with a worker's result (put back together), or with the fallback's."""
        try:
            packed, marker = result
            item = unpack(packed)
        except Exception as exc:
            outer.set_result(f"preparation worker failed: {type(exc).__name__}: {exc}")
            return
        try:
            if marker is not None and isinstance(item, Prepared) and self._attach is not None:
                item = self._attach(item, marker, args)
            outer.set_result(item)
            return
        except Exception as exc:
            log.warning("could not rebuild a prepared item (%s: %s); preparing it in a thread",
                        type(exc).__name__, exc)
        self._to_fallback(args, outer)

    def _restart(self, pool: ProcessPoolExecutor, exc: BaseException) -> bool:
        """After `pool` broke: True when a fresh pool is running (started here or already), False for threads."""
        with self._lock:
            if self.broken is not None or self._closed:
                return False
            if pool is not self._pool:  # another item of the same break got here first
                return True
            if not self._delivered or self.restarts >= self.MAX_RESTARTS:
                self._broke(exc)
                return False
            self.restarts += 1
            self._pool = self._new_pool(self._processes)
        pool.shutdown(wait=False, cancel_futures=True)
        log.warning("a preparation worker process died (%s: %s); started the workers afresh (%d of at most %d), "
                    "and the items it was preparing are prepared again one at a time", type(exc).__name__, exc,
                    self.restarts, self.MAX_RESTARTS)
        return True

    def _quarantine(self, args: tuple[Any, ...], outer: Future) -> None:
        with self._lock:
            if self._suspects is None:
                self._suspects = queue.SimpleQueue()
                threading.Thread(target=self._quarantine_loop, args=(self._suspects,), daemon=True,
                                 name="qvl-prepare-quarantine").start()
            self._suspects.put((args, outer))

    def _quarantine_loop(self, suspects: "queue.SimpleQueue[tuple[tuple[Any, ...], Future] | None]") -> None:
        """Prepare suspect items one at a time, each alone in its worker; two deaths on one item fail it."""
        pool: ProcessPoolExecutor | None = None
        try:
            while (job := suspects.get()) is not None:
                args, outer = job
                for _ in range(2):  # a second death tells a crash on this item from a pool that failed to start
                    pool = pool or self._new_pool(1)
                    try:
                        result = pool.submit(_prepare, args).result()
                    except BrokenProcessPool:
                        pool.shutdown(wait=False)
                        pool = None
                        continue
                    except Exception as exc:
                        outer.set_result(f"preparation worker failed: {type(exc).__name__}: {exc}")
                        break
                    self._deliver(result, args, outer)
                    break
                else:
                    self.crashed += 1
                    log.warning("an input killed its preparation worker twice; it fails alone: %s",
                                _describe(args))
                    outer.set_result(WORKER_DIED)
        finally:
            if pool is not None:
                pool.shutdown(wait=False, cancel_futures=True)

    def _broke(self, exc: BaseException) -> None:
        if self.broken is None:
            self.broken = f"{type(exc).__name__}: {exc}"
            log.warning("preparation worker processes stopped (%s); preparing in threads from now on. "
                        "A script that starts an embedder on a GPU needs the `if __name__ == \"__main__\":` "
                        "guard, or prepare_processes=0.", self.broken)

    def shutdown(self) -> None:
        """Stop the workers and delete hand-over files nobody collected."""
        with self._lock:
            self._closed = True
            if self._suspects is not None:
                self._suspects.put(None)
        # Waited for (at most STOP_WAIT_S): once the pool has joined its workers it drops its queues, and
        # their named semaphores are unlinked from /dev/shm. Not waiting left them there when the
        # process ended abruptly next (a Ray actor does: Ray kills its children, multiprocessing's
        # resource tracker among them). A worker hung in a decoder is not waited for past that.
        # Not while the interpreter finalizes (a runner still held at exit: a module's global): a
        # thread started then never runs, and Python 3.11's start() waits for it forever. The
        # interpreter's own exit then joins the pool.
        if sys.is_finalizing():
            self._pool.shutdown(wait=False, cancel_futures=True)
        else:
            stopper = threading.Thread(target=self._pool.shutdown, kwargs={"wait": True, "cancel_futures": True},
                                       daemon=True, name="qvl-prepare-stop")
            stopper.start()
            stopper.join(STOP_WAIT_S)
        # Results still in flight are read (and their files deleted) by their callbacks.
        remove_shm_files(os.getpid())


def _describe(args: tuple[Any, ...]) -> str:
    """A short description of prepare() arguments for a log line."""
    text = repr(args)
    return text if len(text) <= 300 else text[:300] + "..."
