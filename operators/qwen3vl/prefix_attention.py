"""Attention of the reranker's suffix batches on a CPU: the shared prefix and the causal suffix apart.

On the prefix path (reranker.py) each batch row is one document's suffix, right padded, on top
of the query's prefix keys/values. The stock path expands the prefix to every row, concatenates
it with the suffix keys in a ``DynamicCache`` and runs attention with a 4-D padding mask. With
an explicit mask the CPU flash kernel computes every block of the (suffix x (prefix + suffix))
scores, though half of the suffix square is masked away by causality; and transformers builds
that mask with a vmapped index function (25 ms per 100 passages).

Here each layer runs two attentions and merges them exactly by their log-sum-exps:

- the prefix: every query sees every prefix key, so all rows and all query heads of one key
  head become one long query axis against the prefix's keys, unexpanded (one call, no mask);
- the suffix: causal, with no mask. Rows are right padded, so a real position never sees a
  padded key; padded positions compute finite values that nothing reads.

``softmax([s_p, s_s]) @ [v_p; v_s] = lerp(o_s, o_p, sigmoid(lse_p - lse_s))``: the same sums
split in two, float rounding only. The final decoder layer (read_positions.py) and any layer
that is not installed still get a correct full 4-D mask, so nothing depends on this module being
active to be right except the keys, which the final layer takes from the same keyword.
"""

from __future__ import annotations

import types
from typing import Any, Sequence

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextAttention, apply_rotary_pos_emb

KWARG = "qvl_prefix_kv"  # per layer (keys, values) of the prefix, shape (1, kv_heads, P, head_dim)
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def prefix_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, prefix_key: torch.Tensor,
                            prefix_value: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of (batch, heads, W, d) queries over a shared prefix then their own causal suffix.

    key/value: (batch, kv_heads, W, d) of the suffix; prefix_key/prefix_value: (1, kv_heads, P, d).
    Returns (batch, heads, W, d).
    """
    batch, heads, width, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    # Prefix: (kv_heads, batch * groups * W) queries, each against all P keys of its key head.
    folded = query.reshape(batch, kv_heads, groups, width, dim).transpose(0, 1).reshape(1, kv_heads, -1, dim)
    out_p, lse_p = _FLASH(folded, prefix_key, prefix_value, 0.0, False, scale=scale)
    out_p = out_p.view(kv_heads, batch, groups, width, dim).transpose(0, 1).reshape(batch, heads, width, dim)
    lse_p = lse_p.view(kv_heads, batch, groups, width).transpose(0, 1).reshape(batch, heads, width)
    if groups > 1:
        key = key.repeat_interleave(groups, dim=1)
        value = value.repeat_interleave(groups, dim=1)
    out_s, lse_s = _FLASH(query, key, value, 0.0, True, scale=scale)
    weight = torch.sigmoid(lse_p - lse_s).unsqueeze(-1).to(out_s.dtype)  # the prefix's share of the softmax
    return torch.lerp(out_s, out_p, weight)


def _attention_forward(self: Qwen3VLTextAttention, hidden_states: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None,
                       past_key_values: Any = None, cache_position: torch.Tensor | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Qwen3VLTextAttention.forward; with the prefix keyword, the split attention above."""
    prefix = kwargs.pop(KWARG, None)
    if prefix is None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, past_key_values,
                                  cache_position, **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    query = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
    key = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
    value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    prefix_key, prefix_value = prefix[self.layer_idx]
    out = prefix_causal_attention(query, key, value, prefix_key, prefix_value, self.scaling)
    return self.o_proj(out.transpose(1, 2).reshape(*hidden_states.shape[:-1], -1)), None


def install_prefix_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """Let the language model's attention take the prefix keyword; False where that is not supported."""
    layers = [m for m in model.modules() if isinstance(m, Qwen3VLTextAttention)]
    if device.type != "cpu" or _FLASH is None or not layers:
        return False
    if layers[0].config._attn_implementation != "sdpa":  # the final layer reads the boolean mask with sdpa
        return False
    for layer in layers:
        # An instance attribute: nn.Module.__call__ looks forward up on the instance first.
        layer.forward = types.MethodType(_attention_forward, layer)
    return True


def suffix_mask(lengths: Sequence[int], prefix_length: int, width: int) -> torch.Tensor:
    """The full (batch, 1, W, P + W) boolean mask of right-padded suffixes on a shared prefix."""
    i = torch.arange(width)
    causal = i[None, :] <= i[:, None]  # (W, W): a suffix position sees itself and what precedes it
    real = i[None, :] < torch.tensor(list(lengths))[:, None]  # (batch, W): keys that are not padding
    suffix = causal[None] & real[:, None, :]
    # Padded rows keep the prefix, so no row is all masked (that would be NaN).
    prefix = torch.ones((len(lengths), width, prefix_length), dtype=torch.bool)
    return torch.cat([prefix, suffix], dim=-1)[:, None]
