"""Ray Data actors that hold a Qwen3-VL model: its preparation processes stop with the actor.

A model that prepares in worker processes (operators/qwen3vl/prepare_workers.py, the GPU default)
owns a process pool whose queues are named POSIX semaphores in /dev/shm. When Ray Data lets an
actor go, its process exits and Ray kills the process's children, multiprocessing's resource
tracker among them, so nothing would unlink those semaphores: five were left on the node per
actor per run. Ray Data deletes the actor's callable first (``__ray_shutdown__``); closing the
model then shuts the pool down and its semaphores are unlinked.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)


class ClosesModel:
    """Mixin for a Ray Data callable class: its model (attribute ``model_attr``) is closed when it is deleted."""

    model_attr = "embedder"

    def __del__(self) -> None:
        """Close the model: stop its preparation processes."""
        model: Any = getattr(self, self.model_attr, None)  # None when __init__ failed before loading it
        if model is not None:
            try:
                model.close()
            except Exception as exc:  # nothing to report to: Ray prints what escapes __del__ as a traceback
                log.debug("closing %s failed: %r", type(model).__name__, exc)
