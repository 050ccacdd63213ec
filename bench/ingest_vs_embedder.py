"""Ingestion end to end (local folder -> embedded Qdrant) vs the embedder alone in one process.

    .venv/bin/python bench/ingest_vs_embedder.py [--units 2000] [--size small] [--repeats 1]

The corpus is N single-unit files: 70% short/medium text files, 30% small images
(one unit each, so units == files). Measured side by side in one run:
  - embedder alone: the same units (built with the ingestion's own expand_object, so the
    model inputs are identical), Qwen3VLEmbedder.embed in this process, model already loaded;
  - ingestion: run_ingest(config) end to end: listing, incremental plan, expand tasks,
    the embedding actor pool, the Qdrant owner actor, the report (wall clock of run_ingest,
    including actor start and model load).
Prints units/s and the ratio ingestion / embedder alone (target >= 0.70).
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
    from pipelines.ingest import embedder_kwargs, run_ingest

    ckpt = args.checkpoint or C.checkpoint("embedding", args.size)
    print("#", C.machine())
    ray.init(address="local", num_cpus=C.os.cpu_count(), include_dashboard=False, log_to_driver=False)
    overrides = parse_overrides(args.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        src = make_corpus(tmp_path, args.units)
        cfg0 = ingest_config(src, ckpt, tmp_path / "probe", overrides)
        inputs = unit_inputs(src, ckpt, cfg0)
        print(f"# checkpoint {ckpt} ({args.size}), {len(inputs)} units, overrides {overrides or 'none'}; "
              f"compute: {cfg0.compute.model_dump() if hasattr(cfg0.compute, 'model_dump') else cfg0.compute}",
              flush=True)
        emb = Qwen3VLEmbedder(ckpt, **embedder_kwargs(cfg0, {}))  # as each embedding actor is built
        emb.embed(inputs[:8])  # warm-up

        t_emb, t_ing, reports = [], [], []
        for r in range(args.repeats):
            t, results = C.timed(lambda: emb.embed(inputs, normalize=False))
            assert all(x.ok for x in results)
            t_emb.append(t)
            print(f"# embedder alone: {t:.1f}s ({len(inputs) / t:.2f} units/s)", flush=True)
            cfg = ingest_config(src, ckpt, tmp_path / f"run{r}", overrides)
            t, report = C.timed(lambda: run_ingest(cfg, echo=lambda s: None))
            assert report.points_written == len(inputs), (report.points_written, len(inputs))
            t_ing.append(t)
            reports.append(report)
            print(f"# ingestion: {t:.1f}s ({len(inputs) / t:.2f} units/s); stages "
                  f"{ {k: round(v, 1) for k, v in report.stage_seconds.items()} }", flush=True)
        emb.close()
    n = len(inputs)
    te, ti = C.best(t_emb), C.best(t_ing)
    C.print_table(f"Ingestion vs embedder alone, {n} units ({args.size}, CPU, best of {args.repeats})",
                  ["path", "seconds", "units/s", "ratio to embedder alone"],
                  [["embedder alone, in process", f"{te:.1f}", f"{n / te:.2f}", "1.00"],
                   ["ingestion end to end (local folder -> embedded Qdrant)", f"{ti:.1f}", f"{n / ti:.2f}",
                    f"{te / ti:.2f}"]])
    ray.shutdown()


if __name__ == "__main__":
    main()
