"""Peak memory of the ingestion at 1x and 10x corpus size (streaming: it must stay flat).

    .venv/bin/python bench/ingest_memory.py [--units 500] [--factor 10] [--manifest]

Each run starts a fresh local Ray (so nothing is left from the previous run), ingests a
folder of single-unit files (half text, half 360x360 noise PNGs of ~0.39 MB each, embedded
at max_pixels=65536 so the CPU moves bytes rather than running the model) into embedded
Qdrant with the default configuration, and samples every 0.5 s:
  - process memory, with psutil over this driver and ALL its descendants (raylet, GCS,
    dashboard agents and every Ray worker: expand tasks, the embedding actor, the Qdrant
    owner, the write tasks). USS (private pages) is summed: shared pages - libraries and
    above all the plasma object store, which every process maps - would be counted many
    times over by RSS, and PSS charges a process for store pages it merely touched once
    (those grow towards the store's fixed size whatever the corpus);
  - the object store's bytes in use, from the raylet (memory_summary(stats_only=True));
  - for reference, the naive sum of RSS of the Ray worker processes, and the driver's RSS.
The measure that must stay flat: peak of (sum of USS + object store in use); 1x should hold
a few embedding batches (batch_size 512 rows = 256 single-unit files) to reach steady state.
If the pipeline kept rows, image bytes or points anywhere (driver, store, sink, actor), the
10x run would carry ~10x the image bytes (about 1 GB more at the defaults).
--manifest: the same units as the records of one JSONL manifest (expanded 64 records to a task).
"""

from __future__ import annotations

import argparse
import random
import re
import tempfile
import threading
from pathlib import Path
from typing import Any

import _common as C  # noqa: E402  (sets sys.path)

try:
    import psutil
except ImportError:  # Ray vendors psutil
    import ray as _ray

    C.sys.path.append(str(Path(_ray.__file__).parent / "thirdparty_files"))
    import psutil

MB = 2**20


def make_corpus(root: Path, units: int, seed: int = 0, manifest: bool = False) -> Path:
    """units single-unit files: half text, half ~0.39 MB noise PNGs (distinct content each).

    manifest: the same units as the records of one JSONL manifest instead (texts inline, images
    referenced in a folder beside the source), read 64 records to an expansion task.
    """
    import json

    import numpy as np
    from PIL import Image

    rng = random.Random(seed)
    src = root / "src"
    images = root / "media" if manifest else src / "images"
    (src / "text").mkdir(parents=True, exist_ok=True)
    images.mkdir(parents=True, exist_ok=True)
    n_images = units // 2
    base = np.random.default_rng(seed).integers(0, 256, (360, 720, 3), dtype=np.uint8)
    for i in range(n_images):
        tile = np.roll(base, i * 7, axis=1)[:, :360]
        Image.fromarray(tile).save(images / f"img_{i:06d}.png", compress_level=0)
    texts = [C.sentence(rng, rng.randint(10, 120)) for _ in range(units - n_images)]
    if manifest:
        records = [{"image": str(images / f"img_{i:06d}.png")} for i in range(n_images)] + [{"text": t} for t in texts]
        (src / "text" / "list.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        return src
    for i, text in enumerate(texts):
        (src / "text" / f"doc_{i:06d}.txt").write_text(text + "\n")
    return src


def plasma_bytes() -> int:
    """Object store bytes in use, as the raylet reports them."""
    from ray._private.internal_api import memory_summary

    m = re.search(r"Plasma memory usage (\d+) MiB", memory_summary(stats_only=True))
    return int(m.group(1)) * MB if m else 0


class Sampler:
    """Samples the memory of this process, all its descendants and the object store in a thread."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = {"total": 0, "uss": 0, "plasma": 0, "pss": 0, "rss_workers": 0, "rss_driver": 0}
        self.per_process: dict[int, int] = {}  # pid -> peak USS
        self.names: dict[int, str] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _sample(self) -> None:
        me = psutil.Process()
        uss = pss = rss_workers = 0
        for p in [me] + me.children(recursive=True):
            try:
                info = p.memory_full_info()
                name = p.name()
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                continue
            uss += info.uss
            pss += getattr(info, "pss", info.rss)
            self.names[p.pid] = name[:48]
            self.per_process[p.pid] = max(self.per_process.get(p.pid, 0), info.uss)
            if p.pid != me.pid and name.startswith("ray::"):
                rss_workers += info.rss
        try:
            plasma = plasma_bytes()
        except Exception:  # Ray shutting down
            plasma = 0
        cur = {"total": uss + plasma, "uss": uss, "plasma": plasma, "pss": pss, "rss_workers": rss_workers,
               "rss_driver": me.memory_info().rss}
        for k, v in cur.items():
            self.peak[k] = max(self.peak[k], v)

    def _run(self) -> None:
        while not self._stop.is_set():
            self._sample()
            self._stop.wait(self.interval)

    def __enter__(self) -> "Sampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def run_once(units: int, ckpt: str, tmp: Path, overrides: dict[str, Any], manifest: bool = False) -> dict[str, Any]:
    """Ingest a fresh corpus of `units` on a fresh Ray; peak memory and timings."""
    import ray

    from bench.ingest_vs_embedder import ingest_config
    from pipelines.ingest import run_ingest

    src = make_corpus(tmp / f"corpus_{units}", units, manifest=manifest)
    cfg = ingest_config(src, ckpt, tmp / f"work_{units}", {"embedder": {"max_pixels": 65536}, **overrides})
    ray.init(address="local", num_cpus=C.os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        with Sampler() as s:
            t, report = C.timed(lambda: run_ingest(cfg, echo=lambda _: None))
        assert report.points_written == units, (report.points_written, units)
    finally:
        ray.shutdown()
    data_mb = sum(f.stat().st_size for f in src.parent.rglob("*") if f.is_file()) / MB
    top = sorted(s.per_process.items(), key=lambda kv: -kv[1])[:5]
    return {"units": units, "seconds": t, "data_mb": data_mb, **s.peak,
            "top": ", ".join(f"{s.names[pid]} {v / MB:.0f}" for pid, v in top)}


def main() -> None:
    from bench.ingest_vs_embedder import parse_overrides

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=500, help="units at 1x")
    ap.add_argument("--factor", type=int, default=10)
    ap.add_argument("--size", default="small", choices=("tiny", "small"))
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--manifest", action="store_true", help="the units as the records of one JSONL manifest")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override, e.g. --set compute.batch_size=64")
    args = ap.parse_args()

    ckpt = args.checkpoint or C.checkpoint("embedding", args.size)
    print("#", C.machine())
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for units in (args.units, args.units * args.factor):
            r = run_once(units, ckpt, Path(tmp), parse_overrides(args.overrides), args.manifest)
            runs.append(r)
            print(f"# {units} units ({r['data_mb']:.0f} MB of files): {r['seconds']:.1f}s; peak USS+store "
                  f"{r['total'] / MB:.0f} MB (USS {r['uss'] / MB:.0f}, store {r['plasma'] / MB:.0f}); peak USS by "
                  f"process (MB): {r['top']}", flush=True)
    a, b = runs

    def row(label: str, key: str) -> list[str]:
        return [label, f"{a[key] / MB:.0f}", f"{b[key] / MB:.0f}", f"{b[key] / max(a[key], 1):.2f}"]

    shape = "one manifest's records" if args.manifest else "single-unit files"
    C.print_table(f"Ingestion peak memory, {a['units']} vs {b['units']} units as {shape} "
                  f"({args.size}, CPU, default config but embedder.max_pixels=65536)",
                  ["measure (peaks, MB)", f"1x: {a['units']} units, {a['data_mb']:.0f} MB of files",
                   f"{args.factor}x: {b['units']} units, {b['data_mb']:.0f} MB of files", "ratio"],
                  [row("USS of driver + all Ray processes + object store in use (the flat one)", "total"),
                   row("  of which: USS sum", "uss"), row("  of which: object store in use", "plasma"),
                   row("PSS sum, driver + all Ray processes", "pss"),
                   row("RSS sum of Ray workers (naive: shared pages counted per process)", "rss_workers"),
                   row("RSS of the driver", "rss_driver"),
                   ["wall seconds", f"{a['seconds']:.1f}", f"{b['seconds']:.1f}",
                    f"{b['seconds'] / a['seconds']:.2f}"]])


if __name__ == "__main__":
    main()
