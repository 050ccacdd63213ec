"""How the objects to ingest become expansion tasks (pipelines/expand_plan.py): manifests' records go
64 to a task (a big manifest's in ranges, small ones' packed together); whatever cannot be parsed
first, or whose parse hangs, is expanded whole; the ranges' status rows add up to the manifest's."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray

from operators.expand_stage import expand_work
from operators.expand_work import RECORDS_PER_TASK, ObjectGroup, RecordRanges, read_work, work_row
from operators.media.expand import ExpandSettings
from operators.media.listing import list_objects
from operators.units import SourceObject
from pipelines.expand_plan import (SplitManifests, input_blocks, merge_ranges, pack_manifests, parse_batches,
                                   record_ranges, split_manifests, work_rows)
from tests.media_gen import image_bytes, pattern_image

SETTINGS = ExpandSettings()


def _listed(path: Path) -> SourceObject:
    """The listing's object for one file."""
    objects, dead = list_objects(str(path))
    assert not dead and len(objects) == 1
    return objects[0]


def _jsonl(path: Path, records: list[dict]) -> SourceObject:
    """A JSONL manifest of `records`, listed."""
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return _listed(path)


def test_a_manifests_records_are_cut_into_ranges_that_know_the_whole(tmp_path):
    """150 records: ranges of 64, 64 and 22, in order, each knowing the manifest has 150."""
    obj = _jsonl(tmp_path / "m.jsonl", [{"id": f"r{i}", "text": f"record {i}"} for i in range(150)])
    ranges = record_ranges(obj, SETTINGS, None)
    assert [len(r.records) for r in ranges] == [64, 64, 22] and RECORDS_PER_TASK == 64
    assert [rec.id for r in ranges for rec in r.records] == [f"r{i}" for i in range(150)]
    assert {r.positions for r in ranges} == {150} and {r.obj.uri for r in ranges} == {obj.uri}


def test_a_parquet_manifest_is_cut_too(tmp_path):
    """Parquet rows are records as JSONL lines are."""
    pq.write_table(pa.table({"id": [f"p{i}" for i in range(70)], "text": [f"t{i}" for i in range(70)]}),
                   tmp_path / "m.parquet")
    ranges = record_ranges(_listed(tmp_path / "m.parquet"), SETTINGS, None)
    assert [len(r.records) for r in ranges] == [64, 6]


@pytest.mark.parametrize("content, why", [
    (b'{"text": "a"}\n{oops\n', None),  # parses: one good record is enough
    (b"[]\n", "no record it could read"),
    (b'{"nothing": 1}\n', "every record bad: its expansion writes the EmptyManifest letter"),
    (b"plain words, not JSON at all\n", "a text file named .jsonl"),
    (b"%PDF-1.4\n", "a PDF named .jsonl: not rendered here"),
])
def test_what_is_not_a_readable_manifest_is_expanded_whole(tmp_path, content, why):
    """Only a manifest with a usable record is cut; anything else is left to its expansion's letters."""
    (tmp_path / "m.jsonl").write_bytes(content)
    ranges = record_ranges(_listed(tmp_path / "m.jsonl"), SETTINGS, None)
    assert (ranges is None) == (why is not None), why


def test_a_manifest_over_the_object_cap_or_gone_is_expanded_whole(tmp_path):
    """The cap and a vanished file are the expansion's to report, with its letters."""
    obj = _jsonl(tmp_path / "m.jsonl", [{"text": "a"}])
    assert record_ranges(obj, ExpandSettings(max_object_bytes=obj.size - 1), None) is None
    (tmp_path / "m.jsonl").unlink()
    assert record_ranges(obj, SETTINGS, None) is None


def test_small_manifests_records_are_packed_and_a_big_ones_cut(tmp_path):
    """Records go at most 64 to a task: 150 in 64 + 64 + 22, and the next manifest's 30 and 12
    beside the 22; a file that is no manifest is left out."""
    big = _jsonl(tmp_path / "a.jsonl", [{"id": f"a{i}", "text": "x"} for i in range(150)])
    small = _jsonl(tmp_path / "b.jsonl", [{"id": f"b{i}", "text": "x"} for i in range(30)])
    tiny = _jsonl(tmp_path / "c.jsonl", [{"id": f"c{i}", "text": "x"} for i in range(12)])
    (tmp_path / "d.jsonl").write_text("plain words\n")
    parsed, work, most_rows, seconds = pack_manifests([big, small, _listed(tmp_path / "d.jsonl"), tiny], SETTINGS, None)
    assert parsed == [big.uri, small.uri, tiny.uri] and seconds > 0
    assert most_rows == 64 + 3  # the packed task: a row per record, and a status row per range
    tasks = [[(r.obj.uri, len(r.records)) for r in read_work(work_row(w)).ranges] for w in work]
    assert tasks == [[(big.uri, 64)], [(big.uri, 64)], [(big.uri, 22), (small.uri, 30), (tiny.uri, 12)]]


def test_parse_tasks_take_many_small_manifests_or_one_big_one():
    """Shares by bytes and by count, in listing order."""
    objs = [SourceObject(f"/m/{i}.jsonl", size, "f") for i, size in enumerate((10, 10, 100, 10, 10, 10))]
    assert [[o.size for o in b] for b in parse_batches(objs, max_bytes=50, max_count=2)] == [[10, 10], [100], [10, 10], [10]]


def test_split_manifests_parses_only_manifests_in_ray_tasks(ray_local, tmp_path):
    """Manifests by name are parsed (in Ray tasks); images and unparsable ones are not split."""
    (tmp_path / "a.png").write_bytes(image_bytes(pattern_image(1)))
    good = _jsonl(tmp_path / "good.jsonl", [{"id": str(i), "image": "a.png"} for i in range(100)])
    bad = _jsonl(tmp_path / "bad.jsonl", [{"nothing": 1}])
    image = _listed(tmp_path / "a.png")
    split = split_manifests([image, good, bad], SETTINGS, None, limit_s=60, batch_bytes=1)
    assert split.uris == {good.uri} and split.seconds > 0
    assert sorted(len(read_work(work_row(w)).ranges[0].records) for w in split.work) == [36, 64]


def test_a_parse_that_hangs_is_stopped_and_its_task_mates_parsed_again_alone(ray_local, tmp_path, caplog):
    """A manifest on a store that never answers shares a parse task with a healthy one: the worker's
    watchdog stops the task after limit_s and tells the journal which manifest hung; that one is left
    to be expanded whole, not parsed (and waited for) again, and the healthy one is parsed alone."""
    import http.server
    import threading

    from operators.crash_journal import start_journal, stop_journal

    hits = []

    class Stuck(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 (http.server's name)
            hits.append(self.command)
            time.sleep(60)

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stuck)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    journal = start_journal()
    try:
        stuck = SourceObject(f"http://127.0.0.1:{server.server_port}/m.jsonl", 100, "f")
        good = _jsonl(tmp_path / "good.jsonl", [{"text": str(i)} for i in range(70)])
        every_cpu = ray.cluster_resources()["CPU"]  # one parse at a time: a queued one's time runs from its start
        with caplog.at_level("WARNING", logger="pipelines.expand_plan"):
            split = split_manifests([stuck, good], SETTINGS, None, limit_s=3, cpus=every_cpu, journal=journal)
        assert split.uris == {good.uri} and split.most_rows == 64 + 1
        assert len(hits) == 1, hits  # parsed once: the journal named it
        assert f"parsing {stuck.uri} took over limits.max_expand_s=3 s; it is expanded whole" in caplog.text
        assert "the others are parsed again alone" in caplog.text
    finally:
        stop_journal(journal)
        server.shutdown()


def test_work_rows_hold_every_object_once_in_even_groups_and_the_records_after(ray_local, tmp_path):
    """Objects in input_blocks groups of sizes that differ by one at most, in order; the records' work after."""
    objects = [SourceObject(f"/d/{i}.png", 10, "f") for i in range(133)]
    manifest = _jsonl(tmp_path / "m.jsonl", [{"text": str(i)} for i in range(100)])
    parsed, work, _, _ = pack_manifests([manifest], SETTINGS, None)
    rows = work_rows([*objects[:50], manifest, *objects[50:]], SplitManifests(set(parsed), work))
    tasks = [read_work(row) for row in rows]
    groups = [w for w in tasks if isinstance(w, ObjectGroup)]
    assert len(groups) == input_blocks(133) and {len(g.objects) for g in groups} <= {133 // len(groups), 133 // len(groups) + 1}
    assert [o.uri for g in groups for o in g.objects] == [o.uri for o in objects]
    assert [len(w.ranges[0].records) for w in tasks[len(groups):]] == [64, 36]


def test_a_work_row_that_holds_something_else_is_refused():
    """A row of the wrong shape fails loudly, not as an empty task."""
    import pickle
    import zlib

    with pytest.raises(TypeError, match="not an expansion task's work: dict"):
        read_work({"work": zlib.compress(pickle.dumps({"uri": "x"}))})
    assert isinstance(read_work(work_row(RecordRanges(()))), RecordRanges)
    assert isinstance(read_work(work_row(ObjectGroup(()))), ObjectGroup)


def _range_rows(rng, model: Path) -> list[dict]:
    """The expansion stage's rows for one range."""
    return list(expand_work(work_row(RecordRanges((rng,))), settings=SETTINGS, storage_options=None, model=str(model),
                            model_id="m", dim=8))


def test_a_range_expands_its_records_alone_and_counts_its_own_units(tmp_path, tiny_embedding_ckpt):
    """Rows for the range's records only, each unit's payload counting the whole manifest's points;
    a range with no good record says failed but leaves the EmptyManifest verdict to the whole."""
    (tmp_path / "a.png").write_bytes(image_bytes(pattern_image(1)))
    records = [{"id": f"r{i}", "image": "a.png" if i < 70 else "missing.png"} for i in range(130)]
    ranges = record_ranges(_jsonl(tmp_path / "m.jsonl", records), SETTINGS, None)
    first, last = (_range_rows(ranges[i], tiny_embedding_ckpt) for i in (0, 2))
    assert [r["position"] for r in first[:-1]] == [f"record=r{i}" for i in range(64)]
    assert json.loads(first[0]["payload"])["object_units"] == 130
    assert (first[-1]["row_kind"], first[-1]["status"], first[-1]["n_units"]) == ("object", "ok", 64)
    assert [r["row_kind"] for r in last] == ["dead"] * 2 + ["object"]
    assert (last[-1]["status"], last[-1]["n_units"]) == ("failed", 0)
    assert "EmptyManifest" not in {r["error_type"] for r in last}


def _status(uri: str, status: str, n: int, seconds: float = 1.0) -> dict:
    return {"object_uri": uri, "status": status, "n_units": n, "seconds": seconds}


def _letter(uri: str, position: str | None, stage: str = "expand", error_type: str = "FileNotFoundError") -> dict:
    return {"object_uri": uri, "position": position, "error_stage": stage, "error_type": error_type,
            "error_message": "m"}


def test_merge_ranges_adds_a_split_manifests_ranges_up_into_one_status():
    """Units and seconds summed, ok if any range is; other objects untouched."""
    summary = {"objects": [_status("m", "ok", 64), _status("x", "failed", 0), _status("m", "failed", 0),
                           _status("m", "ok", 6, 2.5)], "dead": [_letter("m", "record=1")], "points": 70}
    merged = merge_ranges(summary, {"m"})
    assert merged["objects"] == [_status("x", "failed", 0), _status("m", "ok", 70, 4.5)]
    assert merged["dead"] == summary["dead"] and merged["points"] == 70
    assert merge_ranges(summary, set()) is summary
    assert merge_ranges({**summary, "stage_seconds": {"expand": 1.0}}, {"m"}, 2.5)["stage_seconds"] == {"expand": 3.5}


def test_merge_ranges_writes_the_empty_manifest_letter_of_a_split_manifest_without_units():
    """As a whole manifest's expansion would: one summary letter counting its bad records."""
    dead = [_letter("m", "record=1"), _letter("m", "record=2"), _letter("m", None, "write"),
            _letter("other", "record=1")]
    merged = merge_ranges({"objects": [_status("m", "failed", 0), _status("m", "failed", 0)], "dead": dead}, ["m"])
    assert merged["objects"] == [_status("m", "failed", 0, 2.0)]
    assert merged["dead"][:-1] == dead
    assert merged["dead"][-1] == {"object_uri": "m", "position": None, "error_stage": "expand",
                                  "error_type": "EmptyManifest",
                                  "error_message": "manifest yielded no usable record (2 bad records)"}
