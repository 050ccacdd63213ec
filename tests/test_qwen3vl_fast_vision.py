"""The fast vision-tower path: the stock tower's outputs, with one attention call per run of equal chunks."""

import pytest
import torch

from operators.qwen3vl import Qwen3VLEmbedder
from transformers.models.qwen3_vl.modeling_qwen3_vl import apply_rotary_pos_emb_vision

from operators.qwen3vl.fast_vision import _equal_runs, _rotary_qk, set_fast_vision
from operators.qwen3vl.preprocess import collate
from tests.media_gen import pattern_image, write_video


@pytest.fixture(scope="module", params=["sdpa", "eager"])
def embedder(request, tiny_embedding_ckpt):
    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt), attn_implementation=request.param)
    yield emb
    emb.close()


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fast_vision")
    paths = []
    for i, size in enumerate([(96, 64), (96, 64), (300, 40), (96, 64), (64, 128)]):
        paths.append(root / f"img{i}.png")
        pattern_image(i, size, "RGB").save(paths[-1])
    video = write_video(root / "clip.mp4", seconds=2.0)
    # Runs of equal grids (0-1), a different one between (2), a repeat after it (3), a video's frames.
    return ([{"image": str(p)} for p in paths[:4]] + [{"image": str(paths[4]), "text": "caption"},
                                                      {"video": str(video)}])


def _tower_outputs(emb, prepared):
    batch = {k: v for k, v in collate(prepared, emb.processor.tokenizer.pad_token_id, "right").items()}
    visual = emb.backbone.visual
    with torch.inference_mode():
        images = visual(batch["pixel_values"].to(visual.dtype), grid_thw=batch["image_grid_thw"])
    return images


def test_fast_tower_equals_the_stock_tower(embedder, inputs):
    prepared = [embedder.prepare(x) for x in inputs[:5]]
    set_fast_vision(embedder.model, False)
    try:
        stock_hidden, stock_deep = _tower_outputs(embedder, prepared)
    finally:
        set_fast_vision(embedder.model, True)
    fast_hidden, fast_deep = _tower_outputs(embedder, prepared)
    assert torch.allclose(fast_hidden, stock_hidden, atol=1e-5, rtol=0)
    assert len(fast_deep) == len(stock_deep) > 0
    for a, b in zip(fast_deep, stock_deep):
        assert torch.allclose(a, b, atol=1e-5, rtol=0)


def test_fast_path_vectors_equal_stock_vectors(embedder, inputs):
    fast = embedder.process(inputs)
    set_fast_vision(embedder.model, False)
    try:
        stock = embedder.process(inputs)
    finally:
        set_fast_vision(embedder.model, True)
    assert (fast - stock).abs().max() < 1e-5


def test_the_per_grid_cache_is_bounded_by_bytes(tiny_embedding_ckpt, inputs, monkeypatch):
    """Grids of many sizes filled 256 entries whatever their size (gigabytes of a real model's
    position embeddings): the cache keeps at most _CACHED_BYTES, and vectors are unchanged."""
    from operators.qwen3vl import fast_vision

    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt))
    try:
        want = emb.process(inputs)
        state = emb.backbone.visual._qvl_fast
        one = sum(t.numel() * t.element_size() for t in next(iter(state._cache.values())))
        state._cache.clear()
        state._bytes = 0
        monkeypatch.setattr(fast_vision, "_CACHED_BYTES", 2 * one)
        assert (emb.process(inputs) - want).abs().max() < 1e-6
        held = sum(t.numel() * t.element_size() for value in state._cache.values() for t in value)
        assert 0 < held == state._bytes <= 2 * one
    finally:
        emb.close()


def test_fast_path_batches_attention_per_run_of_equal_chunks(tiny_embedding_ckpt, inputs, monkeypatch):
    embedder = Qwen3VLEmbedder(str(tiny_embedding_ckpt), attn_implementation="sdpa")
    prepared = [embedder.prepare(x) for x in inputs[:5]]
    calls = []
    original = torch.nn.functional.scaled_dot_product_attention

    def counting(q, *args, **kwargs):
        calls.append(q.shape[0])
        return original(q, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", counting)
    _tower_outputs(embedder, prepared)
    depth = len(embedder.backbone.visual.blocks)
    # grids: A A B A C -> runs (A x2), B, A, C: 4 calls per layer, the first with a batch of 2.
    assert len(calls) == 4 * depth and calls[:4] == [2, 1, 1, 1]
    calls.clear()
    set_fast_vision(embedder.model, False)
    try:
        _tower_outputs(embedder, prepared)
    finally:
        set_fast_vision(embedder.model, True)
    assert len(calls) == 5 * depth  # the stock tower: one call per image per layer
    embedder.close()


def test_equal_runs():
    assert _equal_runs([4, 4, 9, 4, 4, 4]) == [(4, 2), (9, 1), (4, 3)]
    assert _equal_runs([]) == []


@pytest.mark.parametrize("upcast", [True, False])  # False: the GPU's mixed-dtype products, run here on CPU
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rotary_is_bit_for_bit_the_stock_rotary(dtype, upcast):
    generator = torch.Generator().manual_seed(0)
    seq, heads, head_dim = 300, 4, 16
    qkv = torch.randn(seq, 3, heads, head_dim, generator=generator).to(dtype)
    angles = torch.randn(seq, head_dim // 2, generator=generator) * 20
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    q, k, _ = qkv.unbind(1)
    want_q, want_k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    got_q, got_k = _rotary_qk(qkv, cos, sin, upcast)
    assert got_q.dtype == got_k.dtype == dtype and got_q.shape == want_q.shape
    assert torch.equal(got_q, want_q) and torch.equal(got_k, want_k)
