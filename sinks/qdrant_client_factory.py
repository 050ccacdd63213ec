"""Qdrant connection settings and client construction.

Server mode (`url`) reads its API key from the environment variable named by
`api_key_env` at connect time, in the process that connects (on a Ray cluster
the variable must reach the workers, e.g. through `runtime_env={"env_vars": ...}`
or the node environment). The key itself is never stored in the settings, so it
cannot appear in their repr, in logs or in exception messages.

Embedded mode (`path`) is qdrant-client local mode: it takes an exclusive lock
on its folder, so only ONE process may open a given path (see `qdrant_sink`).

`client_wrapper` (optional) is a hook at the client boundary: a callable, or an
importable ``"package.module:attribute"`` string naming one, called as
``wrapper(client, settings)`` in whichever process opens the client; it returns the
object used as the client (e.g. a proxy that injects faults, or adds tracing). It
must be picklable (a string always is), because settings travel to Ray workers.
The resilience tests use it to make writes fail (tests/resilience_helpers.py).
"""

from __future__ import annotations

import logging
import math
import os
import sqlite3
import warnings
from dataclasses import dataclass
from typing import Any, Mapping

from qdrant_client import QdrantClient

# A server that does not answer makes the client warn while it is built, before our own check
# (get_collections) names the problem in one line: the warning only adds noise to that error.
warnings.filterwarnings("ignore", message="Failed to obtain server version", category=UserWarning)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class QdrantSettings:
    """Where Qdrant lives: exactly one of `url` (server) or `path` (embedded)."""

    url: str | None = None
    path: str | None = None
    api_key_env: str | None = "QDRANT_API_KEY"
    timeout_s: float = 30.0
    prefer_grpc: bool = False
    check_compatibility: bool = True
    client_wrapper: Any = None  # None, a callable(client, settings) -> client, or "module:attr" naming one

    def __post_init__(self) -> None:
        url = self.url or None
        path = self.path or None
        object.__setattr__(self, "url", url)
        object.__setattr__(self, "path", None if path is None else os.fspath(path))
        if (url is None) == (path is None):
            raise ValueError(
                "set exactly one of `qdrant.url` (server mode) or `qdrant.path` (embedded mode); "
                f"got {'both' if url is not None else 'neither'}"
            )
        if self.timeout_s <= 0:
            raise ValueError(f"qdrant.timeout_s must be positive, got {self.timeout_s}")

    @property
    def embedded(self) -> bool:
        """True for local (embedded) mode."""
        return self.path is not None

    @classmethod
    def from_mapping(cls, cfg: Mapping[str, Any]) -> "QdrantSettings":
        """Build from the `qdrant:` section of a config (unknown keys are an error)."""
        known = set(cls.__dataclass_fields__)
        unknown = set(cfg) - known
        if unknown:
            raise ValueError(f"unknown qdrant settings: {sorted('qdrant.' + k for k in unknown)}")
        return cls(**dict(cfg))


def _wrap(client: QdrantClient, settings: QdrantSettings) -> QdrantClient:
    """Apply `settings.client_wrapper` (see the module doc), if any."""
    wrapper = settings.client_wrapper
    if wrapper is None:
        return client
    if isinstance(wrapper, str):
        import importlib

        module, _, attr = wrapper.partition(":")
        wrapper = getattr(importlib.import_module(module), attr)
    return wrapper(client, settings)


def make_client(settings: QdrantSettings) -> QdrantClient:
    """Open a client: server mode with the API key from the environment, or embedded mode at `path`."""
    return _wrap(_open_client(settings), settings)


def tune_embedded_storage(client: Any) -> int:
    """Let an embedded store's collections commit without an fsync per point; how many were tuned.

    qdrant-client's local mode commits its SQLite file once per point, and each commit in the
    default rollback-journal mode syncs the disk: 2,000 points took 2.1 s (0.9 CPU-s), with WAL
    and synchronous=NORMAL 0.3 s. That pair survives a crash of the process; an OS crash or a
    power cut can lose the last commits, which the next incremental run re-embeds (an object
    whose units are not all stored counts as not stored). Server mode: nothing to do.
    """
    collections = getattr(getattr(client, "_client", None), "collections", None)
    if not isinstance(collections, dict):
        return 0
    tuned = 0
    for collection in collections.values():
        persistence = getattr(collection, "storage", None)  # None for an in-memory store
        connection = getattr(persistence, "storage", None)
        if not isinstance(connection, sqlite3.Connection) or getattr(persistence, "_qvl_tuned", False):
            continue
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        persistence._qvl_tuned = True
        tuned += 1
    return tuned


def _open_client(settings: QdrantSettings) -> QdrantClient:
    if settings.path is not None:
        os.makedirs(settings.path, exist_ok=True)
        return QdrantClient(path=settings.path)
    api_key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
    if settings.api_key_env and not api_key:
        logger.info("environment variable %s is not set: connecting without an API key", settings.api_key_env)
    try:
        return QdrantClient(
            url=settings.url,
            api_key=api_key or None,
            timeout=max(1, math.ceil(settings.timeout_s)),
            prefer_grpc=settings.prefer_grpc,
            check_compatibility=settings.check_compatibility,
        )
    except Exception as exc:
        # keep the key out of whatever the client library put in its message (and drop the chain)
        message = str(exc).replace(api_key, "***") if api_key else str(exc)
        raise RuntimeError(
            f"could not create a Qdrant client for {settings.url}: {type(exc).__name__}: {message}"
        ) from None
