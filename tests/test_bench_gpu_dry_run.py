"""bench/gpu_bench.py on CPU (--dry-run): the GPU script's every path runs and stays exact.

A device session has 15 minutes in all: a GPU script broken by a later change would spend them
on a traceback. The dry run takes the same code paths with a tiny float32 checkpoint on CPU,
where every comparison it reports must be exact to float32 rounding. Nothing here is timed.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOL = 1e-4  # float32, tiny checkpoint: batching and prefix reuse change only rounding


def test_gpu_bench_dry_run_is_exact(tmp_path: Path) -> None:
    out = tmp_path / "gpu_bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_bench.py"), "--dry-run",
                           "--ckpt-dir", str(tmp_path / "ckpt"), "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out.read_text())

    assert len(results["exactness"]) == 4, results["exactness"]
    assert all(diff <= TOL for diff in results["exactness"].values()), results["exactness"]
    embedder = {r["workload"]: r for r in results["embedder"]}
    assert len(embedder) == 7 and any(w.startswith("image") for w in embedder), list(embedder)
    for row in embedder.values():
        assert row["max_abs_vector_diff"] <= TOL, row
        assert row["ours_items_s"] > 0 and row["baseline_items_s"] > 0, row
    reranker = {r["scenario"]: r for r in results["reranker"]}
    assert len(reranker) == 4, list(reranker)
    for row in reranker.values():
        assert row["max_abs_score_diff"] <= TOL, row
        assert row["prefix_tokens"] > 0, row
    # The tables are what a device session reads from its output.
    assert "### Reranker top-6 on cpu" in proc.stdout and "### Embedder on cpu" in proc.stdout
