"""Actor pools that cannot run on the Ray cluster stop the job up front instead of hanging it."""

import time

import pytest
from qdrant_client import QdrantClient

from pipelines.actor_fit import ActorPool, alive_nodes, can_autoscale, check_pools_fit, misfit, pools_fit
from pipelines.cli import main as qvl
from pipelines.config import parse_config
from pipelines.ingest import run_ingest
from pipelines.preflight import PreflightError, collection_spec, model_dimension
from pipelines.query_batch import run_query_batch
from pipelines.query_files import QueryRow
from sinks.qdrant_schema import ensure_collection

TWO_CPUS = [{"CPU": 2.0}]


def pool(actors=1, cpus=1.0, gpus=0.0, name="embedding"):
    return ActorPool(name, actors, cpus, gpus)


@pytest.mark.parametrize("nodes, pools, spare, fits", [
    (TWO_CPUS, [pool()], 1, True),
    (TWO_CPUS, [pool(2)], 1, False),  # both CPUs held by actors: expansion tasks never run
    (TWO_CPUS, [pool(2)], 0, True),
    (TWO_CPUS, [pool(4, cpus=0.5)], 0, True),
    (TWO_CPUS, [pool(2, cpus=0.5)], 1, True),
    (TWO_CPUS, [pool(gpus=1)], 1, False),
    ([{"CPU": 8, "GPU": 1}], [pool(3, cpus=1, gpus=1 / 3)], 1, True),  # fractions add up to one GPU
    ([{"CPU": 8, "GPU": 1}], [pool(4, cpus=1, gpus=1 / 3)], 1, False),
    # the spare CPU may sit on another node than the actors
    ([{"CPU": 8, "GPU": 1}, {"CPU": 1}], [pool(1, cpus=8, gpus=1)], 1, True),
    ([{"CPU": 8, "GPU": 1}], [pool(1, cpus=8, gpus=1)], 1, False),
    ([{"CPU": 32, "GPU": 4}], [pool(4, cpus=8, gpus=1)], 1, False),  # configs/cluster.yaml on one 32-CPU node
    ([{"CPU": 48, "GPU": 4}], [pool(4, cpus=8, gpus=1)], 1, True),
    (TWO_CPUS, [pool(1), pool(1, name="reranking")], 0, True),
    (TWO_CPUS, [pool(2), pool(2, name="reranking")], 0, False),
    (TWO_CPUS, [pool(1, cpus=0)], 2, True),  # asks for nothing: never the obstacle
])
def test_pools_fit(nodes, pools, spare, fits):
    assert pools_fit(nodes, pools, spare) is fits


def test_misfit_names_the_key_to_change():
    assert misfit(TWO_CPUS, [pool()], 1, "the expansion tasks") is None
    gpu = misfit(TWO_CPUS, [pool(gpus=1)], 1, "the expansion tasks")
    assert gpu.startswith("compute.num_gpus_per_actor:") and "0 GPUs" in gpu and "to 0" in gpu
    cpus = misfit(TWO_CPUS, [pool(cpus=3)], 1, "the expansion tasks")
    assert cpus.startswith("compute.cpus_per_actor:") and "3 CPUs" in cpus
    no_spare = misfit(TWO_CPUS, [pool(cpus=2)], 1, "the expansion tasks")
    assert no_spare.startswith("compute.cpus_per_actor:") and "the expansion tasks" in no_spare
    actors = misfit(TWO_CPUS, [pool(3)], 1, "the expansion tasks")
    assert actors.startswith("compute.embed_actors: 3 embedding actors") and "at most 1 fits" in actors
    both = misfit(TWO_CPUS, [pool(2), pool(2, name="reranking")], 0, "")
    assert both.startswith("compute.embed_actors: 2 embedding actors and 2 reranking actors")
    assert "--rerank-actors" in both


def test_a_cluster_that_can_grow_only_warns():
    cfg = parse_config({"source": {"uri": "/tmp"}, "embedder": {"model": "x"}, "qdrant": {"path": "/tmp/q", "collection": "c"}})
    lines = []
    check_pools_fit(cfg, [pool(gpus=1)], 1, "the expansion tasks", lines.append, nodes=TWO_CPUS, growable=True)
    assert len(lines) == 1 and lines[0].startswith("warning: compute.num_gpus_per_actor:")
    assert "autoscaler" in lines[0]
    with pytest.raises(PreflightError, match="compute.num_gpus_per_actor"):
        check_pools_fit(cfg, [pool(gpus=1)], 1, "the expansion tasks", lines.append, nodes=TWO_CPUS, growable=False)
    check_pools_fit(cfg, [pool()], 1, "the expansion tasks", lines.append, nodes=TWO_CPUS, growable=False)
    assert len(lines) == 1


def _job(tmp_path, ckpt, reranker=None, **compute):
    """A job's config data over a one-file folder: its YAML file's path, and the parsed config."""
    import yaml

    (tmp_path / "src").mkdir(exist_ok=True)
    (tmp_path / "src" / "a.txt").write_text("a short note")
    data = {"source": {"uri": str(tmp_path / "src")}, "embedder": {"model": str(ckpt)},
            "qdrant": {"path": str(tmp_path / "qdrant"), "collection": "fit"},
            "output": {"dir": str(tmp_path / "runs")}, "compute": compute}
    if reranker:
        data["reranker"] = {"model": str(reranker)}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(data))
    return str(path), parse_config(data)


def test_the_local_cluster_is_known_not_to_grow(ray_local):
    assert not can_autoscale()
    assert sum(n.get("CPU", 0) for n in alive_nodes()) == ray_local.cluster_resources()["CPU"]


@pytest.mark.parametrize("compute, key", [
    ({"embed_actors": 2}, "compute.embed_actors"),  # on the 2-CPU test cluster: hung before
    ({"num_gpus_per_actor": 1}, "compute.num_gpus_per_actor"),  # no GPU here: hung before
])
def test_ingest_stops_before_any_work_when_the_pool_cannot_run(tmp_path, tiny_embedding_ckpt, ray_local, compute, key):
    path, cfg = _job(tmp_path, tiny_embedding_ckpt, **compute)
    started = time.monotonic()
    with pytest.raises(PreflightError, match=key):
        run_ingest(cfg)
    assert time.monotonic() - started < 60
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    try:
        assert not client.collection_exists("fit")
    finally:
        client.close()
    assert qvl(["ingest", path, "--plan"]) == 2  # the plan stops on it too, without starting Ray


def test_query_batch_stops_when_its_two_pools_cannot_run_at_once(tmp_path, tiny_embedding_ckpt, tiny_reranker_ckpt,
                                                                ray_local):
    _, cfg = _job(tmp_path, tiny_embedding_ckpt, reranker=tiny_reranker_ckpt, embed_actors=2)
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    ensure_collection(client, collection_spec(cfg, model_dimension(cfg.embedder.model)))
    client.close()
    with pytest.raises(PreflightError, match="2 embedding actors and 2 reranking actors"):
        run_query_batch(cfg, [QueryRow(id="q1", query={"text": "a note"})])


def test_pools_that_fit_the_nodes_but_not_what_is_free_now_get_a_warning():
    """On a joined cluster other jobs, or the job's own driver (--entrypoint-num-cpus 1 on one 2-CPU node),
    hold resources: the job would wait for them with no word; it now says so."""
    cfg = parse_config({"source": {"uri": "/tmp"}, "embedder": {"model": "x"}, "qdrant": {"path": "/tmp/q", "collection": "c"}})
    lines = []
    check_pools_fit(cfg, [pool()], 1, "the expansion tasks", lines.append, nodes=TWO_CPUS, free={"CPU": 1.0})
    assert len(lines) == 1 and lines[0].startswith("warning: the Ray cluster has 1 CPUs and 0 GPUs free now")
    assert "1 embedding actor of 1 CPU and 0 GPU each, and 1 CPU for the expansion tasks" in lines[0]
    assert "--entrypoint-num-cpus" in lines[0]
    check_pools_fit(cfg, [pool()], 1, "the expansion tasks", lines.append, nodes=TWO_CPUS, free={"CPU": 2.0})
    assert len(lines) == 1  # enough is free: nothing to say


def test_query_pools_share_gpus_in_amounts_ray_accepts():
    """The query job's two pools split a cluster with too few GPUs: a fraction of one GPU each, or whole
    GPUs. Before, 2 actors asking 2 GPUs each on 3 GPUs got 1.5, which Ray refuses mid-job."""
    from pipelines.query_batch import shared_gpus

    assert shared_gpus(2, 3, 2) == 1.0
    assert shared_gpus(2, 5, 4) == 1.0
    assert shared_gpus(1, 1, 2) == 0.5 and shared_gpus(1, 2, 3) == pytest.approx(2 / 3)
    assert shared_gpus(1, 4, 2) == 1 and shared_gpus(2, 4, 2) == 2  # they fit: as asked
    assert shared_gpus(0, 4, 2) == 0 and shared_gpus(1, 0, 2) == 1  # none asked; none there (checked elsewhere)
