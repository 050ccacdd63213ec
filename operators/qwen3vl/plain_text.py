"""User text stays plain text: special-token strings inside it never become special tokens.

The chat template writes user text (documents, queries, instructions) into one string with its
own special tokens, and both the HF processor (which expands every ``<|image_pad|>`` and
``<|video_pad|>`` it finds) and the tokenizer (which matches every special-token string) read
that string whole. A document quoting ``<|image_pad|>`` then asked for an image it does not
have, and one quoting ``<|im_end|>`` closed its own turn.

A conversation whose texts hold no such string takes the usual path, unchanged. Otherwise every
text entry is swapped for a short sentinel (the *skeleton*), the processor runs on the skeleton
(its vision placeholders are then exactly the template's), and each run of ordinary tokens that
holds a sentinel is decoded, given its texts back and tokenised again with special tokens split,
as ``tokenizer(text, split_special_tokens=True)`` does. Non-special added tokens (``<think>``)
are matched as usual, there as here. Truncation is applied afterwards, as the tokenizer applies it.
"""

from __future__ import annotations

import re
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Sequence

# A private-use character opens and another closes a sentinel: never special, never normalised
# away, and absent from the template's own text (user text is not in the skeleton at all).
_OPEN, _CLOSE = "\ue000", "\ue001"
_SENTINEL = re.compile(f"{_OPEN}(\\d+){_CLOSE}")


@dataclass(frozen=True)
class TextVocab:
    """What one processor treats as special: the strings to keep out of user text, and the ids."""

    protected: re.Pattern[str]  # every special-token string (and the processor's placeholders)
    special_ids: frozenset[int]


@dataclass(frozen=True)
class TextCodec:
    """Plain-text encoding (special-token strings split) and decoding for one tokenizer."""

    encode: Callable[[str], list[int]]  # nothing added: no <|endoftext|>
    decode: Callable[[Sequence[int]], str]
    added_head: int  # tokens the tokenizer's post-processor puts before the text
    added_tail: int  # ... and after it (the Embedding checkpoints' <|endoftext|>)


@dataclass(frozen=True)
class Skeleton:
    """A conversation with its texts swapped for sentinels, and the texts to put back."""

    conversation: list[dict[str, Any]]
    texts: tuple[str, ...]

    def unescape(self, text: str) -> str:
        """The text with every sentinel replaced by the text it stands for."""
        return _SENTINEL.sub(lambda m: self.texts[int(m.group(1))], text)


_VOCABS: "weakref.WeakKeyDictionary[Any, TextVocab]" = weakref.WeakKeyDictionary()
_CODECS: "weakref.WeakKeyDictionary[Any, TextCodec]" = weakref.WeakKeyDictionary()
_LOCK = threading.Lock()


def _cached(cache: weakref.WeakKeyDictionary, key: Any, build: Callable[[], Any]) -> Any:
    """cache[key], built once under a lock (preparation threads share the processor)."""
    value = cache.get(key)
    if value is None:
        with _LOCK:
            value = cache.get(key)
            if value is None:
                value = cache[key] = build()
    return value


def text_vocab(processor: Any) -> TextVocab:
    """The processor's TextVocab, read once per tokenizer."""
    return _cached(_VOCABS, processor.tokenizer, lambda: _build_vocab(processor))


def text_codec(tokenizer: Any) -> TextCodec:
    """The tokenizer's TextCodec, built on first need (most inputs never need it)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return _cached(_CODECS, tokenizer, lambda: _slow_codec(tokenizer) if backend is None else _fast_codec(backend))


EXPANSION_PLACEHOLDER = "<|placeholder|>"  # transformers' Qwen3VLProcessor, while it expands vision tokens


def _build_vocab(processor: Any) -> TextVocab:
    """The special added tokens' strings and ids, plus the strings the processor expands."""
    special = {i: t.content for i, t in processor.tokenizer.added_tokens_decoder.items() if t.special}
    strings = set(special.values())
    # The processor replaces its placeholders by string, special to the tokenizer or not, and
    # expands them through the literal "<|placeholder|>" (preprocess.py does the same): in user
    # text, either would become vision tokens that no image fills.
    strings.update(s for s in (getattr(processor, n, None) for n in ("image_token", "video_token")) if s)
    strings.add(EXPANSION_PLACEHOLDER)
    protected = re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)) or "(?!)")
    return TextVocab(protected, frozenset(special))


def _fast_codec(backend: Any) -> TextCodec:
    """Encode/decode on a private copy of the Rust tokenizer that splits special tokens.

    A copy, because ``split_special_tokens=True`` on the shared tokenizer writes its state: a
    preparation thread encoding at that moment would split the template's own tokens, or fail
    with "Already borrowed". The copy is only ever read after this.
    """
    from tokenizers import Tokenizer

    plain = Tokenizer.from_str(backend.to_str())
    plain.no_truncation()
    plain.no_padding()
    plain.encode_special_tokens = True
    # What the post-processor adds around a text: the tokens its special-tokens mask marks.
    mask = plain.encode(_OPEN, add_special_tokens=True).special_tokens_mask
    text = [i for i, m in enumerate(mask) if not m]
    head, tail = text[0], len(mask) - 1 - text[-1]

    def encode(text: str) -> list[int]:
        return plain.encode(text, add_special_tokens=False).ids

    def decode(ids: Sequence[int]) -> str:
        return plain.decode(list(ids), skip_special_tokens=False)

    return TextCodec(encode, decode, head, tail)


def _slow_codec(tokenizer: Any) -> TextCodec:
    """Encode/decode through a Python tokenizer (its split_special_tokens is per call, no shared state)."""
    marked = tokenizer.build_inputs_with_special_tokens([-1])
    head = marked.index(-1)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    return TextCodec(encode, decode, head, len(marked) - head - 1)


def _text_entries(conversation: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every text content entry of the conversation, in order."""
    return [e for m in conversation for e in m.get("content", ()) if isinstance(e, dict) and e.get("type") == "text"]


def skeleton(processor: Any, conversation: list[dict[str, Any]]) -> Skeleton | None:
    """The conversation with its texts as sentinels; None when no text holds a special-token string."""
    protected = text_vocab(processor).protected
    if not any(protected.search(e.get("text") or "") for e in _text_entries(conversation)):
        return None
    texts: list[str] = []
    messages = []
    for message in conversation:
        content = []
        for entry in message.get("content", ()):
            if isinstance(entry, dict) and entry.get("type") == "text":
                # Every text, not only the one quoting a token: the skeleton stays short, so the
                # processor never truncates it, and truncation is decided on the real tokens.
                texts.append(entry.get("text") or "")
                entry = {**entry, "text": f"{_OPEN}{len(texts) - 1}{_CLOSE}"}
            content.append(entry)
        messages.append({**message, "content": content})
    return Skeleton(messages, tuple(texts))


def restore(processor: Any, plain: Skeleton, ids: list[int], extra: dict[str, list[int]],
            text_kwargs: dict[str, Any]) -> tuple[list[int], dict[str, list[int]]]:
    """The skeleton's token ids with its texts put back as plain text, then truncated as asked."""
    codec = text_codec(processor.tokenizer)
    ids, extra = _retokenize_runs(text_vocab(processor).special_ids, codec, plain, ids, extra)
    return _truncate(processor, codec, ids, extra, text_kwargs)


def _runs(ids: Sequence[int], special_ids: frozenset[int]) -> list[tuple[int, int]]:
    """(start, end) of each maximal run of non-special ids."""
    out, start = [], None
    for i, t in enumerate(ids):
        if t in special_ids:
            if start is not None:
                out.append((start, i))
            start = None
        elif start is None:
            start = i
    if start is not None:
        out.append((start, len(ids)))
    return out


def _retokenize_runs(special_ids: frozenset[int], codec: TextCodec, plain: Skeleton, ids: list[int],
                     extra: dict[str, list[int]]) -> tuple[list[int], dict[str, list[int]]]:
    """Runs holding a sentinel decoded, given their texts back and encoded again; other tokens kept."""
    new_ids: list[int] = []
    new_extra: dict[str, list[int]] = {k: [] for k in extra}
    done = 0
    for start, end in _runs(ids, special_ids):
        text = codec.decode(ids[start:end])
        if _OPEN not in text:
            continue
        # The tokenizer splits its input at special tokens and encodes each piece alone, so a run
        # between two special tokens is encoded here exactly as it would be in the whole prompt.
        tokens = codec.encode(plain.unescape(text))
        new_ids += ids[done:start] + tokens
        for k, values in extra.items():
            new_extra[k] += values[done:start] + [0] * len(tokens)  # plain text: no multimodal type
        done = end
    new_ids += ids[done:]
    for k, values in extra.items():
        new_extra[k] += values[done:]
    return new_ids, new_extra


def _truncate(processor: Any, codec: TextCodec, ids: list[int], extra: dict[str, list[int]],
              text_kwargs: dict[str, Any]) -> tuple[list[int], dict[str, list[int]]]:
    """Cut to max_length as the tokenizer does: the text part is cut, the added tokens kept."""
    max_length = text_kwargs.get("max_length")
    truncation = text_kwargs.get("truncation")
    if not truncation or truncation == "do_not_truncate" or max_length is None or len(ids) <= max_length:
        return ids, extra
    added = text_kwargs.get("add_special_tokens", True)
    head, tail = (codec.added_head, codec.added_tail) if added else (0, 0)
    body = range(head, len(ids) - tail)
    room = max(0, max_length - head - tail)
    kept_body = body[len(body) - room:] if processor.tokenizer.truncation_side == "left" else body[:room]
    keep = [*range(head), *kept_body, *range(len(ids) - tail, len(ids))]
    _check_vision_kept(processor, ids, [ids[i] for i in keep])
    return [ids[i] for i in keep], {k: [v[i] for i in keep] for k, v in extra.items()}


def _check_vision_kept(processor: Any, before: list[int], after: list[int]) -> None:
    """Raise as the processor does when truncation cuts vision placeholders (the model would fail on them)."""
    for modality in ("image", "video"):
        token_id = getattr(processor, f"{modality}_token_id", None)
        if token_id is not None and before.count(token_id) != after.count(token_id):
            raise ValueError(f"Mismatch in `{modality}` token count between text and `input_ids`. Got "
                             f"ids=[{after.count(token_id)}] and text=[{before.count(token_id)}]. Likely due to "
                             "`truncation='max_length'`. Please disable truncation or increase `max_length`.")
