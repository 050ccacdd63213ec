"""`qvl ingest --plan` (pipelines/preview.py): the run's plan, read-only, equal to what the run then does."""

from __future__ import annotations

import os

import re

import pytest
from qdrant_client import QdrantClient

from pipelines.cli import EXIT_CONFIG, EXIT_OK, main as qvl
from pipelines.config import parse_config
from pipelines.ingest import run_ingest
from pipelines.preflight import PreflightError
from pipelines.preview import preview_ingest
from tests.resilience_helpers import all_points, config_dict, free_port, write_yaml


def _texts(src, names):
    src.mkdir(parents=True, exist_ok=True)
    for name in names:
        (src / name).write_text(f"The note called {name}, about lanterns and rivers.")


def test_the_plan_is_what_the_run_then_does_and_writes_nothing(tmp_path, tiny_embedding_ckpt, ray_local, capsys):
    src = tmp_path / "src"
    _texts(src, ["a.txt", "b.txt", "c.txt", "d.txt"])
    data = config_dict(src, tiny_embedding_ckpt, tmp_path)
    path = write_yaml(data, tmp_path / "cfg.yaml")
    cfg = parse_config(data)

    # No store yet: everything is new, and the store folder is not created.
    first = preview_ingest(cfg)
    assert not (tmp_path / "qdrant").exists() and not first.collection_exists
    assert first.counts() == {"new": 4, "changed": 0, "unchanged": 0, "unlisted": 0, "vanished": 0}
    assert run_ingest(cfg, echo=lambda _: None).counts()["ingested"] == 4

    (src / "b.txt").write_text("Rewritten: now about bridges.")  # changed
    (src / "c.txt").unlink()  # vanished
    _texts(src, ["e.txt"])  # new
    os.symlink(src / "nowhere", src / "dangling.txt")  # cannot be listed
    points_before = sorted(str(p.id) for p in all_points(tmp_path / "qdrant"))
    preview = preview_ingest(cfg, prune=True)
    assert preview.counts() == {"new": 1, "changed": 1, "unchanged": 2, "unlisted": 1, "vanished": 1}
    assert [o.uri for o in preview.plan.todo] == [str(src / "b.txt"), str(src / "e.txt")]
    assert preview.plan.vanished == [str(src / "c.txt")]
    assert sorted(str(p.id) for p in all_points(tmp_path / "qdrant")) == points_before
    runs = sorted(os.listdir(tmp_path / "runs"))

    assert qvl(["ingest", path, "--plan", "--prune", "--plan-limit", "1"]) == EXIT_OK
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"plan for collection 'media' in embedded store {tmp_path / 'qdrant'}: 4 objects listed"
    assert out[1:3] == ["  to embed 2 (new 1, changed 1), unchanged 2, could not be listed 1",
                        "  vanished from the source 1: their points are deleted (--prune)"]
    assert f"  new: {src / 'e.txt'}" in out and f"  changed: {src / 'b.txt'}" in out
    assert f"  vanished: {src / 'c.txt'}" in out and out[-1] == "nothing was embedded or written"
    assert any(line.startswith(f"  could not be listed: {src / 'dangling.txt'}: symlink target") for line in out)
    assert sorted(os.listdir(tmp_path / "runs")) == runs  # no run folder either

    # The run does exactly what the plan said.
    report = run_ingest(cfg, prune=True, echo=lambda _: None)
    assert sorted(u for u, s in report.objects.items() if s == "ingested") == [str(src / "b.txt"), str(src / "e.txt")]
    assert sorted(u for u, s in report.objects.items() if s == "unchanged") == [str(src / "a.txt"), str(src / "d.txt")]
    assert report.pruned_objects == 1
    assert preview_ingest(cfg).counts() == {"new": 0, "changed": 0, "unchanged": 4, "unlisted": 1, "vanished": 0}


def test_the_plan_stops_where_the_run_would(tmp_path, tiny_embedding_ckpt, ray_local, capsys):
    src = tmp_path / "src"
    _texts(src, ["a.txt"])
    data = config_dict(src, tiny_embedding_ckpt, tmp_path)
    run_ingest(parse_config(data), echo=lambda _: None)

    # A collection of another layout: the run's own preflight message.
    other = parse_config({**data, "embedder": {**data["embedder"], "mrl_dims": [24]}})
    with pytest.raises(PreflightError, match="collection 'media' has no vector 'mrl_24'"):
        preview_ingest(other)
    # The embedded store held by another process (here: another client).
    holder = QdrantClient(path=str(tmp_path / "qdrant"))
    try:
        with pytest.raises(PreflightError, match=f"qdrant.path '{tmp_path / 'qdrant'}' cannot be opened"):
            preview_ingest(parse_config(data))
    finally:
        holder.close()
    # A missing source and an unreachable server: one error line, exit 2, as for the run.
    missing = write_yaml({**data, "source": {"uri": str(tmp_path / "nope")}}, tmp_path / "missing.yaml")
    assert qvl(["ingest", missing, "--plan"]) == EXIT_CONFIG
    assert capsys.readouterr().err.startswith(f"error: source.uri '{tmp_path / 'nope'}' cannot be listed")
    url = f"http://127.0.0.1:{free_port()}"
    server = write_yaml({**data, "qdrant": {"url": url, "collection": "media", "timeout_s": 5}}, tmp_path / "s.yaml")
    assert qvl(["ingest", server, "--plan"]) == EXIT_CONFIG
    assert capsys.readouterr().err.startswith(f"error: qdrant.url {url} is unreachable")
    # A file where a folder should be, and a cluster that does not answer: nothing created.
    afile = tmp_path / "afile"
    afile.write_text("x")
    for key, section, value in (("output.dir", "output", {"dir": str(afile)}),
                                ("qdrant.path", "qdrant", {"path": str(afile), "collection": "media"}),
                                ("compute.ray_address", "compute", {"ray_address": f"127.0.0.1:{free_port()}"})):
        with pytest.raises(PreflightError, match=re.escape(key)):
            preview_ingest(parse_config({**data, section: value}))
    assert afile.read_text() == "x"
