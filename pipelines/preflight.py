"""Checks made before an ingestion does any work: the model's checkpoint, the collection layout,
the folders the run writes to. Each failure is a PreflightError naming the config key (exit 2).
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Literal

from transformers import AutoConfig

from operators.qwen3vl.loading import checkpoint_id
from sinks.qdrant_schema import CollectionSpec
from sinks.qdrant_sink import StoreOpenError

from .config import Config


class PreflightError(RuntimeError):
    """The job cannot start: a configuration, model, store or source problem found before any work."""


RAY_GCS_PORT = 6379  # Ray's default for a bare host
RAY_CLIENT_PORT = 10001  # and for ray://host


def check_ray_address(address: str | None, timeout_s: float = 10.0, key: str = "compute.ray_address") -> None:
    """Raise PreflightError unless a Ray address (host:port or ray://host:port) accepts a connection.

    ray.init() retries an unreachable cluster for many minutes, ignoring SIGTERM meanwhile;
    one TCP connect answers in seconds. None (a local Ray) is not probed; "auto" is the cluster
    running on this machine (PreflightError when there is none). key: where the address comes
    from, for the message.
    """
    if address == "auto":
        address = _running_cluster(key)
    if address is None or address == "local" or ("://" in address and not address.startswith("ray://")):
        return  # other schemes are Ray's to interpret
    client = address.startswith("ray://")
    hostport = address[len("ray://"):] if client else address
    hostport = hostport.rstrip("/")
    if hostport.startswith("["):  # an IPv6 address, [::1] or [::1]:6379: its colons are no port
        host, _, rest = hostport[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else rest
    else:
        host, _, port = hostport.rpartition(":") if ":" in hostport else (hostport, "", "")
    host = host or "localhost"
    try:
        port_number = int(port) if port else (RAY_CLIENT_PORT if client else RAY_GCS_PORT)
    except ValueError:
        raise PreflightError(f"{key} {address!r}: {port!r} is not a port number") from None
    try:
        socket.create_connection((host, port_number), timeout=timeout_s).close()
    except OSError as exc:
        raise PreflightError(f"{key} {address!r}: cannot connect to {host}:{port_number} "
                             f"({type(exc).__name__}: {exc}); is the Ray cluster up and reachable?") from None


def nodes_without_env(name: str, timeout_s: float = 60.0) -> list[str]:
    """The alive Ray nodes (by address) whose workers, in this job's runtime environment, do not see
    the environment variable `name`; nodes that do not answer within timeout_s are left out."""

    def has_env(var: str) -> bool:
        import os  # a nested function travels by value: a worker imports nothing of this project for it

        return bool(os.environ.get(var))

    return _nodes_where_false(has_env, name, timeout_s)


def gpu_nodes_without_package(package: str, timeout_s: float = 60.0) -> list[str]:
    """The alive Ray nodes with GPUs (by address) whose workers cannot find the Python package `package`."""

    def has_package(name: str) -> bool:
        import importlib.util

        return importlib.util.find_spec(name) is not None

    return _nodes_where_false(has_package, package, timeout_s, gpu_only=True)


def _nodes_where_false(fn: Callable[[str], bool], arg: str, timeout_s: float, gpu_only: bool = False) -> list[str]:
    """The alive nodes (by address) where fn(arg), run by a worker of this job, is false; silent ones left out."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = ray.remote(num_cpus=0, max_retries=0)(fn)  # no CPU: runs on a node with none free too
    nodes = [n for n in ray.nodes() if n.get("Alive") and (not gpu_only or n.get("Resources", {}).get("GPU", 0) > 0)]
    refs = [probe.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(arg)
            for n in nodes]
    ready, _ = ray.wait(refs, num_returns=len(refs), timeout=timeout_s)
    answered = set(ready)
    missing = []
    for node, ref in zip(nodes, refs):
        if ref in answered:
            try:
                if not ray.get(ref):
                    missing.append(f"{node.get('NodeManagerAddress', '?')} (node {node['NodeID'][:8]})")
            except Exception:  # a node that went away meanwhile: nothing to say about it
                pass
    return sorted(missing)


# The package transformers requires before it loads a model with each flash-attention kernel.
FLASH_PACKAGES = {"flash_attention_2": "flash_attn", "flash_attention_3": "flash_attn_3"}
ATTN_KEY = "embedder.attn_implementation"


def check_attention(attn: str | None, gpus: float, lacking: Callable[[str], list[str]]) -> None:
    """PreflightError when flash attention is asked of actors that run on CPUs, or where its package is missing.

    gpus: GPUs per actor; lacking(package): where the package is missing (nodes, or this machine).
    Else every actor fails to load the model, after the run has started and created its collection.
    """
    package = FLASH_PACKAGES.get(attn or "")
    if package is None:
        return
    if gpus <= 0:
        raise PreflightError(f"{ATTN_KEY}: {attn} runs on GPUs only, and the actors would run on CPUs (the "
                             "cluster has no GPU, or compute.num_gpus_per_actor is 0): use sdpa, or null")
    missing = lacking(package)
    if missing:
        raise PreflightError(f"{ATTN_KEY}: {attn} needs the {package} package, which the Ray workers on "
                             f"{', '.join(missing)} cannot import: install it there, or use sdpa")


def check_workers_see_env(name: str, key: str) -> None:
    """PreflightError naming the Ray nodes whose workers lack `name`, which this process holds.

    The workers read it themselves (a secret travels in no task argument), and nothing carries this
    process's environment to the nodes of a cluster it joins: not `ray job submit`, whose entrypoint
    runs on the head node, nor a driver outside the cluster. Without the check, every write would
    fail on those nodes, unauthenticated, after the run had embedded its batches.
    """
    missing = nodes_without_env(name)
    if missing:
        raise PreflightError(
            f"{key}: {name} is set here but not for the Ray workers on {', '.join(missing)}: the workers "
            f"read it themselves. Set it in those nodes' environment (the cluster's node or pod spec), or "
            f"for the job: ray job submit --runtime-env-json '{{\"env_vars\": {{\"{name}\": \"...\"}}}}'")


def _running_cluster(key: str) -> str | None:
    """The address "auto" stands for (host:port), or PreflightError when no Ray cluster runs on this machine.

    ray.init("auto") would fail the same way, but only after the store and folders were opened.
    None: Ray's discovery could not be asked (a private API); ray.init will say.
    """
    try:
        from ray._private.services import canonicalize_bootstrap_address
    except ImportError:
        return None
    try:
        found = canonicalize_bootstrap_address("auto")
    except ConnectionError:  # Ray's way of saying it found none
        found = None
    except Exception as exc:  # a malformed RAY_ADDRESS or cluster file: ray.init says the same
        raise PreflightError(f"{key} 'auto': {type(exc).__name__}: {exc}") from None
    if found is None:
        raise PreflightError(f"{key} 'auto': no running Ray cluster found on this machine; start one "
                             "(`ray start --head`), give its address, or leave compute.ray_address empty "
                             "for a local Ray")
    return found


def model_dimension(model: str, revision: str | None = None) -> int:
    """The embedding dimension (text hidden size) of an Embedding checkpoint, from its config; PreflightError
    when it does not load, lacks its weights or is a Reranker checkpoint."""
    return embedding_checkpoint(model, revision)[0]


def embedding_checkpoint(model: str, revision: str | None = None) -> tuple[int, str | None]:
    """(dimension, hub commit) of an Embedding checkpoint, checked as model_dimension does; the commit
    that `revision` (None: the default branch) resolves to now, None for a local folder."""
    check_local_checkpoint_exists("embedder.model", model)
    try:
        config = AutoConfig.from_pretrained(model, revision=revision)
    except Exception as exc:
        raise PreflightError(f"embedder.model {checkpoint_id(model, revision)!r} cannot be loaded: "
                             f"{type(exc).__name__}: {one_line(exc)}") from exc
    text_config = getattr(config, "text_config", config)
    check_local_weights(model)
    check_checkpoint_kind("embedder.model", model, "embedding", revision=revision)
    return int(text_config.hidden_size), hub_commit(model, config)


def hub_commit(model: str, config: Any) -> str | None:
    """The hub commit a loaded config came from; None for a local folder."""
    # transformers reads the commit off the cached snapshot's path (snapshots/<commit>/config.json).
    return None if os.path.isdir(model) else getattr(config, "_commit_hash", None)


def looks_like_a_path(model: str) -> bool:
    """Whether a model name can only be a local path: a hub id is exactly `org/name`."""
    return model.startswith(("/", "./", "../", "~")) or model.count("/") > 1 or (os.sep != "/" and os.sep in model)


def check_local_checkpoint_exists(key: str, model: str) -> None:
    """Raise PreflightError naming the key when a model that can only be a local path names no folder.

    transformers would try it as a hub id, and answer with a paragraph about huggingface.co.
    """
    if looks_like_a_path(model) and not os.path.isdir(os.path.expanduser(model)):
        what = "is not a folder" if os.path.exists(os.path.expanduser(model)) else "does not exist"
        raise PreflightError(f"{key} {model!r} cannot be loaded: no such checkpoint folder (the path {what})")


def one_line(exc: BaseException | str) -> str:
    """An exception's message on one line (transformers' messages run over several)."""
    return " ".join(str(exc).split())


def appends_end_token(tokenizer: Any) -> bool:
    """Whether a tokenizer appends a token of its own (an Embedding checkpoint's <|endoftext|>) to a text."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", truncation=False)["input_ids"]
    return len(full) > len(plain)


def check_checkpoint_kind(key: str, model: str, kind: Literal["embedding", "reranker"],
                          tokenizer: Any = None, revision: str | None = None) -> None:
    """Raise PreflightError naming the key when the checkpoint is the other kind than `kind`.

    An Embedding and a Reranker checkpoint share the architecture and config, and each loads
    as the other without a complaint, giving vectors or scores that mean nothing. Their tokenizers
    tell them apart: an Embedding checkpoint's appends <|endoftext|> (the token it pools), a
    Reranker's appends nothing (../shared/docs/model-contract.md).
    """
    name = checkpoint_id(model, revision)
    if tokenizer is None:
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model, revision=revision)
        except Exception as exc:
            raise PreflightError(f"{key} {name!r} cannot be loaded: its tokenizer: {type(exc).__name__}: "
                                 f"{first_line(exc)}") from None
    is_embedding = appends_end_token(tokenizer)
    if kind == "embedding" and not is_embedding:
        raise PreflightError(f"{key} {name!r} is not a Qwen3-VL-Embedding checkpoint (a Reranker one?): its "
                             "tokenizer appends no <|endoftext|> token to pool; give an Embedding checkpoint")
    if kind == "reranker" and is_embedding:
        raise PreflightError(f"{key} {name!r} is a Qwen3-VL-Embedding checkpoint, not a Reranker: its tokenizer "
                             "appends the <|endoftext|> an embedder pools; give a Reranker checkpoint")


_WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def check_local_weights(model: str) -> None:
    """A local checkpoint folder must hold its weights (every shard of an index), else PreflightError.

    Found here, before Ray starts and the collection is created; otherwise every embedding actor
    fails to load it mid-run. Hub ids are left to the actors (their files may not be cached yet).
    """
    if not os.path.isdir(model):
        return
    for index in _WEIGHT_INDEXES:
        path = os.path.join(model, index)
        if os.path.isfile(path):
            try:
                with open(path, encoding="utf-8") as f:
                    shards = set(json.load(f)["weight_map"].values())
            except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
                raise PreflightError(f"embedder.model {model!r}: unreadable weight index {index}: "
                                     f"{type(exc).__name__}: {exc}") from None
            missing = sorted(s for s in shards if not os.path.isfile(os.path.join(model, s)))
            if missing:
                raise PreflightError(f"embedder.model {model!r}: weight shards listed in {index} are missing: "
                                     f"{', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''}")
            _check_safetensors_headers(model, sorted(shards))
            return
    if not any(os.path.isfile(os.path.join(model, name)) for name in _WEIGHT_FILES):
        raise PreflightError(f"embedder.model {model!r} holds no weights: none of {', '.join(_WEIGHT_FILES)} "
                             f"or {', '.join(_WEIGHT_INDEXES)}")
    _check_safetensors_headers(model, ["model.safetensors"])


def _check_safetensors_headers(model: str, names: Iterable[str]) -> None:
    """Each safetensors file's header must cover the file: a truncated copy fails here, not in every actor."""
    from safetensors import safe_open

    for name in names:
        path = os.path.join(model, name)
        if not (name.endswith(".safetensors") and os.path.isfile(path)):
            continue
        try:
            with safe_open(path, framework="pt"):
                pass
        except Exception as exc:
            raise PreflightError(f"embedder.model {model!r}: {name} is unreadable (truncated or corrupt?): "
                                 f"{first_line(exc)}") from None


def collection_spec(cfg: Config, full_dim: int) -> CollectionSpec:
    """The collection layout the config asks for."""
    for d in cfg.embedder.mrl_dims:
        if d >= full_dim:
            raise PreflightError(f"embedder.mrl_dims: {d} must be smaller than the model's dimension {full_dim} "
                                 "(the full vector is always stored)")
    return CollectionSpec(name=cfg.qdrant.collection, full_dim=full_dim, mrl_dims=tuple(cfg.embedder.mrl_dims),
                          full_datatype=cfg.qdrant.full_datatype, on_disk=cfg.qdrant.on_disk,
                          quantization=cfg.qdrant.quantization)


def check_not_a_file(key: str, path: str) -> None:
    """Raise PreflightError naming the key when the folder it names exists as something else, or
    lies where Ray deletes it (job_copy_error)."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise PreflightError(f"{key} {path!r} is a file, not a folder")
    error = job_copy_error(path)
    if error:
        raise PreflightError(f"{key} {path!r} {error}")


# Where Ray unpacks a job's working_dir (<session>/runtime_resources/working_dir_files/<package>/),
# the folder `ray job submit --working-dir` runs the driver in.
_RAY_WORKING_DIR_COPIES = ("runtime_resources", "working_dir_files")


def job_copy_error(path: str) -> str | None:
    """Why a path to write cannot be used when it lies in Ray's copy of a job's working_dir; else None."""
    parts = Path(os.path.realpath(os.path.expanduser(path))).parts
    if not any(parts[i:i + 2] == _RAY_WORKING_DIR_COPIES for i in range(len(parts) - 1)):
        return None
    # A relative path in a config lands there, and Ray deletes those copies: the report, the
    # results or an embedded store written there would be lost after the job.
    return ("lies in Ray's temporary copy of the job's working_dir, which Ray deletes (a relative path "
            "resolves there under `ray job submit --working-dir`): give an absolute path outside it (~ allowed)")


_PROBE_BYTES = 65536  # about what a run's report takes: a full disk fails here


def ensure_folder(key: str, path: str, probe: bool = False) -> None:
    """Create the folder a config key names, or raise PreflightError naming the key.

    probe: also write and remove a small file there, so that a read-only or full folder is found
    now rather than after the whole run (a report that cannot be written loses its dead letters).
    """
    check_not_a_file(key, path)
    try:
        Path(path).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise PreflightError(f"{key} {path!r} cannot be created: {exc.strerror or exc}") from None
    if probe:
        try:
            with tempfile.TemporaryFile(dir=path, prefix=".qvl-probe-") as fh:
                fh.write(b"\0" * _PROBE_BYTES)
                fh.flush()
        except OSError as exc:
            raise PreflightError(f"{key} {path!r} cannot be written: {exc.strerror or exc}") from None


def check_writable(key: str, path: str) -> None:
    """Raise PreflightError naming the key when this process could not create or write the folder path
    (its nearest existing folder is not writable); nothing is created."""
    check_not_a_file(key, path)
    existing = Path(os.path.abspath(path))
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if existing.is_dir() and not os.access(existing, os.W_OK | os.X_OK):
        raise PreflightError(f"{key} {path!r} cannot be written: {existing} is not writable")


def embedded_store_error(path: str, exc: BaseException) -> str:
    """The message for an embedded store (qdrant.path) that cannot be opened."""
    # The usual cause is another process holding it (a running ingestion).
    hint = (" (an embedded store admits one process at a time: wait for the other one, e.g. a running "
            "ingestion, or use a Qdrant server)" if "already accessed" in str(exc) else "")
    # The owner actor's StoreOpenError carries its cause's type and message.
    kind, text = (exc.cause_type, exc.message) if isinstance(exc, StoreOpenError) else (type(exc).__name__, str(exc))
    return f"qdrant.path {path!r} cannot be opened: {kind}: {first_line(text)}{hint}"


def open_embedded_store(path: str) -> Any:
    """A client of the embedded store in the existing folder path (qdrant.path), or PreflightError."""
    from qdrant_client import QdrantClient

    try:
        return QdrantClient(path=path)
    except Exception as exc:
        raise PreflightError(embedded_store_error(path, exc)) from None


def first_line(exc: BaseException | str) -> str:
    """The first line of an exception's message (or of a text)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""
