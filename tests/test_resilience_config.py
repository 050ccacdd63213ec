"""Configuration mistakes fail before any work: one clear message on stderr, exit code 2, nothing written.

Each case runs the real CLI entry point (`pipelines.cli.main`) on a YAML file. "Nothing written"
means: no run folder, and no collection (the embedded store's folder is not even created when
the failure is found before the store is opened).
"""

import os

import pytest

from pipelines.cli import EXIT_CONFIG, main as qvl
from tests.resilience_helpers import all_points, config_dict, free_port, write_yaml


@pytest.fixture()
def source(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "note.txt").write_text("A small note that must never be embedded by a broken config.")
    return src


def run_cli(tmp_path, data, capsys, name="cfg.yaml"):
    path = write_yaml(data, tmp_path / name)
    code = qvl(["ingest", path])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_nothing_written(tmp_path, collection="media"):
    runs = tmp_path / "runs"
    assert not runs.exists() or not any(runs.iterdir()), "a run folder was written"
    qdrant = tmp_path / "qdrant"
    if qdrant.exists():
        assert all_points(qdrant, collection) == []
        from qdrant_client import QdrantClient

        client = QdrantClient(path=str(qdrant))
        try:
            assert not client.collection_exists(collection), "a collection was created"
        finally:
            client.close()


def one_clear_error(err, *patterns):
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, err
    assert "Traceback" not in err, err
    for p in patterns:
        assert p in errors[0], (p, errors[0])
    return errors[0]


@pytest.mark.parametrize("mutate, expected", [
    (lambda d: d["qdrant"].update(urll="http://127.0.0.1:6333"), ["qdrant: unknown key 'urll'", "did you mean 'url'"]),
    (lambda d: d.update(embeder={"model": "x"}), ["unknown top-level key 'embeder'"]),
    (lambda d: d["compute"].update(embed_actors="two"), ["compute.embed_actors: expected an integer"]),
    (lambda d: d["embedder"].update(mrl_dims="64"), ["embedder.mrl_dims: expected a list"]),
    (lambda d: d["expand"].update(chunk_tokens=0), ["expand.chunk_tokens: must be >= 1"]),
    (lambda d: d["limits"].update(max_image_pixels=-5), ["limits.max_image_pixels: must be >= 1"]),
    (lambda d: d["qdrant"].update(url="http://127.0.0.1:6333"), ["qdrant.url", "qdrant.path", "got both"]),
    (lambda d: d["source"].pop("uri"), ["source.uri: required key missing"]),
    # Both used to pass validation and fail only mid-run (every actor, or the report at the end).
    (lambda d: d["embedder"].update(attn_implementation="bogus"),
     ["embedder.attn_implementation: must be null or one of 'eager', 'sdpa'", "(got 'bogus')"]),
    (lambda d: d["output"].update(report_file="sub/r.json"), ["output.report_file: must be a plain file name"]),
    (lambda d: d["output"].update(dead_letter_file="../dead.jsonl"),
     ["output.dead_letter_file: must be a plain file name"]),
], ids=["unknown-key", "unknown-section", "wrong-type-int", "wrong-type-list", "bad-value", "bad-limit",
        "both-url-and-path", "missing-key", "unknown-attn", "report-file-path", "dead-letter-file-path"])
def test_invalid_config_is_one_clear_error_and_exit_2(mutate, expected, tmp_path, source, tiny_embedding_ckpt, capsys):
    data = config_dict(source, tiny_embedding_ckpt, tmp_path, limits={})
    mutate(data)
    code, out, err = run_cli(tmp_path, data, capsys)
    assert code == EXIT_CONFIG
    line = one_clear_error(err, *expected)
    assert line.startswith(f"error: config {tmp_path / 'cfg.yaml'}:")
    assert_nothing_written(tmp_path)


def test_unreachable_qdrant_server_fails_in_preflight(tmp_path, source, tiny_embedding_ckpt, capsys):
    url = f"http://127.0.0.1:{free_port()}"
    data = config_dict(source, tiny_embedding_ckpt, tmp_path)
    data["qdrant"] = {"url": url, "collection": "media", "timeout_s": 5}
    code, out, err = run_cli(tmp_path, data, capsys)
    assert code == EXIT_CONFIG
    one_clear_error(err, f"qdrant.url {url} is unreachable")
    assert_nothing_written(tmp_path)


def test_the_query_commands_fail_in_preflight_on_an_unreachable_server(tmp_path, source, tiny_embedding_ckpt,
                                                                       capsys):
    """As ingest does: one line naming qdrant.url, exit 2 (it was a ResponseHandlingException, exit 3)."""
    url = f"http://127.0.0.1:{free_port()}"
    data = config_dict(source, tiny_embedding_ckpt, tmp_path)
    data["qdrant"] = {"url": url, "collection": "media", "timeout_s": 5}
    path = write_yaml(data, tmp_path / "cfg.yaml")
    (tmp_path / "q.jsonl").write_text('{"id": "a", "text": "x"}\n')
    (tmp_path / "qrels.tsv").write_text("query-id\tcorpus-id\tscore\na\tp\t1\n")
    for argv in (["query", path, "--text", "x", "--no-rerank"],
                 ["query-batch", path, "--queries", str(tmp_path / "q.jsonl"), "--out", str(tmp_path / "r.jsonl"),
                  "--no-rerank"],
                 ["eval", path, "--queries", str(tmp_path / "q.jsonl"), "--qrels", str(tmp_path / "qrels.tsv"),
                  "--out", str(tmp_path / "eval")]):
        assert qvl(argv) == EXIT_CONFIG, argv[0]
        one_clear_error(capsys.readouterr().err, f"qdrant.url {url} is unreachable")
    assert not (tmp_path / "r.jsonl").exists() and not (tmp_path / "eval").exists()


def test_unreachable_s3_endpoint_fails_in_preflight_naming_the_source(tmp_path, tiny_embedding_ckpt, capsys):
    endpoint = f"http://127.0.0.1:{free_port()}"
    # Two attempts instead of botocore's five keep the test short; the outcome is the same.
    options = {"endpoint_url": endpoint, "key": "AKIDPREFLIGHTTEST", "secret": "preflight-test-secret-value", "config_kwargs": {"retries": {"max_attempts": 2}}}
    data = config_dict("s3://nowhere-bucket/media/", tiny_embedding_ckpt, tmp_path, storage_options=options)
    code, out, err = run_cli(tmp_path, data, capsys)
    assert code == EXIT_CONFIG
    one_clear_error(err, "source.uri 's3://nowhere-bucket/media/' cannot be listed", "Could not connect")
    assert not (tmp_path / "qdrant").exists(), "the store was opened before the source was checked"
    assert_nothing_written(tmp_path)


def test_missing_local_source_fails_in_preflight(tmp_path, tiny_embedding_ckpt, capsys):
    data = config_dict(tmp_path / "no_such_folder", tiny_embedding_ckpt, tmp_path)
    code, out, err = run_cli(tmp_path, data, capsys)
    assert code == EXIT_CONFIG
    one_clear_error(err, "source.uri", "no_such_folder", "cannot be listed")
    assert not (tmp_path / "qdrant").exists()
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("kind", ["missing", "not-a-model"])
def test_unloadable_model_fails_in_preflight(kind, tmp_path, source, capsys):
    model = tmp_path / "model"
    if kind == "not-a-model":
        model.mkdir()
        (model / "config.json").write_text("{this is not json")
    data = config_dict(source, model, tmp_path)
    code, out, err = run_cli(tmp_path, data, capsys)
    assert code == EXIT_CONFIG
    one_clear_error(err, f"embedder.model '{model}' cannot be loaded")
    assert not (tmp_path / "qdrant").exists()
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("model", ["{tmp}/no-such-model", "./no-such-model", "{tmp}/a_file"])
def test_a_local_checkpoint_path_that_names_no_folder_says_so(model, tmp_path, source, capsys, monkeypatch):
    # Used to be transformers' paragraph about huggingface.co: a path is never a hub id (`org/name`).
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file").write_text("not a checkpoint")
    model = model.format(tmp=tmp_path)
    code, out, err = run_cli(tmp_path, config_dict(source, model, tmp_path), capsys)
    assert code == EXIT_CONFIG
    what = "is not a folder" if model.endswith("a_file") else "does not exist"
    one_clear_error(err, f"embedder.model '{model}' cannot be loaded: no such checkpoint folder (the path {what})")
    assert "huggingface.co" not in err
    assert_nothing_written(tmp_path)


def test_a_hub_model_that_cannot_be_fetched_is_one_line(tmp_path, source):
    import subprocess
    import sys

    # HF_HUB_OFFLINE is read when huggingface_hub is imported: a process of its own.
    job = write_yaml(config_dict(source, "qvl-test-org/no-such-model", tmp_path), tmp_path / "cfg.yaml")
    proc = subprocess.run([sys.executable, "-m", "pipelines.cli", "ingest", job, "--plan"], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert proc.returncode == EXIT_CONFIG, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith(
        "error: embedder.model 'qvl-test-org/no-such-model' cannot be loaded: "), proc.stderr  # was 2 lines


def test_mrl_dimension_larger_than_the_model_fails_in_preflight(tmp_path, source, tiny_embedding_ckpt, capsys):
    data = config_dict(source, tiny_embedding_ckpt, tmp_path)
    data["embedder"]["mrl_dims"] = [100000]
    code, out, err = run_cli(tmp_path, data, capsys)
    assert code == EXIT_CONFIG
    one_clear_error(err, "embedder.mrl_dims: 100000 must be smaller than the model's dimension")
    assert_nothing_written(tmp_path)


def test_mrl_dimension_equal_to_the_models_is_named_in_preflight(tmp_path, source, tiny_embedding_ckpt, capsys):
    import json

    full = json.loads((tiny_embedding_ckpt / "config.json").read_text())["text_config"]["hidden_size"]
    data = config_dict(source, tiny_embedding_ckpt, tmp_path)
    data["embedder"]["mrl_dims"] = [full]
    code, out, err = run_cli(tmp_path, data, capsys)
    assert code == EXIT_CONFIG
    one_clear_error(err, f"embedder.mrl_dims: {full} must be smaller than the model's dimension {full}")
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("plan", [False, True], ids=["run", "plan"])
def test_a_reranker_checkpoint_as_the_embedder_fails_in_preflight(plan, tmp_path, source, tiny_reranker_ckpt,
                                                                   capsys):
    # Same architecture and config: it used to load, and the run wrote vectors pooled from the wrong token.
    data = config_dict(source, tiny_reranker_ckpt, tmp_path)
    path = write_yaml(data, tmp_path / "cfg.yaml")
    code = qvl(["ingest", path, *(["--plan"] if plan else [])])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG
    one_clear_error(err, f"embedder.model '{tiny_reranker_ckpt}' is not a Qwen3-VL-Embedding checkpoint")
    assert not (tmp_path / "qdrant").exists()
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("broken", ["no-weights", "missing-shard", "truncated"])
def test_checkpoint_without_its_weights_fails_in_preflight(broken, tmp_path, source, tiny_embedding_ckpt, capsys):
    import json
    import shutil

    model = tmp_path / "model"
    shutil.copytree(tiny_embedding_ckpt, model)
    weights = (model / "model.safetensors").read_bytes()
    (model / "model.safetensors").unlink()
    if broken == "truncated":
        (model / "model.safetensors").write_bytes(weights[: len(weights) // 2])
    if broken == "missing-shard":
        index = {"metadata": {}, "weight_map": {"a.weight": "model-00001-of-00002.safetensors",
                                                "b.weight": "model-00002-of-00002.safetensors"}}
        (model / "model.safetensors.index.json").write_text(json.dumps(index))
        (model / "model-00001-of-00002.safetensors").write_bytes(b"")
    data = config_dict(source, model, tmp_path)
    code, out, err = run_cli(tmp_path, data, capsys)
    assert code == EXIT_CONFIG
    if broken == "no-weights":
        one_clear_error(err, f"embedder.model '{model}' holds no weights")
    elif broken == "truncated":
        one_clear_error(err, f"embedder.model '{model}': model.safetensors is unreadable (truncated or corrupt?)")
    else:
        one_clear_error(err, "weight shards listed in model.safetensors.index.json are missing",
                        "model-00002-of-00002.safetensors")
    assert not (tmp_path / "qdrant").exists()
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("key", ["output.dir", "qdrant.path"])
def test_a_folder_key_naming_a_file_fails_in_preflight(key, tmp_path, source, tiny_embedding_ckpt, capsys):
    data = config_dict(source, tiny_embedding_ckpt, tmp_path)
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    section, name = key.split(".")
    data[section][name] = str(a_file)
    code, out, err = run_cli(tmp_path, data, capsys)
    assert code == EXIT_CONFIG
    one_clear_error(err, f"{key} '{a_file}' is a file, not a folder")
    assert a_file.read_text() == "not a folder"
    assert_nothing_written(tmp_path)


@pytest.mark.parametrize("key", ["output.dir", "qdrant.path"])
def test_a_folder_key_starting_with_tilde_is_expanded(key, tmp_path, source, tiny_embedding_ckpt, capsys,
                                                     monkeypatch):
    # The preflight sees the expanded path (here a file, so the run stops before writing anything).
    home, cwd = tmp_path / "home", tmp_path / "cwd"
    home.mkdir()
    cwd.mkdir()
    (home / "a_file").write_text("not a folder")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(cwd)
    path = write_yaml(config_dict(source, tiny_embedding_ckpt, tmp_path), tmp_path / "cfg.yaml")
    code = qvl(["ingest", path, "--set", f"{key}=~/a_file"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG
    one_clear_error(err, f"{key} '{home / 'a_file'}' is a file, not a folder")
    assert list(cwd.iterdir()) == [], "a literal '~' folder was created"
    assert_nothing_written(tmp_path)


def test_missing_secret_variable_is_named_without_a_value(tmp_path, source, tiny_embedding_ckpt, capsys, monkeypatch):
    monkeypatch.delenv("QVL_TEST_UNSET_SECRET", raising=False)
    data = config_dict(source, tiny_embedding_ckpt, tmp_path, storage_options={"secret": "${QVL_TEST_UNSET_SECRET}"})
    code, out, err = run_cli(tmp_path, data, capsys)
    assert code == EXIT_CONFIG
    one_clear_error(err, "environment variable 'QVL_TEST_UNSET_SECRET' is not set")
    assert_nothing_written(tmp_path)


def test_embedded_store_locked_by_another_process_fails_in_preflight(tmp_path, source, tiny_embedding_ckpt, capsys,
                                                                      ray_local):
    from qdrant_client import QdrantClient

    holder = QdrantClient(path=str(tmp_path / "qdrant"))  # e.g. a previous run's owner that is still alive
    try:
        code, out, err = run_cli(tmp_path, config_dict(source, tiny_embedding_ckpt, tmp_path), capsys)
        assert code == EXIT_CONFIG
        one_clear_error(err, "is already accessed by another instance of Qdrant client")
        assert not holder.collection_exists("media")
    finally:
        holder.close()
    assert_nothing_written(tmp_path)


def test_flash_attention_on_cpu_actors_fails_in_preflight(tmp_path, source, tiny_embedding_ckpt, capsys, ray_local):
    """Before, the plan passed and the run created its collection; then every actor failed to load the
    model ("flash_attn seems to be not installed"): exit 3, every object "not written"."""
    data = config_dict(source, tiny_embedding_ckpt, tmp_path)
    data["embedder"]["attn_implementation"] = "flash_attention_2"
    code, out, err = run_cli(tmp_path, data, capsys)
    assert code == EXIT_CONFIG
    one_clear_error(err, "embedder.attn_implementation: flash_attention_2 runs on GPUs only")
    assert_nothing_written(tmp_path)
    path = write_yaml(data, tmp_path / "plan.yaml")
    assert qvl(["ingest", path, "--plan"]) == EXIT_CONFIG
    one_clear_error(capsys.readouterr().err, "embedder.attn_implementation: flash_attention_2 runs on GPUs only")


def test_flash_attention_needs_its_package_where_the_gpu_actors_run():
    """The check itself: what the actors would lack, named."""
    from pipelines.preflight import PreflightError, check_attention

    for attn in (None, "sdpa", "eager"):
        check_attention(attn, 0, lambda package: ["anywhere"])  # nothing to check
    check_attention("flash_attention_2", 1, lambda package: [])
    with pytest.raises(PreflightError, match=r"flash_attention_3 needs the flash_attn_3 package, which the Ray "
                                             r"workers on 10.0.0.7 \(node ab\) cannot import"):
        check_attention("flash_attention_3", 0.5, lambda package: ["10.0.0.7 (node ab)"])
    with pytest.raises(PreflightError, match="runs on GPUs only"):
        check_attention("flash_attention_2", 0, lambda package: [])
