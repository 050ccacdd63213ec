"""The reranker's suffix batches on a CPU: packed without padding, the prefix and the suffix attended apart.

On the prefix path (reranker.py) each pair's suffix (its document and the closing tokens) runs
on top of the query's prefix keys/values. The stock way pads the suffixes to one width, expands
the prefix to every row and concatenates it with the suffix keys in a ``DynamicCache``, and runs
attention with a 4-D mask that transformers builds with a vmapped index function. Here:

- **Packed rows.** The suffixes are one sequence of their real tokens, (1, T): every matrix
  product, norm and MLP runs on those tokens alone. Sorted batches of 100 passages of 60-250
  words still padded 8.5% of their tokens.
- **The prefix apart.** Every query sees every prefix key, so all tokens and all query heads
  of one key head become one long query axis against the prefix's keys, unexpanded: one call,
  no mask.
- **The suffix apart.** Each suffix is scattered into a (batch, heads, W, d) grid for one causal
  call with no mask: rows are right padded, so a real position never sees a padded key. Padded
  keys and values are zeros (finite, so a zero weight stays zero); padded queries are left
  unset, and their rows are dropped when the grid is packed again.

``softmax([s_p, s_s]) @ [v_p; v_s] = lerp(o_s, o_p, sigmoid(lse_p - lse_s))``: the same sums
split in two, float rounding only. The final decoder layer (read_positions.py) computes only the
read positions: it takes the padded grid back (``SuffixPack.padded``), the prefix keys from the
same keyword and the full mask (``suffix_mask``) that the reranker passes as the attention mask.
"""

from __future__ import annotations

import types
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextAttention, apply_rotary_pos_emb

KWARG = "qvl_suffix_pack"  # rides along the decoder layers' **kwargs; the stock layers ignore it
_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


@dataclass
class SuffixPack:
    """Right-padded suffixes of a shared prefix, packed into one row of their real tokens."""

    kv: Sequence[tuple[torch.Tensor, torch.Tensor]]  # per layer: prefix (keys, values), (1, kv_heads, P, d)
    lengths: Sequence[int]
    width: int = field(init=False)
    index: torch.Tensor = field(init=False)  # each packed token's place in the (batch * width) grid
    pad_index: torch.Tensor = field(init=False)  # the grid's padded places

    def __post_init__(self) -> None:
        self.width = max(self.lengths)
        device = self.kv[0][0].device
        self.index = torch.cat([torch.arange(n, device=device) + row * self.width
                                for row, n in enumerate(self.lengths)])
        real = torch.zeros(len(self.lengths) * self.width, dtype=torch.bool, device=device)
        real[self.index] = True
        self.pad_index = torch.nonzero(~real).flatten()

    def padded(self, x: torch.Tensor, fill: bool = True) -> torch.Tensor:
        """(1, T, *rest) packed tokens as a (batch, width, *rest) grid; padded places zero (or left unset)."""
        grid = x.new_empty((len(self.lengths) * self.width, *x.shape[2:]))
        grid.index_copy_(0, self.index, x[0])
        if fill and len(self.pad_index):
            grid.index_fill_(0, self.pad_index, 0)
        return grid.view(len(self.lengths), self.width, *x.shape[2:])

    def packed(self, grid: torch.Tensor) -> torch.Tensor:
        """A (batch, width, *rest) grid's real tokens, (T, *rest)."""
        return grid.reshape(-1, *grid.shape[2:]).index_select(0, self.index)


def prefix_causal_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, pack: SuffixPack,
                            layer: int, scale: float) -> torch.Tensor:
    """Attention of packed (1, heads, T, d) queries over the shared prefix, then their own causal suffix.

    key/value: (1, kv_heads, T, d) of the packed suffixes. Returns (1, T, heads * d).
    """
    _, heads, tokens, dim = query.shape
    kv_heads = key.shape[1]
    groups = heads // kv_heads
    prefix_key, prefix_value = pack.kv[layer]
    # Prefix: (kv_heads, groups * T) queries, each against all P keys of its key head.
    out_p, lse_p = _FLASH(query.reshape(1, kv_heads, groups * tokens, dim), prefix_key, prefix_value, 0.0, False,
                          scale=scale)
    # Suffix: each row causal over its own keys, in the padded grid. Padded queries may hold
    # anything (their rows are dropped); padded keys and values are zeros, finite, never weighted.
    grid_q = pack.padded(query.transpose(1, 2), fill=False).transpose(1, 2)
    grid_k, grid_v = (pack.padded(x.transpose(1, 2)).transpose(1, 2) for x in (key, value))
    if groups > 1:
        grid_k = grid_k.repeat_interleave(groups, dim=1)
        grid_v = grid_v.repeat_interleave(groups, dim=1)
    out_s, lse_s = _FLASH(grid_q, grid_k, grid_v, 0.0, True, scale=scale)
    out_s = pack.packed(out_s.transpose(1, 2))  # (T, heads, d)
    lse_s = pack.packed(lse_s.transpose(1, 2))
    out_p = out_p.reshape(heads, tokens, dim).transpose(0, 1)
    lse_p = lse_p.reshape(heads, tokens).transpose(0, 1)
    weight = torch.sigmoid(lse_p - lse_s).unsqueeze(-1).to(out_s.dtype)  # the prefix's share of the softmax
    return torch.lerp(out_s, out_p, weight).view(1, tokens, heads * dim)


def _attention_forward(self: Qwen3VLTextAttention, hidden_states: torch.Tensor,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor], attention_mask: torch.Tensor | None,
                       past_key_values: Any = None, cache_position: torch.Tensor | None = None,
                       **kwargs: Any) -> tuple[torch.Tensor, None]:
    """Qwen3VLTextAttention.forward; with a suffix pack, the split attention above."""
    pack = kwargs.pop(KWARG, None)
    if pack is None:
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, past_key_values,
                                  cache_position, **kwargs)
    shape = (*hidden_states.shape[:-1], -1, self.head_dim)
    query = self.q_norm(self.q_proj(hidden_states).view(shape)).transpose(1, 2)
    key = self.k_norm(self.k_proj(hidden_states).view(shape)).transpose(1, 2)
    value = self.v_proj(hidden_states).view(shape).transpose(1, 2)
    cos, sin = position_embeddings
    query, key = apply_rotary_pos_emb(query, key, cos, sin)
    return self.o_proj(prefix_causal_attention(query, key, value, pack, self.layer_idx, self.scaling)), None


def attention_is_sdpa(model: torch.nn.Module) -> bool:
    """True while the language model attends with sdpa (the final layer reads the boolean mask with it)."""
    text = getattr(model, "language_model", None)  # Qwen3VLModel's; read once per batch, no module walk
    return text is not None and text.config._attn_implementation == "sdpa"


def install_prefix_attention(model: torch.nn.Module, device: torch.device) -> bool:
    """Let the language model's attention take a suffix pack; False where that is not supported."""
    if device.type != "cpu" or _FLASH is None or not attention_is_sdpa(model):
        return False
    for layer in model.modules():
        if isinstance(layer, Qwen3VLTextAttention):
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
