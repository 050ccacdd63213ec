"""Tiny random Qwen3-VL checkpoints: hub layout, clean from_pretrained, tokenizers, template, determinism."""

import hashlib
import json

import pytest
import torch
from PIL import Image
from qwen_vl_utils import process_vision_info
from safetensors import safe_open
from transformers import AutoProcessor, AutoTokenizer, Qwen3VLForConditionalGeneration, Qwen3VLProcessor
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLPreTrainedModel

from operators.qwen3vl.checkpoint import (QWEN3_VL_CHAT_TEMPLATE, QWEN_ADDED_TOKENS, QWEN_SPECIAL_TOKENS,
                                          build_checkpoint, build_config, build_tokenizer, main)


class OfficialStyleEmbedding(Qwen3VLPreTrainedModel):
    """How the official embedder loads the backbone: `model.` + Qwen3VLModel, no key renames, no ignores."""

    _checkpoint_conversion_mapping: dict = {}

    def __init__(self, config):
        super().__init__(config)
        self.model = Qwen3VLModel(config)
        self.post_init()


def _keys(ckpt):
    with safe_open(str(ckpt / "model.safetensors"), "pt") as f:
        return {k: f.get_tensor(k).dtype for k in f.keys()}


def _clean(info):
    return {k: v for k, v in info.items() if v}


def test_weights_use_the_hub_layout_in_float32(tiny_embedding_ckpt, tiny_reranker_ckpt):
    emb, rr = _keys(tiny_embedding_ckpt), _keys(tiny_reranker_ckpt)
    for keys in (emb, rr):
        assert {k.split(".")[1] for k in keys if k != "lm_head.weight"} == {"language_model", "visual"}
        assert all(k.startswith("model.") for k in keys if k != "lm_head.weight")
        assert set(keys.values()) == {torch.float32}
    assert "lm_head.weight" not in emb  # tied, like Qwen3-VL-2B
    assert "lm_head.weight" in rr
    for ckpt, tied in ((tiny_embedding_ckpt, True), (tiny_reranker_ckpt, False)):
        cfg = json.loads((ckpt / "config.json").read_text())
        assert cfg["tie_word_embeddings"] is tied and cfg["text_config"].get("tie_word_embeddings", False) is tied


def test_both_kinds_load_cleanly(tiny_embedding_ckpt, tiny_reranker_ckpt):
    for ckpt in (tiny_embedding_ckpt, tiny_reranker_ckpt):
        lm, info = Qwen3VLForConditionalGeneration.from_pretrained(str(ckpt), output_loading_info=True)
        assert _clean(info) == {}
    emb, info = OfficialStyleEmbedding.from_pretrained(str(tiny_embedding_ckpt), output_loading_info=True)
    assert _clean(info) == {}
    assert isinstance(emb.model, Qwen3VLModel)
    rr, info = OfficialStyleEmbedding.from_pretrained(str(tiny_reranker_ckpt), output_loading_info=True)
    assert _clean(info) == {"unexpected_keys": ["lm_head.weight"]}  # only the head the backbone does not use
    lm = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_reranker_ckpt))
    head, embed = lm.lm_head.weight, lm.model.language_model.embed_tokens.weight
    assert head.data_ptr() != embed.data_ptr() and not torch.equal(head, embed)
    assert head.std() > 0.01  # random, not zeros


def test_qwen3vlmodel_from_pretrained_cannot_read_the_hub_layout(tiny_embedding_ckpt):
    # transformers 4.57.3: Qwen3VLModel has an empty base_model_prefix, so `model.*` keys are all
    # unexpected and the weights stay random. This is why the embedder loads through a wrapper.
    _, info = Qwen3VLModel.from_pretrained(str(tiny_embedding_ckpt), output_loading_info=True)
    assert info["missing_keys"] and info["unexpected_keys"]


def test_processor_and_tokenizer_classes(tiny_embedding_ckpt, tiny_reranker_ckpt):
    for ckpt in (tiny_embedding_ckpt, tiny_reranker_ckpt):
        proc = AutoProcessor.from_pretrained(str(ckpt))
        assert type(proc).__name__ == "Qwen3VLProcessor"
        assert type(proc.tokenizer).__name__ == "Qwen2TokenizerFast"
        assert type(proc.image_processor).__name__ == "Qwen2VLImageProcessorFast"
        assert type(proc.video_processor).__name__ == "Qwen3VLVideoProcessor"
        for p in (proc.image_processor, proc.video_processor):
            assert (p.patch_size, p.temporal_patch_size, p.merge_size) == (16, 2, 2)
            assert list(p.image_mean) == list(p.image_std) == [0.5, 0.5, 0.5]
        assert type(AutoTokenizer.from_pretrained(str(ckpt))).__name__ == "Qwen2TokenizerFast"
        right = Qwen3VLProcessor.from_pretrained(str(ckpt), padding_side="right")
        assert right.tokenizer.padding_side == "right"
        assert proc.chat_template == right.tokenizer.chat_template == QWEN3_VL_CHAT_TEMPLATE


def test_special_tokens_ids_and_config(tiny_embedding_ckpt, tiny_reranker_ckpt):
    for ckpt in (tiny_embedding_ckpt, tiny_reranker_ckpt):
        tok = AutoTokenizer.from_pretrained(str(ckpt))
        cfg = json.loads((ckpt / "config.json").read_text())
        ids = [tok.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS + QWEN_ADDED_TOKENS]
        base = ids[0]
        assert ids == list(range(base, base + len(ids)))  # Qwen's order, right after the BPE vocabulary
        assert len(tok) == base + len(ids) == cfg["text_config"]["vocab_size"]
        assert set(tok.all_special_tokens) == set(QWEN_SPECIAL_TOKENS)
        added = {t.content: t.special for t in tok.added_tokens_decoder.values()}
        assert all(added[t] for t in QWEN_SPECIAL_TOKENS) and not any(added[t] for t in QWEN_ADDED_TOKENS)
        assert (tok.pad_token, tok.eos_token, tok.bos_token) == ("<|endoftext|>", "<|im_end|>", None)
        tid = tok.convert_tokens_to_ids
        assert cfg["image_token_id"] == tid("<|image_pad|>") and cfg["video_token_id"] == tid("<|video_pad|>")
        assert cfg["vision_start_token_id"] == tid("<|vision_start|>")
        assert cfg["vision_end_token_id"] == tid("<|vision_end|>")
        assert cfg["text_config"]["bos_token_id"] == tid("<|endoftext|>")
        assert cfg["text_config"]["eos_token_id"] == tid("<|im_end|>")
        # yes / no are plain single tokens (the reranker reads their LM-head rows)
        vocab = tok.get_vocab()
        assert tok.tokenize("yes") == ["yes"] and tok.tokenize("no") == ["no"]
        assert vocab["yes"] != vocab["no"] and max(vocab["yes"], vocab["no"]) < base
        # the chat roles too: the reranker keeps the last 5 tokens `<|im_end|>\n<|im_start|>assistant\n`
        assert tok.tokenize("<|im_end|>\n<|im_start|>assistant\n") == \
            ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
        assert tok.tokenize("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n")[:3] == ["<|im_start|>", "system", "Ċ"]
        # specials are never split, and text round-trips
        text = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hello, world! 42<|im_end|>"
        enc = tok(text, add_special_tokens=False).input_ids
        assert tid("<|image_pad|>") in enc and tok.decode(enc) == text


def test_embedding_tokenizer_appends_endoftext_and_reranker_does_not(tiny_embedding_ckpt, tiny_reranker_ckpt):
    emb = AutoProcessor.from_pretrained(str(tiny_embedding_ckpt)).tokenizer
    rr = AutoProcessor.from_pretrained(str(tiny_reranker_ckpt)).tokenizer
    eot = emb.convert_tokens_to_ids("<|endoftext|>")
    plain = emb("hi there", add_special_tokens=False).input_ids
    assert emb("hi there").input_ids == plain + [eot]
    assert rr("hi there").input_ids == plain == rr("hi there", add_special_tokens=False).input_ids
    # truncation leaves room for the appended token
    long = "word " * 100
    truncated = emb(long, truncation=True, max_length=10).input_ids
    assert len(truncated) == 10 and truncated[-1] == eot and eot not in truncated[:-1]
    assert rr(long, truncation=True, max_length=10).input_ids[-1] != eot
    # batched, right-padded: the last real token of every row is the appended one
    batch = emb(["a b c d e", "a"], padding=True, padding_side="right")
    for ids, mask in zip(batch.input_ids, batch.attention_mask):
        assert ids[sum(mask) - 1] == eot


def test_chat_template_renders_the_qwen3vl_prompt(tiny_embedding_ckpt):
    assert len(QWEN3_VL_CHAT_TEMPLATE.encode()) == 5292
    assert hashlib.sha256(QWEN3_VL_CHAT_TEMPLATE.encode()).hexdigest() == \
        "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"
    proc = AutoProcessor.from_pretrained(str(tiny_embedding_ckpt))
    conv = [{"role": "system", "content": [{"type": "text", "text": "INSTR"}]},
            {"role": "user", "content": [{"type": "image", "image": "x.png"}, {"type": "text", "text": "TEXT"}]}]
    assert proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nINSTR<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>"
        "TEXT<|im_end|>\n<|im_start|>assistant\n")
    conv = [{"role": "system", "content": "S"},
            {"role": "user", "content": [{"type": "video", "video": "v.mp4"}, {"type": "text", "text": "T"}]}]
    assert proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>"
        "T<|im_end|>\n<|im_start|>assistant\n")


def _image_inputs(ckpt, padding_side):
    proc = Qwen3VLProcessor.from_pretrained(str(ckpt), padding_side=padding_side)
    image = Image.new("RGB", (64, 64))
    image.putdata([((7 * i) % 256, (13 * i) % 256, (29 * i) % 256) for i in range(64 * 64)])
    conv = [{"role": "system", "content": [{"type": "text", "text": "Represent the user's input."}]},
            {"role": "user", "content": [{"type": "image", "image": image, "min_pixels": 4096,
                                          "max_pixels": 1843200},
                                         {"type": "text", "text": "a picture of a cat"}]}]
    text = proc.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
    images, videos = process_vision_info([conv], image_patch_size=16)
    inputs = proc(text=[text], images=images, videos=videos, do_resize=False, padding=True, return_tensors="pt")
    return proc, inputs


def test_forward_pass_on_text_and_image(tiny_embedding_ckpt, tiny_reranker_ckpt):
    proc, inputs = _image_inputs(tiny_embedding_ckpt, "right")
    assert inputs.image_grid_thw.tolist() == [[1, 4, 4]]  # 64x64 at patch 16, merged 2x2 -> 4 tokens
    ids = inputs.input_ids[0].tolist()
    assert ids.count(proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 4
    assert ids[-1] == proc.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    emb = OfficialStyleEmbedding.from_pretrained(str(tiny_embedding_ckpt)).eval()
    with torch.inference_mode():
        hidden = emb.model(**inputs).last_hidden_state
    assert hidden.shape == (1, len(ids), 64) and torch.isfinite(hidden).all()

    proc, inputs = _image_inputs(tiny_reranker_ckpt, "left")
    assert inputs.input_ids[0, -1].item() != proc.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    lm = Qwen3VLForConditionalGeneration.from_pretrained(str(tiny_reranker_ckpt)).eval()
    with torch.inference_mode():
        logits = lm(**inputs).logits
    assert logits.shape == (1, inputs.input_ids.shape[1], len(proc.tokenizer)) and torch.isfinite(logits).all()


def test_same_seed_same_checkpoint(tmp_path, tiny_reranker_ckpt):
    a = build_checkpoint(tmp_path / "a", "reranker", seed=0)
    b = build_checkpoint(tmp_path / "b", "reranker", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (a / name).read_bytes() == (tiny_reranker_ckpt / name).read_bytes(), name
    assert (a / "model.safetensors").read_bytes() != (b / "model.safetensors").read_bytes()
    assert (a / "tokenizer.json").read_bytes() == (b / "tokenizer.json").read_bytes()


def test_cli_main(tmp_path):
    assert main([str(tmp_path / "ck"), "--kind", "embedding", "--seed", "3"]) == 0
    assert json.loads((tmp_path / "ck" / "config.json").read_text())["text_config"]["hidden_size"] == 64
    with pytest.raises(SystemExit):
        main([str(tmp_path / "bad"), "--kind", "classifier"])


@pytest.mark.parametrize("size,hidden,layers,heads,kv,inter,vis", [
    ("tiny", 64, 3, 4, 2, 128, (2, 32, 2, 64, [0, 1])),
    ("small", 512, 4, 8, 4, 1536, (4, 256, 4, 1024, [0, 1, 2])),
    ("2b", 2048, 28, 16, 8, 6144, (24, 1024, 16, 4096, [5, 11, 17])),
    ("8b", 4096, 36, 32, 8, 12288, (27, 1152, 16, 4304, [8, 16, 24])),
])
def test_config_sizes(size, hidden, layers, heads, kv, inter, vis):
    tok = build_tokenizer("reranker")
    cfg = build_config("reranker", size, tok)
    t, v = cfg.text_config, cfg.vision_config
    assert (t.hidden_size, t.num_hidden_layers, t.num_attention_heads, t.num_key_value_heads,
            t.intermediate_size) == (hidden, layers, heads, kv, inter)
    assert 2 * sum(t.rope_scaling["mrope_section"]) == t.head_dim
    assert t.rope_scaling["mrope_interleaved"] is True and t.rope_theta == 5e6
    assert t.max_position_embeddings == 262144
    assert (v.depth, v.hidden_size, v.num_heads, v.intermediate_size, v.deepstack_visual_indexes) == vis
    assert v.out_hidden_size == hidden and (v.patch_size, v.spatial_merge_size, v.temporal_patch_size) == (16, 2, 2)
    assert t.vocab_size == (len(tok) if size in ("tiny", "small") else 151936)
    if size in ("2b", "8b"):
        assert t.head_dim == 128 and t.rope_scaling["mrope_section"] == [24, 20, 20]


def test_weights_are_as_readable_as_the_other_files(tiny_embedding_ckpt):
    """safetensors writes through a 0600 temporary file; a shared checkpoint must stay readable."""
    mode = lambda p: p.stat().st_mode & 0o777  # noqa: E731
    assert mode(tiny_embedding_ckpt / "model.safetensors") == mode(tiny_embedding_ckpt / "config.json")
