"""Randomly initialised Qwen3-VL checkpoints that load exactly like the hub's Embedding / Reranker ones.

No weights can be downloaded here, so tests and benchmarks build their own checkpoints:
the real Qwen3-VL architecture (tiny, small, or the real 2B / 8B sizes), random weights
from a fixed seed, a small byte-level BPE tokenizer trained locally that holds all of
Qwen's special tokens, the real processor classes and the Qwen3-VL Instruct chat template.
Everything is written with ``save_pretrained`` and loads back through ``from_pretrained``.

Layout, as the hub checkpoints store it: a ``Qwen3VLForConditionalGeneration`` state dict
(``model.language_model.*``, ``model.visual.*``), float32 safetensors.

- ``embedding``: tied word embeddings, so no ``lm_head.weight`` is stored; the tokenizer
  appends ``<|endoftext|>`` when ``add_special_tokens=True`` (the token the embedder pools).
- ``reranker``: an untied, random ``lm_head.weight``; the tokenizer appends nothing.

Note (transformers 4.57.3): ``Qwen3VLModel.from_pretrained`` cannot read the hub layout
(its ``base_model_prefix`` is empty, so every ``model.*`` key is reported missing and the
weights stay random). Load the backbone through a ``Qwen3VLPreTrainedModel`` wrapper
holding ``self.model = Qwen3VLModel(config)`` (what the official embedder does), or through
``Qwen3VLForConditionalGeneration``.

CLI: ``python -m operators.qwen3vl.checkpoint OUT_DIR --kind embedding|reranker [--size tiny]``
(also ``qvl tiny-checkpoint``, which delegates to :func:`main`).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
from pathlib import Path
from typing import Any, Literal

Kind = Literal["embedding", "reranker"]
Size = Literal["tiny", "small", "2b", "8b"]
KINDS: tuple[str, ...] = ("embedding", "reranker")
SIZES: tuple[str, ...] = ("tiny", "small", "2b", "8b")

# Qwen's special tokens, in Qwen's id order, right after the BPE vocabulary.
QWEN_SPECIAL_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
)
# Added but not special (as in Qwen3-VL's tokenizer.json).
QWEN_ADDED_TOKENS: tuple[str, ...] = (
    "<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
    "<|repo_name|>", "<|file_sep|>", "<tool_response>", "</tool_response>", "<think>", "</think>",
)
PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
REAL_VOCAB_SIZE = 151936

# Qwen2's pre-tokenizer split (tokenizer.json of every Qwen2/2.5/3/3-VL checkpoint).
QWEN2_PRETOKENIZE_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Byte-level BPE merges learned on top of the 256 byte symbols (the added tokens come after).
BPE_VOCAB_SIZE = 2000

# The chat template of Qwen/Qwen3-VL-2B-Instruct (chat_template.json), byte for byte (5,292 bytes,
# sha256 3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4; the same text is in the
# official Qwen3-VL-8B-Instruct GGUF and in the Qwen3-VL-Embedding / Reranker checkpoints' processors).
QWEN3_VL_CHAT_TEMPLATE = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Text and vision tower sizes. mrope_section sums to head_dim / 2, in the real [24, 20, 20] proportions.
_ARCH: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "text": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, mrope_section=[4, 2, 2]),
        "vision": dict(depth=2, hidden_size=32, num_heads=2, intermediate_size=64, deepstack_visual_indexes=[0, 1]),
    },
    "small": {
        "text": dict(hidden_size=512, intermediate_size=1536, num_hidden_layers=4, num_attention_heads=8,
                     num_key_value_heads=4, head_dim=64, mrope_section=[12, 10, 10]),
        "vision": dict(depth=4, hidden_size=256, num_heads=4, intermediate_size=1024,
                       deepstack_visual_indexes=[0, 1, 2]),
    },
    # Qwen/Qwen3-VL-2B-Instruct (the Embedding-2B / Reranker-2B backbone).
    "2b": {
        "text": dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                     num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]),
        "vision": dict(depth=24, hidden_size=1024, num_heads=16, intermediate_size=4096,
                       deepstack_visual_indexes=[5, 11, 17]),
    },
    # Qwen/Qwen3-VL-8B-Instruct (the Embedding-8B / Reranker-8B backbone).
    "8b": {
        "text": dict(hidden_size=4096, intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                     num_key_value_heads=8, head_dim=128, mrope_section=[24, 20, 20]),
        "vision": dict(depth=27, hidden_size=1152, num_heads=16, intermediate_size=4304,
                       deepstack_visual_indexes=[8, 16, 24]),
    },
}

# preprocessor_config.json / video_preprocessor_config.json of the Qwen3-VL checkpoints.
_IMAGE_PROCESSOR_KWARGS: dict[str, Any] = dict(
    size={"longest_edge": 16777216, "shortest_edge": 65536}, patch_size=16, temporal_patch_size=2, merge_size=2,
    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])
_VIDEO_PROCESSOR_KWARGS: dict[str, Any] = dict(
    size={"longest_edge": 25165824, "shortest_edge": 4096}, patch_size=16, temporal_patch_size=2, merge_size=2,
    image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5])

# --- training corpus for the tokenizer (generated, deterministic) -------------------------------------

_WORDS = """
the of and to in is was for on that with as by at from it an be this are or his her which have has
had not but were they their one all been more when who will there would can if about into than its
only other some time what up out so new first two also after most them made over such many where
these then may any between used each during under world people year years city state part while
three through both being known same before because well later could would should must still even
long great high small large old young good best last next back down own right left since around
against another house home water river lake sea ocean mountain hill forest tree trees flower garden
park road street bridge tower building church school university library museum station train car
bus bicycle boat ship plane airport market shop store restaurant kitchen table chair bed window door
wall roof floor room office desk computer phone screen keyboard camera picture photo image video
movie film music song book page paper document report chart graph table figure map screenshot slide
cat cats dog dogs bird birds horse cow sheep fish animal animals child children man men woman women
boy girl baby family friend friends teacher student doctor player team game ball match goal sport
red blue green yellow black white gray brown orange purple pink dark light bright color colors
sun moon star stars sky cloud clouds rain snow wind weather summer winter spring autumn night day
morning evening today tomorrow yesterday week month hour minute second moment history story news
food bread cheese apple banana fruit coffee tea milk wine beer dinner lunch breakfast meal pizza
run runs running walk walks walking sit sits sitting stand stands standing look looks looking hold
holds holding play plays playing eat eats eating drink read reads reading write writes writing
show shows showing find finds finding search query answer answers question questions document
documents candidate candidates relevant retrieve retrieval represent input user users instruction
judge whether meets requirements based provided note can only given match matches matching rank
ranking score scores embedding embeddings model models vision language text texts visual video frame
frames second seconds caption captions describe description contains containing shows depicting
person people group crowd front behind above below near inside outside next top bottom middle side
big little tall short wide narrow heavy soft hard hot cold warm cool wet dry open closed empty full
happy sad funny quiet loud fast slow early late easy simple clear strong weak rich poor free real
make makes making take takes taking give gives giving get gets getting go goes going come comes
see sees seen know knows think thinks want wants use uses like likes help helps work works call
ask asks tell tells try tries leave leaves feel feels become becomes keep keeps begin begins seem
north south east west country countries nation government company market business money price cost
system data information service program project research science nature energy health power space
product products review reviews customer order orders delivery number numbers price prices value
page pages title titles section sections table tables column columns row rows cell cells total
yes no yes no maybe true false correct wrong null none
"""

_FIXED_LINES = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. "
    'Note that the answer can only be "yes" or "no".',
    "Represent the user's input.",
    "Given a search query, retrieve relevant candidates that answer the query.",
    "Find a document image that matches the given query.",
    "Retrieve images or text relevant to the user's query.",
    "<Instruct>: <Query>: <Document>: NULL",
)


# Words that must be single tokens, as in Qwen's vocabulary: the reranker reads the LM-head rows of
# `yes` / `no`, and keeps the last 5 tokens `<|im_end|>`, `\n`, `<|im_start|>`, `assistant`, `\n`.
_SINGLE_TOKEN_WORDS = ("yes", "no", "assistant", "user", "system")


def _corpus(seed: int = 1234) -> list[str]:
    """A few thousand English-like lines; lines of the bare role words and `yes` / `no` make them single tokens."""
    rng = random.Random(seed)
    words = _WORDS.split()
    lines: list[str] = []
    for i in range(6000):
        n = rng.randint(4, 16)
        sent = " ".join(rng.choice(words) for _ in range(n))
        sent = sent[0].upper() + sent[1:] + rng.choice([".", ".", ".", "?", "!", ",", ";", ":"])
        if i % 7 == 0:
            sent += f" {rng.randint(0, 2030)}"
        if i % 11 == 0:
            sent = f'"{sent}"'
        lines.append(sent)
        if i % 3 == 0:
            lines.append(rng.choice(["yes", "no", "Yes", "No"]))
        if i % 4 == 0:
            lines.append(rng.choice(["system", "user", "assistant"]))
    lines.extend(_FIXED_LINES * 50)
    return lines


def build_tokenizer(kind: Kind) -> Any:
    """A Qwen2TokenizerFast: byte-level BPE trained here, then Qwen's special and added tokens."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from tokenizers.trainers import BpeTrainer
    from transformers import Qwen2TokenizerFast

    _check_kind(kind)
    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    trainer = BpeTrainer(vocab_size=BPE_VOCAB_SIZE, min_frequency=2, show_progress=False, special_tokens=[],
                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer=trainer)
    missing = [w for w in _SINGLE_TOKEN_WORDS if tok.encode(w).tokens != [w]]
    if missing:  # the corpus guarantees this; fail loudly rather than build a broken tokenizer
        raise RuntimeError(f"trained vocabulary lacks the single tokens {missing}")

    tok.add_special_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=True)
                            for t in QWEN_SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, lstrip=False, rstrip=False, normalized=False, special=False)
                    for t in QWEN_ADDED_TOKENS])

    byte_level = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    if kind == "embedding":
        eot_id = tok.token_to_id(PAD_TOKEN)
        tok.post_processor = processors.Sequence([byte_level, processors.TemplateProcessing(
            single=f"$A:0 {PAD_TOKEN}:0", pair=f"$A:0 {PAD_TOKEN}:0 $B:1 {PAD_TOKEN}:1",
            special_tokens=[(PAD_TOKEN, eot_id)])])
    else:
        tok.post_processor = byte_level

    return Qwen2TokenizerFast(
        tokenizer_object=tok, unk_token=None, bos_token=None, eos_token=EOS_TOKEN, pad_token=PAD_TOKEN,
        additional_special_tokens=list(QWEN_SPECIAL_TOKENS[1:]), errors="replace", model_max_length=262144,
        split_special_tokens=False, clean_up_tokenization_spaces=False, add_bos_token=False,
        chat_template=QWEN3_VL_CHAT_TEMPLATE)


def build_processor(tokenizer: Any) -> Any:
    """Qwen3VLProcessor: fast Qwen2-VL image processor, Qwen3-VL video processor, tokenizer, chat template."""
    from transformers import Qwen2VLImageProcessorFast, Qwen3VLProcessor
    from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor

    return Qwen3VLProcessor(image_processor=Qwen2VLImageProcessorFast(**_IMAGE_PROCESSOR_KWARGS),
                            tokenizer=tokenizer, video_processor=Qwen3VLVideoProcessor(**_VIDEO_PROCESSOR_KWARGS),
                            chat_template=QWEN3_VL_CHAT_TEMPLATE)


def build_config(kind: Kind, size: Size, tokenizer: Any) -> Any:
    """A Qwen3VLConfig of the given size whose token ids are the tokenizer's."""
    from transformers import Qwen3VLConfig

    _check_kind(kind)
    if size not in _ARCH:
        raise ValueError(f"unknown size {size!r}; use one of {SIZES}")
    arch = _ARCH[size]
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIAL_TOKENS}
    # tiny/small: the matrices are exactly the tokenizer's size; 2b/8b: the real (padded) vocabulary.
    vocab_size = len(tokenizer) if size in ("tiny", "small") else REAL_VOCAB_SIZE
    # Embedding: tied (no lm_head stored, the backbone is all that is used). Reranker: an untied, random head.
    tie = kind == "embedding"
    text = dict(arch["text"])
    mrope_section = text.pop("mrope_section")
    if 2 * sum(mrope_section) != text["head_dim"]:
        raise AssertionError(f"mrope_section {mrope_section} must sum to head_dim / 2")
    text_config = dict(
        **text, vocab_size=vocab_size, hidden_act="silu", max_position_embeddings=262144, initializer_range=0.02,
        rms_norm_eps=1e-6, use_cache=True, tie_word_embeddings=tie, rope_theta=5000000.0,
        rope_scaling={"rope_type": "default", "mrope_section": mrope_section, "mrope_interleaved": True},
        attention_bias=False, attention_dropout=0.0, bos_token_id=ids[PAD_TOKEN], eos_token_id=ids[EOS_TOKEN])
    vision_config = dict(
        **arch["vision"], hidden_act="gelu_pytorch_tanh", in_channels=3, patch_size=16, spatial_merge_size=2,
        temporal_patch_size=2, out_hidden_size=text["hidden_size"], num_position_embeddings=2304,
        initializer_range=0.02)
    return Qwen3VLConfig(
        text_config=text_config, vision_config=vision_config, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=tie,
        architectures=["Qwen3VLForConditionalGeneration"])


def build_checkpoint(out_dir: str | Path, kind: Kind, size: Size = "tiny", seed: int = 0, *,
                     dtype: str = "float32", device: str = "cpu") -> Path:
    """Write a random-weight Qwen3-VL ``kind`` checkpoint of ``size`` to ``out_dir`` and return its path.

    Same seed, same files. ``dtype`` (float32 by default) is what the safetensors hold;
    ``device`` is where the weights are initialised (a GPU makes 2b/8b builds much faster,
    but its random numbers differ from the CPU's).
    """
    import torch
    from transformers import GenerationConfig, Qwen3VLForConditionalGeneration

    _check_kind(kind)
    if size not in _ARCH:
        raise ValueError(f"unknown size {size!r}; use one of {SIZES}")
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(dtype)
    if torch_dtype is None:
        raise ValueError(f"unknown dtype {dtype!r}; use float32, bfloat16 or float16")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)

    tokenizer = build_tokenizer(kind)
    processor = build_processor(tokenizer)
    config = build_config(kind, size, tokenizer)

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if torch.device(device).type == "cuda":
            torch.cuda.manual_seed_all(seed)
        with torch.device(device):
            model = Qwen3VLForConditionalGeneration._from_config(config, dtype=torch_dtype)
    model.eval()
    eot, im_end = tokenizer.convert_tokens_to_ids(PAD_TOKEN), tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    # generation_config.json as in the Qwen3-VL Instruct checkpoints (token ids are this tokenizer's).
    model.generation_config = GenerationConfig(
        bos_token_id=eot, pad_token_id=eot, eos_token_id=[im_end, eot], do_sample=True, top_k=20, top_p=0.8,
        temperature=0.7, repetition_penalty=1.0)
    model.save_pretrained(out, safe_serialization=True)
    processor.save_pretrained(out)
    # Hub layout: the processor's template in chat_template.json, the tokenizer's inline in
    # tokenizer_config.json (save_pretrained in 4.57 writes one chat_template.jinja for both instead).
    (out / "chat_template.json").write_text(
        json.dumps({"chat_template": QWEN3_VL_CHAT_TEMPLATE}, indent=2, ensure_ascii=False) + "\n")
    tok_cfg_path = out / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text())
    tok_cfg["chat_template"] = QWEN3_VL_CHAT_TEMPLATE
    tok_cfg_path.write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n")
    jinja = out / "chat_template.jinja"
    if jinja.exists():
        jinja.unlink()
    # safetensors writes the weights through a private (0600) temporary file: give them the mode
    # every other file got, so workers running as another user can read the checkpoint.
    umask = os.umask(0)
    os.umask(umask)
    for weights in out.glob("*.safetensors"):
        weights.chmod(0o666 & ~umask)
    return out


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; use one of {KINDS}")


def main(argv: list[str] | None = None) -> int:
    """``qvl tiny-checkpoint OUT_DIR --kind embedding|reranker [--size tiny|small|2b|8b] [--seed N]``."""
    parser = argparse.ArgumentParser(
        prog="qvl tiny-checkpoint",
        description="Write a randomly initialised Qwen3-VL Embedding or Reranker checkpoint (no download).")
    parser.add_argument("out_dir", help="directory to write (created if missing)")
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--size", default="tiny", choices=SIZES,
                        help="tiny: tests; small: CPU benchmarks; 2b/8b: the real architectures (GPU throughput)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--device", default="cpu", help="where to initialise the weights (e.g. cuda for 2b/8b)")
    args = parser.parse_args(argv)
    path = build_checkpoint(args.out_dir, args.kind, args.size, args.seed, dtype=args.dtype, device=args.device)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
