"""Decode text objects and cut them into token-sized chunks that are exact substrings.

Chunking tokenises with the tokenizer's offsets (no special tokens) and slices the
ORIGINAL string between the first token's start and the last token's end (edge
whitespace trimmed), so every chunk is an exact substring of the input. A window
made only of whitespace tokens is dropped. Long inputs are tokenised in segments of about
``SEGMENT_CHARS`` characters cut at line/space boundaries (a batch call: fast for
MBs, never hits the model's max length); tokens may differ from a one-shot
tokenisation only at those few boundaries.

Without a tokenizer (``tokenizer=None``) a regex stands in: runs of up to 8 word
characters and single punctuation marks count as tokens, which is close to (and
usually above) a BPE count for English prose.
"""

from __future__ import annotations

import re
from array import array
from itertools import islice
from typing import Any, Iterator

SEGMENT_CHARS = 32_768
# About 128 KB of text per tokenizer call: its encodings (about 80 bytes a token) are held only that
# long. 32 segments a call held 4x more and were no faster (2 cores, 2.3M tokens: 1.0 s vs 0.9 s).
SEGMENTS_PER_CALL = 4
_FALLBACK_TOKEN = re.compile(r"\w{1,8}|[^\w\s]")
_BOM = b"\xef\xbb\xbf"


class TextError(ValueError):
    """A text object cannot be used."""


class TextDecodeError(TextError):
    """Bytes are not UTF-8 text (invalid UTF-8 or binary)."""


class EmptyTextError(TextError):
    """The text is empty or whitespace only."""


# Byte-order marks of the wide encodings Windows tools write instead of UTF-8 (PowerShell 5's
# default is UTF-16 LE). UTF-32 LE's mark begins with UTF-16 LE's, so the UTF-32 ones come first.
_WIDE_BOMS = ((b"\xff\xfe\x00\x00", "UTF-32", "little-endian"), (b"\x00\x00\xfe\xff", "UTF-32", "big-endian"),
              (b"\xff\xfe", "UTF-16", "little-endian"), (b"\xfe\xff", "UTF-16", "big-endian"))
# Bytes looked at for a wide encoding without a mark: a few lines are enough to see its pattern.
WIDE_SAMPLE_BYTES = 4096


def _nul_share(sample: bytes, offset: int, step: int) -> float:
    """The share of NUL bytes among those of sample at positions offset (mod step)."""
    picked = sample[offset::step]
    return picked.count(0) / len(picked) if picked else 0.0


def wide_encoding(data: bytes) -> tuple[str, str] | None:
    """("UTF-16" or "UTF-32", how it was told) when data starts as UTF-16/32 text, else None."""
    for bom, name, order in _WIDE_BOMS:
        if data.startswith(bom):
            return name, f"{order}, byte-order mark {bom.hex(' ').upper()}"
    # Without a mark: text that is mostly ASCII (JSON's keys and punctuation, a .txt in a Latin
    # script) has a NUL in the high byte(s) of nearly every code unit, and none in the low one.
    # Random or binary bytes have NULs in no such pattern (an ELF header's few are not).
    sample = data[:WIDE_SAMPLE_BYTES]
    sample = sample[: len(sample) - len(sample) % 4]
    if len(sample) < 8 or 0 not in sample:
        return None
    high, low = 0.5, 0.1
    shares = [_nul_share(sample, o, 4) for o in range(4)]
    if shares[2] > 0.9 and shares[3] > 0.9 and shares[0] < low:
        return "UTF-32", "little-endian, no byte-order mark: NUL bytes between its characters"
    if shares[0] > 0.9 and shares[1] > 0.9 and shares[3] < low:
        return "UTF-32", "big-endian, no byte-order mark: NUL bytes between its characters"
    odd, even = _nul_share(sample, 1, 2), _nul_share(sample, 0, 2)
    if odd > high and even < low:
        return "UTF-16", "little-endian, no byte-order mark: NUL bytes between its characters"
    if even > high and odd < low:
        return "UTF-16", "big-endian, no byte-order mark: NUL bytes between its characters"
    return None


def decode_text(data: bytes) -> str:
    """Strict UTF-8 decode (BOM stripped); binary, invalid or empty text raise clear TextError subclasses."""
    if data.startswith(_BOM):
        data = data[len(_BOM) :]
    wide = wide_encoding(data)
    if wide is not None:
        raise TextDecodeError(f"{wide[0]} text ({wide[1]}): only UTF-8 is supported, re-encode the file")
    nul = data.find(b"\x00")
    if nul >= 0:
        raise TextDecodeError(f"binary content: NUL byte at offset {nul} (not a text file)")
    try:
        text = data.decode("utf-8", errors="strict")
    except UnicodeDecodeError as exc:
        raise TextDecodeError(f"invalid UTF-8 at byte {exc.start}: {exc.reason}") from exc
    if not text.strip():
        raise EmptyTextError("empty text")
    return text


def _segments(text: str, size: int = SEGMENT_CHARS) -> Iterator[tuple[int, str]]:
    """Split text into (offset, piece) segments of about `size` chars, cut after a newline or space."""
    start, n = 0, len(text)
    while start < n:
        end = min(start + size, n)
        if end < n:
            cut = text.rfind("\n", start + size // 2, end)
            if cut < 0:
                cut = text.rfind(" ", start + size // 2, end)
            if cut >= 0:
                end = cut + 1
        yield start, text[start:end]
        start = end


def _offsets(pieces: list[str], tokenizer: Any) -> list[list[tuple[int, int]]]:
    """Per-piece token offsets from an HF fast tokenizer or a raw `tokenizers.Tokenizer` (no special tokens)."""
    from tokenizers import Tokenizer

    backend = tokenizer if isinstance(tokenizer, Tokenizer) else getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.truncation is None and backend.padding is None:
        return [e.offsets for e in backend.encode_batch(pieces, add_special_tokens=False)]
    if backend is tokenizer:
        raise TextError("tokenizers.Tokenizer has truncation or padding enabled; disable them for chunking")
    enc = tokenizer(  # the HF call resets any truncation/padding state left on the backend
        pieces,
        add_special_tokens=False,
        return_offsets_mapping=True,
        return_attention_mask=False,
        return_token_type_ids=False,
        truncation=False,
        padding=False,
        verbose=False,
    )
    return [list(map(tuple, o)) for o in enc["offset_mapping"]]


def token_spans(text: str, tokenizer: Any | None) -> list[tuple[int, int]]:
    """Character (start, end) of every token in `text` (zero-width tokens dropped)."""
    starts, ends = token_bounds(text, tokenizer)
    return list(zip(starts, ends))


def token_bounds(text: str, tokenizer: Any | None) -> tuple[array, array]:
    """Character starts and ends of every token in `text` (zero-width tokens dropped), as two arrays."""
    # Two flat arrays of 4-byte integers (a text is at most limits.max_object_bytes long): a (start, end)
    # tuple per token, and the tokenizer's encodings of the whole text at once, took 80-220x a large
    # text's size (6.9 GB for 29 MB of prose).
    starts, ends = array("i"), array("i")
    if tokenizer is None:
        for m in _FALLBACK_TOKEN.finditer(text):
            starts.append(m.start())
            ends.append(m.end())
        return starts, ends
    segments = _segments(text)
    while group := list(islice(segments, SEGMENTS_PER_CALL)):
        for (base, _), offsets in zip(group, _offsets([piece for _, piece in group], tokenizer)):
            for s, e in offsets:
                if e > s:
                    starts.append(base + s)
                    ends.append(base + e)
    return starts, ends


def chunk_spans(text: str, tokenizer: Any | None, chunk_tokens: int, overlap_tokens: int) -> list[tuple[int, int]]:
    """Character spans of windows of `chunk_tokens` tokens, each overlapping the previous by `overlap_tokens`."""
    if chunk_tokens <= 0:
        raise ValueError(f"chunk_tokens must be > 0, got {chunk_tokens}")
    if not 0 <= overlap_tokens < chunk_tokens:
        raise ValueError(f"overlap_tokens must be in [0, chunk_tokens), got {overlap_tokens} with chunk_tokens={chunk_tokens}")
    starts, ends = token_bounds(text, tokenizer)
    if not starts:
        raise EmptyTextError("empty text")
    step = chunk_tokens - overlap_tokens
    spans: list[tuple[int, int]] = []
    start = 0
    while True:
        end = min(start + chunk_tokens, len(starts))
        span = _strip_span(text, starts[start], ends[end - 1])
        if span is not None:
            spans.append(span)
        if end == len(starts):
            break
        start += step
    if not spans:
        raise EmptyTextError("empty text")
    return spans


def _strip_span(text: str, start: int, end: int) -> tuple[int, int] | None:
    """The span without leading/trailing whitespace (None if nothing is left)."""
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return (start, end) if end > start else None


def chunk_text(text: str, tokenizer: Any | None, chunk_tokens: int, overlap_tokens: int) -> list[str]:
    """Chunk text by tokens; every chunk is an exact substring of `text`."""
    return [text[s:e] for s, e in chunk_spans(text, tokenizer, chunk_tokens, overlap_tokens)]
