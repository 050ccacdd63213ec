"""The expansion stage's rows (operators/expand_stage.py): a manifest's records are passed on as they
are read, so a task never holds all the images a manifest references; waiting on its consumer is
not a hang."""

from __future__ import annotations

import io
import json
import time
import tracemalloc
from pathlib import Path

import numpy as np
import ray
from PIL import Image

from operators.crash_journal import start_journal
from operators.expand_stage import HANDOVER_BYTES, object_rows, tokenizer_for
from operators.media.expand import ExpandSettings
from operators.media.listing import list_objects
from operators.units import SourceObject


def _raw_png(path: Path, side: int, seed: int) -> int:
    """An uncompressed noise PNG of side x side pixels; returns its size in bytes."""
    arr = np.random.default_rng(seed).integers(0, 256, (side, side, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=0)
    path.write_bytes(buf.getvalue())
    return len(buf.getvalue())


def _manifest(folder: Path, images: list[str]) -> SourceObject:
    """A JSONL manifest of one record per image (ids r0, r1, ...), as listed."""
    (folder / "list.jsonl").write_text("".join(json.dumps({"id": f"r{i}", "image": name}) + "\n"
                                               for i, name in enumerate(images)))
    objects, _ = list_objects(str(folder / "list.jsonl"))
    return objects[0]


def _rows(obj: SourceObject, model: Path, **kwargs) -> object:
    """object_rows for a listed object, chunking text in `model`'s tokens."""
    return object_rows(obj, settings=ExpandSettings(), storage_options=None, model=str(model),
                       model_id="m", dim=8, **kwargs)


def test_a_manifests_images_are_passed_on_as_they_are_read(tmp_path, tiny_embedding_ckpt):
    """80 records of 1.1 MB images (88 MB in all): the rows' reader holds at most a handover's worth."""
    size = _raw_png(tmp_path / "big.png", 600, seed=1)
    total = 80 * size
    row = _manifest(tmp_path, ["big.png"] * 79 + ["last.png"])
    _raw_png(tmp_path / "last.png", 600, seed=2)

    tokenizer_for(str(tiny_embedding_ckpt))  # loaded once per process, not this expansion's memory
    rows = iter(_rows(row, tiny_embedding_ckpt))
    tracemalloc.start()
    try:
        first = next(rows)
        (tmp_path / "last.png").unlink()  # read after the first row was passed on: its record fails
        kinds = [first["row_kind"]] + [r["row_kind"] for r in rows]  # each row dropped once counted
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kinds == ["unit"] * 79 + ["dead", "object"], kinds
    assert json.loads(first["payload"])["object_units"] == 80
    assert peak < HANDOVER_BYTES + 8 * size < total / 2, (peak, total)


def test_a_manifest_with_no_good_record_fails_with_a_summary(tmp_path, tiny_embedding_ckpt):
    row = _manifest(tmp_path, ["missing-1.png", "missing-2.png"])
    rows = list(_rows(row, tiny_embedding_ckpt))
    assert [(r["row_kind"], r["position"], r["error_type"]) for r in rows[:-1]] == [
        ("dead", "record=r0", "FileNotFoundError"), ("dead", "record=r1", "FileNotFoundError"),
        ("dead", None, "EmptyManifest")]
    assert (rows[-1]["row_kind"], rows[-1]["status"], rows[-1]["n_units"]) == ("object", "failed", 0)


def test_a_worker_without_the_tokenizer_fails_its_text_objects_and_expands_the_rest(tmp_path):
    """A worker that cannot load the embedder's tokenizer (a node without the model, the hub out of
    reach) must not cut text on word pieces: those chunks would differ from other workers' and,
    the file unchanged, stay so. Its text fails (retried next run); an image is expanded as ever."""
    (tmp_path / "note.txt").write_text("A short note about lanterns.")
    (tmp_path / "red.png").write_bytes(image_bytes := _png_bytes())
    objects, _ = list_objects(str(tmp_path))
    missing = tmp_path / "no-such-model"
    rows = {o.uri: list(_rows(o, missing)) for o in objects}
    text = rows[str(tmp_path / "note.txt")]
    assert [(r["row_kind"], r["error_type"]) for r in text[:-1]] == [("dead", "TokenizerUnavailableError")]
    assert text[0]["error_message"].startswith("the embedder's tokenizer cannot be loaded on this worker (")
    assert (text[-1]["status"], text[-1]["n_units"]) == ("failed", 0)
    image = rows[str(tmp_path / "red.png")]
    assert [r["row_kind"] for r in image] == ["unit", "object"] and image[0]["image"] == image_bytes


def _png_bytes() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (200, 10, 10)).save(buf, format="PNG")
    return buf.getvalue()


@ray.remote(max_retries=0)
def _expand_slowly_consumed(row: dict, model: Path, journal) -> list[str]:
    """Expand a manifest under a 1 s limit per record, its consumer taking 3 s over the first rows."""
    kinds = []
    for out in _rows(row, model, crash_journal=journal, max_expand_s=1.0):
        if not kinds:
            time.sleep(3)  # as Ray Data holding the task while the embedders catch up
        kinds.append(out["row_kind"])
    return kinds


def test_waiting_on_the_consumer_is_not_a_hang(tmp_path, tiny_embedding_ckpt, ray_local):
    """A record over HANDOVER_BYTES is passed on at once; the 3 s its consumer then takes is not
    counted against max_expand_s (the watchdog would stop the task's process)."""
    side = int((HANDOVER_BYTES / 3) ** 0.5) + 8
    _raw_png(tmp_path / "huge.png", side, seed=3)
    row = _manifest(tmp_path, ["huge.png", "huge.png"])
    journal = start_journal()
    try:
        assert ray.get(_expand_slowly_consumed.remote(row, tiny_embedding_ckpt, journal), timeout=120) == ["unit", "unit", "object"]
    finally:
        ray.kill(journal)


def test_the_time_ray_data_holds_the_task_is_not_expansion_time(tmp_path, tiny_embedding_ckpt):
    """The status row's seconds go into the report's expand stage: a slow consumer must not inflate them."""
    _raw_png(tmp_path / "a.png", 32, seed=4)
    (tmp_path / "note.txt").write_text("a few words to embed")
    for row in (_manifest(tmp_path, ["a.png", "a.png"]), list_objects(str(tmp_path / "note.txt"))[0][0]):
        started = time.perf_counter()
        rows = []
        for out in _rows(row, tiny_embedding_ckpt):
            time.sleep(0.5)  # as Ray Data holding the task
            rows.append(out)
        assert rows[-1]["row_kind"] == "object" and rows[-1]["status"] == "ok"
        assert rows[-1]["seconds"] < 0.4 < time.perf_counter() - started, rows[-1]


def _journal_blames(journal, task: str, item: str) -> object:
    """The guard of a task's third attempt, after its careful second attempt died reading `item`."""
    from operators.crash_journal import TaskGuard

    ray.get(journal.begin.remote(task))  # attempt 1 died, naming nothing
    careful = TaskGuard(journal, task)  # attempt 2 names each item before reading it ...
    ray.get(journal.enter.remote(task, item))  # ... and died reading this one
    assert careful.careful
    return TaskGuard(journal, task)


def test_a_retry_leaves_out_the_one_record_that_killed_its_worker(tmp_path, tiny_embedding_ckpt, ray_local):
    """Records are journalled by line: a bad line 1 and a record whose id is '1' are two items, and a
    record that reads nothing (a bad line) is never blamed, so the retry's rows before the culprit
    are the first attempt's."""
    from operators.expand_stage import _manifest_rows
    from operators.media.expand import start_expansion

    _raw_png(tmp_path / "ok.png", 16, seed=5)
    lines = ["{not json", json.dumps({"id": "1", "image": "ok.png"}), json.dumps({"id": "x", "image": "ok.png"}),
             json.dumps({"id": "x", "text": "a duplicate id"})]
    (tmp_path / "list.jsonl").write_text("\n".join(lines) + "\n")
    obj = list_objects(str(tmp_path / "list.jsonl"))[0][0]
    expansion = start_expansion(obj, ExpandSettings())
    first = [(r["row_kind"], r["position"], r["error_type"]) for r in
             _manifest_rows(expansion, None, "m", 8, "now", time.perf_counter())]
    journal = start_journal()
    try:
        guard = _journal_blames(journal, "t", f"{obj.uri}\0line=3")  # the first record with id 'x'
        retry = [(r["row_kind"], r["position"], r["error_type"]) for r in
                 _manifest_rows(start_expansion(obj, ExpandSettings()), guard, "m", 8, "now", time.perf_counter())]
    finally:
        ray.kill(journal)
    assert first[:3] == [("dead", "record=1", "InvalidJSON"), ("unit", "record=1", None), ("unit", "record=x", None)]
    assert retry[:2] == first[:2]
    assert retry[2] == ("dead", "record=x", "WorkerCrashed") and retry[3] == first[3] == ("dead", "record=x", "DuplicateId")
