"""Packed suffixes, prefix and suffix attended apart: one attention over prefix + suffix with the full mask."""

import pytest
import torch
import torch.nn.functional as F

from operators.qwen3vl import Qwen3VLReranker
from operators.qwen3vl.prefix_attention import SuffixPack, prefix_causal_attention, suffix_mask
from tests.media_gen import pattern_image


def _reference(query, key, value, prefix_key, prefix_value, lengths, scale):
    """One sdpa call: prefix expanded to every row, GQA heads repeated, the full boolean mask."""
    batch, heads, width, _ = query.shape
    groups = heads // key.shape[1]
    keys = torch.cat([prefix_key.expand(batch, -1, -1, -1), key], dim=2).repeat_interleave(groups, dim=1)
    values = torch.cat([prefix_value.expand(batch, -1, -1, -1), value], dim=2).repeat_interleave(groups, dim=1)
    mask = suffix_mask(lengths, prefix_key.shape[2], width)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (8, 2)])
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-6), (torch.bfloat16, 2e-2)])
def test_equals_one_masked_attention_on_real_positions(heads, kv_heads, dtype, tol):
    torch.manual_seed(0)
    lengths, prefix, width, dim = [5, 9, 1, 9], 7, 9, 16
    batch = len(lengths)
    # Queries as the model makes them: a transposed view of (batch, seq, heads, dim).
    query = torch.randn(batch, width, heads, dim, dtype=dtype).transpose(1, 2)
    key, value = (torch.randn(batch, width, kv_heads, dim, dtype=dtype).transpose(1, 2) for _ in range(2))
    prefix_key, prefix_value = (torch.randn(1, kv_heads, prefix, dim, dtype=dtype) for _ in range(2))
    pack = SuffixPack([(prefix_key, prefix_value)], lengths)
    # Packed as the model sees them: (1, heads, T, d) of the real tokens only.
    packed = [pack.packed(x.transpose(1, 2))[None].transpose(1, 2) for x in (query, key, value)]
    got = prefix_causal_attention(*packed, pack, 0, dim ** -0.5)
    want = _reference(query, key, value, prefix_key, prefix_value, lengths, dim ** -0.5)
    assert got.shape == (1, sum(lengths), heads * dim) and got.dtype == dtype  # o_proj's input
    got = got.view(sum(lengths), heads, dim)
    want = pack.packed(want.transpose(1, 2))  # padded positions are never read
    assert (got.float() - want.float()).abs().max() <= tol


def test_pack_round_trip():
    pack = SuffixPack([(torch.zeros(1, 1, 2, 4), torch.zeros(1, 1, 2, 4))], [2, 3, 1])
    x = torch.arange(6.0).view(1, 6, 1)
    grid = pack.padded(x)
    assert grid[..., 0].tolist() == [[0, 1, 0], [2, 3, 4], [5, 0, 0]]
    assert torch.equal(pack.packed(grid), x[0])


def test_suffix_mask():
    mask = suffix_mask([2, 3], 2, 3)[:, 0]
    assert mask.shape == (2, 3, 5) and mask.dtype == torch.bool
    assert mask[0].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 0]]
    assert mask[1].int().tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]


def test_reranker_scores_equal_the_cache_path(tiny_reranker_ckpt, tmp_path):
    image = tmp_path / "a.png"
    pattern_image(1, (96, 64), "RGB").save(image)
    docs = [{"text": "short"}, {"text": "long " * 60}, {"image": str(image), "text": "caption"}, {"text": "mid " * 9}]
    with Qwen3VLReranker(str(tiny_reranker_ckpt), max_batch_items=3) as rr:
        assert rr.split_prefix_attention  # on a CPU with sdpa: the path every prefix test here exercises
        for query in ({"text": "find it"}, {"image": str(image), "text": "like this"}):
            split = rr.score(query, docs, "Pick")
            assert rr.last_prefix_length > 0
            rr.split_prefix_attention = False
            try:
                cached = rr.score(query, docs, "Pick")
            finally:
                rr.split_prefix_attention = True
            assert all(r.ok for r in split + cached)
            assert [r.score for r in split] == pytest.approx([r.score for r in cached], abs=1e-6)
