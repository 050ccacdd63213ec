"""The Qdrant API key must reach every process that talks to the server: a cluster whose second node's
workers lack it is refused before any work, naming that node (a real two-node Ray cluster on this
machine), and a driver without it says so when the server refuses it."""

import os
from pathlib import Path

import pytest

from tests.resilience_helpers import REPO, run_json_script

SCRIPT = r"""
import json, os, sys
from ray.cluster_utils import Cluster

# The head's raylet (and so its workers) gets the key; the second node is started without it.
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "env_vars": {"QVL_TEST_QDRANT_KEY": "k"}})
second = cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
# compute.ray_address null means a local Ray of the job's own, even with a cluster running here.
JOIN = ("import ray, sys; from pipelines.config import parse_config; from pipelines.ingest import ensure_ray; "
        "ensure_ray(parse_config({'source': {'uri': sys.argv[1]}, 'embedder': {'model': 'org/m'}, "
        "'qdrant': {'path': sys.argv[1], 'collection': 'c'}})); print(ray.get_runtime_context().gcs_address)")
import subprocess
probe = subprocess.run([sys.executable, "-c", JOIN, sys.argv[1]], capture_output=True, text=True, timeout=180)
out_local = (probe.stdout.strip().splitlines() or [probe.stderr[-2000:]])[-1]
os.environ["QVL_TEST_QDRANT_KEY"] = "k"  # the driver holds it
import ray
ray.init(address=cluster.address)
from pipelines.config import parse_config
from pipelines.ingest import check_workers_hold_api_key
from pipelines.preflight import PreflightError, nodes_without_env
out = {"nodes": len([n for n in ray.nodes() if n["Alive"]]), "second": second.node_id[:8],
       "local_gcs": out_local, "cluster_gcs": cluster.address,
       "missing": nodes_without_env("QVL_TEST_QDRANT_KEY"), "present": nodes_without_env("PATH")}
cfg = parse_config({"source": {"uri": sys.argv[1]}, "embedder": {"model": "org/m"},
                    "qdrant": {"url": "http://127.0.0.1:1", "path": None, "collection": "c",
                               "api_key_env": "QVL_TEST_QDRANT_KEY"}})
try:
    check_workers_hold_api_key(cfg)
    out["error"] = None
except PreflightError as exc:
    out["error"] = str(exc)
del os.environ["QVL_TEST_QDRANT_KEY"]  # no key here: nothing to carry, nothing to check
check_workers_hold_api_key(cfg)
ray.shutdown()
cluster.shutdown()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_node_whose_workers_lack_the_api_key_is_refused_by_name_and_a_null_address_starts_its_own_ray(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "QVL_TEST_QDRANT_KEY")}
    env.update(PYTHONPATH=str(REPO), RAY_AUTH_MODE="disabled", RAY_ENABLE_UV_RUN_RUNTIME_ENV="0",
               RAY_TMPDIR=str(Path("/tmp")))
    out = run_json_script(SCRIPT, str(tmp_path), env=env)
    assert out["nodes"] == 2 and out["present"] == []
    assert ":" in out["local_gcs"] and out["local_gcs"] != out["cluster_gcs"], out  # started its own Ray
    assert len(out["missing"]) == 1 and f"(node {out['second']})" in out["missing"][0], out
    assert out["error"].startswith("qdrant.api_key_env: QVL_TEST_QDRANT_KEY is set here but not for the Ray "
                                   f"workers on {out['missing'][0]}"), out["error"]
    assert "--runtime-env-json" in out["error"]


def test_a_refused_server_says_when_no_api_key_was_sent(tmp_path, monkeypatch):
    """`export QDRANT_API_KEY=...; ray job submit ...` leaves the job (on the head node) without it:
    the refusal then says the variable is unset here, not just that the server refused."""
    from pipelines.config import parse_config
    from pipelines.ingest import server_client
    from pipelines.preflight import PreflightError
    from tests.resilience_helpers import EchoingQdrant

    monkeypatch.delenv("QVL_TEST_UNSET_KEY", raising=False)
    server = EchoingQdrant()
    try:
        cfg = parse_config({"source": {"uri": str(tmp_path)}, "embedder": {"model": "org/m"},
                            "qdrant": {"url": server.url, "path": None, "collection": "c",
                                       "api_key_env": "QVL_TEST_UNSET_KEY"}})
        with pytest.raises(PreflightError, match=r"refused the request: .*\(QVL_TEST_UNSET_KEY is not set in this "
                                                 r"process's environment: no API key was sent\)"):
            server_client(cfg)
        monkeypatch.setenv("QVL_TEST_UNSET_KEY", "k")
        with pytest.raises(PreflightError) as refused:
            server_client(cfg)
        assert "is not set" not in str(refused.value)
    finally:
        server.close()
