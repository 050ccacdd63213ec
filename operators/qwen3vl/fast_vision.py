"""An exact, faster path through Qwen3-VL's vision tower: the same math with fewer launches and host syncs.

transformers' vision tower (4.57, sdpa/eager attention) rebuilds every image's position
embeddings with per-image Python loops of small GPU ops, reads the chunk lengths back to the
host in every one of its layers, and runs attention once per image. For a batch of 64 images
that is thousands of kernel launches and dozens of GPU->host syncs per forward, while the
GPU waits. Here:

- the patch embedding (a Conv3d whose kernel is the whole patch) runs as the matrix product
  it is;
- each grid's position embeddings (interpolated absolute and rotary) are computed once, by
  the model's own functions, and cached (a grid's embeddings do not depend on its batch);
- the chunk lengths are read once per forward, not once per layer;
- attention runs once per run of equal-length chunks (images of one size, a video's frames)
  as one batch; every chunk still attends only to itself, so the result is unchanged;
- the rotary embedding of queries and keys is the stock float32 math in 6 passes over memory
  instead of 16, bit for bit the same (``_rotary_qk``).

flash_attention_2 already attends over all chunks in one varlen call, so its attention is left
as it is. ``set_fast_vision(model, False)`` restores the stock path (benchmarks use it as the
official baseline).
"""

from __future__ import annotations

import threading
import types
from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLVisionModel, eager_attention_forward

_CACHED_GRIDS = 256  # distinct (t, h, w) grids kept: about 15 MB each at 1600x1200 in bf16
# ... and at most this many bytes of them: photos and videos of many sizes would otherwise hold
# 256 grids' worth for the life of the process (1.6 GiB of bf16 on a GPU for varied photos, 14 GB
# for 64-frame videos). A grid over the bound alone is computed each time, not cached.
_CACHED_BYTES = 256 * 2**20


class _FastVision:
    """Per-vision-tower state: on/off switch and the per-grid embedding cache."""

    def __init__(self, visual: Qwen3VLVisionModel) -> None:
        self.visual = visual
        self.enabled = True
        self._cache: OrderedDict[tuple[Any, ...], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._bytes = 0  # what the cached grids hold
        self._lock = threading.Lock()

    def embeddings(self, grids: list[tuple[int, int, int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """(absolute position embeddings, rotary angles) for these grids, concatenated in order."""
        weight = self.visual.pos_embed.weight
        parts = [self._grid(g, weight.device, weight.dtype) for g in grids]
        if len(parts) == 1:
            return parts[0]
        return torch.cat([p for p, _ in parts]), torch.cat([r for _, r in parts])

    def _grid(self, grid: tuple[int, int, int], device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor,
                                                                                                   torch.Tensor]:
        key = (grid, device, dtype)
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None:
                self._cache.move_to_end(key)
                return hit
        one = torch.tensor([grid], dtype=torch.long, device=device)
        value = (self.visual.fast_pos_embed_interpolate(one), self.visual.rot_pos_emb(one))
        size = sum(t.numel() * t.element_size() for t in value)
        if size > _CACHED_BYTES:
            return value
        with self._lock:
            if key not in self._cache:  # another thread may have stored it meanwhile
                self._cache[key] = value
                self._bytes += size
            while len(self._cache) > _CACHED_GRIDS or self._bytes > _CACHED_BYTES:
                _, (pos, rot) = self._cache.popitem(last=False)
                self._bytes -= sum(t.numel() * t.element_size() for t in (pos, rot))
        return value


def _equal_runs(lengths: list[int]) -> list[tuple[int, int]]:
    """(length, count) for each run of consecutive equal lengths."""
    runs: list[tuple[int, int]] = []
    for n in lengths:
        if runs and runs[-1][0] == n:
            runs[-1] = (n, runs[-1][1] + 1)
        else:
            runs.append((n, 1))
    return runs


def _patch_embed(embed: Any, pixels: torch.Tensor) -> torch.Tensor:
    """Qwen3VLVisionPatchEmbed as the matrix product it is.

    Its Conv3d has kernel == stride == the whole patch, so each output is one dot product of the
    flattened patch with each filter: a linear layer over the same weights, in the same order.
    The convolution kernels ran 6x slower than the product on CPU (8,000 patches: 121 vs 20 ms);
    results differ only by float rounding (7.6e-06 on values of about 4).
    """
    weight = embed.proj.weight
    flat = pixels.reshape(-1, weight[0].numel()).to(weight.dtype)
    return F.linear(flat, weight.reshape(weight.shape[0], -1), embed.proj.bias)


def _rotary_qk(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               upcast: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Queries and keys of a (seq, 3, heads, head_dim) projection with the vision rotary applied.

    Bit for bit ``apply_rotary_pos_emb_vision``: float32 ``q * cos + rotate_half(q) * sin``, cast
    back. That function upcasts q and k, builds ``rotate_half`` (a negation and a concatenation),
    and multiplies and adds full-width float32 copies: 16 elementwise passes for q and k, about
    1.7 GB per vision layer of the 2B for 16 512x512 images, as much time as the layer's matrix
    products on a GPU. Here both halves of q and k at once: four products and two sums whose
    results land in the output (the sums round to float32, then to the output dtype, as the
    stock casts do). ``-x2 * s == -(x2 * s)`` exactly, so the subtraction is the stock sum.
    """
    qk = qkv[:, :2]
    if upcast is None:
        # CPU kernels with mixed bf16/float32 operands run slower than one upcast first;
        # on a GPU the mixed products save that pass (the values are the same either way).
        upcast = qk.device.type == "cpu"
    if upcast and qk.dtype != torch.float32:
        qk = qk.float()
    half = qk.shape[-1] // 2
    x1, x2 = qk[..., :half], qk[..., half:]
    cos = cos.float()[:, None, None, :]
    sin = sin.float()[:, None, None, :]
    out = torch.empty(qk.shape, dtype=qkv.dtype, device=qkv.device)
    torch.sub(x1 * cos[..., :half], x2 * sin[..., :half], out=out[..., :half])
    torch.add(x2 * cos[..., half:], x1 * sin[..., half:], out=out[..., half:])
    return out[:, 0], out[:, 1]


def _vision_forward(self: Qwen3VLVisionModel, hidden_states: torch.Tensor, grid_thw: torch.Tensor,
                    **kwargs: Any) -> Any:
    """Qwen3VLVisionModel.forward with cached grid embeddings and chunk lengths read once."""
    fast: _FastVision = self._qvl_fast
    if not fast.enabled:
        return type(self).forward(self, hidden_states, grid_thw, **kwargs)
    hidden_states = _patch_embed(self.patch_embed, hidden_states)
    grids = [(int(t), int(h), int(w)) for t, h, w in grid_thw.tolist()]  # the one host read
    pos_embeds, rotary_pos_emb = fast.embeddings(grids)
    hidden_states = hidden_states + pos_embeds

    seq_len, _ = hidden_states.size()
    hidden_states = hidden_states.reshape(seq_len, -1)
    rotary_pos_emb = rotary_pos_emb.reshape(seq_len, -1)
    emb = torch.cat((rotary_pos_emb, rotary_pos_emb), dim=-1)
    position_embeddings = (emb.cos(), emb.sin())

    cu_seqlens = torch.repeat_interleave(grid_thw[:, 1] * grid_thw[:, 2], grid_thw[:, 0]).cumsum(
        dim=0, dtype=torch.int32)
    cu_seqlens = F.pad(cu_seqlens, (1, 0), value=0)
    chunk_lengths = [h * w for t, h, w in grids for _ in range(t)]

    deepstack_feature_lists = []
    for layer_num, blk in enumerate(self.blocks):
        hidden_states = blk(hidden_states, cu_seqlens=cu_seqlens, position_embeddings=position_embeddings,
                            qvl_chunk_lengths=chunk_lengths, **kwargs)
        if layer_num in self.deepstack_visual_indexes:
            merger = self.deepstack_merger_list[self.deepstack_visual_indexes.index(layer_num)]
            deepstack_feature_lists.append(merger(hidden_states))
    hidden_states = self.merger(hidden_states)
    return hidden_states, deepstack_feature_lists


def _attention_forward(self: Any, hidden_states: torch.Tensor, cu_seqlens: torch.Tensor,
                       rotary_pos_emb: torch.Tensor | None = None,
                       position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                       qvl_chunk_lengths: list[int] | None = None, **kwargs: Any) -> torch.Tensor:
    """Qwen3VLVisionAttention.forward with one attention call per run of equal-length chunks."""
    impl = self.config._attn_implementation
    if qvl_chunk_lengths is None or impl == "flash_attention_2":
        return type(self).forward(self, hidden_states, cu_seqlens, rotary_pos_emb, position_embeddings, **kwargs)
    seq_length = hidden_states.shape[0]
    qkv = self.qkv(hidden_states).reshape(seq_length, 3, self.num_heads, -1)
    value_states = qkv[:, 2]
    query_states, key_states = _rotary_qk(qkv, *position_embeddings)
    # (1, heads, seq, head_dim) views, as the stock path builds them.
    query_states = query_states.transpose(0, 1).unsqueeze(0)
    key_states = key_states.transpose(0, 1).unsqueeze(0)
    value_states = value_states.transpose(0, 1).unsqueeze(0)
    attention_interface = eager_attention_forward if impl == "eager" else ALL_ATTENTION_FUNCTIONS[impl]
    heads, head_dim = query_states.shape[1], query_states.shape[3]

    outputs, start = [], 0
    for length, count in _equal_runs(qvl_chunk_lengths):
        end = start + length * count

        def chunks(x: torch.Tensor) -> torch.Tensor:
            # (1, H, count*L, d) -> (count, H, L, d): a view, each chunk its own batch row.
            return x[0, :, start:end].reshape(heads, count, length, head_dim).transpose(0, 1)

        out = attention_interface(self, chunks(query_states), chunks(key_states), chunks(value_states),
                                  attention_mask=None, scaling=self.scaling,
                                  dropout=0.0 if not self.training else self.attention_dropout,
                                  is_causal=False, **kwargs)[0]
        outputs.append(out.reshape(1, count * length, heads, head_dim))  # (count, L, H, d) -> stock layout
        start = end
    attn_output = outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)
    attn_output = attn_output.reshape(seq_length, -1).contiguous()
    return self.proj(attn_output)


def _vision_tower(model: torch.nn.Module) -> Qwen3VLVisionModel:
    for module in model.modules():
        if isinstance(module, Qwen3VLVisionModel):
            return module
    raise ValueError(f"{type(model).__name__} has no Qwen3-VL vision tower")


def install_fast_vision(model: torch.nn.Module) -> None:
    """Route the model's vision tower through the fast path (idempotent)."""
    visual = _vision_tower(model)
    if isinstance(getattr(visual, "_qvl_fast", None), _FastVision):
        return
    visual._qvl_fast = _FastVision(visual)
    # Instance attributes: nn.Module.__call__ looks forward up on the instance first.
    visual.forward = types.MethodType(_vision_forward, visual)
    for block in visual.blocks:
        block.attn.forward = types.MethodType(_attention_forward, block.attn)


def set_fast_vision(model: torch.nn.Module, enabled: bool) -> None:
    """Switch an installed fast path on or off (off = transformers' stock vision tower)."""
    visual = _vision_tower(model)
    fast = getattr(visual, "_qvl_fast", None)
    if fast is None:
        if enabled:
            install_fast_vision(model)
        return
    fast.enabled = enabled
