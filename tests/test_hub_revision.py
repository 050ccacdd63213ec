"""Checkpoints by hub id and revision: the embedder, the reranker, the expansion's tokenizer and the
preflight checks all load the pinned commit, from a real hub cache layout, offline.

huggingface_hub reads HF_HUB_CACHE when it is imported, so each check runs in a process of its own
with the cache in its environment (tests/hub_cache.py).
"""

import json
import os
from pathlib import Path

import pytest

from operators.qwen3vl.checkpoint import build_checkpoint
from tests.hub_cache import add_snapshot, hub_env
from tests.resilience_helpers import REPO, run_json_script, write_notes

REPO_ID = "qvl-test/tiny-emb"


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_embedding_ckpt, tiny_reranker_ckpt):
    """A hub cache: `main` is the session's tiny embedder, `v2` one of another seed, `rr` a reranker."""
    root = tmp_path_factory.mktemp("hub")
    other = build_checkpoint(root / "seed1", "embedding", "tiny", seed=1)
    cache = root / "cache"
    commits = {"main": add_snapshot(cache, REPO_ID, tiny_embedding_ckpt, ["main"]),
               "v2": add_snapshot(cache, REPO_ID, other, ["v2"]),
               "rr": add_snapshot(cache, REPO_ID, tiny_reranker_ckpt, ["rr"])}
    return {"cache": cache, "commits": commits, "paths": {"main": str(tiny_embedding_ckpt), "v2": str(other),
                                                          "rr": str(tiny_reranker_ckpt)}}


def run_python(code: str, cache: Path, *args: str, timeout_s: float = 300) -> dict:
    """Run `code` (with `args` as sys.argv[1:]) in a fresh interpreter that loads from `cache` only;
    its last stdout line is JSON."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "TRANSFORMERS_", "RAY_ADDRESS"))}
    env.update(hub_env(cache), PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0")
    return run_json_script(code, *args, env=env, timeout_s=timeout_s)


LIBRARY_CHECKS = r"""
import json, sys
import numpy as np
from operators.expand_stage import tokenizer_for
from operators.qwen3vl import ModelLoadError, Qwen3VLEmbedder, Qwen3VLReranker
from pipelines.preflight import PreflightError, check_checkpoint_kind, model_dimension

repo, paths, commits = sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3])
items = [{"text": "a red square"}, {"text": "a small blue circle on white"}]

def vectors(model, revision=None):
    emb = Qwen3VLEmbedder(model, revision=revision, device="cpu")
    try:
        return np.stack([r.vector for r in emb.embed(items)])
    finally:
        emb.close()

out = {}
by_hub = {"default": vectors(repo), "v2": vectors(repo, "v2"), "v2_commit": vectors(repo, commits["v2"])}
by_path = {"main": vectors(paths["main"]), "v2": vectors(paths["v2"])}
out["default_is_main"] = float(np.abs(by_hub["default"] - by_path["main"]).max())
out["v2_is_v2"] = float(np.abs(by_hub["v2"] - by_path["v2"]).max())
out["commit_is_v2"] = float(np.abs(by_hub["v2_commit"] - by_path["v2"]).max())
out["main_vs_v2"] = float(np.abs(by_path["main"] - by_path["v2"]).max())
out["chunk_ids_equal"] = tokenizer_for(repo, "v2").encode("a red square").ids == \
    tokenizer_for(paths["v2"]).encode("a red square").ids
out["dimension"] = model_dimension(repo, "v2")
try:
    check_checkpoint_kind("embedder.model", repo, "embedding", revision="rr")
    out["kind_error"] = None
except PreflightError as exc:
    out["kind_error"] = str(exc)
try:
    Qwen3VLEmbedder(repo, revision="no-such-branch", device="cpu")
    out["load_error"] = None
except ModelLoadError as exc:
    out["load_error"] = str(exc)[:300]
query, docs = {"text": "a red square"}, [{"text": "red"}, {"text": "a square, red"}]
rr_hub = Qwen3VLReranker(repo, revision="rr", device="cpu")
rr_path = Qwen3VLReranker(paths["rr"], device="cpu")
try:
    a = [r.score for r in rr_hub.score(query, docs)]
    b = [r.score for r in rr_path.score(query, docs)]
    out["rerank_diff"] = max(abs(x - y) for x, y in zip(a, b))
finally:
    rr_hub.close()
    rr_path.close()
print(json.dumps(out))
"""


def test_hub_revisions_load_the_pinned_commit(hub):
    out = run_python(LIBRARY_CHECKS, hub["cache"], REPO_ID, json.dumps(hub["paths"]), json.dumps(hub["commits"]))
    assert out["main_vs_v2"] > 1e-3  # the two snapshots really differ
    assert out["default_is_main"] == 0.0
    assert out["v2_is_v2"] == 0.0 and out["commit_is_v2"] == 0.0
    assert out["chunk_ids_equal"] is True
    assert out["dimension"] > 0
    assert out["kind_error"] and f"'{REPO_ID}@rr' is not a Qwen3-VL-Embedding checkpoint" in out["kind_error"]
    assert out["load_error"] and f"'{REPO_ID}@no-such-branch'" in out["load_error"]
    assert out["rerank_diff"] == 0.0


JOB = r"""
import json, sys
from pipelines.config import parse_config
from pipelines.ingest import run_ingest
from pipelines.query import QueryEngine
from tests.resilience_helpers import all_points, config_dict
from pathlib import Path

src, repo, tmp = sys.argv[1], sys.argv[2], Path(sys.argv[3])
out = {}

def job(revision, collection="media"):
    data = config_dict(src, repo, tmp)
    data["embedder"]["revision"] = revision
    data["qdrant"]["collection"] = collection
    return parse_config(data)

def stored():
    return sorted({p.payload["model_id"] for p in all_points(tmp / "qdrant")})

report = run_ingest(job("v2"), echo=lambda line: None)
out["first"], out["first_models"], out["commit"] = report.counts()["ingested"], stored(), report.model_commit
out["again_unchanged"] = run_ingest(job("v2"), echo=lambda line: None).counts()["unchanged"]
for revision in ("v2", None):
    warnings = []
    engine = QueryEngine(job(revision), with_reranker=False, warn=warnings.append)
    try:
        hits = engine.search({"text": "lanterns"}, top_k=5, top_n=5, rerank=False)
    finally:
        engine.close()
    out[f"warnings_{revision}"] = warnings
    out[f"hits_{revision}"] = len(hits.hits)
unpinned = run_ingest(job(None), echo=lambda line: None).counts()
out["unpinned_ingested"], out["unpinned_models"] = unpinned["ingested"], stored()

# The branch moves on the hub once the driver has resolved it: the workers still load that commit.
import numpy as np
import pipelines.ingest as ingest
from operators.qwen3vl import Qwen3VLEmbedder
ref = Path(sys.argv[4]) / "refs" / "v2"
pinned, resolve = ref.read_text(), ingest.embedding_checkpoint

def resolve_then_move(model, revision):
    resolved = resolve(model, revision)
    ref.write_text(sys.argv[5])  # v2 now names main's commit
    return resolved

ingest.embedding_checkpoint = resolve_then_move
try:
    out["moved_commit"] = run_ingest(job("v2", "moved"), echo=lambda line: None).model_commit
finally:
    ref.write_text(pinned)
points = {Path(p.payload["source_uri"]).name: np.asarray(p.vector["full"])
          for p in all_points(tmp / "qdrant", "moved", vectors=True)}
for name in ("v2", "main"):
    with Qwen3VLEmbedder(sys.argv[6 if name == "v2" else 7]) as emb:
        want = emb.embed([{"text": (Path(src) / "a.txt").read_text()}])[0].vector
    out[f"moved_vs_{name}"] = float(np.abs(points["a.txt"] - want).max())

# query-batch: its actors load the commits the driver resolved, though both branches move meanwhile.
import pipelines.query_batch as qb
from pipelines.query_files import QueryRow
rr_ref = Path(sys.argv[4]) / "refs" / "rr"
rr_pinned, start_pool = rr_ref.read_text(), qb.map_on_actor_pool

def batch_job():
    data = config_dict(src, repo, tmp, embedder={"revision": "v2"}, qdrant={"collection": "moved"},
                       reranker={"model": repo, "revision": "rr"})
    return parse_config(data)

def scores():
    try:
        rows = qb.run_query_batch(batch_job(), [QueryRow("q", {"text": "lanterns"})], top_k=2, top_n=2)
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"[:300]
    return rows[0]["error"] or sorted((h["source_uri"], h["vector_score"], h["rerank_score"]) for h in rows[0]["hits"])

def move_then_start(*args, **kwargs):  # after the driver's checks, before any actor loads a model
    ref.write_text(sys.argv[5])  # v2 and rr now name main's commit (an embedder, no reranker)
    rr_ref.write_text(sys.argv[5])
    return start_pool(*args, **kwargs)

out["batch_pinned"] = scores()
qb.map_on_actor_pool = move_then_start
try:
    out["batch_moved"] = scores()
finally:
    ref.write_text(pinned)
    rr_ref.write_text(rr_pinned)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_pinned_revision_is_ingested_recorded_and_checked_by_queries(hub, tmp_path):
    src = write_notes(tmp_path / "src")
    repo_dir = hub["cache"] / f"models--{REPO_ID.replace('/', '--')}"
    out = run_python(JOB, hub["cache"], str(src), REPO_ID, str(tmp_path), str(repo_dir), hub["commits"]["main"],
                     hub["paths"]["v2"], hub["paths"]["main"])
    assert out["first"] == 2 and out["first_models"] == [f"{REPO_ID}@v2"]
    assert out["commit"] == hub["commits"]["v2"]  # what every worker loaded, for the record
    assert out["again_unchanged"] == 2
    assert out["warnings_v2"] == [] and out["hits_v2"] == 2
    # The same name at its default branch is other weights: the query says so.
    assert len(out["warnings_None"]) == 1 and f"'{REPO_ID}@v2'" in out["warnings_None"][0], out["warnings_None"]
    # Dropping the pin changes the settings digest: every object is embedded again, by `main`.
    assert out["unpinned_ingested"] == 2 and out["unpinned_models"] == [REPO_ID]
    # v2 moved to main's commit between the driver's resolution and the workers' loads.
    assert out["moved_commit"] == hub["commits"]["v2"]
    assert out["moved_vs_v2"] < 1e-5 < 1e-3 < out["moved_vs_main"], out
    # So do query-batch's actors, for the embedder and the reranker: the same hits and scores.
    assert len(out["batch_pinned"]) == 2 and all(h[2] is not None for h in out["batch_pinned"])
    assert out["batch_moved"] == out["batch_pinned"]
