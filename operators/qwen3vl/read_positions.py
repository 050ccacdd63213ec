"""The language model's final layer computed only at the positions that are read: one per row.

The embedder pools one hidden state per sequence (its last token) and the reranker reads one
(the last position). In a causal model every other position's output of the FINAL decoder
layer is computed and thrown away: that layer needs every position's keys and values, but
queries, attention output, residual and MLP only at the read position. Skipping the rest is
exact (the same operations on the same rows; only float rounding of differently shaped
products differs) and saves almost one layer's work per token - llama.cpp does the same for
the tokens whose logits nobody asks for. The saving is about 1/num_layers of the language
model: 3% on the 28-layer 2B, 22% on the 4-layer `small` benchmark checkpoint.

Active only where it is exact and cheap to do right: sdpa or eager attention, and a final
layer after every deepstack injection (deepstack adds vision features to whole-sequence
hidden states after the first layers). ``hidden_at`` reads the same rows either way.
"""

from __future__ import annotations

import types
from typing import Any

import torch
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3_vl.modeling_qwen3_vl import (Qwen3VLTextModel, eager_attention_forward,
                                                            rotate_half)

from . import prefix_attention

_KWARG = "qvl_read_positions"  # rides along the decoder layers' **kwargs; the stock layers ignore it


def _text_model(model: torch.nn.Module) -> Qwen3VLTextModel:
    for module in model.modules():
        if isinstance(module, Qwen3VLTextModel):
            return module
    raise ValueError(f"{type(model).__name__} has no Qwen3-VL language model")


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rotary_pos_emb for one tensor (x: batch, heads, seq, head_dim; cos/sin: batch, seq, head_dim)."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (rotate_half(x) * sin)


def _query_mask(attention_mask: torch.Tensor | None, rows: torch.Tensor, read: torch.Tensor, seq: int,
                keys: int, dtype: torch.dtype, additive: bool) -> torch.Tensor:
    """The read positions' rows of the layer's 4-D mask, shape (batch, 1|heads, 1, keys)."""
    if attention_mask is not None:
        mask = attention_mask.expand(rows.shape[0], -1, -1, -1)
        return mask[rows, :, read][:, :, None, :keys]
    # No mask given means causal and unpadded: a position sees every key up to its own.
    allowed = torch.arange(keys, device=read.device)[None, :] <= (keys - seq + read)[:, None]
    if additive:
        return torch.zeros(allowed.shape, dtype=dtype, device=read.device).masked_fill(
            ~allowed, torch.finfo(dtype).min)[:, None, None, :]
    return allowed[:, None, None, :]


def _final_layer_forward(self: Any, hidden_states: torch.Tensor, position_embeddings: tuple[torch.Tensor, torch.Tensor],
                         attention_mask: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                         past_key_values: Any = None, use_cache: bool | None = False,
                         cache_position: torch.Tensor | None = None, **kwargs: Any) -> torch.Tensor:
    """Qwen3VLTextDecoderLayer.forward with queries, attention output and MLP only at the read positions."""
    read = kwargs.pop(_KWARG, None)
    attn = self.self_attn
    impl = attn.config._attn_implementation
    pack = kwargs.pop(prefix_attention.KWARG, None)
    if pack is not None:
        if read is None or impl != "sdpa":
            raise RuntimeError("packed reranker suffixes need the read positions and sdpa attention")
        # Back to the padded grid: this layer computes one query per row (prefix_attention.py).
        hidden_states = pack.padded(hidden_states)
        position_embeddings = tuple(pack.padded(x) for x in position_embeddings)
    if read is None or impl not in ("sdpa", "eager"):
        out = type(self).forward(self, hidden_states, position_embeddings, attention_mask, position_ids,
                                 past_key_values, use_cache, cache_position, **kwargs)
        # Attention switched to another kernel since install: the whole layer, then the read rows.
        return out if read is None else out[torch.arange(out.shape[0], device=out.device), read][:, None]
    batch, seq, _ = hidden_states.shape
    rows = torch.arange(batch, device=hidden_states.device)
    normed = self.input_layernorm(hidden_states)
    kv_shape = (batch, seq, -1, attn.head_dim)
    cos, sin = position_embeddings
    key_states = _rotate(attn.k_norm(attn.k_proj(normed).view(kv_shape)).transpose(1, 2), cos, sin)
    value_states = attn.v_proj(normed).view(kv_shape).transpose(1, 2)
    picked = normed[rows, read][:, None]  # (batch, 1, hidden)
    query_states = attn.q_norm(attn.q_proj(picked).view(batch, 1, -1, attn.head_dim)).transpose(1, 2)
    query_states = _rotate(query_states, cos[rows, read][:, None], sin[rows, read][:, None])
    if past_key_values is not None:
        key_states, value_states = past_key_values.update(
            key_states, value_states, attn.layer_idx, {"sin": sin, "cos": cos, "cache_position": cache_position})
    if pack is not None:  # the shared prefix's keys/values come first
        prefix_key, prefix_value = pack.kv[attn.layer_idx]
        key_states = torch.cat([prefix_key.expand(batch, -1, -1, -1), key_states], dim=2)
        value_states = torch.cat([prefix_value.expand(batch, -1, -1, -1), value_states], dim=2)
    mask = _query_mask(attention_mask, rows, read, seq, key_states.shape[-2], query_states.dtype,
                       additive=impl == "eager")
    interface = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
    out, _ = interface(attn, query_states, key_states, value_states, mask, dropout=0.0, scaling=attn.scaling,
                       is_causal=False, **kwargs)
    out = attn.o_proj(out.reshape(batch, 1, -1).contiguous())
    hidden = hidden_states[rows, read][:, None] + out
    return hidden + self.mlp(self.post_attention_layernorm(hidden))


def install_read_positions(model: torch.nn.Module) -> bool:
    """Let the final decoder layer compute only read positions; False where that is not supported."""
    text = _text_model(model)
    layer = text.layers[-1]
    if getattr(layer, "_qvl_read_positions", False):
        return True
    vision = getattr(getattr(model, "config", None), "vision_config", None)
    deepstack = len(getattr(vision, "deepstack_visual_indexes", None) or ())
    if text.config._attn_implementation not in ("sdpa", "eager") or len(text.layers) <= deepstack:
        return False
    # An instance attribute: nn.Module.__call__ looks forward up on the instance first.
    layer.forward = types.MethodType(_final_layer_forward, layer)
    layer._qvl_read_positions = True
    return True


def hidden_at(model: torch.nn.Module, batch: dict[str, torch.Tensor], read: torch.Tensor, active: bool,
              **forward_kwargs: Any) -> torch.Tensor:
    """The final hidden state (after the norm) at one position per row, shape (batch, hidden)."""
    if active:
        return model(**batch, **forward_kwargs, **{_KWARG: read}).last_hidden_state[:, 0]
    hidden = model(**batch, **forward_kwargs).last_hidden_state
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), read]
