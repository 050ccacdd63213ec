"""Qwen3-VL embedding and reranking models, reproducing the official implementation exactly."""

from .embedder import EmbedResult, Qwen3VLEmbedder, reduce_dim
from .formatting import DEFAULT_EMBED_INSTRUCTION, DEFAULT_RERANK_INSTRUCTION, VisionSettings
from .loading import ModelLoadError
from .media_io import MediaError
from .preprocess import InputError
from .reranker import Qwen3VLReranker, ScoreResult

__all__ = [
    "DEFAULT_EMBED_INSTRUCTION", "DEFAULT_RERANK_INSTRUCTION", "EmbedResult", "InputError", "MediaError",
    "ModelLoadError", "Qwen3VLEmbedder", "Qwen3VLReranker", "ScoreResult", "VisionSettings", "reduce_dim",
]
