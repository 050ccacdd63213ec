"""A Hugging Face hub cache built from local checkpoints, for loading by hub id and revision offline.

The layout is huggingface_hub's own (``models--org--name/snapshots/<commit>/`` plus
``refs/<branch>`` files holding the commit), so ``from_pretrained("org/name", revision=...)``
with ``HF_HUB_CACHE`` pointing here and ``HF_HUB_OFFLINE=1`` resolves branches, tags and commits
exactly as it does for a download. Snapshots hold plain copies (as on systems without symlinks).
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import Iterable


def add_snapshot(cache: Path, repo_id: str, checkpoint: Path, refs: Iterable[str] = ()) -> str:
    """Copy `checkpoint` in as one commit of `repo_id`, point each ref at it, and return the commit hash."""
    commit = hashlib.sha1(f"{repo_id}:{Path(checkpoint).resolve()}".encode()).hexdigest()
    repo = Path(cache) / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return commit


def hub_env(cache: Path) -> dict[str, str]:
    """Environment for a process that must load from this cache and nothing else."""
    return {"HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_DISABLE_TELEMETRY": "1"}
