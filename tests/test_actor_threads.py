"""Intra-op threads of a model held by a Ray actor (operators/actor_threads.py), in a real Ray actor."""

import os

import pytest
import torch

from operators.actor_threads import ActorThreads, cpu_threads


def test_a_ray_actor_starts_with_one_thread_and_its_cpu_model_gets_every_core(ray_local):
    @ray_local.remote(num_cpus=1)
    class Probe:
        def threads(self, device):
            import torch

            from operators.actor_threads import ActorThreads, cpu_threads
            before = torch.get_num_threads()  # Ray's OMP_NUM_THREADS = num_cpus
            ActorThreads(torch.device(device))
            return before, torch.get_num_threads(), cpu_threads()

    probe = Probe.remote()
    try:
        assert ray_local.get(probe.threads.remote("cpu")) == (1, len(os.sched_getaffinity(0)),
                                                            len(os.sched_getaffinity(0)))
        before, after, _ = ray_local.get(probe.threads.remote("cuda"))  # a GPU model keeps Ray's setting
        assert after == before
    finally:
        ray_local.kill(probe)


def test_qvl_torch_threads_overrides_the_core_count(monkeypatch):
    monkeypatch.setenv("QVL_TORCH_THREADS", "3")
    assert cpu_threads() == 3
    for bad in ("0", "two", ""):
        monkeypatch.setenv("QVL_TORCH_THREADS", bad)
        assert cpu_threads() == len(os.sched_getaffinity(0))


def test_apply_restores_the_count_a_call_changed():
    saved = torch.get_num_threads()
    try:
        threads = ActorThreads(torch.device("cpu"))
        torch.set_num_threads(1)
        threads.apply()
        assert torch.get_num_threads() == cpu_threads()
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("stage", ["embed", "rerank"])
def test_query_batch_stages_run_their_model_on_every_core(stage, tiny_embedding_ckpt, tiny_reranker_ckpt, tmp_path):
    from pipelines.config import parse_config
    from pipelines.query import CollectionLayout
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
        assert torch.get_num_threads() == cpu_threads()
    finally:
        torch.set_num_threads(saved)
