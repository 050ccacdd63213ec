"""The intra-op threads a model runs with in a real Ray actor, which Ray starts with one thread
(Qwen3VLRunner.use_every_core; a call from a thread started later: test_qwen3vl_runner.py)."""

import os

import pytest
import torch

from operators.qwen3vl.runner import every_core


def test_a_ray_actor_starts_with_one_thread_and_its_cpu_model_runs_on_every_core(ray_local, tiny_embedding_ckpt):
    @ray_local.remote(num_cpus=1)
    class Probe:
        def threads_in_forward(self, ckpt):
            import threading

            import torch

            from operators.qwen3vl.embedder import Qwen3VLEmbedder
            before = torch.get_num_threads()  # Ray's OMP_NUM_THREADS = num_cpus
            emb = Qwen3VLEmbedder(ckpt, prepare_processes=0)
            seen = []
            emb.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
            emb.use_every_core()
            # Ray may call an actor's methods from another thread, whose count is its own.
            call = threading.Thread(target=lambda: (torch.set_num_threads(1), emb.embed([{"text": "hi"}])))
            call.start()
            call.join()
            emb.close()
            return before, seen, every_core()

    from operators.qwen3vl.runner import every_core as cores
    probe = Probe.remote()
    try:
        before, seen, remote_cores = ray_local.get(probe.threads_in_forward.remote(str(tiny_embedding_ckpt)))
        assert before == 1 and seen == [len(os.sched_getaffinity(0))] and remote_cores == cores()
    finally:
        ray_local.kill(probe)


def test_every_core_on_a_gpu_leaves_the_cpu_threads_alone(tiny_embedding_ckpt):
    from operators.qwen3vl.embedder import Qwen3VLEmbedder
    saved = torch.get_num_threads()
    torch.set_num_threads(1)
    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_processes=0)
    try:
        emb.device = torch.device("cuda")  # what use_every_core reads: on a GPU, threads only prepare inputs
        emb.use_every_core()
        assert torch.get_num_threads() == 1
    finally:
        emb.close()
        torch.set_num_threads(saved)


def test_qvl_torch_threads_sets_the_count_a_model_call_runs_with(tiny_embedding_ckpt, monkeypatch):
    # Fewer threads than the loading thread had too: a machine shared with other work.
    from operators.qwen3vl.embedder import Qwen3VLEmbedder
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    monkeypatch.setenv("QVL_TORCH_THREADS", "1")
    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt), prepare_processes=0)
    seen = []
    emb.model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    try:
        emb.use_every_core()
        torch.set_num_threads(2)  # the calling thread's own count, as a later call might find it
        emb.embed([{"text": "hi"}])
        assert seen == [1]
    finally:
        emb.close()
        torch.set_num_threads(saved)


def test_qvl_torch_threads_overrides_the_core_count(monkeypatch):
    monkeypatch.setenv("QVL_TORCH_THREADS", "3")
    assert every_core() == 3
    for bad in ("0", "two", ""):
        monkeypatch.setenv("QVL_TORCH_THREADS", bad)
        assert every_core() == len(os.sched_getaffinity(0))


@pytest.mark.parametrize("stage", ["embed", "rerank"])
def test_query_batch_stages_run_their_model_on_every_core(stage, tiny_embedding_ckpt, tiny_reranker_ckpt, tmp_path):
    from pipelines.config import parse_config
    from pipelines.query_store import CollectionLayout
    from pipelines.query_batch import EmbedSearchStage, RerankStage

    cfg = parse_config({"source": {"uri": str(tmp_path)}, "embedder": {"model": str(tiny_embedding_ckpt)},
                        "reranker": {"model": str(tiny_reranker_ckpt)},
                        "qdrant": {"path": str(tmp_path / "qdrant"), "collection": "c"},
                        "output": {"dir": str(tmp_path / "runs")}})
    saved = torch.get_num_threads()
    torch.set_num_threads(1)  # as Ray starts the actor
    try:
        if stage == "embed":
            EmbedSearchStage(cfg, CollectionLayout("c", 64), top_k=5).client.close()
        else:
            RerankStage(cfg, top_n=3)
        assert torch.get_num_threads() == every_core()
    finally:
        torch.set_num_threads(saved)
