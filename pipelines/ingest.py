"""The ingestion job: list objects, skip unchanged ones, expand, embed in an actor pool, write to Qdrant.

    list (driver) -> expand (CPU tasks) -> embed (fixed actor pool) -> Qdrant datasink
                       \\______ failures become dead-letter rows, returned by the sink ______/

Everything that can be checked before work is checked before work, in this order: the
config, the model's config (dimension), the source (listed before anything is created),
the store (a server is pinged) and the collection (dimension, distance). Any of these
failing raises PreflightError (``preflight.py``) and nothing is written. What to embed, skip
and prune is decided by ``plan.py``.

A failure DURING the run (the store keeps failing, the cluster breaks) still writes the
report: objects whose points are all in the store count as ingested, every other object
to ingest gets a dead letter of stage ``write`` ("not written"), the report's ``error``
says why, and IngestError is raised (the CLI exits 3). A stop signal (SIGINT, SIGTERM)
during the run is accounted the same way, then raised as ``Interrupted`` (the CLI exits 130 /
143); one during the bookkeeping around the run waits for a safe point (``interrupts.py``).
Re-running finishes the job: complete objects are skipped, incomplete ones re-embedded (point
ids are deterministic).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import time
import uuid
import warnings
from datetime import datetime, timezone
from pathlib import Path
from collections.abc import Collection
from typing import Any, Callable

import ray
from ray.data.exceptions import SystemException

from operators.crash_journal import retries_needed, start_journal, stop_journal
from operators.embed_stage import EmbedStage
from operators.expand_stage import expand_work
from operators.expand_work import RECORDS_PER_TASK
from operators.media.expand import UNREACHABLE, ExpandSettings, most_units
from operators.media.listing import is_local_uri, list_objects, local_path
from operators.qwen3vl.media_io import is_fetch_failure
from operators.units import DeadLetter, SourceObject
from sinks.ingest_sink import IngestDatasink
from sinks.qdrant_client_factory import QdrantSettings, make_client
from sinks.qdrant_schema import CollectionSpec, ensure_collection
from sinks.qdrant_sink import StoreOpenError, start_owner, stop_owner
from sinks.qdrant_writer import QdrantWriter

from .actor_fit import ActorPool, check_pools_fit
from .config import Config
from .config_secrets import REDACTED, redact
from .expand_plan import MAX_WORK_BLOCKS, merge_ranges, split_manifests, work_rows
from .interrupts import Interrupted, SignalGate, defer_signals, deferral_ends_on_error, stop_on_signals
from .plan import PRUNE_REFUSED, Plan, plan_objects, settings_digest, source_root, unlisted_entries, with_settings
from .preflight import (PreflightError, check_attention, check_ray_address, check_workers_see_env, collection_spec,
                        embedded_store_error, embedding_checkpoint, ensure_folder, first_line,
                        gpu_nodes_without_package)
from .ray_processes import note_started_here
from .report import RunReport

logger = logging.getLogger(__name__)


class IngestError(RuntimeError):
    """The run started but stopped on an infrastructure error; the report says what was written."""


def qdrant_settings(cfg: Config) -> QdrantSettings:
    """Client settings from the qdrant section."""
    return QdrantSettings(url=cfg.qdrant.url, path=cfg.qdrant.path, api_key_env=cfg.qdrant.api_key_env,
                          timeout_s=cfg.qdrant.timeout_s)


def check_cluster(cfg: Config) -> None:
    """Raise PreflightError when the Ray cluster the run would join does not answer (none named: nothing to check)."""
    if cfg.compute.ray_address is not None:
        check_ray_address(cfg.compute.ray_address)
    elif os.environ.get("RAY_ADDRESS"):  # ray.init(address=None) joins it
        check_ray_address(os.environ["RAY_ADDRESS"], key="the RAY_ADDRESS environment variable")


UNFINISHED = ("the run did not finish: its process ended before it wrote this report (the Ray cluster "
              "was lost, or the process was killed); re-run the same job to finish (complete objects are skipped)")


def check_workers_hold_api_key(cfg: Config) -> None:
    """PreflightError when this process holds the Qdrant server's API key and some Ray node's workers,
    which connect to the server themselves, do not."""
    if cfg.qdrant.url and cfg.qdrant.api_key():
        check_workers_see_env(cfg.qdrant.api_key_env, "qdrant.api_key_env")


def ensure_ray(cfg: Config) -> None:
    """Connect to the configured cluster, or start a local Ray."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    check_cluster(cfg)
    address = cfg.compute.ray_address
    if address is None and not os.environ.get("RAY_ADDRESS"):
        # ray.init(address=None) joins a cluster that `ray start` left running on this machine (someone
        # else's, with other resources, or one that goes away mid-run); the config promises a local Ray.
        address = "local"
    try:
        ray.init(address=address, include_dashboard=False, log_to_driver=True)
    except ConnectionError as exc:  # the cluster went away since the check, or could not be found
        key = "compute.ray_address" if cfg.compute.ray_address else "the RAY_ADDRESS environment variable"
        raise PreflightError(f"{key}: cannot connect to the Ray cluster: {first_line(exc)}") from None
    except SystemExit as exc:  # Ray's handler of a SIGTERM during its start: sys.exit(signum)
        if exc.code != signal.SIGTERM:
            raise
        ray.shutdown()  # the processes it had started, which would outlive this one
        raise Interrupted(signal.SIGTERM, "interrupted by SIGTERM while Ray was starting; nothing was "
                          "written") from None
    if address == "local":
        note_started_here()  # the CLI shuts it down at the end, leaving no process of it behind
    # Until the job's own handlers (stop_on_signals), a stop signal waits for them: the job then
    # stops at its first safe point (exit 143, one line), not with Ray's sys.exit(15) and no word.
    defer_signals()


def server_client(cfg: Config) -> Any:
    """A client of the configured Qdrant server, checked to answer (PreflightError if it does not)."""
    settings, secrets = qdrant_settings(cfg), cfg.secret_values()
    try:
        client = make_client(settings)
    except Exception as exc:
        raise PreflightError(redact(f"qdrant.url {settings.url}: cannot create a client: {exc}", secrets)) from None
    try:
        client.get_collections()  # cheap reachability and authentication check
    except Exception as exc:
        client.close()
        # A job started by `ray job submit` runs on the head node, with its environment, not the shell's.
        shown = cfg.qdrant.shown_api_key_env()
        name = shown if shown != REDACTED else "the variable that qdrant.api_key_env names"
        unset = (f" ({name} is not set in this process's environment: no API key was sent)"
                 if cfg.qdrant.api_key_env and not cfg.qdrant.api_key() else "")
        raise PreflightError(redact(f"qdrant.url {settings.url} is unreachable or refused the "
                                    f"request: {type(exc).__name__}: {first_line(exc)}{unset}", secrets)) from None
    return client


def run_folders(cfg: Config) -> dict[str, str]:
    """The folders a run writes (config key -> path): output.dir, and qdrant.path when embedded."""
    return {"output.dir": cfg.output.dir, **({"qdrant.path": cfg.qdrant.path} if cfg.qdrant.embedded else {})}


def run_folders_in_source(cfg: Config) -> list[str]:
    """A line for each folder the run writes that lies inside its local source (the listing leaves it out)."""
    if not is_local_uri(cfg.source.uri):
        return []
    root = os.path.realpath(local_path(cfg.source.uri))
    return [f"{key} {path} lies inside the source: it is not listed" for key, path in run_folders(cfg).items()
            if os.path.realpath(path).startswith(root.rstrip(os.sep) + os.sep)]


def list_source(cfg: Config) -> tuple[list[SourceObject], list[DeadLetter]]:
    """The source's objects, fingerprinted with the settings digest, and what could not be listed."""
    # With source.uri "." and the default output.dir "runs", each run's dead_letters.jsonl would be
    # parsed as a manifest by the next run (its letters doubling each run) and the embedded store's
    # files listed as sources: the run's own folders are never listed.
    for line in run_folders_in_source(cfg):
        logger.info("%s", line)
    try:
        objects, dead = list_objects(cfg.source.uri, cfg.source.include, cfg.source.exclude,
                                     dict(cfg.source.storage_options), skip=list(run_folders(cfg).values()))
    except Exception as exc:
        raise PreflightError(f"source.uri {cfg.source.uri!r} cannot be listed: {type(exc).__name__}: "
                             f"{redact(str(exc), cfg.secret_values())}") from None
    return with_settings(objects, settings_digest(cfg)), dead


def open_owner(settings: QdrantSettings, collection: str, writer_kwargs: dict[str, Any] | None = None) -> Any:
    """The embedded store's owner actor, or PreflightError naming qdrant.path when it cannot open the store."""
    try:
        return start_owner(settings, collection, writer_kwargs)
    except StoreOpenError as exc:
        raise PreflightError(embedded_store_error(settings.path, exc)) from None


class Store:
    """The job's handle on Qdrant: an owner actor in embedded mode, a client in server mode."""

    def __init__(self, cfg: Config) -> None:
        self.settings = qdrant_settings(cfg)
        self.collection = cfg.qdrant.collection
        writer_kwargs = {"max_points_per_request": cfg.qdrant.upsert_batch, "retry_s": cfg.qdrant.retry_s}
        self.writer_kwargs = writer_kwargs
        if self.settings.embedded:  # its folder was made by run_ingest's preflight (ensure_folder)
            self.owner = open_owner(self.settings, self.collection, writer_kwargs)
            self.writer = None
        else:
            self.owner = None
            self.writer = QdrantWriter(server_client(cfg), self.collection, **writer_kwargs)

    def call(self, method: str, *args: Any) -> Any:
        """Run a store operation in the owner (embedded) or locally (server)."""
        if self.owner is not None:
            return ray.get(getattr(self.owner, method).remote(*args))
        if method == "ensure_collection":
            return ensure_collection(self.writer.client, *args)
        return getattr(self.writer, method)(*args)

    def call_reopening(self, method: str, *args: Any) -> Any:
        """As call; in embedded mode, once more through a fresh owner if the owner died (an OOM kill, say):
        the folder's lock died with it, and what it wrote is on disk."""
        try:
            return self.call(method, *args)
        except ray.exceptions.RayActorError:
            if self.owner is None:
                raise
            try:
                ray.kill(self.owner)
            except Exception:  # gone already
                pass
            self.owner = None  # close() must not stop a dead owner if the new one cannot open the store
            self.owner = open_owner(self.settings, self.collection, self.writer_kwargs)
            return self.call(method, *args)

    def sink(self, spec: CollectionSpec) -> IngestDatasink:
        """The datasink writing into this store."""
        return IngestDatasink(self.settings, self.collection, self.owner, spec=spec, writer_kwargs=self.writer_kwargs)

    def close(self) -> None:
        """Release the embedded folder lock or the server connection."""
        if self.owner is not None:
            try:
                stop_owner(self.owner)
            except Exception as exc:  # the owner is gone already (crashed, or never opened the folder)
                logger.warning("closing the embedded store's owner: %s", type(exc).__name__)
            self.owner = None
        if self.writer is not None:
            self.writer.client.close()
            self.writer = None


def num_gpus_per_actor(cfg: Config) -> float:
    """GPUs per embedding actor: as configured, or 1 when the cluster has GPUs (0 = auto)."""
    return cfg.compute.effective_num_gpus(ray.cluster_resources().get("GPU", 0))


# Each expansion task holds a CPU: the embedding pool must leave one free, or nothing reaches it.
EXPAND_TASK_CPUS = 1


def embed_pool(cfg: Config) -> ActorPool:
    """The ingestion's embedding actor pool, as Ray will be asked for it."""
    return ActorPool("embedding", cfg.compute.embed_actors, cfg.compute.cpus_per_actor, num_gpus_per_actor(cfg))


def embedder_kwargs(cfg: Config, storage_options: dict[str, Any]) -> dict[str, Any]:
    """Qwen3VLEmbedder keyword arguments from the embedder section."""
    e = cfg.embedder
    kwargs: dict[str, Any] = dict(dtype=None if e.dtype == "auto" else e.dtype, max_length=e.max_length,
                                  min_pixels=e.min_pixels, max_pixels=e.max_pixels, total_pixels=e.total_pixels,
                                  fps=cfg.expand.video_fps, max_frames=cfg.expand.video_max_frames,
                                  token_budget=e.token_budget, max_batch_items=e.max_batch_items,
                                  window_mib=e.window_mib, prepare_processes=e.prepare_processes,
                                  attn_implementation=e.attn_implementation, storage_options=storage_options,
                                  revision=e.revision)
    if e.instruction:
        kwargs["default_instruction"] = e.instruction
    return kwargs


def expand_settings(cfg: Config) -> ExpandSettings:
    """Expansion settings from the expand and limits sections."""
    return ExpandSettings(chunk_tokens=cfg.expand.chunk_tokens, overlap_tokens=cfg.expand.overlap_tokens,
                          pdf_dpi=cfg.expand.pdf_dpi, max_pdf_pages=cfg.limits.max_pdf_pages,
                          video_segment_s=cfg.expand.video_segment_s,
                          max_video_duration_s=cfg.limits.max_video_duration_s,
                          max_object_bytes=cfg.limits.max_object_bytes,
                          max_image_pixels=cfg.limits.max_image_pixels)


def run_ingest(cfg: Config, prune: bool | None = None, echo: Callable[[str], None] = print) -> RunReport:
    """Run one ingestion of cfg's source into its collection; returns the report (also written to disk)."""
    started = time.perf_counter()
    run_id = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ") + "-" + uuid.uuid4().hex[:6]
    prune = cfg.prune if prune is None else prune
    secrets = cfg.secret_values()
    dim, commit = embedding_checkpoint(cfg.embedder.model, cfg.embedder.revision)
    spec = collection_spec(cfg, dim)
    # The source before the store: an unreachable source must not leave a new collection behind.
    objects, list_dead = list_source(cfg)
    ensure_folder("output.dir", cfg.output.dir, probe=True)  # now, not after every object is written
    if cfg.qdrant.embedded:
        ensure_folder("qdrant.path", cfg.qdrant.path)
    with deferral_ends_on_error():  # ensure_ray defers stop signals to the run's gate, below
        if cfg.qdrant.embedded:
            ensure_ray(cfg)  # the embedded store's owner is an actor
        store = Store(cfg)  # a server is pinged here, before Ray starts
        try:
            ensure_ray(cfg)
            check_workers_hold_api_key(cfg)
            check_pools_fit(cfg, [embed_pool(cfg)], EXPAND_TASK_CPUS, "the expansion tasks", echo)
            check_attention(cfg.embedder.attn_implementation, embed_pool(cfg).gpus, gpu_nodes_without_package)
        except BaseException:
            store.close()
            raise
    report = RunReport(run_id, cfg.qdrant.collection, cfg.source.uri,
                       cfg.embedder.checkpoint, commit,
                       config=cfg.redacted_dict())
    run_dir = Path(cfg.output.dir) / run_id

    def mark_started() -> None:
        # Ray ends the driver's process itself when it loses the cluster (its GCS) for 60 s, and the
        # kernel's OOM killer asks nobody either: no report would say the run never finished.
        report.error = UNFINISHED
        try:
            report.write(run_dir, cfg.output.report_file, cfg.output.dead_letter_file, secrets)
        except OSError:
            pass  # the final write reports a folder that cannot be written
        finally:
            report.error = None

    # After ray.init: its SIGTERM handler (an abort in Ray's core worker) is replaced for the run.
    with stop_on_signals() as gate:
        try:
            failure = _ingest(cfg, report, (objects, list_dead), spec, store, prune, gate, echo, mark_started)
        finally:
            store.close()
            report.wall_seconds = time.perf_counter() - started
        echo(redact(report.summary(), secrets))  # first: the console has it even if the folder fails
        try:
            report.write(run_dir, cfg.output.report_file, cfg.output.dead_letter_file, secrets)
        except OSError as exc:  # the folder filled up or turned read-only during the run
            echo(f"error: the report could not be written to {run_dir}: {exc.strerror or exc}")
            if failure is None:
                raise IngestError(f"output.dir {cfg.output.dir!r}: the run's report could not be written "
                                  f"({exc.strerror or exc}); the points are in the store") from None
        else:
            echo(f"report: {run_dir / cfg.output.report_file}")
        if failure is not None:
            not_written = sum(1 for d in report.dead_letters if d.get("stage") == "write")
            # A model the workers cannot load fails the same way on every re-run: say what to fix.
            advice = ("the embedding actors could not load the model: fix embedder.model / attn_implementation / "
                      "dtype for the workers, then re-run" if _model_load_failed(failure)
                      else "re-run the same job to finish (complete objects are skipped)")
            what = (f"{report.counts()['ingested']} objects were written completely, {not_written} were not "
                    f"(listed with stage 'write' in {run_dir / cfg.output.dead_letter_file}); {advice}")
            if isinstance(failure, Interrupted):
                raise failure.with_message(redact(f"{failure}: {what}", secrets)) from None
            raise IngestError(redact(f"the run stopped: {report.error}; {what}", secrets)) from None
        gate.raise_pending(f"interrupted: a stop signal came after the run had written everything "
                           f"(report: {run_dir / cfg.output.report_file})")
    return report


def _ingest(cfg: Config, report: RunReport, listing: tuple[list[SourceObject], list[DeadLetter]],
            spec: CollectionSpec, store: Store, prune: bool, gate: SignalGate,
            echo: Callable[[str], None], started: Callable[[], None] = lambda: None) -> BaseException | None:
    """Plan, run the stages, settle the store; fills the report; the failure that stopped the run, if any.

    started: called once the plan is made, before anything is written.
    """
    objects, list_dead = listing
    secrets = cfg.secret_values()
    try:
        notes = store.call("ensure_collection", spec)  # a mismatch stops here, before any work
    except Exception as exc:
        raise PreflightError(redact(_error_text(exc), secrets)) from exc
    for note in notes or ():
        echo(f"warning: {note}")
    for d in list_dead:
        report.objects[d.uri] = "failed"
        report.dead_letters.append(d.to_row())
    stored = store.call("fingerprints_by_uri")
    plan = plan_objects(objects, stored, source_root(cfg.source.uri), cfg.source.include,
                        cfg.source.exclude, unlisted_entries(list_dead))
    for uri in plan.unchanged:
        report.objects[uri] = "unchanged"
    unlisted = f", {len(list_dead)} could not be listed" if list_dead else ""
    echo(f"listed {len(objects)} objects: {len(plan.todo)} to ingest, {len(plan.unchanged)} unchanged{unlisted}")
    if not objects and not list_dead:  # a mistyped prefix or pattern looks like an empty source
        echo(f"warning: nothing under source.uri {cfg.source.uri!r} matched (check the prefix and "
             "source.include / source.exclude)")
    if prune and plan.vanished and plan.listed_nothing:
        echo(f"warning: {len(plan.vanished)} stored objects vanished, none pruned: {PRUNE_REFUSED}")
    if plan.todo:
        started()
        try:
            with gate.interruptible():  # only here: the bookkeeping below must not stop half-way
                summary = _run_dataset(cfg, plan.todo, spec, store, report.model_commit)
        except (Exception, Interrupted) as exc:  # the store or the cluster failed, or a stop signal: say what got written
            _account_stopped_run(report, plan.todo, store, exc)
            return exc
        _account(report, summary)
    # The bookkeeping after the writes. If the store fails here, the report is still written: each
    # step left undone leaves its objects incomplete or changed, so the next run does it again.
    try:
        if plan.todo:
            _settle_and_replace(report, summary, plan, store)
        if prune and plan.to_prune():
            store.call("delete_by_uri", plan.to_prune())
            report.pruned_objects = len(plan.to_prune())
    except Exception as exc:
        report.error = (f"{cause_name(exc)}: {_error_text(exc)} (in the bookkeeping after the "
                        "writes: settling unit counts, deleting replaced or pruned points)")
        return exc
    return None


def _settle_and_replace(report: RunReport, summary: dict[str, Any], plan: Plan, store: Store) -> None:
    """Settle partly embedded objects, delete the units changed objects no longer have, and the
    points of changed objects that now fail or are skipped."""
    settled = partly_embedded(summary, plan.todo, report)
    if settled:
        store.call("settle_object_units", settled)
    # Units of changed objects that the new version no longer has.
    replaced = {u: fp for u, fp in plan.changed.items() if report.objects.get(u) == "ingested"}
    if replaced:
        store.call("delete_stale", replaced)
    report.deleted_stale_objects = len(replaced)
    # An object that changed into something unreadable or unsupported: its old vectors are wrong
    # now. Only points of another version go: "changed" also holds an object stored incomplete at
    # its current version (a killed run, a record whose store was unreachable), whose points still
    # show what it holds, and a transient failure this run must not delete them.
    gone = {u: fp for u, fp in plan.changed.items() if report.objects.get(u) in ("failed", "skipped")}
    report.removed_failed_objects = store.call("delete_stale", gone) if gone else 0


def _model_load_failed(exc: BaseException) -> bool:
    """Whether a run failed because the model could not be loaded (locally or in an actor)."""
    cause = root_cause(exc)
    return type(cause).__name__ == "ModelLoadError" or "ModelLoadError" in str(cause)


_EXCEPTION_LINE = re.compile(r"^[\w.]*(Error|Exception)\b[^:\s]*: ")
_CHAINED = ("The above exception was the direct cause", "During handling of the above exception")
# Ray Data appends retry advice to a failed UDF's wrapper: it says nothing about what failed.
_ADVICE = re.compile(r"^(Failed to apply UDF transform after \d+/\d+ attempts|To change retry attempts, backoff)")


def _error_text(exc: BaseException, limit: int = 500) -> str:
    """The message of the real cause (see real_cause), cut to `limit` characters."""
    text = real_cause(exc)[1]
    return text if len(text) <= limit else text[: limit - 3] + "..."


def cause_name(exc: BaseException) -> str:
    """The type name of the real cause (see real_cause)."""
    return real_cause(exc)[0]


def real_cause(exc: BaseException) -> tuple[str, str]:
    """(type name, message) of what started it all: the root cause; behind Ray Data's UserCodeException,
    the remote exception it wraps; for a Ray error carrying a remote traceback, the remote exception's
    own message (its last "SomeError: ..." line, other than Ray Data's wrapper, and the lines that continue it)."""
    chain = _cause_chain(exc)
    cause = chain[-1]
    # Behind Ray Data's wrapper, or an exception that could not be unpickled here, the real cause
    # stayed in the worker: read it off the traceback text.
    if isinstance(cause, (ray.exceptions.UserCodeException, ray.exceptions.UnserializableException)):
        for link in reversed(chain):
            found = _remote_exception(str(link))
            if found is not None:
                name, message = found
                return name.rsplit(".", 1)[-1], message
    text = str(cause).strip()
    if isinstance(cause, ray.exceptions.RayError) and "\n" in text:
        found = _remote_exception(text)
        lines = _message_lines(text)
        text = ": ".join(found) if found is not None else lines[-1] if lines else ""
    elif "\n" in text:  # e.g. an HTTP error with the response body after its first line
        text = text.splitlines()[0].strip()
    return type(cause).__name__, text


def _message_lines(text: str) -> list[str]:
    """The non-blank lines of an error's text, less Ray Data's retry advice."""
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not _ADVICE.match(line)]


def _remote_exception(text: str) -> tuple[str, str] | None:
    """(type as written, message) of the last exception in a traceback's text that is not Ray Data's
    UserCodeException wrapper; None when there is none."""
    lines = _message_lines(text)
    starts = [i for i, line in enumerate(lines)
              if _EXCEPTION_LINE.match(line) and "UserCodeException" not in line.split(":", 1)[0]]
    if not starts:
        return None
    end = next((j for j in range(starts[-1] + 1, len(lines))  # the message ends where a chained exception begins
                if lines[j].startswith(_CHAINED) or _EXCEPTION_LINE.match(lines[j])), len(lines))
    name, _, message = " ".join(lines[starts[-1]:end]).partition(": ")
    return name, message


def root_cause(exc: BaseException) -> BaseException:
    """The exception that started it all, through Ray's task-error wrappers and `raise ... from` chains."""
    return _cause_chain(exc)[-1]


def _cause_chain(exc: BaseException) -> list[BaseException]:
    """`exc` and its causes, outermost first, through Ray's task-error wrappers and `raise ... from` chains."""
    chain = [exc]
    while True:
        nxt = getattr(exc, "cause", None) if isinstance(exc, ray.exceptions.RayTaskError) else None
        nxt = nxt if isinstance(nxt, BaseException) else exc.__cause__
        if nxt is None or isinstance(nxt, SystemException) or any(nxt is c for c in chain):
            return chain  # SystemException: Ray Data's empty marker for non-user errors
        chain.append(nxt)
        exc = nxt


def _account_stopped_run(report: RunReport, todo: list[Any], store: Store, exc: BaseException) -> None:
    """After a mid-run failure: objects fully in the store are ingested, every other one is "not written";
    the points written are those of the run's objects, in their new version, found in the store."""
    cause = cause_name(exc)
    report.error = f"{cause}: {_error_text(exc)}"
    try:
        stored = store.call_reopening("stored_objects", [o.uri for o in todo])
    except Exception as read_exc:  # the store may be down altogether
        stored = None
        report.error += f" (the store could not be read afterwards: {type(read_exc).__name__})"
    finished: dict[str, str] = {}  # changed objects whose new version is all there beside old points
    for obj in todo:
        held = stored.get(obj.uri) if stored is not None else None
        # The sink's own count died with the run: count this version's points in the store instead.
        for modality, n in (held.points_of(obj.fingerprint) if held is not None else {}).items():
            report.points_written += n
            report.points_per_modality[modality] = report.points_per_modality.get(modality, 0) + n
        if held is not None and held.complete(obj.fingerprint):
            report.objects[obj.uri] = "ingested"
            if held.fingerprint() != obj.fingerprint:
                finished[obj.uri] = obj.fingerprint
            continue
        report.objects[obj.uri] = "failed"
        what = ("maybe not written (the store could not be checked)" if stored is None else
                "not written" if held is None or not held.points_of(obj.fingerprint) else
                "not complete (its unit count is settled, and its failed units reported, when a run ends)")
        report.dead_letters.append({"uri": obj.uri, "position": None, "stage": "write",
                                    "error_type": cause,
                                    "message": f"{what}: the run stopped on {report.error}; re-run to finish"})
    if finished:
        # Their old version's surplus units (an object that changed to fewer units) would answer
        # queries until the next run, which would then embed the whole object again.
        try:
            report.deleted_stale_objects = store.call_reopening("delete_stale", finished)
        except Exception:  # the store is down: they stay incomplete, and the next run does them again
            pass


# Ray Data retries a batch whose actor died forever: a batch that keeps killing its actor would
# loop. A stage without a crash journal gets five retries, room for an unrelated death or two;
# one with a journal gets retries_needed(batch size): every unit in it may crash a decoder.
BATCH_RETRIES = 5


def map_on_actor_pool(ds: Any, fn: type, *, actors: int, retries: int = BATCH_RETRIES, **kwargs: Any) -> Any:
    """ds.map_batches(fn) on a fixed pool of `actors` actors, restarted when they die; a batch is
    retried at most `retries` times."""
    with warnings.catch_warnings():
        # Ray 2.60 deprecates extra remote args but names no parameter for actor retries yet.
        warnings.filterwarnings("ignore", message=r"`ray_remote_args` is deprecated")
        return ds.map_batches(fn, compute=ray.data.ActorPoolStrategy(size=actors), max_restarts=-1,
                              max_task_retries=retries, **kwargs)


def may_outgrow_a_batch(todo: list[Any], cfg: Config, split: Collection[str] = (),
                        split_rows: int = RECORDS_PER_TASK + 1) -> bool:
    """Whether some object (or task over manifest records) may expand into more rows than one
    embedding call takes.

    split: the manifests whose records are expanded a few to a task (pipelines/expand_plan.py),
    in at most split_rows rows a task (unit or dead rows, and each range's status row).
    """
    settings = expand_settings(cfg)
    for obj in todo:
        bound = split_rows if obj.uri in split else most_units(obj.uri, obj.size, settings)
        if bound is None or bound >= cfg.compute.batch_size:  # its status row rides along
            return True
    return False


def _run_dataset(cfg: Config, todo: list[Any], spec: CollectionSpec, store: Store,
                 commit: str | None = None) -> dict[str, Any]:
    """Build and run the Ray Data pipeline over the objects to ingest; returns the sink's summary.

    commit: the hub commit the driver resolved embedder.revision to. Every worker loads that commit,
    not the branch or tag: one moved on the hub during the run would otherwise mix two models.
    """
    journal = start_journal()  # a file that crashes a decoder's process fails alone (crash_journal.py)
    try:
        return _run_stages(cfg, todo, spec, store, journal, commit or cfg.embedder.revision)
    finally:
        stop_journal(journal)


def _run_stages(cfg: Config, todo: list[Any], spec: CollectionSpec, store: Store, journal: Any,
                revision: str | None) -> dict[str, Any]:
    """The expansion and embedding stages into the store's sink, with the crash journal given to both."""
    storage_options = dict(cfg.source.storage_options)
    settings = expand_settings(cfg)
    split = split_manifests(todo, settings, storage_options, cfg.limits.max_expand_s, EXPAND_TASK_CPUS,
                            cfg.compute.prepare_concurrency, journal=journal)
    rows = work_rows(todo, split)
    blocks = min(len(rows), MAX_WORK_BLOCKS)
    split_rows = split.most_rows * -(-len(rows) // blocks)  # past MAX_WORK_BLOCKS, rows share a task
    ds = ray.data.from_items(rows, override_num_blocks=blocks)
    del rows  # in the object store now: the driver need not hold the records too
    split.work = []
    ds = ds.flat_map(expand_work, fn_kwargs=dict(
        settings=settings, storage_options=storage_options, model=cfg.embedder.model,
        revision=revision, model_id=cfg.embedder.checkpoint,
        dim=spec.full_dim, ingested_at=datetime.now(timezone.utc).isoformat(),
        crash_journal=journal, max_expand_s=cfg.limits.max_expand_s),
        num_cpus=EXPAND_TASK_CPUS, **({"concurrency": cfg.compute.prepare_concurrency} if cfg.compute.prepare_concurrency else {}))
    if may_outgrow_a_batch(todo, cfg, split.uris, split_rows):
        # One object can expand into a block of 50,000 rows (a manifest expanded whole, a huge text's
        # chunks), which one actor call would take whole: the other actors idle, nothing is written
        # until all of it is embedded, and a retry redoes all of it. Blocks of one embedding call's
        # rows stream. Only then: the re-cut is a stage of its own (Ray Data fuses it only after a
        # map_batches), whose tasks cost a 2-core CPU ingestion about 2 CPU-s (bench/RESULTS.md).
        ds = ds.repartition(target_num_rows_per_block=cfg.compute.batch_size)
    pool = embed_pool(cfg)  # as checked before the run (check_pools_fit)
    # A crashed or killed embedding actor is restarted and its in-flight batch retried (upserts are
    # idempotent: a retried batch never duplicates).
    ds = map_on_actor_pool(
        ds, EmbedStage, actors=pool.actors, retries=retries_needed(cfg.compute.batch_size),
        fn_constructor_kwargs=dict(model=cfg.embedder.model, mrl_dims=list(cfg.embedder.mrl_dims),
                                   embedder_kwargs={**embedder_kwargs(cfg, storage_options), "revision": revision},
                                   crash_journal=journal, max_batch_s=cfg.limits.max_embed_batch_s),
        batch_size=cfg.compute.batch_size, batch_format="numpy", num_gpus=pool.gpus, num_cpus=pool.cpus)
    # Streaming with a fixed memory bound: Ray Data's default lets a dataset buffer up to half the
    # object store (GBs on a big node), so a fast expand stage would run that far ahead of the
    # embedder and memory would grow with the corpus up to there. A few embedding batches in
    # flight per actor keep it fed; more only costs memory.
    options = ds.context.execution_options
    limit = min(options.resource_limits.object_store_memory, cfg.compute.inflight_bytes(pool.gpus))
    options.resource_limits = options.resource_limits.copy(object_store_memory=limit)
    sink = store.sink(spec)
    ds.write_datasink(sink)
    return merge_ranges(sink.summary or {}, split.uris, split.seconds)


def partly_embedded(summary: dict[str, Any], todo: list[Any], report: RunReport) -> dict[str, tuple[str, int]]:
    """(fingerprint, units stored) of each ingested object some of whose units failed for good, at
    expansion (a bad manifest record) or embedding (a segment the decoder rejects). Objects with a
    unit that may work next time (a file not fetched, a record's store not reached) are left out:
    they stay incomplete, so the next run embeds them again."""
    failed: dict[str, int] = {}
    retry: set[str] = set()
    lettered: set[str] = set()
    for dead in summary.get("dead", []):
        if not dead.get("position") or dead.get("error_stage") not in ("expand", "embed"):
            continue
        # An expansion letter: its unit counted in object_units (expand_stage.py), not in n_units.
        lettered.add(dead["object_uri"])
        if dead.get("error_stage") == "embed":
            failed[dead["object_uri"]] = failed.get(dead["object_uri"], 0) + 1
            if is_fetch_failure(dead.get("error_message") or ""):
                retry.add(dead["object_uri"])  # the file could not be fetched: may well work next time
        elif dead.get("error_type") == UNREACHABLE:
            retry.add(dead["object_uri"])  # a record's media store was down: the next run reads it again
    fingerprints = {o.uri: o.fingerprint for o in todo}
    units = {o["object_uri"]: int(o["n_units"]) for o in summary.get("objects", [])}
    return {uri: (fingerprints[uri], units[uri] - failed.get(uri, 0)) for uri in sorted(lettered)
            if report.objects.get(uri) == "ingested" and uri in fingerprints and uri in units and uri not in retry}


def _account(report: RunReport, summary: dict[str, Any]) -> None:
    """Fold the sink's summary into the report: every processed object ends as one status."""
    per_object = summary.get("points_per_object", {})
    report.points_written += int(summary.get("points", 0))
    for modality, n in summary.get("points_per_modality", {}).items():
        report.points_per_modality[modality] = report.points_per_modality.get(modality, 0) + n
    for dead in summary.get("dead", []):
        report.dead_letters.append({"uri": dead["object_uri"], "position": dead["position"],
                                    "stage": dead["error_stage"], "error_type": dead["error_type"],
                                    "message": dead["error_message"]})
        if dead.get("position"):
            report.units_failed += 1
    for obj in summary.get("objects", []):
        uri, status = obj["object_uri"], obj["status"]
        if status == "skipped_unsupported":
            report.objects[uri] = "skipped"
        elif per_object.get(uri, 0) > 0:
            report.objects[uri] = "ingested"
        elif status == "ok" and obj["n_units"] == 0:
            report.objects[uri] = "ingested"  # nothing to embed in it, and nothing wrong with it
        else:
            report.objects[uri] = "failed"
    report.stage_seconds.update(summary.get("stage_seconds", {}))
    report.write_stats = {k: summary.get(k) for k in ("points", "requests", "retries", "tasks")}
