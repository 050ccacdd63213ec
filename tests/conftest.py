"""Shared pytest fixtures."""


# --- ray_local: one local Ray instance per test session (sinks/qdrant tests and others) ---
import os as _os

import pytest as _pytest


@_pytest.fixture(scope="session")
def ray_local():
    """A local Ray instance (2 CPUs, no dashboard) shared by the whole test session."""
    # Ray 2.60 warns about token auth unless RAY_AUTH_MODE is set; uv-run env propagation off.
    _os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    _os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    import ray

    started = not ray.is_initialized()
    if started:
        ray.init(address="local", num_cpus=2, include_dashboard=False)  # never a cluster running here
    yield ray
    if started:
        ray.shutdown()


# --- tiny random Qwen3-VL checkpoints (operators/qwen3vl/checkpoint.py), built once per session ---


@_pytest.fixture(scope="session")
def tiny_embedding_ckpt(tmp_path_factory):
    """A tiny random Qwen3-VL-Embedding checkpoint directory (tokenizer appends <|endoftext|>)."""
    from operators.qwen3vl.checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny_embedding"), "embedding", "tiny", seed=0)


@_pytest.fixture(scope="session")
def tiny_reranker_ckpt(tmp_path_factory):
    """A tiny random Qwen3-VL-Reranker checkpoint directory (untied random LM head, nothing appended)."""
    from operators.qwen3vl.checkpoint import build_checkpoint

    return build_checkpoint(tmp_path_factory.mktemp("tiny_reranker"), "reranker", "tiny", seed=0)


# --- models on those checkpoints, one per test module (a module may define its own with other settings) ---


@_pytest.fixture(scope="module")
def embedder(tiny_embedding_ckpt):
    """A Qwen3VLEmbedder on the tiny checkpoint, in small batches (4 items, 4,096 tokens)."""
    from operators.qwen3vl import Qwen3VLEmbedder

    emb = Qwen3VLEmbedder(str(tiny_embedding_ckpt), token_budget=4096, max_batch_items=4)
    yield emb
    emb.close()


@_pytest.fixture(scope="module")
def reranker(tiny_reranker_ckpt):
    """A Qwen3VLReranker on the tiny checkpoint, in batches of 3 pairs."""
    from operators.qwen3vl import Qwen3VLReranker

    rr = Qwen3VLReranker(str(tiny_reranker_ckpt), max_batch_items=3)
    yield rr
    rr.close()


# --- moto_s3: a real S3-compatible HTTP server (moto) on loopback, one per session (operators/media tests) ---


@_pytest.fixture(scope="session")
def moto_s3():
    """A moto S3 server on 127.0.0.1 (free port): yields {"endpoint_url", "storage_options", "client"}."""
    from moto.server import ThreadedMotoServer

    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: _os.environ.get(k) for k in (*env, "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")}
    _os.environ.update(env)
    _os.environ.pop("AWS_SESSION_TOKEN", None)
    _os.environ.pop("AWS_SECURITY_TOKEN", None)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    try:
        yield {"endpoint_url": endpoint, "storage_options": options, "client": client}
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                _os.environ.pop(k, None)
            else:
                _os.environ[k] = v
