"""Configuration schema, loading, overrides and secret handling (fast, no Ray)."""

from __future__ import annotations

import json
import os
import pickle
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.config import (
    DEFAULT_QUERY_INSTRUCTION,
    Config,
    ConfigError,
    apply_overrides,
    load_config,
    parse_config,
)
from pipelines.config_secrets import redact, redact_obj

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"

S3_ENV = {
    "AWS_ACCESS_KEY_ID": "AKIDPLANTED0001",
    "AWS_SECRET_ACCESS_KEY": "s3cr3t/PLANTED+value==",
    "AWS_ENDPOINT_URL": "http://127.0.0.1:5999",
}

MINIMAL = {
    "source": {"uri": "sample_data/"},
    "embedder": {"model": "tiny"},
    "qdrant": {"path": "qdrant_data", "collection": "media"},
}


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text), encoding="utf-8")
    return p


def error_of(data=None, overrides=(), **kw) -> str:
    with pytest.raises(ConfigError) as ei:
        parse_config(MINIMAL if data is None else data, overrides, **kw)
    exc = ei.value  # no chained pydantic error (its repr holds the inputs)
    assert exc.__cause__ is None and (exc.__context__ is None or exc.__suppress_context__)
    return str(ei.value)


def with_section(section: str, **values) -> dict:
    data = {k: dict(v) for k, v in MINIMAL.items()}
    data.setdefault(section, {}).update(values)
    return data


# ----------------------------------------------------------------- shipped configs


def test_local_config_loads():
    cfg = load_config(CONFIGS / "local.yaml")
    assert cfg.source.uri == "sample_data/"
    assert cfg.qdrant.path == os.path.abspath("qdrant_data") and cfg.qdrant.url is None and cfg.qdrant.embedded
    assert cfg.qdrant.collection == "media"
    assert cfg.embedder.model == "Qwen/Qwen3-VL-Embedding-2B"
    assert cfg.embedder.mrl_dims == [256, 64]
    assert cfg.compute.ray_address is None
    # The file restates the defaults: it must agree with the schema.
    defaults = parse_config(
        {
            "source": {"uri": "sample_data/"},
            "embedder": {"model": "Qwen/Qwen3-VL-Embedding-2B", "mrl_dims": [256, 64]},
            "qdrant": {"path": "qdrant_data", "collection": "media"},
            "reranker": {"model": "Qwen/Qwen3-VL-Reranker-2B"},
        }
    )
    assert cfg == defaults


def test_local_config_loads_without_any_env(monkeypatch):
    for var in S3_ENV:
        monkeypatch.delenv(var, raising=False)
    load_config(CONFIGS / "local.yaml")
    load_config(str(CONFIGS / "cluster.yaml"))


def test_s3_config_uses_the_standard_aws_chain_without_any_env(monkeypatch):
    # As shipped it names no variable, so s3fs/botocore find credentials (and AWS_ENDPOINT_URL) themselves.
    for var in S3_ENV:
        monkeypatch.delenv(var, raising=False)
    cfg = load_config(CONFIGS / "s3.yaml")
    assert cfg.source.uri == "s3://my-bucket/media/"
    assert cfg.source.storage_options == {"client_kwargs": {"region_name": "us-east-1"}}


def s3_explicit_variant(tmp_path: Path) -> Path:
    """configs/s3.yaml with its commented explicit-credential lines switched on."""
    lines = []
    for line in (CONFIGS / "s3.yaml").read_text().splitlines():
        stripped = line.lstrip()
        if stripped.startswith(("# key:", "# secret:", "# endpoint_url:")):
            line = line[: len(line) - len(stripped)] + stripped[2:]
        lines.append(line)
    return write(tmp_path, "\n".join(lines) + "\n", "s3_explicit.yaml")


def test_s3_config_explicit_variant_loads_with_env(monkeypatch, tmp_path):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    cfg = load_config(s3_explicit_variant(tmp_path))
    so = cfg.source.storage_options
    assert so["key"] == S3_ENV["AWS_ACCESS_KEY_ID"]
    assert so["secret"] == S3_ENV["AWS_SECRET_ACCESS_KEY"]
    assert so["endpoint_url"] == S3_ENV["AWS_ENDPOINT_URL"]
    assert so["client_kwargs"] == {"region_name": "us-east-1"}
    red = json.dumps(cfg.redacted_dict())
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in red and S3_ENV["AWS_ACCESS_KEY_ID"] not in red
    assert "${AWS_SECRET_ACCESS_KEY}" in red and "${AWS_ENDPOINT_URL}" in red
    assert S3_ENV["AWS_SECRET_ACCESS_KEY"] not in repr(cfg)


def test_s3_config_explicit_variant_missing_env_names_variable(monkeypatch, tmp_path):
    for k, v in S3_ENV.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(ConfigError) as ei:
        load_config(s3_explicit_variant(tmp_path))
    msg = str(ei.value)
    assert "AWS_SECRET_ACCESS_KEY" in msg and "source.storage_options.secret" in msg
    assert "s3_explicit.yaml" in msg


def test_cluster_config_loads():
    cfg = load_config(CONFIGS / "cluster.yaml")
    assert cfg.compute.ray_address == "auto"
    assert cfg.compute.embed_actors == 4 and cfg.compute.num_gpus_per_actor == 1.0
    assert cfg.qdrant.url == "http://qdrant:6333" and cfg.qdrant.path is None
    assert cfg.reranker.model == "Qwen/Qwen3-VL-Reranker-2B"
    assert cfg.embedder.dtype == "bfloat16"
    assert cfg.embedder.attn_implementation == "flash_attention_2"
    # The actor reserves the CPUs its preparation processes run on.
    assert cfg.embedder.prepare_processes == 6 and cfg.compute.cpus_per_actor == 8.0


def test_every_shipped_key_is_commented():
    for f in ("local.yaml", "s3.yaml", "cluster.yaml"):
        for n, line in enumerate((CONFIGS / f).read_text().splitlines(), 1):
            s = line.strip()
            if s and not s.startswith("#") and ":" in s and not s.endswith(":"):
                assert "#" in s, f"{f}:{n} has no comment: {s}"


# ------------------------------------------------------------------------- defaults


def test_defaults():
    cfg = parse_config(MINIMAL)
    assert cfg.source.include == [] and cfg.source.exclude == [] and cfg.source.storage_options == {}
    e = cfg.expand
    assert (e.chunk_tokens, e.overlap_tokens, e.pdf_dpi) == (512, 64, 144)
    assert (e.video_segment_s, e.video_fps, e.video_max_frames) == (30.0, 1.0, 64)
    lim = cfg.limits
    assert (lim.max_object_bytes, lim.max_image_pixels, lim.max_pdf_pages, lim.max_video_duration_s) == (
        536870912,
        89478485,
        200,
        3600.0,
    )
    em = cfg.embedder
    assert em.mrl_dims == [] and em.dtype == "auto" and em.attn_implementation is None
    assert (em.max_length, em.min_pixels, em.max_pixels, em.total_pixels) == (8192, 4096, 1843200, 7864320)
    assert (em.token_budget, em.max_batch_items, em.prepare_processes, em.instruction) == (16384, 64, None, None)
    assert em.window_mib is None  # the embedder's own: 64 MiB on a CPU, 1 GiB on a GPU
    c = cfg.compute
    assert (c.ray_address, c.embed_actors, c.num_gpus_per_actor, c.cpus_per_actor) == (None, 1, 0.0, 1.0)
    assert (c.batch_size, c.prepare_concurrency) == (512, None)
    assert c.effective_num_gpus(0) == 0.0 and c.effective_num_gpus(2) == 1.0
    assert c.inflight_mib_per_actor is None
    assert (c.inflight_bytes(0.0), c.inflight_bytes(1.0)) == (256 * 2**20, 2048 * 2**20)  # per actor, CPU / GPU
    two = c.model_copy(update={"embed_actors": 2, "inflight_mib_per_actor": 100})
    assert two.inflight_bytes(0.0) == two.inflight_bytes(1.0) == 200 * 2**20
    q = cfg.qdrant
    assert (q.url, q.path, q.api_key_env, q.collection) == (None, os.path.abspath("qdrant_data"), "QDRANT_API_KEY", "media")
    assert (q.full_datatype, q.on_disk, q.quantization, q.upsert_batch, q.timeout_s, q.retry_s) == (
        "float32",
        False,
        "none",
        128,
        30.0,
        120.0,
    )
    r = cfg.reranker
    assert (r.model, r.instruction, r.max_length, r.batch_pairs, r.window_mib) == (None, None, 10240, None, None)
    qu = cfg.query
    assert qu.instruction == DEFAULT_QUERY_INSTRUCTION == "Retrieve images or text relevant to the user's query."
    assert (qu.top_k, qu.top_n, qu.prefetch_multiplier) == (100, 10, 4)
    o = cfg.output
    assert (o.dir, o.dead_letter_file, o.report_file) == (os.path.abspath("runs"), "dead_letters.jsonl", "report.json")
    assert cfg.prune is False


def test_frozen_and_picklable():
    cfg = parse_config(MINIMAL)
    with pytest.raises(ValidationError):
        cfg.prune = True  # type: ignore[misc]
    with pytest.raises(ValidationError):
        cfg.qdrant.collection = "x"  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(cfg)) == cfg


# ------------------------------------------------------------------ unknown keys


@pytest.mark.parametrize(
    "data, expected",
    [
        ({**MINIMAL, "qdrnt": {}}, "unknown top-level key 'qdrnt'"),
        (with_section("qdrant", urll="http://x"), "qdrant: unknown key 'urll' (did you mean 'url'?)"),
        (with_section("expand", chunk=3), "expand: unknown key 'chunk'"),
        (with_section("limits", max_pages=3), "limits: unknown key 'max_pages'"),
        (with_section("source", storage={}), "source: unknown key 'storage'"),
        (with_section("output", folder="x"), "output: unknown key 'folder'"),
    ],
)
def test_unknown_keys_rejected(data, expected):
    assert expected in error_of(data)


def test_unknown_key_in_file_names_file_and_key(tmp_path):
    p = write(
        tmp_path,
        """
        source: {uri: x}
        embedder: {model: m, mrl_dims: [0]}
        qdrant: {path: q, collection: c, urll: http://x}
        """,
    )
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(f"config {p}: ")
    assert "embedder.mrl_dims.0: must be >= 1 (got 0)" in msg
    assert "qdrant: unknown key 'urll'" in msg
    assert msg.count("\n") == 0  # one message


@pytest.mark.parametrize("section", ["qdrant", "source"])
def test_a_misspelt_section_is_named_before_the_section_it_leaves_missing(section):
    # The typo is the cause; "qdrant: required section missing" alone used to lead the message.
    data = {k: v for k, v in MINIMAL.items() if k != section}
    data[section[:-1]] = MINIMAL[section]
    msg = error_of(data)
    assert msg.startswith(f"config <dict>: unknown top-level key '{section[:-1]}' (did you mean '{section}'?); "), msg
    assert f"{section}: required section missing" in msg


def test_api_key_in_config_rejected_without_echoing_it():
    msg = error_of(with_section("qdrant", api_key="PLANTED-QDRANT-KEY"))
    assert "qdrant: unknown key 'api_key'" in msg and "api_key_env" in msg
    assert "PLANTED-QDRANT-KEY" not in msg


# --------------------------------------------------------------- types and values


@pytest.mark.parametrize(
    "section, values, expected",
    [
        ("compute", {"embed_actors": "two"}, "compute.embed_actors: expected an integer"),
        ("compute", {"embed_actors": 0}, "compute.embed_actors: must be >= 1 (got 0)"),
        ("compute", {"embed_actors": 1.5}, "compute.embed_actors: expected an integer"),
        ("compute", {"num_gpus_per_actor": -1}, "compute.num_gpus_per_actor: must be >= 0"),
        ("compute", {"prepare_concurrency": 0}, "compute.prepare_concurrency: must be >= 1"),
        ("compute", {"inflight_mib_per_actor": 0}, "compute.inflight_mib_per_actor: must be >= 1"),
        ("embedder", {"dtype": "fp8"}, "embedder.dtype: must be one of"),
        ("embedder", {"mrl_dims": 256}, "embedder.mrl_dims: expected a list"),
        ("embedder", {"mrl_dims": ["a"]}, "embedder.mrl_dims.0: expected an integer"),
        ("embedder", {"model": ""}, "embedder.model: must not be empty"),
        ("embedder", {"max_pixels": 100}, "embedder.max_pixels: must be >= min_pixels"),
        ("embedder", {"window_mib": 0}, "embedder.window_mib: must be >= 1 (got 0)"),
        ("reranker", {"window_mib": 0}, "reranker.window_mib: must be >= 1 (got 0)"),
        ("expand", {"overlap_tokens": 512}, "expand.overlap_tokens: must be < chunk_tokens (512)"),
        ("expand", {"video_fps": 0}, "expand.video_fps: must be > 0"),
        ("expand", {"video_max_frames": 1}, "expand.video_max_frames: must be >= 2"),
        ("embedder", {"model": "m", "max_length": 512}, "expand.chunk_tokens: must be <= embedder.max_length - 64 = 448"),
        ("limits", {"max_video_duration_s": float("inf")}, "limits.max_video_duration_s: must be a finite number"),
        ("limits", {"max_image_pixels": 178_956_971}, "limits.max_image_pixels: must be <= 178956970"),
        ("qdrant", {"quantization": "int4"}, "qdrant.quantization: must be one of"),
        ("qdrant", {"on_disk": "yes please"}, "qdrant.on_disk: expected true or false"),
        ("qdrant", {"collection": "a/b"}, "qdrant.collection: must be"),
        ("qdrant", {"timeout_s": 0}, "qdrant.timeout_s: must be > 0"),
        ("query", {"top_k": 0}, "query.top_k: must be >= 1"),
        ("reranker", {"batch_pairs": "8"}, "reranker.batch_pairs: expected an integer"),
        ("embedder", {"revision": "v 2"}, "embedder.revision: a branch, tag or commit has no spaces"),
        ("embedder", {"revision": 2}, "embedder.revision: expected a string"),
        ("reranker", {"model": None, "revision": "main"}, "reranker.revision: set without a model"),
        ("source", {"include": "*.jpg"}, "source.include: expected a list"),
        ("source", {"uri": 3}, "source.uri: expected a string"),
        ("source", {"storage_options": "PLANTED"}, "source.storage_options: expected a mapping"),
    ],
)
def test_bad_values_name_the_key(section, values, expected):
    msg = error_of(with_section(section, **values))
    assert expected in msg
    assert "PLANTED" not in msg


def test_bad_values_all_reported_at_once():
    data = with_section("compute", embed_actors=0)
    data["prune"] = "yes"
    data["embedder"] = {"model": "m", "dtype": "x"}
    msg = error_of(data)
    for key in ("compute.embed_actors", "prune", "embedder.dtype"):
        assert key in msg
    assert msg.count(";") == 2


def test_missing_required():
    msg = error_of({"source": {}, "embedder": {"model": "m"}})
    assert "source.uri: required key missing" in msg
    assert "qdrant: required section missing" in msg
    assert "qdrant.collection: required key missing" in error_of(
        {**MINIMAL, "qdrant": {"path": "q"}}
    )


def test_top_level_not_a_mapping(tmp_path):
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="required section missing"):
        load_config(write(tmp_path, "# only a comment\n"))


def test_yaml_syntax_error_names_file_and_line(tmp_path):
    p = write(tmp_path, "source:\n  uri: x\nembedder: {model: m\nqdrant: {path: q}\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert msg.startswith(f"config {p}: invalid YAML at line ") and "line 4" in msg


def test_yaml_duplicate_key_rejected(tmp_path):
    p = write(tmp_path, "source: {uri: x}\nembedder: {model: m}\nqdrant: {path: q, collection: c}\nprune: true\nprune: false\n")
    with pytest.raises(ConfigError, match=r"line 5.*duplicate key 'prune'"):
        load_config(p)


def test_yaml_merge_keys_may_be_overridden_but_written_keys_not_repeated(tmp_path):
    """`<<: *anchor` then a key of its own is YAML's override, not a duplicate."""
    text = ("source:\n  uri: x\n  storage_options:\n    base: &base {region: eu, anon: false}\n"
            "    other:\n      <<: *base\n      anon: true\n"
            "embedder: {model: m}\nqdrant: {path: q, collection: c}\n")
    cfg = load_config(write(tmp_path, text))
    assert cfg.source.storage_options["other"] == {"region": "eu", "anon": True}
    twice = text.replace("      anon: true\n", "      anon: true\n      anon: false\n")
    with pytest.raises(ConfigError, match=r"line 8.*duplicate key 'anon'"):
        load_config(write(tmp_path, twice))


def test_blank_ray_address_and_reranker_model_mean_none(tmp_path):
    cfg = parse_config(with_section("compute", ray_address=" ") | {"reranker": {"model": ""}})
    assert cfg.compute.ray_address is None and cfg.reranker.model is None


def test_missing_file():
    with pytest.raises(ConfigError, match="nope.yaml: file not found"):
        load_config("configs/nope.yaml")


# ------------------------------------------------------------- qdrant url / path


@pytest.mark.parametrize(
    "qdrant, word",
    [
        ({"url": "http://q:6333", "path": "qdrant_data", "collection": "c"}, "both"),
        ({"collection": "c"}, "neither"),
        ({"url": None, "path": None, "collection": "c"}, "neither"),
        ({"url": "", "path": "", "collection": "c"}, "neither"),
    ],
)
def test_exactly_one_of_url_and_path(qdrant, word):
    msg = error_of({**MINIMAL, "qdrant": qdrant})
    assert "qdrant.url" in msg and "qdrant.path" in msg and word in msg


def test_url_must_be_http():
    assert "qdrant.url: must be an http:// or https:// URL" in error_of(
        {**MINIMAL, "qdrant": {"url": "qdrant:6333", "collection": "c"}}
    )


# ------------------------------------------------------------------------ overrides


def test_overrides_scalars_lists_null(tmp_path):
    cfg = load_config(
        CONFIGS / "local.yaml",
        [
            "compute.embed_actors=2",
            "embedder.mrl_dims=[64, 512,128]",
            "qdrant.path=null",
            "qdrant.url=http://localhost:6333",
            "qdrant.collection=2024",
            "embedder.instruction=Represent: this",
            "prune=true",
            "source.include=['*.jpg', '*.png']",
            "source.storage_options.anon=true",
            "compute.prepare_concurrency=",
            "expand.video_fps=0.5",
        ],
    )
    assert cfg.compute.embed_actors == 2
    assert cfg.embedder.mrl_dims == [512, 128, 64]
    assert cfg.qdrant.path is None and cfg.qdrant.url == "http://localhost:6333"
    assert cfg.qdrant.collection == "2024"
    assert cfg.embedder.instruction == "Represent: this"
    assert cfg.prune is True
    assert cfg.source.include == ["*.jpg", "*.png"]
    assert cfg.source.storage_options == {"anon": True}
    assert cfg.compute.prepare_concurrency is None
    assert cfg.expand.video_fps == 0.5


def test_override_empty_list_and_section():
    cfg = parse_config(
        with_section("embedder", mrl_dims=[256]),
        ["embedder.mrl_dims=[]", "query={top_k: 5, top_n: 2}"],
    )
    assert cfg.embedder.mrl_dims == []
    assert (cfg.query.top_k, cfg.query.top_n, cfg.query.prefetch_multiplier) == (5, 2, 4)


@pytest.mark.parametrize(
    "override, expected",
    [
        ("qdrant.urll=http://x", "override 'qdrant.urll': unknown key 'qdrant.urll' (did you mean 'qdrant.url'?)"),
        ("nosuch=1", "override 'nosuch': unknown key 'nosuch'"),
        ("qdrant.url.host=x", "override 'qdrant.url.host': unknown key 'qdrant.url.host'"),
        ("prune", "expected dotted.key=value"),
        ("=3", "expected dotted.key=value"),
        ("source.include=[*.jpg]", "override 'source.include': value is not valid YAML"),
        ("source.include=[*.jpg]", "quote glob patterns such as '*.jpg'"),
        ("source.storage_options={key: ${K}, secret: [}", "override 'source.storage_options': value is not valid YAML"),
    ],
)
def test_bad_overrides(override, expected):
    with pytest.raises(ConfigError) as ei:
        load_config(CONFIGS / "local.yaml", [override])
    assert f"config {CONFIGS / 'local.yaml'}: " in str(ei.value)
    assert expected in str(ei.value)
    if "*" not in override:  # the glob hint only where a '*' is the likely culprit
        assert "glob" not in str(ei.value)


def test_override_value_validated_and_not_echoed_for_secrets():
    msg = error_of(overrides=["compute.embed_actors=0", "source.storage_options=PLANTED-SECRET"])
    assert "compute.embed_actors: must be >= 1 (got 0)" in msg
    assert "source.storage_options: expected a mapping" in msg and "PLANTED-SECRET" not in msg


@pytest.mark.parametrize(
    "override, key, expected",
    [
        # '#' would start a YAML comment: the value was cut (a different collection!).
        ("source.uri=s3://bucket/my #1 folder/", ("source", "uri"), "s3://bucket/my #1 folder/"),
        ("qdrant.collection=media #2", ("qdrant", "collection"), "media #2"),
        ("embedder.instruction=#x", ("embedder", "instruction"), "#x"),  # was null
        ("source.uri=&x", ("source", "uri"), "&x"),  # was a YAML anchor error
        ("source.uri=*x", ("source", "uri"), "*x"),
        ("source.uri=!tag x", ("source", "uri"), "!tag x"),
        ("embedder.instruction=Find: cats, dogs", ("embedder", "instruction"), "Find: cats, dogs"),
        ("embedder.instruction=[not a list]", ("embedder", "instruction"), "[not a list]"),
        ("qdrant.collection=  spaced  ", ("qdrant", "collection"), "spaced"),
        # One quoted YAML scalar is unquoted: spaces kept, a literal "null", escapes.
        ("embedder.instruction='  keep spaces '", ("embedder", "instruction"), "  keep spaces "),
        ('embedder.instruction="null"', ("embedder", "instruction"), "null"),
        ("embedder.instruction='it''s'", ("embedder", "instruction"), "it's"),
        ('embedder.instruction="a #1"', ("embedder", "instruction"), "a #1"),
        # Not one quoted scalar: as written.
        ('embedder.instruction="a" #x "b"', ("embedder", "instruction"), '"a" #x "b"'),
        ('embedder.instruction="a" or "b"', ("embedder", "instruction"), '"a" or "b"'),
        # Null as before.
        ("embedder.instruction=", ("embedder", "instruction"), None),
        ("embedder.instruction=null", ("embedder", "instruction"), None),
        ("embedder.instruction=~", ("embedder", "instruction"), None),
        ("embedder.instruction=  ", ("embedder", "instruction"), None),
    ],
)
def test_string_override_is_used_as_written(override, key, expected):
    out = apply_overrides(MINIMAL, [override])
    assert out[key[0]][key[1]] == expected
    if expected is not None and key != ("source", "uri"):
        cfg = parse_config(MINIMAL, [override])
        assert getattr(getattr(cfg, key[0]), key[1]) == expected


def test_non_string_overrides_stay_yaml():
    out = apply_overrides(MINIMAL, ["compute.embed_actors=3 # three", "embedder.mrl_dims=[64, 32]",
                                    "source.include=['#1*.jpg']", "source.storage_options.anon=true"])
    assert out["compute"]["embed_actors"] == 3
    assert out["embedder"]["mrl_dims"] == [64, 32]
    assert out["source"]["include"] == ["#1*.jpg"]
    assert out["source"]["storage_options"] == {"anon": True}


def test_apply_overrides_does_not_mutate_input():
    data = with_section("embedder", mrl_dims=[256])
    out = apply_overrides(data, ["embedder.mrl_dims=[1]", "source.storage_options.client_kwargs.region_name=eu"])
    assert data["embedder"]["mrl_dims"] == [256] and "storage_options" not in data["source"]
    assert out["source"]["storage_options"] == {"client_kwargs": {"region_name": "eu"}}


# ------------------------------------------------------------------------- mrl_dims


def test_mrl_dims_sorted_descending_and_validated():
    assert parse_config(with_section("embedder", mrl_dims=[64, 1024, 256])).embedder.mrl_dims == [1024, 256, 64]
    assert parse_config(with_section("embedder", mrl_dims=(32,))).embedder.mrl_dims == [32]
    assert "embedder.mrl_dims: duplicate dimension 64" in error_of(with_section("embedder", mrl_dims=[64, 128, 64]))
    assert "embedder.mrl_dims.1: must be >= 1 (got -8)" in error_of(with_section("embedder", mrl_dims=[64, -8]))
    assert "embedder.mrl_dims.0: expected an integer" in error_of(with_section("embedder", mrl_dims=[True]))


# -------------------------------------------------------------------------- secrets


def secret_data(**options) -> dict:
    return with_section("source", uri="s3://bucket/p/", storage_options=options)


def test_env_substitution_nested(monkeypatch):
    monkeypatch.setenv("T_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("T_SECRET", "PLANTED-s3-secret")
    cfg = parse_config(
        secret_data(
            secret="${T_SECRET}",
            client_kwargs={"endpoint_url": "${T_ENDPOINT}", "extra": ["a-${T_ENDPOINT}-b"]},
            literal="$${T_SECRET}",
        )
    )
    so = cfg.source.storage_options
    assert so["secret"] == "PLANTED-s3-secret"
    assert so["client_kwargs"] == {"endpoint_url": "http://127.0.0.1:9000", "extra": ["a-http://127.0.0.1:9000-b"]}
    assert so["literal"] == "${T_SECRET}"


def test_env_substitution_only_in_storage_options(monkeypatch):
    monkeypatch.setenv("T_X", "resolved")
    cfg = parse_config(with_section("source", uri="${T_X}/data"))
    assert cfg.source.uri == "${T_X}/data"


def test_missing_env_var_names_variable_without_leaking(monkeypatch):
    monkeypatch.setenv("T_PRESENT", "PLANTED-present-secret")
    monkeypatch.delenv("T_ABSENT", raising=False)
    msg = error_of(secret_data(key="${T_PRESENT}", client_kwargs={"aws_session_token": "${T_ABSENT}"}))
    assert "source.storage_options.client_kwargs.aws_session_token" in msg
    assert "'T_ABSENT'" in msg and "not set" in msg
    assert "PLANTED" not in msg


def test_redacted_dict_hides_secrets(monkeypatch):
    monkeypatch.setenv("T_KEY", "PLANTED-access-key")
    monkeypatch.setenv("T_SECRET", "PLANTED-secret-key")
    monkeypatch.setenv("T_ENDPOINT", "http://127.0.0.1:9000")
    monkeypatch.setenv("QDRANT_API_KEY", "PLANTED-qdrant-key")
    cfg = parse_config(
        secret_data(
            key="${T_KEY}",
            Secret="PLANTED-literal-secret",
            Password="prefix-${T_SECRET}",
            anon=False,
            client_kwargs={
                "endpoint_url": "${T_ENDPOINT}",
                "region_name": "eu-west-1",
                "AWS_SECRET_ACCESS_KEY": "PLANTED-nested-secret",
                "aws_session_token": "${T_SECRET}",
            },
        )
    )
    red = cfg.redacted_dict()
    so = red["source"]["storage_options"]
    assert so["key"] == "${T_KEY}"  # a pure reference names a variable, not a value
    assert so["Secret"] == "***" and so["Password"] == "***" and so["anon"] is False
    ck = so["client_kwargs"]
    assert ck == {
        "endpoint_url": "${T_ENDPOINT}",
        "region_name": "eu-west-1",
        "AWS_SECRET_ACCESS_KEY": "***",
        "aws_session_token": "${T_SECRET}",
    }
    dumped = json.dumps(red) + repr(cfg) + str(cfg)
    assert "PLANTED" not in dumped
    assert red["qdrant"]["api_key_env"] == "QDRANT_API_KEY"
    # The rest of the config is echoed unchanged.
    assert red["embedder"] == cfg.embedder.model_dump(mode="json")

    secrets = cfg.secret_values()
    for s in (
        "PLANTED-access-key",
        "PLANTED-secret-key",
        "PLANTED-literal-secret",
        "PLANTED-nested-secret",
        "PLANTED-qdrant-key",
    ):
        assert s in secrets
    assert "http://127.0.0.1:9000" not in secrets and "eu-west-1" not in secrets
    assert all(secrets)


def test_secret_values_qdrant_key_optional(monkeypatch):
    monkeypatch.delenv("QDRANT_API_KEY", raising=False)
    assert parse_config(MINIMAL).secret_values() == []
    monkeypatch.setenv("OTHER_KEY_VAR", "PLANTED-q")
    cfg = parse_config(with_section("qdrant", api_key_env="OTHER_KEY_VAR"))
    assert cfg.secret_values() == ["PLANTED-q"] and cfg.qdrant.api_key() == "PLANTED-q"
    assert parse_config(with_section("qdrant", api_key_env=None)).secret_values() == []


def test_redacted_dict_scrubs_url_passwords_and_stray_secrets(monkeypatch):
    monkeypatch.setenv("T_SECRET", "PLANTED-stray")
    cfg = parse_config(
        {
            **secret_data(secret="${T_SECRET}"),
            "qdrant": {"url": "https://user:PLANTED-pw@qdrant:6333", "collection": "c"},
            "output": {"dir": "runs/PLANTED-stray"},
        }
    )
    red = json.dumps(cfg.redacted_dict())
    assert "PLANTED" not in red
    assert "https://user:***@qdrant:6333" in red


def test_redact():
    secrets = ["abc/def+", "", "abc"]
    text = "x abc/def+ y abc%2Fdef%2B z abc s3://u:pw@h/p"
    assert redact(text, secrets) == "x *** y *** z *** s3://u:***@h/p"
    assert redact("nothing here", []) == "nothing here"
    rec = {"error": "failed with abc", "n": 3, "nested": [{"abc": "abc"}]}
    assert redact_obj(rec, secrets) == {"error": "failed with ***", "n": 3, "nested": [{"***": "***"}]}


def test_config_constructible_in_python(tmp_path):
    cfg = Config(
        source={"uri": tmp_path},
        embedder={"model": "m", "mrl_dims": (128, 256)},
        qdrant={"path": tmp_path / "q", "collection": "c"},
    )
    assert cfg.source.uri == str(tmp_path) and cfg.embedder.mrl_dims == [256, 128]
    assert cfg.qdrant.path == str(tmp_path / "q")


# ------------------------------------------------------------------- paths and names


def test_tilde_expanded_in_local_folders(monkeypatch, tmp_path):
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = parse_config(MINIMAL, ["qdrant.path=~/store", "output.dir=~/runs"])
    assert cfg.qdrant.path == str(tmp_path / "store")
    assert cfg.output.dir == str(tmp_path / "runs")
    # Also from a file and from Python; source.uri is left to the listing (it may be a URL).
    cfg = parse_config(with_section("output", dir="~"), ["source.uri=~/media"])
    assert cfg.output.dir == str(tmp_path) and cfg.source.uri == "~/media"
    assert parse_config(MINIMAL, ["qdrant.path=x/~"]).qdrant.path == os.path.abspath("x/~")


def test_local_paths_are_made_absolute_in_the_driver(monkeypatch, tmp_path):
    """Ray workers on a joined cluster run in another folder: a relative path must not reach them."""
    (tmp_path / "ckpt").mkdir()
    monkeypatch.chdir(tmp_path)
    cfg = parse_config(MINIMAL, ["qdrant.path=store", "output.dir=./runs", "embedder.model=ckpt",
                                 "reranker.model=ckpt"])
    assert cfg.qdrant.path == str(tmp_path / "store") and cfg.output.dir == str(tmp_path / "runs")
    assert cfg.embedder.model == cfg.reranker.model == str(tmp_path / "ckpt")
    hub = parse_config(MINIMAL, ["embedder.model=Qwen/Qwen3-VL-Embedding-2B", "reranker.model=Qwen/Qwen3-VL-Reranker-2B"])
    assert (hub.embedder.model, hub.reranker.model) == ("Qwen/Qwen3-VL-Embedding-2B", "Qwen/Qwen3-VL-Reranker-2B")


@pytest.mark.parametrize("key", ["report_file", "dead_letter_file"])
@pytest.mark.parametrize("name", ["sub/r.json", "/abs/r.json", "..", ".", "../r.json", "a\\b.json"])
def test_output_file_names_must_be_plain(key, name):
    msg = error_of(with_section("output", **{key: name}))
    assert f"output.{key}: must be a plain file name" in msg


def test_output_file_names_must_differ():
    # One name for both: the report, written last, would overwrite the dead letters.
    msg = error_of(with_section("output", report_file="dead_letters.jsonl"))
    assert "dead_letter_file and report_file are both 'dead_letters.jsonl'" in msg


def test_output_file_names_plain_ok():
    cfg = parse_config(with_section("output", report_file="r..json", dead_letter_file="dead letters.jsonl"))
    assert (cfg.output.report_file, cfg.output.dead_letter_file) == ("r..json", "dead letters.jsonl")


@pytest.mark.parametrize("value", [None, "eager", "sdpa", "flash_attention_2", "flash_attention_3"])
def test_attn_implementation_accepted(value):
    assert parse_config(with_section("embedder", attn_implementation=value)).embedder.attn_implementation == value


@pytest.mark.parametrize("value", ["bogus", "SDPA", "flex_attention", "paged_attention"])
def test_attn_implementation_rejected_listing_the_values(value):
    msg = error_of(MINIMAL, [f"embedder.attn_implementation={value}"])
    assert "embedder.attn_implementation: must be null or one of 'eager', 'sdpa', 'flash_attention_2', " \
           f"'flash_attention_3' (got '{value}')" in msg


def test_attn_implementation_names_known_to_transformers():
    # The list must stay a subset of what the installed transformers accepts.
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    from pipelines.config import ATTN_IMPLEMENTATIONS

    assert set(ATTN_IMPLEMENTATIONS) <= {"eager", *ALL_ATTENTION_FUNCTIONS.valid_keys()}


def test_a_revision_pins_hub_ids_only_and_joins_the_settings_digest(tmp_path):
    from pipelines.plan import settings_digest

    hub = with_section("embedder", model="Qwen/Qwen3-VL-Embedding-2B")
    assert parse_config(hub).embedder.revision is None
    assert parse_config(with_section("embedder", model="org/m", revision="  ")).embedder.revision is None
    # An unpinned collection keeps the digest it was ingested with before revisions existed.
    assert settings_digest(load_config(CONFIGS / "local.yaml")) == "5d41590ed2ab"
    digests = {settings_digest(parse_config(with_section("embedder", model="org/m", revision=r)))
               for r in (None, "v2", "0123456789abcdef0123456789abcdef01234567")}
    assert len(digests) == 3
    # transformers ignores a revision for a local folder: a pin that pins nothing is refused.
    for section in ("embedder", "reranker"):
        msg = error_of(with_section(section, model=str(tmp_path), revision="v2"))
        assert f"{section}.revision: applies to a hub id, but model is the local folder" in msg, msg


# ------------------------------------------------------------- review fixes


@pytest.mark.parametrize("value", [1.5, 2.25, 1.0001])
def test_num_gpus_per_actor_above_one_must_be_whole(value):
    # Ray refuses "GPU resource quantities >1 must be whole numbers" only when the actors start.
    msg = error_of(with_section("compute", num_gpus_per_actor=value))
    assert f"compute.num_gpus_per_actor: must be a fraction of one GPU (at most 1) or a whole number of GPUs " \
           f"(got {value})" in msg


@pytest.mark.parametrize("value", [0, 0.25, 1, 1.0, 2, 3.0])
def test_num_gpus_per_actor_fractions_and_whole_numbers_ok(value):
    assert parse_config(with_section("compute", num_gpus_per_actor=value)).compute.num_gpus_per_actor == value


@pytest.mark.parametrize(
    "value, hint",
    [
        ("PLANTED-sk-live-9f8e7d6c", None),
        ("PLANTED_KEY with spaces", None),
        ("1PLANTED", None),
        ("${QDRANT_API_KEY}", "QDRANT_API_KEY"),
        ("$MY_QDRANT_KEY", "MY_QDRANT_KEY"),
        ("${ MY_QDRANT_KEY }", "MY_QDRANT_KEY"),
    ],
)
def test_api_key_env_must_be_a_variable_name_not_echoed(value, hint):
    msg = error_of(with_section("qdrant", api_key_env=value))
    assert "qdrant.api_key_env: must be null or the name of an environment variable" in msg
    assert value not in msg and "PLANTED" not in msg
    if hint:
        assert msg.endswith(f"write the variable's name, {hint}")
    else:
        assert "write the variable's name" not in msg
    # Not as an override either, nor as a non-string (a numeric key).
    assert value not in error_of(MINIMAL, [f"qdrant.api_key_env={value}"])
    assert "9876543210" not in error_of(with_section("qdrant", api_key_env=9876543210))


def test_an_api_key_env_that_may_be_a_pasted_key_is_not_shown(monkeypatch):
    """A key of letters and digits passes the name check; unless the variable exists or the name is
    conventional (upper case), the report and the unreachable-server message do not show it."""
    from pipelines.ingest import server_client
    from pipelines.preflight import PreflightError
    from tests.resilience_helpers import free_port

    pasted = "qk7Hf93LmPq2Zx81RtYv"
    monkeypatch.delenv(pasted, raising=False)
    cfg = parse_config(MINIMAL, [f"qdrant.api_key_env={pasted}"])
    assert cfg.redacted_dict()["qdrant"]["api_key_env"] == "***"
    server = parse_config(MINIMAL, ["qdrant.path=", f"qdrant.url=http://127.0.0.1:{free_port()}",
                                    f"qdrant.api_key_env={pasted}"])
    with pytest.raises(PreflightError) as info:
        server_client(server)
    assert pasted not in str(info.value)
    assert "the variable that qdrant.api_key_env names is not set in this process's environment" in str(info.value)
    monkeypatch.setenv("MY_QDRANT_KEY", "s3cr3t-value")  # set: surely a name
    assert parse_config(MINIMAL, ["qdrant.api_key_env=MY_QDRANT_KEY"]).redacted_dict()["qdrant"]["api_key_env"] \
        == "MY_QDRANT_KEY"
    assert parse_config(MINIMAL).redacted_dict()["qdrant"]["api_key_env"] == "QDRANT_API_KEY"  # the default
    monkeypatch.delenv("MY_UNSET_KEY_VAR", raising=False)
    assert parse_config(MINIMAL, ["qdrant.api_key_env=MY_UNSET_KEY_VAR"]).redacted_dict()["qdrant"]["api_key_env"] \
        == "MY_UNSET_KEY_VAR"


@pytest.mark.parametrize("value, expected", [("MY_KEY_2", "MY_KEY_2"), ("_k", "_k"), (None, None), ("", None),
                                             ("  ", None)])
def test_api_key_env_names_and_null_ok(value, expected):
    assert parse_config(with_section("qdrant", api_key_env=value)).qdrant.api_key_env == expected


@pytest.mark.parametrize("value", ["${S3_ENDPOINT:-http://PLANTED:9000}", "${ AWS_PROFILE }", "x-${}-y",
                                   "${PLANTED-x}", "ok-${T_SET} then ${PLANTED:?}"])
def test_env_refs_other_than_name_form_rejected(monkeypatch, value):
    monkeypatch.setenv("T_SET", "PLANTED-set")
    msg = error_of(secret_data(client_kwargs={"endpoint_url": value}))
    assert "source.storage_options.client_kwargs.endpoint_url: only ${NAME} references" in msg
    assert "PLANTED" not in msg and value not in msg


def test_bad_env_ref_located_in_lists(monkeypatch):
    from pipelines.config_secrets import BadEnvRef, substitute_env

    with pytest.raises(BadEnvRef) as ei:
        substitute_env({"a": ["ok", "${B:-c}"]}, "storage_options", {})
    assert ei.value.where == "storage_options.a.1"


def test_dollar_text_that_is_no_reference_stays(monkeypatch):
    monkeypatch.setenv("T_SET", "v")
    so = parse_config(secret_data(password="pa$$w0rd$", user="$T_SET", half="x${y", lit="$${ not a ref }",
                                  both="${T_SET}$${A:-b}")).source.storage_options
    assert so == {"password": "pa$$w0rd$", "user": "$T_SET", "half": "x${y", "lit": "${ not a ref }",
                  "both": "v${A:-b}"}


def test_chunk_tokens_leave_room_for_the_instruction():
    # 64 for the template, then one token at most per UTF-8 byte of the (NFC) instruction.
    def data(instruction, max_length):
        return with_section("embedder", model="m", instruction=instruction, max_length=max_length)

    assert parse_config(data("x" * 100, 64 + 100 + 512)).expand.chunk_tokens == 512
    msg = error_of(data("x" * 100, 64 + 100 + 511))
    assert "expand.chunk_tokens: must be <= embedder.max_length - 64 - 100 = 511" in msg
    assert "embedder.instruction" in msg and "(got 512)" in msg
    assert "expand.chunk_tokens: must be <= embedder.max_length - 64 - 200 = " in error_of(data("é" * 100, 675))
    # NFC lengthens some characters (U+FB2C: 3 bytes, 6 after NFC): the normalized text is what is tokenised.
    assert "embedder.max_length - 64 - 600 = " in error_of(data("\ufb2c" * 100, 1000))
    # The default instruction is part of the 64.
    assert parse_config(data(None, 64 + 512)).expand.chunk_tokens == 512


def test_empty_yaml_keys_mean_their_defaults(tmp_path):
    p = write(tmp_path, """\
        source:
          uri: x
          include:
          storage_options:
            # key: ${AWS_ACCESS_KEY_ID}
        expand:
        limits:
        embedder:
          model: m
          mrl_dims:
          window_mib:
        compute:
        qdrant:
          path: q
          collection: c
        reranker:
          model:
        query:
        output:
        """)
    cfg = load_config(p)
    defaults = parse_config({"source": {"uri": "x"}, "embedder": {"model": "m"},
                             "qdrant": {"path": "q", "collection": "c"}})
    assert cfg == defaults
    assert (cfg.source.include, cfg.source.storage_options, cfg.embedder.mrl_dims) == ([], {}, [])
    assert cfg.embedder.window_mib is None and cfg.reranker.model is None  # null stays null where allowed
    # The same through overrides, and a required section left empty names its missing keys.
    cfg = parse_config(MINIMAL, ["expand=", "embedder.mrl_dims=null", "source.storage_options=~"])
    assert cfg.embedder.mrl_dims == [] and cfg.source.storage_options == {}
    assert "source.uri: required key missing" in error_of({**MINIMAL, "source": None})


def test_yaml_12_exponent_numbers(tmp_path):
    import yaml

    p = write(tmp_path, """\
        source: {uri: x}
        embedder: {model: m}
        qdrant: {path: q, collection: c, timeout_s: 1e2, retry_s: 2.5E-1}
        limits: {max_expand_s: 6e2, max_video_duration_s: .5e+4}
        """)
    cfg = load_config(p)
    assert (cfg.qdrant.timeout_s, cfg.qdrant.retry_s) == (100.0, 0.25)
    assert (cfg.limits.max_expand_s, cfg.limits.max_video_duration_s) == (600.0, 5000.0)
    cfg = parse_config(MINIMAL, ["qdrant.timeout_s=1e2", "limits.max_expand_s=6E2", "qdrant.collection=1e2"])
    assert (cfg.qdrant.timeout_s, cfg.limits.max_expand_s, cfg.qdrant.collection) == (100.0, 600.0, "1e2")
    assert yaml.safe_load("1e2") == "1e2"  # PyYAML's own loader is left as it was
    # Text keys keep it as text, in a file too: a collection name, a password (which became inf).
    p = write(tmp_path, """\
        source: {uri: x, storage_options: {password: 123e4567, token: 1e999}}
        embedder: {model: m, revision: 2e5}
        qdrant: {path: q, collection: 1e2}
        """)
    cfg = load_config(p)
    assert (cfg.qdrant.collection, cfg.embedder.revision) == ("1e2", "2e5")
    assert cfg.source.storage_options == {"password": "123e4567", "token": "1e999"}
    assert "must be a finite number" in error_of(with_section("limits", max_expand_s="1e999"))


def test_default_output_dir_follows_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert parse_config(MINIMAL).output.dir == os.path.join(os.getcwd(), "runs")


@pytest.mark.parametrize("attn", ["flash_attention_2", "flash_attention_3"])
def test_flash_attention_in_float32_is_refused(attn):
    msg = error_of(with_section("embedder", attn_implementation=attn, dtype="float32"))
    assert f"embedder.attn_implementation: {attn} runs in bfloat16 or float16 only, and dtype is float32" in msg
    for dtype in ("auto", "bfloat16", "float16"):  # auto is bfloat16 on the GPU flash attention needs
        assert parse_config(with_section("embedder", attn_implementation=attn, dtype=dtype)).embedder.dtype == dtype
