"""What the embedder and the reranker share (runner.py): a tokenizer safe to use from preparation threads."""

import threading
import time

import pytest

from operators.qwen3vl import Qwen3VLEmbedder, Qwen3VLReranker
from tests.tokenizer_settings import with_shipped_tokenizer_settings


class BusyTokenizer:
    """Another preparation thread encoding a long text, over and over, with the shared Rust tokenizer.

    While it encodes, the tokenizer is borrowed with the GIL released: any write to its settings then
    fails with "Already borrowed", which is how an item was dead-lettered in CI.
    """

    def __init__(self, tokenizer):
        self.backend = tokenizer.backend_tokenizer
        self.text = "hello world " * 50_000
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            self.backend.encode_batch([self.text])

    def __enter__(self):
        self.thread.start()
        time.sleep(0.05)  # inside its first encode
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _weightless_copy(runner):
    """The copy a preparation worker process builds (for_preparation), here in this process."""
    state = {name: getattr(runner, name) for name in runner._PREPARE_STATE}
    state["config"] = runner.backbone.config
    return type(runner).for_preparation(state)


@pytest.mark.parametrize("kind", ["embedder", "reranker"])
def test_a_fresh_runner_prepares_while_another_thread_tokenises(kind, tiny_embedding_ckpt, tiny_reranker_ckpt,
                                                                 tmp_path):
    if kind == "embedder":
        ckpt = with_shipped_tokenizer_settings(tiny_embedding_ckpt, tmp_path / "ckpt")
        runner = Qwen3VLEmbedder(ckpt, max_length=64, prepare_workers=1)
        args = ({"text": "a first text, prepared while another thread encodes"},)
    else:
        ckpt = with_shipped_tokenizer_settings(tiny_reranker_ckpt, tmp_path / "ckpt")
        runner = Qwen3VLReranker(ckpt, max_length=64, prepare_workers=1)
        args = ({"text": "a query"}, {"text": "a first document, prepared while another thread encodes"})
    with runner:
        for fresh in (runner, _weightless_copy(runner)):
            with BusyTokenizer(fresh.processor.tokenizer):
                busy_ids = fresh.prepare(*args).input_ids
            assert busy_ids == fresh.prepare(*args).input_ids
