"""`qvl query-batch` on a CPU: the query actors' models on every core vs Ray's one thread per actor.

    .venv/bin/python bench/query_batch_threads.py [--queries 96] [--repeats 2]

Ray starts an actor with OMP_NUM_THREADS = its num_cpus (1); the query-batch stages (embed and
search, rerank) raise their model's intra-op threads to every core (`use_every_core` in operators/qwen3vl/runner.py).
QVL_TORCH_THREADS=1 gives the one-thread behaviour back. Each variant runs in its own child
process (its own Ray, so the variable reaches the actors), alternately, on the same 300-text
collection (small random checkpoints, top 30 reranked, top 5 kept). Prints the best of the
repeats and the ratio.
"""

from __future__ import annotations

import argparse
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

import _common as C  # noqa: E402  (sets sys.path)


def config(root: Path) -> dict:
    """The query config over the collection at root (small random checkpoints)."""
    return {"source": {"uri": str(root / "src")}, "embedder": {"model": C.checkpoint("embedding", "small")},
            "reranker": {"model": C.checkpoint("reranker", "small")},
            "qdrant": {"path": str(root / "qdrant"), "collection": "bench"}, "output": {"dir": str(root / "runs")}}


def child(root: Path, queries: int) -> None:
    """One timed query-batch run (ingesting the collection first if it is not there)."""
    import ray

    from pipelines.config import parse_config
    from pipelines.ingest import run_ingest
    from pipelines.query_batch import run_query_batch
    from pipelines.query_files import QueryRow

    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    cfg = parse_config(config(root))
    if not (root / "qdrant").exists():
        rng = random.Random(0)
        (root / "src").mkdir(parents=True, exist_ok=True)
        for i in range(300):
            (root / "src" / f"d{i:03d}.txt").write_text(C.sentence(rng, rng.randint(20, 80)))
        run_ingest(cfg, echo=lambda _: None)
    rng = random.Random(1)
    rows = [QueryRow(str(i), {"text": C.sentence(rng, 8)}) for i in range(queries)]
    seconds, out = C.timed(lambda: run_query_batch(cfg, rows, top_k=30, top_n=5))
    assert all(r["error"] is None and len(r["hits"]) == 5 for r in out), out[0]
    print(f"RESULT {seconds:.2f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=96)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(Path(args.child), args.queries)
        return
    print("#", C.machine())
    variants = {"Ray's one thread per actor (QVL_TORCH_THREADS=1)": "1", "every core (default)": ""}
    times: dict[str, list[float]] = {name: [] for name in variants}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in ("embedding", "reranker"):
            C.checkpoint(kind, "small")  # built once, outside the timing
        warm = [sys.executable, __file__, "--child", tmp, "--queries", "4"]
        subprocess.run(warm, check=True, capture_output=True)  # ingests the collection
        for _ in range(args.repeats):
            for name, threads in variants.items():
                env = {**os.environ, "QVL_TORCH_THREADS": threads}
                run = subprocess.run([sys.executable, __file__, "--child", tmp, "--queries", str(args.queries)],
                                     env=env, check=True, capture_output=True, text=True)
                seconds = float(run.stdout.split("RESULT ")[1].split()[0])
                times[name].append(seconds)
                print(f"# {name}: {seconds:.1f}s", flush=True)
    base = C.best(times["Ray's one thread per actor (QVL_TORCH_THREADS=1)"])
    C.print_table(f"query-batch, {args.queries} queries, top 30 reranked (small, CPU, best of {args.repeats})",
                  ["query actors' model threads", "seconds", "queries/s", "speed-up"],
                  [[name, C.best(ts), args.queries / C.best(ts), f"{base / C.best(ts):.2f}x"]
                   for name, ts in times.items()])


if __name__ == "__main__":
    main()
