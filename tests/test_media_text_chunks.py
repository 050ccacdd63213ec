"""Text decoding and token chunking."""

from __future__ import annotations

import math
import time

import pytest

from operators.media.text_chunks import EmptyTextError, TextDecodeError, chunk_spans, chunk_text, decode_text, token_spans
from tests.media_corpus import LONG_TEXT, make_test_tokenizer


@pytest.fixture(scope="module")
def tok():
    return make_test_tokenizer()


def test_decode_strips_bom_and_rejects_bad_input() -> None:
    assert decode_text("\ufeffhé".encode()) == "hé"
    with pytest.raises(TextDecodeError, match="invalid UTF-8 at byte 2"):
        decode_text(b"ab\xff")
    with pytest.raises(TextDecodeError, match="NUL byte"):
        decode_text(b"abc\x00def")
    with pytest.raises(EmptyTextError, match="empty text"):
        decode_text(b" \n\t ")
    with pytest.raises(EmptyTextError, match="empty text"):
        decode_text(b"\xef\xbb\xbf")


@pytest.mark.parametrize("use_tokenizer", [True, False])
def test_chunks_are_exact_substrings_with_expected_count(tok, use_tokenizer: bool) -> None:
    tokenizer = tok if use_tokenizer else None
    n_tokens = len(token_spans(LONG_TEXT, tokenizer))
    chunks = chunk_text(LONG_TEXT, tokenizer, 64, 8)
    assert len(chunks) == 1 + math.ceil((n_tokens - 64) / 56)
    assert all(c and c in LONG_TEXT and c == c.strip() for c in chunks)
    spans = chunk_spans(LONG_TEXT, tokenizer, 64, 8)
    assert spans[0][0] == 0 and spans[-1][1] == len(LONG_TEXT.rstrip())
    assert all(a[1] > b[0] for a, b in zip(spans, spans[1:]))  # overlapping windows


def test_token_budget_respected(tok) -> None:
    for chunk in chunk_text(LONG_TEXT, tok, 32, 4):
        assert len(tok(chunk, add_special_tokens=False)["input_ids"]) <= 32 + 2  # boundary bytes may re-merge


def test_short_text_single_chunk_and_no_overlap(tok) -> None:
    assert chunk_text("  hello world  ", tok, 512, 64) == ["hello world"]
    spans = chunk_spans(LONG_TEXT, tok, 50, 0)
    assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:]))


def test_unicode_offsets(tok) -> None:
    text = "café 日本語 🙂 naïve " * 30
    assert all(c in text for c in chunk_text(text, tok, 10, 3))


def test_invalid_settings(tok) -> None:
    with pytest.raises(ValueError):
        chunk_text("x", tok, 0, 0)
    with pytest.raises(ValueError):
        chunk_text("x", tok, 8, 8)


def test_raw_tokenizers_object_and_leftover_truncation(tok) -> None:
    expected = chunk_text(LONG_TEXT, tok, 64, 8)
    assert chunk_text(LONG_TEXT, tok.backend_tokenizer, 64, 8) == expected
    tok(LONG_TEXT, truncation=True, max_length=16)  # may leave truncation state on the backend
    assert chunk_text(LONG_TEXT, tok, 64, 8) == expected


def test_megabytes_far_beyond_model_length_are_fast(tok) -> None:
    text = LONG_TEXT * 300  # ~0.6 MB, far past any max length
    start = time.perf_counter()
    spans = chunk_spans(text, tok, 512, 64)
    assert time.perf_counter() - start < 10
    assert spans[-1][1] == len(text) and len(spans) > 100
    assert text[spans[5][0] : spans[5][1]] in text


def test_utf16_is_named() -> None:
    with pytest.raises(TextDecodeError, match="UTF-16"):
        decode_text("hello".encode("utf-16"))
    # Without a byte-order mark its NULs, one between each pair of characters, tell it (the
    # manifest check shares this): "binary content" said nothing of what to do.
    with pytest.raises(TextDecodeError, match=r"UTF-16 text \(big-endian, no byte-order mark"):
        decode_text("hello, world".encode("utf-16-be"))
    with pytest.raises(TextDecodeError, match=r"UTF-32 text \(little-endian, byte-order mark FF FE 00 00\)"):
        decode_text("hello".encode("utf-32"))
    with pytest.raises(TextDecodeError, match="binary content: NUL byte at offset 7"):
        decode_text(b"\x7fELF\x02\x01\x01\x00" + bytes(range(1, 256)))


def test_expand_workers_tokenizer_chunks_exactly_as_the_checkpoints_hf_tokenizer(tiny_embedding_ckpt) -> None:
    # The expand stage loads only tokenizer.json (no transformers/torch import in its workers);
    # its chunks must be the ones the checkpoint's HF tokenizer gives.
    import subprocess
    import sys

    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    from operators.expand_stage import tokenizer_for
    tokenizer_for.cache_clear()
    raw = tokenizer_for(str(tiny_embedding_ckpt))
    assert isinstance(raw, Tokenizer)
    hf = AutoTokenizer.from_pretrained(str(tiny_embedding_ckpt))
    texts = [LONG_TEXT, "héllo wörld — 漢字 テキスト 🙂 " * 40, "<|im_start|>user\nspecial <|endoftext|> tokens\n" * 20,
             "  leading and trailing whitespace \n\n\t tabs\r\n" * 30, "x" * 5000]
    for text in texts:
        for size, overlap in ((32, 0), (64, 16), (512, 64)):
            assert chunk_spans(text, raw, size, overlap) == chunk_spans(text, hf, size, overlap)
    # And a fresh expand worker never imports torch.
    code = "import sys, operators.expand_stage as e; e.tokenizer_for(sys.argv[1]); print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code, str(tiny_embedding_ckpt)], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "False"


def test_a_tokenizer_json_shipping_truncation_and_padding_still_chunks_whole_texts(tiny_embedding_ckpt,
                                                                                    tmp_path) -> None:
    # Settings a hub tokenizer.json ships (truncation to 16 tokens here) are the HF tokenizer's
    # defaults for other callers; chunking must see every token, as with the HF tokenizer.
    from transformers import AutoTokenizer

    from operators.expand_stage import tokenizer_for
    from tests.tokenizer_settings import with_shipped_tokenizer_settings

    ckpt = with_shipped_tokenizer_settings(tiny_embedding_ckpt, tmp_path / "ckpt")
    hf = AutoTokenizer.from_pretrained(ckpt)
    spans = chunk_spans(LONG_TEXT, tokenizer_for(ckpt), 32, 8)
    assert spans == chunk_spans(LONG_TEXT, hf, 32, 8)
    assert spans[-1][1] == len(LONG_TEXT.rstrip()) or spans[-1][1] == len(LONG_TEXT)


_MEMORY_SCRIPT = """
import json, random, resource, sys
from operators.media import text_chunks
from tests.media_corpus import make_test_tokenizer

tok = make_test_tokenizer()
words = "the quick brown fox jumps over a lazy dog while reading prose about rivers and mountains".split()
random.seed(0)
text = "\\n".join(" ".join(random.choice(words) for _ in range(14)) for _ in range(50_000))  # about 4 MB
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
spans = text_chunks.chunk_spans(text, tok, 512, 64)
grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base
text_chunks.SEGMENTS_PER_CALL = 10**9  # one tokenizer call for the whole text: the same chunks
print(json.dumps({"mb": len(text) / 1e6, "grown_mb": grown / 1024, "same": text_chunks.chunk_spans(text, tok, 512, 64) == spans}))
"""


def test_chunking_a_large_text_holds_a_small_multiple_of_it() -> None:
    # A tuple per token and the tokenizer's encodings of the whole text took 80-220x its size
    # (6.9 GB for 29 MB of prose); two flat arrays and about 128 KB per tokenizer call take about 12x.
    import os

    from tests.resilience_helpers import run_json_script

    out = run_json_script(_MEMORY_SCRIPT, env=dict(os.environ), timeout_s=300)
    assert out["same"]
    assert out["grown_mb"] < 30 * out["mb"], out
