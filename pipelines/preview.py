"""`qvl ingest --plan`: what a run would do, read-only.

A scheduled ingestion over a large prefix is expensive to start by mistake: a changed model or
chunking setting re-embeds every object, a wrong prefix with ``--prune`` deletes another
source's points. The plan is computed exactly as the run computes it (the same listing,
fingerprints with the settings digest, the same store read and ``plan_objects``) and the same
preflight checks stop it (a bad checkpoint, source or store, a collection of another layout),
but nothing is embedded, created or written, and Ray is not started: an embedded store is
opened in this process, read-only in effect (a missing store folder is not created).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass, field
from typing import Any

from operators.media.listing import shown_path
from operators.units import DeadLetter
from sinks.qdrant_schema import CollectionMismatchError, storage_differences, validate_collection
from sinks.qdrant_writer import QdrantWriter

from .actor_fit import ActorPool, check_pools_fit, joins_cluster, local_node
from .config import Config
from .config_secrets import redact
from .ingest import EXPAND_TASK_CPUS, check_cluster, list_source, run_folders_in_source, server_client
from .plan import PRUNE_REFUSED, Plan, plan_objects, source_root, unlisted_entries
from .preflight import (PreflightError, check_attention, check_not_a_file, check_writable, collection_spec, first_line,
                        model_dimension, open_embedded_store)


@dataclass
class PlanPreview:
    """What an ingestion run would do: its plan, what could not be listed, and notes on the store."""

    collection: str
    store: str
    listed: int
    plan: Plan
    unlisted: list[DeadLetter]
    prune: bool
    collection_exists: bool
    notes: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Objects per outcome: new, changed, unchanged, could not be listed, vanished."""
        changed = len(self.plan.changed)
        return {"new": len(self.plan.todo) - changed, "changed": changed, "unchanged": len(self.plan.unchanged),
                "unlisted": len(self.unlisted), "vanished": len(self.plan.vanished)}

    def lines(self, limit: int = 10) -> list[str]:
        """The console report; at most `limit` URIs per kind."""
        c = self.counts()
        created = "" if self.collection_exists else " (does not exist yet: the run creates it)"
        if self.plan.vanished and self.plan.listed_nothing:
            vanished = f"their points are kept: {PRUNE_REFUSED}"
        else:
            vanished = ("their points are deleted (--prune)" if self.prune
                        else "their points are kept; --prune deletes them")
        out = [f"plan for collection {self.collection!r}{created} in {self.store}: {self.listed} objects listed",
               f"  to embed {len(self.plan.todo)} (new {c['new']}, changed {c['changed']}), "
               f"unchanged {c['unchanged']}, could not be listed {c['unlisted']}",
               f"  vanished from the source {c['vanished']}: {vanished}"]
        out += [f"  note: {n}" for n in self.notes]
        changed = set(self.plan.changed)
        kinds = [("new", [o.uri for o in self.plan.todo if o.uri not in changed]), ("changed", sorted(changed)),
                 ("could not be listed", [f"{d.uri}: {d.message}" for d in self.unlisted]),
                 ("vanished", self.plan.vanished)]
        for kind, items in kinds:
            for item in items[:limit]:
                out.append(f"  {kind}: {shown_path(item)}")
            if len(items) > limit:
                out.append(f"  {kind}: ... and {len(items) - limit} more")
        out.append("nothing was embedded or written")
        return out


def _stored_fingerprints(cfg: Config, spec: Any) -> tuple[dict[str, str], bool, list[str]]:
    """(source_uri -> fingerprint, whether the collection exists, storage notes) from the configured store."""
    if cfg.qdrant.embedded:
        if not os.path.isdir(cfg.qdrant.path):  # opening it would create it
            return {}, False, []
        client = open_embedded_store(cfg.qdrant.path)
    else:
        client = server_client(cfg)
    try:
        if not client.collection_exists(cfg.qdrant.collection):
            return {}, False, []
        info = client.get_collection(cfg.qdrant.collection)
        try:
            validate_collection(info, spec)  # the run would stop here, before any work
        except CollectionMismatchError as exc:
            raise PreflightError(str(exc)) from None
        stored = QdrantWriter(client, cfg.qdrant.collection, retry_s=cfg.qdrant.retry_s).fingerprints_by_uri()
        return stored, True, storage_differences(info, spec)
    finally:
        client.close()


def check_local_pool(cfg: Config) -> None:
    """The run's actor-pool check, against the local Ray the run would start on this machine.

    A cluster to join is only probed (check_cluster): the plan does not connect to it.
    """
    if joins_cluster(cfg):
        return
    node = local_node()
    pool = ActorPool("embedding", cfg.compute.embed_actors, cfg.compute.cpus_per_actor,
                     cfg.compute.effective_num_gpus(node["GPU"]))
    check_pools_fit(cfg, [pool], EXPAND_TASK_CPUS, "the expansion tasks", nodes=[node], growable=False)
    # The local Ray's workers run this interpreter: what it finds, they find.
    check_attention(cfg.embedder.attn_implementation, pool.gpus,
                    lambda package: [] if importlib.util.find_spec(package) else ["this machine"])


def preview_ingest(cfg: Config, prune: bool | None = None) -> PlanPreview:
    """What `qvl ingest` would do with cfg now, without embedding, creating or writing anything."""
    prune = cfg.prune if prune is None else prune
    spec = collection_spec(cfg, model_dimension(cfg.embedder.model, cfg.embedder.revision))
    objects, unlisted = list_source(cfg)
    # The run's other checks, in its order, none of which creates or starts anything here.
    check_writable("output.dir", cfg.output.dir)
    if cfg.qdrant.embedded:
        check_not_a_file("qdrant.path", cfg.qdrant.path)
    check_cluster(cfg)
    check_local_pool(cfg)
    try:
        stored, exists, notes = _stored_fingerprints(cfg, spec)
    except PreflightError:
        raise
    except Exception as exc:  # the store failed while being read
        raise PreflightError(redact(f"the store could not be read: {type(exc).__name__}: {first_line(exc)}",
                                    cfg.secret_values())) from None
    plan = plan_objects(objects, stored, source_root(cfg.source.uri), cfg.source.include, cfg.source.exclude,
                        unlisted_entries(unlisted))
    where = f"embedded store {cfg.qdrant.path}" if cfg.qdrant.embedded else f"{cfg.qdrant.url}"
    return PlanPreview(cfg.qdrant.collection, where, len(objects), plan, unlisted, prune, exists,
                       run_folders_in_source(cfg) + notes)
