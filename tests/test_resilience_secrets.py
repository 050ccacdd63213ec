"""Secrets never leak: S3 keys and the Qdrant API key, planted as unique values in environment variables
that the config references, appear in no output of a run: console, report, dead letters, the config
echoed in the report, exception messages, Ray's logs.

The run is the real CLI in a subprocess with its own Ray (its temp dir, hence every Ray log of that
session, under the test's folder). The S3 endpoint is moto behind a hostile loopback proxy that
answers one object with a 403 whose message echoes the request's Authorization header (it holds the
access key id), so errors that carry a secret do happen and must be scrubbed. A second run points
qdrant.url at a hostile server that echoes the API key back in its error body.
"""

import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path

import pytest

from pipelines.cli import EXIT_CONFIG, EXIT_OK
from tests.resilience_corpus import encode, pattern
from tests.resilience_helpers import (EchoingQdrant, FlakyProxy, config_dict, grep_tree, latest_run, reap_session,
                                      write_yaml)

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def secrets():
    tag = uuid.uuid4().hex
    return {"QVL_TEST_S3_KEY": f"AKIA{tag[:16].upper()}", "QVL_TEST_S3_SECRET": f"s3secret-{tag}",
            "QVL_TEST_QDRANT_KEY": f"qdrantkey-{tag}"}


def run_cli(args, env_extra, tmp_path, name):
    ray_tmp = Path(tempfile.mkdtemp(prefix="qvlray", dir="/tmp"))  # short path: Ray's unix sockets
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(env_extra, RAY_TMPDIR=str(ray_tmp), PYTHONPATH=str(REPO))
    out, err = tmp_path / f"{name}.out", tmp_path / f"{name}.err"
    with open(out, "wb") as fo, open(err, "wb") as fe:
        proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", "-v", *args], cwd=REPO, env=env,
                                stdout=fo, stderr=fe, start_new_session=True)
        try:
            code = proc.wait(300)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(30)
            reap_session(proc.pid, grace_s=5)
    return code, out.read_text(errors="replace"), err.read_text(errors="replace"), ray_tmp


def test_secrets_never_appear_in_any_output(tmp_path, secrets, moto_s3, tiny_embedding_ckpt, tiny_reranker_ckpt,
                                           request):
    s3 = moto_s3["client"]
    bucket = "secret-test"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="in/good.txt", Body=b"A good note that is ingested.")
    s3.put_object(Bucket=bucket, Key="in/img.png", Body=encode(pattern(1, (32, 32)), "PNG"))
    s3.put_object(Bucket=bucket, Key="in/broken.jpg", Body=b"\xff\xd8\xff\xe0 truncated")
    s3.put_object(Bucket=bucket, Key="in/hostile/denied.txt", Body=b"the proxy never lets this through")

    with FlakyProxy(moto_s3["endpoint_url"], deny_paths=("/hostile/",)) as proxy:
        options = {"endpoint_url": proxy.url, "key": "${QVL_TEST_S3_KEY}", "secret": "${QVL_TEST_S3_SECRET}"}
        data = config_dict(f"s3://{bucket}/in/", tiny_embedding_ckpt, tmp_path, storage_options=options)
        data["qdrant"]["api_key_env"] = "QVL_TEST_QDRANT_KEY"
        path = write_yaml(data, tmp_path / "s3.yaml")
        code, out, err, ray_tmp = run_cli(["ingest", path], secrets, tmp_path, "s3")
        assert code == EXIT_OK, err[-3000:]

        # The queries' own messages quote store errors too: a candidate whose image the store now
        # refuses (skipped, its reason in the table, the results file, eval.json), a query image it
        # refuses (that query's error), and -v's debug logs of the S3 client (signed headers).
        proxy.deny_paths = ("/hostile/", "/img.png")
        rerank = ["--set", f"reranker.model={tiny_reranker_ckpt}"]
        queries = tmp_path / "queries.jsonl"
        queries.write_text('{"id": "q1", "text": "a good note"}\n'
                           f'{{"id": "q2", "image": "s3://{bucket}/in/hostile/denied.txt"}}\n')
        qrels = tmp_path / "qrels.tsv"
        qrels.write_text(f"q1\ts3://{bucket}/in/good.txt#chunk=0\t1\nq2\ts3://{bucket}/in/img.png#image\t1\n")
        runs = {"query": ["query", path, "--text", "a good note", *rerank],
                "batch": ["query-batch", path, "--queries", str(queries), "--out", str(tmp_path / "results.jsonl"),
                          *rerank],
                "eval": ["eval", path, "--queries", str(queries), "--qrels", str(qrels), "--out",
                         str(tmp_path / "eval"), *rerank]}
        queried = {name: run_cli(args, secrets, tmp_path, name) for name, args in runs.items()}
    for name, (qcode, qout, qerr, qray) in queried.items():
        request.addfinalizer(lambda d=qray: shutil.rmtree(d, ignore_errors=True))
        assert qcode == EXIT_OK, (name, qerr[-3000:])
    assert f"skipped s3://{bucket}/in/img.png image: cannot read source" in queried["query"][1]
    assert "Credential=***" in queried["query"][1] and "Credential=***" in queried["query"][2]  # -v: S3 debug logs
    batch = (tmp_path / "results.jsonl").read_text()
    assert batch.count("Credential=***") == 2  # q1's skipped image, q2's error
    assert "Credential=***" in (tmp_path / "eval" / "eval.json").read_text()

    report, dead = latest_run(tmp_path / "runs")
    # The failing cases did fail, and the hostile 403 did carry the access key id.
    by_uri = {d["uri"]: d for d in dead}
    denied = by_uri[f"s3://{bucket}/in/hostile/denied.txt"]
    assert "PermissionError" in denied["error_type"] and "***" in denied["message"], denied
    assert f"s3://{bucket}/in/broken.jpg" in by_uri
    assert report["counts"]["ingested"] == 2
    # The config echoed in the report shows the references, never the values.
    assert report["config"]["source"]["storage_options"]["key"] == "${QVL_TEST_S3_KEY}"
    assert report["config"]["source"]["storage_options"]["secret"] == "${QVL_TEST_S3_SECRET}"

    # A server-mode run against a Qdrant that echoes the API key in its error body.
    server = EchoingQdrant()
    try:
        data = config_dict(tmp_path / "nowhere", tiny_embedding_ckpt, tmp_path)
        (tmp_path / "nowhere").mkdir()
        (tmp_path / "nowhere" / "a.txt").write_text("text")
        data["qdrant"] = {"url": server.url, "collection": "media", "api_key_env": "QVL_TEST_QDRANT_KEY"}
        path = write_yaml(data, tmp_path / "server.yaml")
        code2, out2, err2, ray_tmp2 = run_cli(["ingest", path], secrets, tmp_path, "server")
    finally:
        server.close()
    assert code2 == EXIT_CONFIG
    assert f"qdrant.url {server.url} is unreachable or refused the request" in err2

    request.addfinalizer(lambda: [shutil.rmtree(d, ignore_errors=True) for d in (ray_tmp, ray_tmp2)])
    values = list(secrets.values())
    console = {"s3 stdout": out, "s3 stderr": err, "server stdout": out2, "server stderr": err2}
    console.update({f"{name} {stream}": text for name, (_, qout, qerr, _) in queried.items()
                    for stream, text in (("stdout", qout), ("stderr", qerr))})
    assert not [(name, v) for name, text in console.items() for v in values if v in text]
    hits = grep_tree(tmp_path, values) + grep_tree(ray_tmp, values) + grep_tree(ray_tmp2, values)
    hits += [hit for _, _, _, qray in queried.values() for hit in grep_tree(qray, values)]
    # The only legitimate holders of a secret: none. (Configs hold ${VAR} references only.)
    assert hits == [], hits
    assert list(ray_tmp.rglob("*.log")) or list(ray_tmp.rglob("*.out")), "no Ray logs were captured"
