"""What the embedder and the reranker share: settings, model loading, per-item preparation threads."""

from __future__ import annotations

import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Mapping, Sequence

import torch

from .fast_text import install_fast_text
from .fast_vision import install_fast_vision
from .formatting import VisionSettings
from .heap import retain_freed_memory
from .loading import checkpoint_id, load_model, load_processor, resolve_device, resolve_dtype
from .media_io import VideoFiles
from .prepare_workers import PrepareProcesses, _RopeOnly
from .preprocess import Prepared, cast_pixels, check_window, describe_error, rope_positions, to_device
from .read_positions import hidden_at, install_read_positions
from .windows import InputWeights, Weigh, Windows


def resolve_prepare_processes(processes: int | None, device: torch.device) -> int:
    """Worker processes for preparation: as asked, else several on a GPU and none (threads) on a CPU.

    On a CPU the model is the bottleneck and already uses every core; on a GPU the model thread
    needs the interpreter to itself (prepare_workers.py).
    """
    if processes is not None:
        if processes < 0:
            raise ValueError(f"prepare_processes must be >= 0, got {processes}")
        return processes
    cpus = usable_cores()
    return min(8, cpus - 2) if device.type == "cuda" and cpus >= 4 else 0


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def every_core() -> int:
    """Intra-op threads for a model on CPU: $QVL_TORCH_THREADS, else usable_cores()."""
    env = os.environ.get("QVL_TORCH_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return usable_cores()


def _one_intra_op_thread() -> None:
    """Preparation threads run their torch ops (image processor, rotary positions) single-threaded.

    Intra-op settings are per thread: a preparation thread left at the default builds its own
    OpenMP team, and on a 2-core machine the model thread's matmuls then ran 50% slower for the
    rest of the process (measured: bench/RESULTS.md). The model thread keeps its own setting.
    """
    torch.set_num_threads(1)


def check_inputs(items: Any, what: str) -> Sequence[Any]:
    """A sequence of inputs, or a TypeError saying what was passed instead (one dict, one string)."""
    if isinstance(items, (Mapping, str, bytes)):
        raise TypeError(f"{what} must be a list of dicts, got one {type(items).__name__}: wrap it in a list")
    if not isinstance(items, Iterable):
        raise TypeError(f"{what} must be a list of dicts, got {type(items).__name__}")
    return items


def _picklable(value: Any) -> Any:
    """An input's image and video values as a worker process can receive them: memoryviews (an
    image, or a frame of a video's list) as bytes, which they stand for; pickle refuses a memoryview."""
    if isinstance(value, memoryview):
        return bytes(value)
    if isinstance(value, Mapping):
        return {k: _picklable(v) if k in ("image", "video") else v for k, v in value.items()}
    if isinstance(value, (list, tuple)):  # images, frames, or videos each a list of frames
        return [_picklable(v) for v in value]
    return value


class Qwen3VLRunner:
    """A loaded Qwen3-VL checkpoint with its processor, vision settings and preparation threads."""

    def __init__(self, model_cls: Any, model_name_or_path: str, *, dtype: str | torch.dtype | None,
                 device: str | torch.device | None, attn_implementation: str | None, padding_side: str,
                 max_length: int, vision: VisionSettings, default_instruction: str, token_budget: int,
                 max_batch_items: int, prepare_workers: int | None, storage_options: dict[str, Any] | None,
                 thread_name: str, prepare_processes: int | None = None, revision: str | None = None,
                 window_mib: int | None = None, **model_kwargs: Any) -> None:
        check_window("window_mib", window_mib)  # before the weights load
        torch_dtype = model_kwargs.pop("torch_dtype", None)
        if torch_dtype is not None:  # transformers' older name: honoured, not silently overridden by dtype
            if dtype not in (None, "auto"):
                raise ValueError("give dtype or torch_dtype, not both")
            dtype = torch_dtype
        self.model_name_or_path = model_name_or_path
        self.revision = revision  # hub branch, tag or commit; the processor and the weights both follow it
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        if self.device.type == "cpu":
            retain_freed_memory()  # CPU activations are reused, not page-faulted in anew (heap.py)
        self.max_length = max_length
        self.vision = vision
        self.default_instruction = default_instruction
        self.token_budget = token_budget
        self.max_batch_items = max_batch_items
        # Two windows of prepared inputs are held at once (one in the model, the next being prepared).
        # Counted in items alone, 256 images of 1,843,200 pixels held 11 GB each; 512 small ones raised a
        # CPU embedding actor's peak by 1.1 GB (bench/RESULTS.md section 4).
        self.window_bytes = (window_mib or (1024 if self.device.type == "cuda" else 64)) * 2**20
        self.weights = InputWeights(vision, self.dtype.itemsize, max_length)
        # Pinning each fresh batch (a page-locked allocation plus a host copy) gave no consistent gain on
        # an H200: +5-12% on large images, -3-10% on small ones (bench/RESULTS.md, GPU run 2).
        self.pin_memory = False
        self.storage_options = storage_options or {}
        self.processor = load_processor(model_name_or_path, padding_side=padding_side, revision=revision)
        self._settle_tokenizer()
        self.model = load_model(model_cls, model_name_or_path, self.device, self.dtype, attn_implementation,
                                revision=revision, **model_kwargs)
        install_fast_vision(self.model)
        install_fast_text(self.model)
        self.read_positions_only = install_read_positions(self.model)
        self.padding_side = padding_side
        self._video_files = VideoFiles(self.storage_options)
        # On a CPU, every model call runs with this many intra-op threads (model_threads()): the
        # loading thread's count, or every core after use_every_core(). Setting preparation threads
        # to one (below) also makes one the default of threads started later.
        self._model_threads = torch.get_num_threads()
        self._pool = ThreadPoolExecutor(prepare_workers or min(8, (os.cpu_count() or 2)),
                                        thread_name_prefix=thread_name, initializer=_one_intra_op_thread)
        self.prepare_processes = resolve_prepare_processes(prepare_processes, self.device)
        self._processes: PrepareProcesses | None = None  # started on first use
        self._processes_lock = threading.Lock()

    @property
    def checkpoint(self) -> str:
        """The loaded checkpoint as points and messages name it: ``org/name@revision`` when pinned."""
        return checkpoint_id(self.model_name_or_path, self.revision)

    # -- preparation, in threads or worker processes ---------------------------------------
    def windows(self, inputs: Sequence[Any], first: int, cap: int, weigh: Weigh) -> Windows:
        """A call's preparation windows over inputs, each cut at about window_mib of prepared inputs."""
        return Windows(inputs, first, cap, weigh, self.window_bytes, self.token_budget, self.max_batch_items)

    # What prepare() reads; a preparation worker gets exactly this (plus the model config).
    _PREPARE_STATE = ("model_name_or_path", "revision", "dtype", "max_length", "vision", "default_instruction",
                      "storage_options", "padding_side")

    @classmethod
    def for_preparation(cls, state: dict[str, Any]) -> "Qwen3VLRunner":
        """A weightless copy that can prepare items (used inside preparation worker processes)."""
        self = cls.__new__(cls)
        for name in cls._PREPARE_STATE:
            setattr(self, name, state[name])
        self.processor = load_processor(self.model_name_or_path, padding_side=self.padding_side,
                                        revision=self.revision)
        self._settle_tokenizer()
        self.model = _RopeOnly(state["config"])
        self._video_files = VideoFiles(self.storage_options)
        self._light_init()
        return self

    def _light_init(self) -> None:
        """Derived preparation settings (subclasses override)."""

    def text_kwargs(self) -> dict[str, Any]:
        """The truncation and padding arguments prepare() tokenises with (subclasses override)."""
        raise NotImplementedError

    def _settle_tokenizer(self) -> None:
        """Put the fast tokenizer in the truncation and padding state prepare() asks for, before any thread runs.

        transformers writes these settings into the shared Rust tokenizer on the first call that asks for
        different ones. A write while another preparation thread is encoding (the GIL released, the
        tokenizer borrowed) raises "RuntimeError: Already borrowed", and that item was dead-lettered
        (seen in CI). Once settled, every later call only reads them, and concurrent reads are safe.
        """
        self.processor.tokenizer([""], **self.text_kwargs())

    def _safe_prepare(self, *args: Any) -> Prepared | str:
        try:
            return self.prepare(*args)  # type: ignore[attr-defined]
        except Exception as exc:  # one bad item must never fail its neighbours
            return describe_error(exc)

    def submit_prepare(self, *args: Any) -> Future:
        """A future of prepare(*args), or of the reason it failed, from a thread or a worker process."""
        if getattr(self, "_closed", False):
            raise RuntimeError(f"{type(self).__name__} is closed")
        if self.prepare_processes:
            with self._processes_lock:  # two threads' first calls must not start two pools
                if self._processes is None:
                    state = {name: getattr(self, name) for name in self._PREPARE_STATE}
                    state.update(cls=type(self), config=self.backbone.config)
                    self._processes = PrepareProcesses(self.prepare_processes, state,
                                                       fallback=lambda *a: self._pool.submit(self._safe_prepare, *a),
                                                       attach=self.attach_shared)
                processes = self._processes
            return processes.submit(*(_picklable(a) if isinstance(a, Mapping) else a for a in args))
        return self._pool.submit(self._safe_prepare, *args)

    def detach_shared(self, item: Prepared, args: tuple[Any, ...]) -> tuple[Prepared, Any]:
        """In a worker: (the item less what the model process can rebuild, what attach_shared needs); none here."""
        return item, None

    def attach_shared(self, item: Prepared, marker: Any, args: tuple[Any, ...]) -> Prepared:
        """In the model process: the whole item again, from detach_shared's marker."""
        raise NotImplementedError(f"{type(self).__name__} detaches nothing")

    @property
    def backbone(self) -> Any:
        """The Qwen3VLModel (vision tower + language model), inside a wrapper or not."""
        return getattr(self.model, "model", self.model)

    def finish(self, ids: list[int], vision: dict[str, torch.Tensor], extra: dict[str, list[int]],
               prompt: str) -> Prepared:
        """A Prepared item with its rotary positions and its pixels in the model's dtype."""
        return Prepared(ids, cast_pixels(vision, self.dtype), extra, prompt,
                        positions=rope_positions(self.backbone, ids, vision))

    def model_threads(self) -> None:
        """On a CPU, give the calling thread the model's intra-op threads (see use_every_core)."""
        if self.device.type == "cpu" and torch.get_num_threads() != self._model_threads:
            torch.set_num_threads(self._model_threads)

    def use_every_core(self) -> None:
        """On a CPU, run model calls on every core (every_core()) from now on; on a GPU, change nothing.

        For a model held by a Ray actor: Ray sets OMP_NUM_THREADS to the actor's num_cpus (1 by
        default), which halves a CPU model on 2 cores. On a GPU the CPU threads only prepare inputs.
        """
        if self.device.type == "cpu":
            self._model_threads = every_core()
            self.model_threads()

    def hidden_at(self, batch: dict[str, torch.Tensor], read: torch.Tensor, **forward_kwargs: Any) -> torch.Tensor:
        """The final hidden state at one position per row (batch, hidden), on the device."""
        return hidden_at(self.model, batch, read, self.read_positions_only, **forward_kwargs)

    def to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A collated batch on the model's device."""
        return to_device(batch, self.device, pin=self.pin_memory)

    def __enter__(self) -> "Qwen3VLRunner":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release worker threads and temporary video copies (use after this raises RuntimeError)."""
        self._closed = True
        self._pool.shutdown(wait=False)
        with self._processes_lock:
            processes, self._processes = self._processes, None
        if processes is not None:
            processes.shutdown()
        self._video_files.close()
