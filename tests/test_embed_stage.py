"""The embedding stage (`operators/embed_stage.py`) on one batch, as Ray Data hands it over.

Unit rows get one L2-normalised vector per named vector, equal to the embedder's own
``process`` at that dimension; a unit the model cannot read becomes a dead row of stage
``embed``; object rows pass through; image bytes do not travel on.
"""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image

from operators.embed_stage import EmbedStage, vector_column
from operators.units import Unit, object_row, unit_row

MRL = [16, 8]


@pytest.fixture(scope="module")
def stage(tiny_embedding_ckpt):
    s = EmbedStage(str(tiny_embedding_ckpt), MRL, {"token_budget": 2048, "max_batch_items": 2})
    yield s
    s.embedder.close()


def _png(color: tuple[int, int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 32), color).save(buf, format="PNG")
    return buf.getvalue()


def _numpy_batch(rows: list[dict]) -> dict[str, np.ndarray]:
    table = pa.Table.from_pylist(rows)
    return {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}


def test_unit_rows_get_the_embedders_vectors_at_every_dimension(stage):
    units = [Unit("/d/a.txt", "f1", "chunk=0", "text", text="a red square"),
             Unit("/d/b.png", "f2", "image", "image", image=_png((200, 10, 10))),
             Unit("/d/c.png", "f3", "image", "image", image=b"\x89PNG not really"),
             Unit("/d/d.txt", "f4", "chunk=0", "text", text="a blue circle")]
    rows = [unit_row(u, {"source_uri": u.object_uri}) for u in units]
    rows.insert(2, object_row("/d/b.png", "ok", 1, 0.01))
    out = stage(_numpy_batch(rows))

    assert "image" not in out
    assert list(out["row_kind"]) == ["unit", "unit", "object", "dead", "unit"]
    assert out["error_stage"][3] == "embed" and out["error_type"][3] == "InputError" and out["error_message"][3]
    assert out["error_message"][0] is None and out["text"][2] is None  # None stays None, not NaN
    good = [(0, units[0]), (1, units[1]), (4, units[3])]
    for dim in (None, *MRL):
        column = np.asarray(out[vector_column(dim)])
        want = stage.embedder.process([u.model_input() for _, u in good], dim=dim).numpy()
        np.testing.assert_allclose(column[[i for i, _ in good]], want, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(column[[i for i, _ in good]], axis=1), 1.0, atol=1e-5)
        assert not column[[2, 3]].any()  # object and dead rows keep zeros and are never written
    assert all(out["seconds"][i] > 0 for i in (0, 1, 3, 4))


def test_a_batch_without_units_passes_through(stage):
    out = stage(_numpy_batch([object_row("/d/empty.txt", "ok", 0, 0.0)]))
    assert list(out["row_kind"]) == ["object"] and np.asarray(out["vec_full"]).shape == (1, stage.embedder.hidden_size)


def nan_vision_checkpoint(ckpt, out):
    """A copy of a checkpoint whose vision tower yields NaN: its images get NaN vectors, its texts not."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    shutil.copytree(ckpt, out)
    weights = load_file(str(out / "model.safetensors"))
    name = "model.visual.merger.linear_fc2.weight"
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    return out


def test_a_vector_with_nan_components_fails_its_unit_alone(tiny_embedding_ckpt, tmp_path):
    """A NaN vector (a half-precision overflow) would reach Qdrant as null and fail the whole write
    request, and so the run. Here the vision tower yields NaN: the image fails, the text lands."""
    ckpt = nan_vision_checkpoint(tiny_embedding_ckpt, tmp_path / "nan-vision")
    stage = EmbedStage(str(ckpt), MRL, {"token_budget": 2048, "max_batch_items": 2})
    try:
        units = [Unit("/d/a.txt", "f1", "chunk=0", "text", text="a red square"),
                 Unit("/d/b.png", "f2", "image", "image", image=_png((200, 10, 10)))]
        out = stage(_numpy_batch([unit_row(u, {"source_uri": u.object_uri}) for u in units]))
    finally:
        stage.embedder.close()
    assert list(out["row_kind"]) == ["unit", "dead"]
    assert (out["error_stage"][1], out["error_type"][1]) == ("embed", "NonFiniteVector")
    assert "NaN or infinite components (an overflow in float32 arithmetic?)" in out["error_message"][1]
    for dim in (None, *MRL):
        column = np.asarray(out[vector_column(dim)])
        assert np.isfinite(column).all() and abs(np.linalg.norm(column[0]) - 1) < 1e-5 and not column[1].any()


def test_a_stage_let_go_closes_its_embedder(tiny_embedding_ckpt):
    # Ray Data deletes an actor's stage as it lets the actor go: the embedder's preparation processes
    # must stop then, while the process can still clean up after them (operators/model_actor.py).
    s = EmbedStage(str(tiny_embedding_ckpt), MRL, {"prepare_processes": 1})
    embedder = s.embedder
    assert embedder.embed([{"text": "hello"}])[0].ok and embedder._processes is not None
    del s
    assert embedder._closed and embedder._processes is None

