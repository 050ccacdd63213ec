"""Loading Qwen3-VL checkpoints (hub id or local path) with sensible device and dtype defaults."""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoProcessor
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel, Qwen3VLPreTrainedModel

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
           "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}


class ModelLoadError(RuntimeError):
    """A checkpoint could not be loaded; names the checkpoint."""


def resolve_device(device: str | torch.device | None) -> torch.device:
    """The requested device, else the first GPU, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The requested dtype, else bfloat16 on GPU and float32 on CPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype is None or dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    try:
        return _DTYPES[str(dtype).lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; use one of {sorted(_DTYPES)} or 'auto'") from None


class Qwen3VLForEmbedding(Qwen3VLPreTrainedModel):
    """The Qwen3-VL backbone under `model.`, as the Embedding checkpoints store it (no LM head)."""

    _checkpoint_conversion_mapping: dict[str, str] = {}
    # Checkpoints saved with an LM head load cleanly; the head is simply not used.
    _keys_to_ignore_on_load_unexpected = [r"lm_head\..*"]

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.model = Qwen3VLModel(config)
        self.post_init()

    def forward(self, **inputs: Any) -> Any:
        """Backbone outputs; last_hidden_state is after the final norm."""
        return self.model(**inputs)


def checkpoint_id(model_name_or_path: str, revision: str | None = None) -> str:
    """The checkpoint as payloads and messages name it: the hub id or path, with ``@revision`` when pinned."""
    return f"{model_name_or_path}@{revision}" if revision else model_name_or_path


def load_processor(model_name_or_path: str, padding_side: str, revision: str | None = None) -> Any:
    """The checkpoint's processor (tokenizer, image and video processors, chat template)."""
    try:
        return AutoProcessor.from_pretrained(model_name_or_path, padding_side=padding_side, revision=revision)
    except Exception as exc:
        name = checkpoint_id(model_name_or_path, revision)
        raise ModelLoadError(f"cannot load processor from {name!r}: {exc}") from exc


def load_model(cls: Any, model_name_or_path: str, device: torch.device, dtype: torch.dtype,
               attn_implementation: str | None, revision: str | None = None, **kwargs: Any) -> Any:
    """from_pretrained the model class onto the device in eval mode."""
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = cls.from_pretrained(model_name_or_path, dtype=dtype, revision=revision, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model from {checkpoint_id(model_name_or_path, revision)!r}: {exc}") from exc
    return model.to(device).eval()
