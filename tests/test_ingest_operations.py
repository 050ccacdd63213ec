"""Operational failures of an ingestion: what cannot work stops before any work naming its key; a dead store owner is survived."""

import json

import pytest
import yaml
from qdrant_client import QdrantClient

from pipelines.cli import main as qvl
from pipelines.config import parse_config
from pipelines.ingest import run_ingest
from pipelines.preflight import PreflightError
from pipelines.report import RunReport

from tests.media_gen import pattern_image
from tests.resilience_helpers import semaphores, semaphores_left


def _job(tmp_path, ckpt, **sections):
    """A one-file job: its YAML file's path, and the parsed config."""
    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "a.txt").write_text("a short note")
    data = {"source": {"uri": str(tmp_path / "src")}, "embedder": {"model": str(ckpt)},
            "qdrant": {"path": str(tmp_path / "qdrant"), "collection": "pre"},
            "output": {"dir": str(tmp_path / "runs")}}
    for key, value in sections.items():
        data.setdefault(key, {}).update(value)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path), parse_config(data)


def test_an_output_dir_that_cannot_be_written_stops_the_run_before_any_work(tmp_path, tiny_embedding_ckpt,
                                                                             ray_local):
    # /proc/self exists and is a folder, but nothing can be created in it, not even by root.
    path, cfg = _job(tmp_path, tiny_embedding_ckpt, output={"dir": "/proc/self"})
    with pytest.raises(PreflightError, match=r"output.dir '/proc/self' cannot be written"):
        run_ingest(cfg)
    assert not (tmp_path / "qdrant").exists() or not any((tmp_path / "qdrant").iterdir())
    assert qvl(["ingest", path, "--plan"]) == 2
    assert qvl(["ingest", path]) == 2


def test_a_store_held_by_another_process_is_named_by_its_key(tmp_path, tiny_embedding_ckpt, ray_local, capsys):
    path, cfg = _job(tmp_path, tiny_embedding_ckpt)
    holder = QdrantClient(path=cfg.qdrant.path)  # e.g. a running ingestion
    try:
        with pytest.raises(PreflightError, match=r"qdrant.path .* cannot be opened: .*one process at a time"):
            run_ingest(cfg)
        capsys.readouterr()
        assert qvl(["ingest", path]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"error: qdrant.path '{cfg.qdrant.path}' cannot be opened")
    finally:
        holder.close()
    assert run_ingest(cfg).points_written == 1  # once released, the same job runs


def test_a_report_is_written_whole_or_not_at_all(tmp_path):
    report = RunReport("r1", "c", "/src", "m")
    report.dead_letters.append({"uri": "/src/a", "stage": "expand"})
    run_dir = tmp_path / "r1"
    (run_dir / "report.json").mkdir(parents=True)  # the report's name taken: the write fails
    with pytest.raises(OSError):
        report.write(run_dir, "report.json", "dead_letters.jsonl", [])
    assert sorted(p.name for p in run_dir.iterdir()) == ["dead_letters.jsonl", "report.json"]
    assert json.loads((run_dir / "dead_letters.jsonl").read_text())["uri"] == "/src/a"
    (run_dir / "report.json").rmdir()
    report.write(run_dir, "report.json", "dead_letters.jsonl", [])
    assert json.loads((run_dir / "report.json").read_text())["run_id"] == "r1"


def test_a_run_whose_store_owner_died_still_counts_what_it_wrote(tmp_path, tiny_embedding_ckpt, ray_local):
    """The owner of an embedded store killed mid-run (an OOM kill): the report reads the store through a new one."""
    from pipelines.ingest import Store, _account_stopped_run, list_source

    _, cfg = _job(tmp_path, tiny_embedding_ckpt)
    assert run_ingest(cfg).points_written == 1
    objects, _ = list_source(cfg)
    store = Store(cfg)
    try:
        ray_local.kill(store.owner, no_restart=True)
        report = RunReport("stopped", "pre", cfg.source.uri, cfg.embedder.model)
        _account_stopped_run(report, objects, store, RuntimeError("the owner died"))
    finally:
        store.close()
    assert report.objects == {objects[0].uri: "ingested"} and report.points_written == 1
    assert "could not be read" not in report.error and not report.dead_letters


def test_an_ingestion_preparing_in_processes_leaves_no_semaphores_on_the_node(tmp_path, tiny_embedding_ckpt,
                                                                             ray_local):
    """prepare_processes (the GPU default) in the embedding actors: the run works, and the pools' named
    semaphores go with the actors (tests/test_qwen3vl_prepare_workers.py shows why they could stay)."""
    _, cfg = _job(tmp_path, tiny_embedding_ckpt, embedder={"prepare_processes": 1})
    pattern_image(3).save(tmp_path / "src" / "b.png")
    before = semaphores()
    assert run_ingest(cfg).points_written == 2
    assert semaphores_left(before) == set()

