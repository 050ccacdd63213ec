"""Intra-op threads for a model held by a Ray actor on a CPU.

Ray sets OMP_NUM_THREADS to an actor's num_cpus (1 by default), which halves a CPU model on a
2-core machine: its matmuls are what the node's cores are for. On a GPU the CPU threads only
prepare inputs, so Ray's setting is kept.
"""

from __future__ import annotations

import os

import torch


def cpu_threads() -> int:
    """Intra-op threads for a model on CPU: $QVL_TORCH_THREADS, else every core this process may use."""
    env = os.environ.get("QVL_TORCH_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


class ActorThreads:
    """The intra-op thread count an actor's model runs with: cpu_threads() on a CPU, Ray's on a GPU."""

    def __init__(self, device: torch.device) -> None:
        self.threads = cpu_threads() if device.type == "cpu" else None
        self.apply()

    def apply(self) -> None:
        """Give the calling thread that count (per call: OpenMP's count is per thread, and Ray may call from another)."""
        if self.threads and torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
