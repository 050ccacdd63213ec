"""The README's cluster command, `ray job submit --working-dir . -- qvl ingest <config>`, on a real Ray head
with its job server on this machine: the job ingests and leaves its report where the config says, and a
relative output path, which would land in Ray's temporary copy of the working dir, is refused up front."""

import json
import os
import sys
from pathlib import Path

import pytest
import yaml

from tests.resilience_helpers import REPO, all_points, config_dict, run_json_script, write_notes

SCRIPT = r"""
import json, os, subprocess, sys, time
from ray.cluster_utils import Cluster
from tests.resilience_helpers import free_port

# Ports of its own: the suite's local Ray holds the default agent port (52365), and a job server
# whose node agent cannot bind it answers every submission "No available agent".
port = free_port()
cluster = Cluster(initialize_head=True, head_node_args={
    "num_cpus": 2, "include_dashboard": True, "dashboard_host": "127.0.0.1", "dashboard_port": port,
    "dashboard_agent_listen_port": free_port(), "metrics_export_port": free_port()})
out = {}
ray_cli = [os.path.join(os.path.dirname(sys.executable), "ray"), "job"]
address = ["--address", f"http://127.0.0.1:{port}"]


def submit(*args, timeout=400):
    # `ray job submit ...` from the working dir; again while the job server says it has no agent yet
    # (its node's agent registers a while after the head is up, later on a loaded machine).
    for _ in range(15):
        proc = subprocess.run([*ray_cli, "submit", *address, *args], cwd=sys.argv[1], capture_output=True, text=True,
                              timeout=timeout)
        if "No available agent to submit job" not in proc.stdout + proc.stderr:
            return proc
        time.sleep(2)
    return proc


try:
    for name in sys.argv[2:]:
        proc = submit("--working-dir", ".", "--", "qvl", "ingest", name)
        out[name] = {"rc": proc.returncode, "log": proc.stdout[-6000:] + proc.stderr[-3000:]}
    # The driver itself holding one of the node's two CPUs: the pool and the expansion tasks cannot
    # both run, and the job would wait forever without a word. It warns; then it is stopped.
    job = "qvl-entrypoint-cpu"
    sub = submit("--no-wait", "--submission-id", job, "--entrypoint-num-cpus", "1", "--working-dir", ".", "--",
                 "qvl", "ingest", sys.argv[-1], timeout=120)
    out["submitted"] = (sub.returncode, sub.stderr[-1500:])
    log, deadline = "", time.time() + 120
    while sub.returncode == 0 and "warning" not in log and "ingested" not in log and time.time() < deadline:
        time.sleep(2)
        log = subprocess.run([*ray_cli, "logs", *address, job], capture_output=True, text=True, timeout=60).stdout
    subprocess.run([*ray_cli, "stop", *address, job], capture_output=True, text=True, timeout=120)
    out["entrypoint"] = log[-6000:]
finally:
    cluster.shutdown()
print(json.dumps(out))
"""


@pytest.mark.slow
def test_ray_job_submit_ingests_and_refuses_outputs_in_the_working_dir_copy(tmp_path, tiny_embedding_ckpt):
    src = write_notes(tmp_path / "src")
    good = config_dict(src, tiny_embedding_ckpt, tmp_path)  # absolute store and output folders
    relative = config_dict(src, tiny_embedding_ckpt, tmp_path, output={"dir": "runs"})
    for name, data in (("good.yaml", good), ("relative.yaml", relative)):
        (tmp_path / name).write_text(yaml.safe_dump(data))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # The job's entrypoint `qvl` is found on the head node's PATH, as in a cluster image with the project installed.
    env.update(PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}", RAY_AUTH_MODE="disabled",
               RAY_ENABLE_UV_RUN_RUNTIME_ENV="0", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    out = run_json_script(SCRIPT, str(REPO), str(tmp_path / "relative.yaml"), str(tmp_path / "good.yaml"), env=env,
                          timeout_s=900)

    refused = out[str(tmp_path / "relative.yaml")]
    assert refused["rc"] != 0, refused["log"]
    assert "error: output.dir '" in refused["log"], refused["log"]
    assert "lies in Ray's temporary copy of the job's working_dir" in refused["log"]
    assert "working_dir_files" in refused["log"] and "/runs'" in refused["log"]
    assert "listed" not in refused["log"]  # refused before any work

    ran = out[str(tmp_path / "good.yaml")]
    assert ran["rc"] == 0, ran["log"]
    assert "ingested 2, unchanged 0, failed 0" in ran["log"], ran["log"]
    reports = sorted((tmp_path / "runs").glob("*/report.json"))  # this run's, then the stopped one's
    assert len(reports) == 2 and json.loads(reports[0].read_text())["counts"]["ingested"] == 2
    assert sorted(Path(p.payload["source_uri"]).name for p in all_points(tmp_path / "qdrant")) == ["a.txt", "b.txt"]
    assert "warning" not in ran["log"]

    assert out["submitted"][0] == 0, out["submitted"]
    waiting = out["entrypoint"]
    assert "warning: the Ray cluster has 1 CPUs and 0 GPUs free now, fewer than the job needs" in waiting, waiting
    assert "--entrypoint-num-cpus" in waiting


def test_paths_in_a_working_dir_copy_are_refused_for_every_output(tmp_path, monkeypatch):
    """The report folder, an embedded store, and query-batch / eval outputs: each names its key or option."""
    from pipelines.preflight import PreflightError, check_writable, ensure_folder
    from pipelines.query_files import check_results_path
    from pipelines.query_inputs import QueryInputError

    copy = tmp_path / "session_x" / "runtime_resources" / "working_dir_files" / "_ray_pkg_0f"
    copy.mkdir(parents=True)
    monkeypatch.chdir(copy)
    for check in (ensure_folder, check_writable):
        with pytest.raises(PreflightError, match=r"^qdrant.path '.*/_ray_pkg_0f/qdrant_data' lies in Ray's temporary"):
            check("qdrant.path", os.path.abspath("qdrant_data"))
    with pytest.raises(QueryInputError, match=r"^--out results.jsonl: lies in Ray's temporary copy"):
        check_results_path("results.jsonl")
    assert not (copy / "qdrant_data").exists()
    elsewhere = tmp_path / "kept"
    ensure_folder("output.dir", str(elsewhere), probe=True)  # an absolute path outside the copy is fine
    check_results_path(str(elsewhere / "results.jsonl"))
