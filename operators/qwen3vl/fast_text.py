"""The language model's RMS norms and gated MLPs with fewer passes over memory: the same math.

transformers' Qwen3VLTextRMSNorm runs six elementwise kernels (cast, pow, mean, add, rsqrt, two
multiplies), each reading and writing the whole activation; ``torch.nn.functional.rms_norm``
does it in one, in float32 as transformers does, with the weight applied after the cast back
exactly as there. The MLP's ``act(gate) * up`` multiplies into the activation's own buffer
instead of a fresh one. On 2 CPU cores: norm 6.4 -> 2.6 ms, gate 4.6 -> 2.8 ms for 4,000 tokens
of the small checkpoint; both elementwise-bound on a GPU as well.

``set_fast_text(model, False)`` restores the stock modules (benchmarks use it as the official
baseline); under autograd the stock code runs (the in-place product would break backward).
"""

from __future__ import annotations

import types
from typing import Any

import torch
import torch.nn.functional as F
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextMLP, Qwen3VLTextRMSNorm


class _Switch:
    """One model's on/off state, shared by its patched modules."""

    def __init__(self) -> None:
        self.enabled = True


def _rms_norm_forward(self: Qwen3VLTextRMSNorm, hidden_states: torch.Tensor) -> torch.Tensor:
    """Qwen3VLTextRMSNorm.forward as one fused normalisation."""
    if not self._qvl_fast_text.enabled or torch.is_grad_enabled():
        return type(self).forward(self, hidden_states)
    dtype = hidden_states.dtype
    shape = (hidden_states.shape[-1],)
    if dtype == torch.float32 and self.weight.dtype == torch.float32:
        return F.rms_norm(hidden_states, shape, self.weight, self.variance_epsilon)
    normed = F.rms_norm(hidden_states.float(), shape, None, self.variance_epsilon)
    return self.weight * normed.to(dtype)  # transformers' rounding: cast first, then the weight


def _mlp_forward(self: Qwen3VLTextMLP, x: torch.Tensor) -> torch.Tensor:
    """Qwen3VLTextMLP.forward with the gate product in place."""
    if not self._qvl_fast_text.enabled or torch.is_grad_enabled():
        return type(self).forward(self, x)
    return self.down_proj(self.act_fn(self.gate_proj(x)).mul_(self.up_proj(x)))


def _patched(model: torch.nn.Module) -> list[torch.nn.Module]:
    return [m for m in model.modules() if isinstance(m, (Qwen3VLTextRMSNorm, Qwen3VLTextMLP))]


def install_fast_text(model: torch.nn.Module) -> None:
    """Route the language model's norms and MLPs through the fused path (idempotent)."""
    switch = _Switch()
    for module in _patched(model):
        if isinstance(getattr(module, "_qvl_fast_text", None), _Switch):
            continue
        module._qvl_fast_text = switch
        # Instance attributes: nn.Module.__call__ looks forward up on the instance first.
        forward = _rms_norm_forward if isinstance(module, Qwen3VLTextRMSNorm) else _mlp_forward
        module.forward = types.MethodType(forward, module)


def set_fast_text(model: torch.nn.Module, enabled: bool) -> None:
    """Switch the installed fused path on or off (off = transformers' stock modules)."""
    if enabled:
        install_fast_text(model)
    for module in _patched(model):
        switch: Any = getattr(module, "_qvl_fast_text", None)
        if switch is not None:
            switch.enabled = enabled
