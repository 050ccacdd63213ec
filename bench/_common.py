"""Helpers shared by the benchmark scripts: checkpoints, generated corpora, timing and tables.

Absolute times on a shared 2-core machine are noisy, so every script measures the things
it compares side by side in one process and reports ratios over interleaved repeats (the best
repeat of each side, unless a script says otherwise).
"""

from __future__ import annotations

import os
import platform
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as `python bench/x.py` from the repository root
    sys.path.insert(0, str(ROOT))

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def checkpoint(kind: str, size: str, path: str | None = None, dtype: str = "float32", device: str = "cpu") -> str:
    """A random checkpoint of kind/size: path if given and built, else built once under the temp dir."""
    from operators.qwen3vl.checkpoint import build_checkpoint

    out = Path(path) if path else Path(tempfile.gettempdir()) / f"qvl-bench-{kind}-{size}-{dtype}"
    # config.json is written before the weights: only the marker, written last, says a build ended
    # (a run killed mid-build, then rerun on the same machine, would load a half-written one).
    done = out / ".qvl-built"
    if not done.exists():
        t0 = time.perf_counter()
        build_checkpoint(out, kind, size, seed=0, dtype=dtype, device=device)
        done.write_text("ok\n")
        print(f"# built {kind}/{size} checkpoint in {out} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return str(out)


def vocabulary() -> list[str]:
    """English-like words the checkpoints' tokenizer knows (about one token per word)."""
    from operators.qwen3vl.checkpoint import _WORDS

    return _WORDS.split()


def sentence(rng: random.Random, n_words: int) -> str:
    """A random sentence of n_words vocabulary words."""
    words = vocabulary()
    return " ".join(rng.choice(words) for _ in range(n_words)).capitalize() + "."


def write_images(root: Path, sizes: Sequence[tuple[int, int]], seed: int = 0, fmt: str = "JPEG") -> list[str]:
    """Noisy-but-smooth images of the given (w, h) sizes; paths in order."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, (w, h) in enumerate(sizes):
        small = rng.integers(0, 256, (max(h // 16, 2), max(w // 16, 2), 3), dtype=np.uint8)
        img = Image.fromarray(small).resize((w, h), Image.BILINEAR)
        p = root / f"img_{i:05d}_{w}x{h}.{'jpg' if fmt == 'JPEG' else fmt.lower()}"
        img.save(p, format=fmt, quality=90) if fmt == "JPEG" else img.save(p, format=fmt)
        paths.append(str(p))
    return paths


def write_videos(root: Path, n: int, seconds: float = 4.0, fps: int = 8,
                 size: tuple[int, int] = (160, 120)) -> list[str]:
    """n short mpeg4 clips."""
    from tests.media_gen import write_video

    root.mkdir(parents=True, exist_ok=True)
    return [str(write_video(root / f"clip_{i:03d}.mp4", seconds=seconds, fps=fps, size=size, seed=i))
            for i in range(n)]


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(seconds, result) of one call."""
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def median(xs: Sequence[float]) -> float:
    """The median."""
    return statistics.median(xs)


def best(xs: Sequence[float]) -> float:
    """The fastest of interleaved repeats: on a shared machine noise only ever adds time."""
    return min(xs)


def print_table(title: str, header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """Print (and return) a small markdown table."""
    def fmt(x: Any) -> str:
        if isinstance(x, float):
            return f"{x:.3g}" if abs(x) < 1000 else f"{x:.0f}"
        return str(x)

    lines = [f"\n### {title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(fmt(x) for x in row) + " |" for row in rows]
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def machine() -> str:
    """A one-line description of this machine and the software versions."""
    import torch
    import transformers

    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{os.cpu_count()} CPUs ({cpu}), {gpu}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"transformers {transformers.__version__}, python {platform.python_version()}, "
            f"{datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}")
