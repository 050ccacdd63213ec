"""Whether a job's actor pools fit the Ray cluster, checked before the job starts them.

Ray Data waits for a pool's actors without a deadline: an actor asking for a GPU on a cluster
with none, or a pool that takes every CPU the expansion tasks need, hangs the job forever (Ray
prints only an autoscaler line after two minutes). On a cluster that cannot grow (a local Ray,
a static cluster) that is a configuration error, raised as PreflightError naming the key. On a
cluster with an autoscaler the missing nodes may still come, so the job only says what it waits for.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

from .config import Config
from .preflight import PreflightError

# Floating-point slack for fractional requests: 3 actors of 1/3 GPU fit one GPU.
_EPS = 1e-9

NodeResources = Mapping[str, float]


@dataclass(frozen=True)
class ActorPool:
    """A fixed pool of identical actors and what each asks of Ray."""

    name: str  # e.g. "embedding", for messages
    actors: int
    cpus: float
    gpus: float


def actors_on(node: NodeResources, cpus: float, gpus: float) -> float:
    """How many actors asking for cpus and gpus one node holds (inf when they ask for nothing)."""
    counts = [math.floor(node.get(key, 0.0) / need + _EPS) for key, need in (("CPU", cpus), ("GPU", gpus)) if need > 0]
    return min(counts) if counts else math.inf


def pools_fit(nodes: Sequence[NodeResources], pools: Sequence[ActorPool], spare_cpus: float) -> bool:
    """Whether every pool's actors can run at once on nodes, with spare_cpus left free on one node.

    The pools' actors must be alike (all of one job's pools ask for the same per-actor resources).
    """
    wanted = sum(p.actors for p in pools)
    cpus, gpus = pools[0].cpus, pools[0].gpus
    held = [actors_on(n, cpus, gpus) for n in nodes]
    if spare_cpus <= 0:
        return sum(held) >= wanted
    # One node keeps spare_cpus for the tasks beside the actors; try each.
    for i, node in enumerate(nodes):
        if node.get("CPU", 0.0) + _EPS < spare_cpus:
            continue
        rest = dict(node, CPU=node.get("CPU", 0.0) - spare_cpus)
        if sum(held[:i]) + actors_on(rest, cpus, gpus) + sum(held[i + 1:]) >= wanted:
            return True
    return False


def most_actors(nodes: Sequence[NodeResources], pool: ActorPool, spare_cpus: float) -> int:
    """The largest pool of pool's actors that fits nodes with spare_cpus left (0 when none does)."""
    fitting = 0
    while fitting < pool.actors and pools_fit(nodes, [ActorPool(pool.name, fitting + 1, pool.cpus, pool.gpus)],
                                              spare_cpus):
        fitting += 1
    return fitting


def describe(nodes: Sequence[NodeResources]) -> str:
    """The cluster in a few words: totals and the node count."""
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    return f"{_amount(cpus)} CPUs and {_amount(gpus)} GPUs on {len(nodes)} node{'s' if len(nodes) != 1 else ''}"


def _amount(value: float) -> str:
    return f"{value:g}"


def _actors(pool: ActorPool) -> str:
    return f"{pool.actors} {pool.name} actor{'s' if pool.actors != 1 else ''}"


def misfit(nodes: Sequence[NodeResources], pools: Sequence[ActorPool], spare_cpus: float,
           spare_for: str) -> str | None:
    """Why the pools do not fit nodes (naming the config key to change), or None when they do."""
    if pools_fit(nodes, pools, spare_cpus):
        return None
    pool = pools[0]
    ask = f"{_amount(pool.cpus)} CPU{'s' if pool.cpus != 1 else ''}" + (
        f" and {_amount(pool.gpus)} GPU{'s' if pool.gpus != 1 else ''}" if pool.gpus > 0 else "")
    where = f"the Ray cluster has {describe(nodes)}"
    if not any(actors_on(n, pool.cpus, pool.gpus) >= 1 for n in nodes):
        if pool.gpus > 0 and not any(n.get("GPU", 0.0) + _EPS >= pool.gpus for n in nodes):
            return (f"compute.num_gpus_per_actor: an {pool.name} actor asks for {ask}, but no node has "
                    f"{_amount(pool.gpus)} GPU{'s' if pool.gpus != 1 else ''} ({where}); "
                    "set compute.num_gpus_per_actor to 0 to run on CPUs")
        return (f"compute.cpus_per_actor: an {pool.name} actor asks for {ask}, but no node has that "
                f"({where}); lower compute.cpus_per_actor")
    names = " and ".join(_actors(p) for p in pools)
    if len(pools) > 1:
        return (f"compute.embed_actors: {names} of {ask} each do not fit at once ({where}); lower "
                "compute.embed_actors, --rerank-actors or compute.cpus_per_actor")
    most = most_actors(nodes, pool, spare_cpus)
    if most == 0:  # one actor fits, but leaves no CPU for the tasks that feed it
        return (f"compute.cpus_per_actor: an {pool.name} actor of {ask} leaves no node {_amount(spare_cpus)} "
                f"CPU for {spare_for} ({where}); lower compute.cpus_per_actor")
    left = f", with {_amount(spare_cpus)} CPU left for {spare_for}," if spare_cpus > 0 else ""
    return (f"compute.embed_actors: {names} of {ask} each{left} do not fit at once ({where}); at most "
            f"{most} fit{'s' if most == 1 else ''}: lower compute.embed_actors or compute.cpus_per_actor")


def alive_nodes() -> list[dict[str, float]]:
    """The resources of every alive node of the connected Ray cluster."""
    import ray

    return [dict(n.get("Resources", {})) for n in ray.nodes() if n.get("Alive")]


def joins_cluster(cfg: Config) -> bool:
    """Whether ray.init will join a cluster by address (compute.ray_address, else RAY_ADDRESS) rather than
    start a local Ray on this machine."""
    if cfg.compute.ray_address == "local":
        return False
    return bool(cfg.compute.ray_address or os.environ.get("RAY_ADDRESS"))


def can_autoscale() -> bool:
    """Whether the connected cluster publishes an autoscaler's node types (it may add nodes)."""
    try:
        from ray._private.state import state

        return state.get_cluster_config() is not None  # an autoscaler (v2) publishes its node types
    except Exception:  # a private API: when it cannot tell, assume the cluster may grow
        return True


def check_pools_fit(cfg: Config, pools: Sequence[ActorPool], spare_cpus: float, spare_for: str,
                    echo: Callable[[str], None] = print,
                    nodes: Sequence[NodeResources] | None = None, growable: bool | None = None,
                    free: NodeResources | None = None) -> None:
    """Raise PreflightError when pools cannot run on a cluster that cannot grow; on one that can, say
    what the job waits for. nodes / growable default to the connected cluster's.

    free: what the cluster has free now, all nodes together (default: Ray's answer on a joined
    cluster, where other jobs and this job's own driver hold resources; none on a local Ray of the
    job's own). Pools that fit the nodes but not what is free get a warning: the job waits.
    """
    if nodes is None:
        nodes = alive_nodes()
        if free is None and joins_cluster(cfg):
            free = free_resources()
    reason = misfit(nodes, pools, spare_cpus, spare_for)
    if reason is None:
        if free is not None and not pools_fit([free], pools, spare_cpus):
            echo(f"warning: {short_of_free(free, pools, spare_cpus, spare_for)}")
        return
    if growable is None:
        growable = joins_cluster(cfg) or can_autoscale()
    if not growable:
        raise PreflightError(reason)
    echo(f"warning: {reason}; the job waits until the cluster's autoscaler adds such nodes")


def short_of_free(free: NodeResources, pools: Sequence[ActorPool], spare_cpus: float, spare_for: str) -> str:
    """What the job needs beyond what the cluster has free now (pools_fit([free], ...) said no).

    free is one pseudo-node of every free resource: optimistic, so the warning is never false.
    """
    needs = ", ".join(f"{_actors(p)} of {_amount(p.cpus)} CPU and {_amount(p.gpus)} GPU each" for p in pools)
    if spare_cpus > 0:
        needs += f", and {_amount(spare_cpus)} CPU for {spare_for}"
    return (f"the Ray cluster has {_amount(free.get('CPU', 0.0))} CPUs and {_amount(free.get('GPU', 0.0))} GPUs "
            f"free now, fewer than the job needs ({needs}): other jobs, or this job's own driver "
            "(ray job submit --entrypoint-num-cpus), hold the rest, and the job waits until they are freed")


def free_resources() -> dict[str, float]:
    """What the connected Ray cluster has free now, all nodes together."""
    import ray

    return dict(ray.available_resources())


def local_node() -> dict[str, float]:
    """The resources a local Ray started on this machine would have (its CPU and GPU detection)."""
    from ray._private.accelerators import get_accelerator_manager_for_resource
    from ray._private.utils import get_num_cpus

    manager = get_accelerator_manager_for_resource("GPU")
    visible = manager.get_current_process_visible_accelerator_ids()
    gpus = len(visible) if visible is not None else manager.get_current_node_num_accelerators()
    return {"CPU": float(get_num_cpus()), "GPU": float(gpus)}
