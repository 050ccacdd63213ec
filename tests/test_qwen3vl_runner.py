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


@pytest.mark.parametrize("kind", ["embedder", "reranker"])
def test_a_model_call_from_a_new_thread_gets_the_loading_threads_intra_op_threads(kind, tiny_embedding_ckpt,
                                                                                   tiny_reranker_ckpt):
    # Preparation threads run with one intra-op thread, which also became the default of threads
    # started afterwards: a server thread calling embed() ran the model's matmuls on one core.
    import torch

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        if kind == "embedder":
            runner = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_workers=2)
            call = lambda: runner.embed([{"text": "one"}, {"text": "two"}])  # noqa: E731
        else:
            runner = Qwen3VLReranker(str(tiny_reranker_ckpt), prepare_workers=2)
            call = lambda: runner.score({"text": "q"}, [{"text": "one"}, {"text": "two"}])  # noqa: E731
        with runner:
            assert all(r.ok for r in call())  # starts the preparation threads
            seen = []

            def server_thread():
                seen.append(torch.get_num_threads())  # what this thread starts with
                assert all(r.ok for r in call())
                seen.append(torch.get_num_threads())

            worker = threading.Thread(target=server_thread)
            worker.start()
            worker.join()
        assert seen == [1, 2]
    finally:
        torch.set_num_threads(saved)
