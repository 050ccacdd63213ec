"""The fused language-model norms and MLPs: the stock modules' outputs, vectors and scores."""

import pytest
import torch
from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextMLP, Qwen3VLTextRMSNorm

from operators.qwen3vl import Qwen3VLEmbedder, Qwen3VLReranker
from operators.qwen3vl.fast_text import install_fast_text, set_fast_text
from tests.media_gen import pattern_image


class _Config:
    hidden_size, intermediate_size, hidden_act = 32, 48, "silu"


def _modules(dtype):
    torch.manual_seed(0)
    norm = Qwen3VLTextRMSNorm(32, eps=1e-6).to(dtype)
    norm.weight.data.normal_()
    mlp = Qwen3VLTextMLP(_Config()).to(dtype)
    holder = torch.nn.ModuleList([norm, mlp])
    return holder, norm, mlp


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_and_mlp_equal_the_stock_modules(dtype):
    holder, norm, mlp = _modules(dtype)
    x = (torch.randn(3, 7, 32) * 5).to(dtype)
    with torch.inference_mode():
        stock_norm, stock_mlp = norm(x), mlp(x)
        install_fast_text(holder)
        fast_norm, fast_mlp = norm(x), mlp(x)
    assert fast_norm.dtype == stock_norm.dtype == dtype
    # One fused reduction instead of pow/mean: float rounding at most (one bf16 step after the cast).
    tol = 1e-6 if dtype == torch.float32 else 0.02
    assert (fast_norm.float() - stock_norm.float()).abs().max() <= tol * stock_norm.float().abs().max()
    assert torch.equal(fast_mlp, stock_mlp)  # the same products, only the buffer differs


def test_switch_off_and_autograd_take_the_stock_code(monkeypatch):
    holder, norm, mlp = _modules(torch.float32)
    install_fast_text(holder)
    calls = []
    original = torch.nn.functional.rms_norm
    monkeypatch.setattr(torch.nn.functional, "rms_norm", lambda *a, **k: calls.append(1) or original(*a, **k))
    x = torch.randn(2, 5, 32, requires_grad=True)
    mlp(norm(x)).sum().backward()  # in-place gate product would break backward: stock code under autograd
    assert x.grad is not None and not calls
    with torch.inference_mode():
        norm(x.detach())
        assert calls == [1]
        set_fast_text(holder, False)
        norm(x.detach())
        assert calls == [1]


def test_embedder_and_reranker_outputs_equal_the_stock_modules(tiny_embedding_ckpt, tiny_reranker_ckpt, tmp_path):
    image = tmp_path / "img.png"
    pattern_image(0, (96, 64), "RGB").save(image)
    inputs = [{"text": "short"}, {"text": " ".join(["longer text"] * 20)}, {"image": str(image), "text": "x"}]
    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt))
    rr = Qwen3VLReranker(str(tiny_reranker_ckpt))
    try:
        fast_vectors = emb.process(inputs)
        fast_scores = [r.score for r in rr.score({"text": "query"}, inputs)]
        set_fast_text(emb.model, False)
        set_fast_text(rr.model, False)
        assert (emb.process(inputs) - fast_vectors).abs().max() < 1e-5
        stock_scores = [r.score for r in rr.score({"text": "query"}, inputs)]
        assert max(abs(a - b) for a, b in zip(fast_scores, stock_scores)) < 1e-5
    finally:
        emb.close()
        rr.close()
