"""Freed activation memory kept in the process on CPU, so the next batch reuses it without page faults.

A CPU forward allocates and frees activations of tens of MB per op. glibc returns a freed chunk
at the top of the heap to the kernel once it passes ``M_TRIM_THRESHOLD`` (and serves chunks over
``M_MMAP_THRESHOLD`` with mmap, unmapped again on free), so every batch faults the same memory
back in, one zeroed 4 KiB page at a time. Measured on the reranker's 100 passages (2 cores):
SiLU 3.2 -> 1.2 ms per call, the whole call 2.17-2.25 -> 1.92-2.07 s, with one pair at a time
unchanged (its tensors are small enough to be reused anyway; bench/RESULTS.md section 3). This is what
PyTorch's CPU tuning guides get from jemalloc or tcmalloc; here it is two ``mallopt`` calls.

The price is that the process keeps up to ``_TRIM_THRESHOLD`` of freed heap instead of giving it
back: its peak, not more (the ingestion memory benchmark measures that peak). Opt out with
``QVL_RETAIN_FREED_MEMORY=0``. Other C libraries (musl, macOS) are left alone.
"""

from __future__ import annotations

import ctypes
import os
import threading

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
# Freed heap kept before glibc trims it (mallopt takes an int).
_TRIM_THRESHOLD = 1 << 30
# Chunks up to this size come from the heap, so they are kept and reused too. Setting either
# value turns off glibc's own adaptive thresholds, so both are set: the trim threshold alone
# leaves the mmap threshold at its 128 KiB start, and every tensor is mapped afresh.
_MMAP_THRESHOLD = 256 << 20
ENV = "QVL_RETAIN_FREED_MEMORY"

_lock = threading.Lock()
_applied: bool | None = None


def retain_freed_memory() -> bool:
    """Make glibc keep and reuse freed memory in this process; True when it is in effect (idempotent)."""
    global _applied
    with _lock:
        if _applied is None:
            _applied = _apply()
        return _applied


def _apply() -> bool:
    if os.environ.get(ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    try:
        libc = ctypes.CDLL(None)
        mallopt = libc.mallopt
        libc.gnu_get_libc_version  # glibc only: musl's mallopt does nothing, macOS has none
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return bool(mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)) and bool(mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD))
