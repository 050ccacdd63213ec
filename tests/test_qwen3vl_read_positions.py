"""The final decoder layer at the read positions only: the same vectors and scores as the whole layer."""

import pytest
import torch
from transformers import Qwen3VLConfig
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel

from operators.qwen3vl import Qwen3VLEmbedder, Qwen3VLReranker
from operators.qwen3vl.read_positions import hidden_at, install_read_positions
from tests.media_gen import pattern_image, write_video


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("read_positions")
    images = []
    for i, size in enumerate([(96, 64), (64, 128)]):
        images.append(str(root / f"img{i}.png"))
        pattern_image(i, size, "RGB").save(images[-1])
    return images, str(write_video(root / "clip.mp4", seconds=2.0))


def _final_mlp_rows(model):
    """Rows (positions) the final layer's MLP saw per call."""
    seen = []
    layer = next(m for m in model.modules() if type(m).__name__ == "Qwen3VLTextModel").layers[-1]
    handle = layer.mlp.register_forward_hook(lambda mod, args, out: seen.append(tuple(args[0].shape[:2])))
    return seen, handle


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_embedder_vectors_equal_the_whole_final_layer(tiny_embedding_ckpt, media, attn):
    images, video = media
    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt), attn_implementation=attn)
    try:
        assert emb.read_positions_only
        # Texts of very different lengths (right padding), images, a video, text + image.
        inputs = [{"text": "short"}, {"text": " ".join(["a long text"] * 40)}, {"image": images[0]},
                  {"image": images[1], "text": "caption"}, {"video": video}]
        seen, handle = _final_mlp_rows(emb.model)
        ours = emb.process(inputs)
        handle.remove()
        assert seen and all(rows == 1 for _, rows in seen)  # one position per sequence
        emb.read_positions_only = False
        whole = emb.process(inputs)
        assert (ours - whole).abs().max() < 1e-5
    finally:
        emb.close()


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_reranker_scores_equal_the_whole_final_layer(tiny_reranker_ckpt, media, prefix_cache):
    images, _ = media
    rr = Qwen3VLReranker(str(tiny_reranker_ckpt), prefix_cache=prefix_cache, max_batch_items=3)
    try:
        assert rr.read_positions_only
        docs = [{"text": "a cat"}, {"text": " ".join(["many words"] * 30)}, {"image": images[0]},
                {"image": images[1], "text": "a caption"}, {"text": "dog"}]
        for query in ({"text": "find the cat"}, {"image": images[1], "text": "like this"}):
            seen, handle = _final_mlp_rows(rr.model)
            ours = [r.score for r in rr.score(query, docs)]
            handle.remove()
            assert (rr.last_prefix_length > 0) == prefix_cache
            # Every pair's final layer ran at its one read position (the prefix run computes keys/values).
            assert sum(b for b, rows in seen if rows == 1) == len(docs)
            rr.read_positions_only = False
            whole = [r.score for r in rr.score(query, docs)]
            rr.read_positions_only = True
            assert max(abs(a - b) for a, b in zip(ours, whole)) < 1e-5
    finally:
        rr.close()


def _text_only_model(layers: int, deepstack: list[int], attn: str = "sdpa") -> Qwen3VLModel:
    config = Qwen3VLConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, head_dim=8, vocab_size=50,
                         rope_scaling={"rope_type": "default", "mrope_section": [2, 1, 1], "mrope_interleaved": True}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=32, out_hidden_size=32,
                           deepstack_visual_indexes=deepstack))
    config._attn_implementation = attn
    config.text_config._attn_implementation = attn
    torch.manual_seed(0)
    return Qwen3VLModel(config).eval()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_any_read_position_without_a_mask_is_causal(attn):
    model = _text_only_model(3, [0], attn)
    ids = torch.randint(0, 50, (2, 9))
    with torch.inference_mode():
        stock = model(input_ids=ids).last_hidden_state
        assert install_read_positions(model)
        # No attention mask: the layer must still hide the keys after each read position.
        read = torch.tensor([8, 3])
        ours = hidden_at(model, {"input_ids": ids}, read, True)
    assert torch.allclose(ours, stock[torch.arange(2), read], atol=1e-5, rtol=0)


def test_attention_switched_after_install_still_reads_the_right_rows():
    model = _text_only_model(3, [0])
    ids = torch.randint(0, 50, (2, 6))
    read = torch.tensor([5, 2])
    with torch.inference_mode():
        assert install_read_positions(model)
        fast = hidden_at(model, {"input_ids": ids}, read, True)
        # An unsupported kernel now (the final layer then runs whole and picks the rows).
        for config in (model.config, model.config.text_config):
            config._attn_implementation = "sdpa_unsupported_here"
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        ALL_ATTENTION_FUNCTIONS["sdpa_unsupported_here"] = ALL_ATTENTION_FUNCTIONS["sdpa"]
        try:
            whole = hidden_at(model, {"input_ids": ids}, read, True)
        finally:
            del ALL_ATTENTION_FUNCTIONS["sdpa_unsupported_here"]
    assert torch.allclose(fast, whole, atol=1e-5, rtol=0)


def test_not_installed_where_deepstack_reaches_the_final_layer():
    model = _text_only_model(2, [0, 1])
    assert not install_read_positions(model)
    ids = torch.randint(0, 50, (2, 5))
    with torch.inference_mode():
        stock = model(input_ids=ids).last_hidden_state
        # Not active: hidden_at reads the same rows from the whole output.
        assert torch.equal(hidden_at(model, {"input_ids": ids}, torch.tensor([4, 2]), False),
                           stock[torch.arange(2), torch.tensor([4, 2])])
