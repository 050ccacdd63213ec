"""Ingestion end to end (local folder -> embedded Qdrant) vs the embedder alone in one process.

    .venv/bin/python bench/ingest_vs_embedder.py [--units 2000] [--size small] [--repeats 1]

The corpus is N single-unit files: 70% short/medium text files, 30% small images
(one unit each, so units == files). Measured side by side in one run:
  - embedder alone: the same units (built with the ingestion's own expand_object, so the
    model inputs are identical), Qwen3VLEmbedder.embed in this process, model already loaded;
  - ingestion: run_ingest(config) end to end, as `qvl ingest` runs it: starting its own local
    Ray (none runs before it: each repeat starts afresh), listing, incremental plan, expand
    tasks, the embedding actor pool, the Qdrant owner actor, the report (wall clock of
    run_ingest, including Ray's start, actor start and model load); then Ray's shutdown, which
    the CLI also waits for, timed on its own line.
Prints units/s and the ratio ingestion / embedder alone (target >= 0.70), with and without
Ray's start and shutdown; and, for the whole `qvl ingest` command, the ratio to a script that
embeds the same units in one fresh process (imports in a fresh interpreter, model load, embedding).
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path
from typing import Any

import _common as C  # noqa: E402  (sets sys.path)


def make_corpus(root: Path, units: int, seed: int = 0) -> Path:
    """units files, each one unit: text files (70%) and small images (30%)."""
    rng = random.Random(seed)
    src = root / "src"
    (src / "text").mkdir(parents=True, exist_ok=True)
    n_images = int(units * 0.3)
    sizes = [(rng.choice([64, 96, 128, 160, 224]), rng.choice([64, 96, 128, 160])) for _ in range(n_images)]
    C.write_images(src / "images", sizes, seed=seed)
    for i in range(units - n_images):
        (src / "text" / f"doc_{i:06d}.txt").write_text(C.sentence(rng, rng.randint(10, 150)) + "\n")
    return src


def ingest_config(src: Path, ckpt: str, work: Path, overrides: dict[str, Any] | None = None) -> Any:
    """The ingestion config: this folder into a fresh embedded Qdrant collection."""
    from pipelines.config import parse_config

    data: dict[str, Any] = {"source": {"uri": str(src)}, "embedder": {"model": ckpt, "mrl_dims": [256, 64]},
                            "qdrant": {"path": str(work / "qdrant"), "collection": "bench"},
                            "output": {"dir": str(work / "runs")}}
    for section, values in (overrides or {}).items():
        data.setdefault(section, {}).update(values)
    return parse_config(data)


def unit_inputs(src: Path, ckpt: str, cfg: Any) -> list[dict[str, Any]]:
    """The model inputs of every unit, exactly as the ingestion's expand stage builds them."""
    from transformers import AutoTokenizer

    from operators.media.expand import expand_object
    from operators.media.listing import list_objects
    from pipelines.ingest import expand_settings

    tok = AutoTokenizer.from_pretrained(ckpt)
    objects, _ = list_objects(str(src), [], [], {})
    inputs = []
    for obj in objects:
        units, dead, status = expand_object(obj, expand_settings(cfg), {}, tok)
        assert status == "ok" and not dead, (obj.uri, status, dead)
        inputs += [u.model_input() for u in units]
    return inputs


def fresh_import_seconds() -> float:
    """Seconds a fresh interpreter takes to import the embedder (torch, transformers, the project)."""
    import subprocess
    import sys

    code = ("import time; t = time.perf_counter(); import operators.qwen3vl.embedder; "
            "print(time.perf_counter() - t)")
    out = subprocess.run([sys.executable, "-c", code], cwd=C.ROOT, capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """section.key=value (value parsed as int/float/bool/None when it looks like one)."""
    out: dict[str, Any] = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        section, name = key.split(".", 1)
        parsed: Any = value
        for conv in (int, float):
            try:
                parsed = conv(value)
                break
            except ValueError:
                pass
        if value in ("true", "false", "null"):
            parsed = {"true": True, "false": False, "null": None}[value]
        out.setdefault(section, {})[name] = parsed
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--units", type=int, default=2000)
    ap.add_argument("--size", default="small", choices=("tiny", "small"))
    ap.add_argument("--checkpoint", default=None)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override for the ingestion, e.g. --set compute.batch_size=128")
    args = ap.parse_args()

    import ray

    from operators.qwen3vl import Qwen3VLEmbedder
    from pipelines.ingest import embedder_kwargs, ensure_ray, run_ingest

    ckpt = args.checkpoint or C.checkpoint("embedding", args.size)
    print("#", C.machine())
    overrides = parse_overrides(args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        src = make_corpus(tmp_path, args.units)
        cfg0 = ingest_config(src, ckpt, tmp_path / "probe", overrides)
        inputs = unit_inputs(src, ckpt, cfg0)
        print(f"# checkpoint {ckpt} ({args.size}), {len(inputs)} units, overrides {overrides or 'none'}; "
              f"compute: {cfg0.compute.model_dump() if hasattr(cfg0.compute, 'model_dump') else cfg0.compute}",
              flush=True)
        t_load, emb = C.timed(lambda: Qwen3VLEmbedder(ckpt, **embedder_kwargs(cfg0, {})))  # as each actor builds it
        t_import = fresh_import_seconds()
        t_load += C.timed(lambda: emb.embed(inputs[:8]))[0]  # warm-up: weights are read lazily, at the first call

        t_emb, t_ing, t_ray, t_down, reports = [], [], [], [], []
        for r in range(args.repeats):
            t, results = C.timed(lambda: emb.embed(inputs, normalize=False))
            assert all(x.ok for x in results)
            t_emb.append(t)
            print(f"# embedder alone: {t:.1f}s ({len(inputs) / t:.2f} units/s)", flush=True)
            cfg = ingest_config(src, ckpt, tmp_path / f"run{r}", overrides)
            assert not ray.is_initialized()  # the run starts its own, as the CLI's does
            # Started by the job's own call, timed apart (run_ingest then finds it up).
            t_start = C.timed(lambda: ensure_ray(cfg))[0]
            t, report = C.timed(lambda: run_ingest(cfg, echo=lambda s: None))
            assert report.points_written == len(inputs), (report.points_written, len(inputs))
            t_ing.append(t_start + t)
            t_ray.append(t_start)
            t_down.append(C.timed(ray.shutdown)[0])
            reports.append(report)
            print(f"# ingestion: {t_ing[-1]:.1f}s ({len(inputs) / t_ing[-1]:.2f} units/s), of which Ray's start "
                  f"{t_ray[-1]:.1f}s; Ray's shutdown {t_down[-1]:.1f}s; stages "
                  f"{ {k: round(v, 1) for k, v in report.stage_seconds.items()} }", flush=True)
        emb.close()
    n = len(inputs)
    te, ti = C.best(t_emb), C.best(t_ing)
    # The same repeat's parts: its run without Ray's start, and with its shutdown too.
    k = t_ing.index(ti)
    tw, tc = ti - t_ray[k], ti + t_down[k]
    C.print_table(f"Ingestion vs embedder alone, {n} units ({args.size}, CPU, best of {args.repeats})",
                  ["path", "seconds", "units/s", "ratio to embedder alone"],
                  [["embedder alone, in process", f"{te:.1f}", f"{n / te:.2f}", "1.00"],
                   ["ingestion end to end (local folder -> embedded Qdrant), its own Ray's start included",
                    f"{ti:.1f}", f"{n / ti:.2f}", f"{te / ti:.2f}"],
                   ["  the same without Ray's start", f"{tw:.1f}", f"{n / tw:.2f}", f"{te / tw:.2f}"],
                   ["  the same with Ray's shutdown (as `qvl ingest` waits for it)", f"{tc:.1f}", f"{n / tc:.2f}",
                    f"{te / tc:.2f}"]])
    tf = t_import + t_load + te
    C.print_table("The whole command vs one fresh process that embeds the same units",
                  ["path", "seconds", "units/s", "ratio"],
                  [[f"one process: imports {t_import:.1f}s + model load and a first call of 8 {t_load:.1f}s + "
                    f"embedding {te:.1f}s",
                    f"{tf:.1f}", f"{n / tf:.2f}", "1.00"],
                   ["`qvl ingest`: Ray's start, the run, Ray's shutdown", f"{tc:.1f}", f"{n / tc:.2f}",
                    f"{tf / tc:.2f}"]])


if __name__ == "__main__":
    main()
