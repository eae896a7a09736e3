"""CPUs and GPUs for the training workers, judged against what the cluster can grow to.

Ray Data's decode tasks need CPUs of their own next to the workers: when the workers take every
CPU, the stream never starts and the fit waits forever. So before the fit, the request is sized
when the user gave no `train.cpus_per_worker`, and a request that cannot be met fails at once,
naming the keys to change.

A cluster is its alive nodes plus the nodes its autoscaler may add (`NodeType`s, read from the
autoscaler's own config by `autoscaler_node_types`). Each worker is one bundle (`CPU`, and one `GPU`
with `train.use_gpu`) that must fit on one node, and after the workers are placed one node must
still have a CPU free for decoding. Then:
- the alive nodes hold the request: the run starts;
- only the grown cluster holds it: the autoscaler is asked for the bundles (Ray's public
  `request_resources`) and the run waits for the nodes, a status line every 30 s, at most
  `train.resource_wait_s`, then fails naming what is missing and the keys to change;
- not even the grown cluster holds it (more GPUs than the node types' maximum, a worker bigger than
  any node), or there is no autoscaler and the alive nodes do not hold it: one error line at once.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipelines.errors import UserError
from xtra_core.config import XTRAConfig

log = logging.getLogger(__name__)

# the CPU share left to Ray Data's decode + augment tasks when sizing from the cluster
DECODE_SHARE = 0.25
MIN_DECODE_CPUS = 1.0
STATUS_EVERY_S = 30.0
POLL_S = 2.0

Bundle = dict[str, float]


@dataclass(frozen=True)
class NodeType:
    """A worker node type of the autoscaler: the resources of one node, how many it may start."""

    name: str
    resources: Bundle
    max_workers: int


@dataclass
class Cluster:
    """`alive`: each alive node's total resources. `node_types`: what the autoscaler may add
    (empty: no autoscaler); `max_workers`: its cap on worker nodes in all (None: the types' sum)."""

    alive: list[Bundle]
    node_types: list[NodeType] = field(default_factory=list)
    max_workers: int | None = None

    def grown(self) -> list[Bundle]:
        """The alive nodes plus every node the autoscaler may still add (an upper bound: alive
        workers count against the cap, not against their own type, whose name Ray does not keep)."""
        alive_workers = max(0, len(self.alive) - 1)  # the head is no autoscaled worker
        left = (self.max_workers if self.max_workers is not None
                else sum(t.max_workers for t in self.node_types)) - alive_workers
        added: list[Bundle] = []
        for t in sorted(self.node_types, key=lambda t: -t.resources.get("CPU", 0.0)):
            n = max(0, min(t.max_workers, left - len(added)))
            added += [dict(t.resources)] * n
        return [*self.alive, *added]


def node_types_from_config(config: dict[str, Any]) -> tuple[list[NodeType], int | None]:
    """The worker node types of a cluster-launcher / autoscaler config (`available_node_types`,
    head type left out) and its `max_workers`."""
    head = config.get("head_node_type")
    types = [
        NodeType(name, {k: float(v) for k, v in (spec.get("resources") or {}).items()},
                 int(spec.get("max_workers", 0)))
        for name, spec in (config.get("available_node_types") or {}).items()
        if name != head
    ]
    cap = config.get("max_workers")
    return [t for t in types if t.max_workers > 0], (int(cap) if cap is not None else None)


def autoscaler_node_types() -> tuple[list[NodeType], int | None]:
    """What the connected cluster's autoscaler may add: ([], None) when it has none.

    The one place that reads Ray's autoscaler state. Ray 2.60 has no public API for the node
    types and their limits, so, in order:
    1. the cluster config that an autoscaler reports to the GCS (`ray._private.state`'s
       `get_cluster_config`: node groups with their max counts; Ray Data reads the same);
    2. the config file of the autoscaler (`--autoscaling-config` of the head's monitor process,
       for this cluster's GCS address): `ray up` clusters (~/ray_bootstrap_config.yaml) and the
       local fake multi-node autoscaler. The driver runs on the head (`ray job submit`);
    3. KubeRay (its autoscaler is a sidecar the head container cannot see): the RayCluster named by
       RAY_CLUSTER_NAME / RAY_CLUSTER_NAMESPACE (set in cluster/kuberay/'s head containers), read
       as KubeRay's autoscaler reads it (Ray's `AutoscalingConfigProducer`, the head's
       ServiceAccount that KubeRay binds to its autoscaler role).
    tests/cluster/test_multinode.py runs 1-2 against a real autoscaling Ray; 3 is parsed offline
    (tests/cluster/test_resources.py) but not run against a Kubernetes API here."""
    import psutil
    import ray
    import yaml
    from ray._private.state import state

    try:
        gcs = state.get_cluster_config()
    except Exception:  # noqa: BLE001 - an older GCS or none of it: try the next source
        gcs = None
    if gcs is not None and gcs.node_group_configs:
        types = [NodeType(g.name, {k: float(v) for k, v in g.resources.items()},
                          g.max_count if g.max_count >= 0 else 10**6)
                 for g in gcs.node_group_configs if g.max_count != 0]
        return types, None
    address = ray.get_runtime_context().gcs_address
    for proc in psutil.process_iter(["cmdline"]):
        cmd = proc.info.get("cmdline") or []
        if not any("monitor.py" in a for a in cmd) or f"--gcs-address={address}" not in cmd:
            continue
        for arg in cmd:
            if arg.startswith("--autoscaling-config="):
                with open(arg.split("=", 1)[1]) as f:
                    return node_types_from_config(yaml.safe_load(f) or {})
    name, namespace = os.environ.get("RAY_CLUSTER_NAME"), os.environ.get("RAY_CLUSTER_NAMESPACE")
    if name and namespace:
        from ray.autoscaler._private.kuberay.autoscaling_config import AutoscalingConfigProducer

        try:
            return node_types_from_config(AutoscalingConfigProducer(name, namespace)())
        except Exception as e:  # noqa: BLE001 - no RBAC / API: judged on the alive nodes
            log.warning("could not read RayCluster %s/%s for its autoscaler's node types: %s",
                        namespace, name, e)
    return [], None


# --------------------------------------------------------------------------- placement


def place(bundles: Sequence[Bundle], nodes: Sequence[Bundle]) -> list[Bundle] | None:
    """First-fit of the bundles onto the nodes (each bundle on one node), biggest first:
    -> what is left of each node, or None when a bundle fits nowhere."""
    free = [dict(n) for n in nodes]
    for b in sorted(bundles, key=lambda b: (-b.get("GPU", 0.0), -b.get("CPU", 0.0))):
        for node in free:
            if all(node.get(k, 0.0) >= v - 1e-9 for k, v in b.items()):
                for k, v in b.items():
                    node[k] = node.get(k, 0.0) - v
                break
        else:
            return None
    return free


def worker_bundle(cfg: XTRAConfig, cpus: float) -> Bundle:
    return {"CPU": cpus, **({"GPU": 1.0} if cfg.train.use_gpu else {})}


def holds(cfg: XTRAConfig, cpus: float, nodes: Sequence[Bundle], decode: float = MIN_DECODE_CPUS) -> bool:
    """The workers fit on the nodes and leave `decode` CPUs, a whole one on one node at least."""
    left = place([worker_bundle(cfg, cpus)] * cfg.train.num_workers, nodes)
    if left is None:
        return False
    free = [n.get("CPU", 0.0) for n in left]
    return sum(free) >= decode - 1e-9 and max(free, default=0.0) >= MIN_DECODE_CPUS - 1e-9


def size_workers(cfg: XTRAConfig, nodes: Sequence[Bundle], decode_cpus: float = MIN_DECODE_CPUS) -> float | None:
    """CPUs per worker on these nodes: `train.cpus_per_worker` if given and it fits, else the CPUs
    less a decoding share (a quarter, at least one CPU) split over the workers, rounded down to a
    half CPU, and lowered until every worker fits on a node; None when nothing fits."""
    t = cfg.train
    if t.cpus_per_worker is not None:
        return t.cpus_per_worker if holds(cfg, t.cpus_per_worker, nodes, decode_cpus) else None
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    decode = max(decode_cpus, DECODE_SHARE * cpus)
    if t.use_gpu:  # a GPU worker takes its node's CPUs per GPU at most, so every GPU can be used
        biggest = max((n.get("CPU", 0.0) / n["GPU"] for n in nodes if n.get("GPU", 0.0) >= 1), default=0.0)
    else:
        biggest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    per_worker = min(math.floor(2 * (cpus - decode) / t.num_workers) / 2, math.floor(2 * biggest) / 2)
    while per_worker >= 0.5:
        if holds(cfg, per_worker, nodes, decode if len(nodes) == 1 else decode_cpus):
            return per_worker
        per_worker -= 0.5
    share = (cpus - decode) / t.num_workers  # under half a CPU each: a fraction of one
    return share if share > 0 and holds(cfg, share, nodes, decode_cpus) else None


def refusal(cfg: XTRAConfig, nodes: Sequence[Bundle], what: str,
            decode_cpus: float = MIN_DECODE_CPUS) -> UserError:
    """The one-line error for a request that `nodes` (`what`: 'the Ray cluster', ...) cannot hold."""
    t = cfg.train
    cpus = sum(n.get("CPU", 0.0) for n in nodes)
    gpus = sum(n.get("GPU", 0.0) for n in nodes)
    if t.use_gpu and gpus < t.num_workers:
        return UserError(
            f"train.use_gpu=true with train.num_workers={t.num_workers} needs {t.num_workers} GPUs; "
            f"{what} has {gpus:g}: lower train.num_workers or add GPU nodes"
        )
    biggest = max((n.get("CPU", 0.0) for n in nodes), default=0.0)
    if t.cpus_per_worker is None:
        return UserError(
            f"{what} has {cpus:g} CPUs (at most {biggest:g} on one node): not enough for "
            f"train.num_workers={t.num_workers} workers and {decode_cpus:g} CPU of decoding; "
            f"lower train.num_workers or add nodes"
        )
    if t.cpus_per_worker > biggest or (t.use_gpu and place([worker_bundle(cfg, t.cpus_per_worker)], nodes) is None):
        return UserError(
            f"a worker needs train.cpus_per_worker={t.cpus_per_worker:g} CPUs"
            f"{' and 1 GPU' if t.use_gpu else ''} on one node; the biggest node of {what} has "
            f"{biggest:g} CPUs: lower train.cpus_per_worker, or leave it unset to size it from the cluster"
        )
    left = cpus - t.num_workers * t.cpus_per_worker
    return UserError(
        f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker:g} leaves "
        f"{max(left, 0):g} of {what}'s {cpus:g} CPUs for decoding images (at least "
        f"{decode_cpus:g} needed, else the run waits forever): lower train.cpus_per_worker "
        f"or train.num_workers, or leave train.cpus_per_worker unset to size it from the cluster"
    )


def worker_cpus(cfg: XTRAConfig, cluster: dict[str, float]) -> float:
    """CPUs per training worker on one node with these resources (`ray.cluster_resources()` of a
    single-node cluster). Raises UserError naming the keys when it cannot hold the request."""
    nodes = [{k: float(v) for k, v in cluster.items()}]
    per_worker = size_workers(cfg, nodes)
    if per_worker is None:
        raise refusal(cfg, nodes, "the Ray cluster")
    return per_worker


@dataclass
class Verdict:
    """`cpus_per_worker` to run with; `wait`: only once the autoscaler adds nodes."""

    cpus_per_worker: float
    wait: bool


def judge(cfg: XTRAConfig, cluster: Cluster, decode_cpus: float = MIN_DECODE_CPUS) -> Verdict:
    """Pure: run now on the alive nodes, wait for the autoscaler, or refuse (UserError, one line)."""
    now = size_workers(cfg, cluster.alive, decode_cpus)
    if now is not None:
        return Verdict(now, wait=False)
    if not cluster.node_types:
        raise refusal(cfg, cluster.alive, "the Ray cluster", decode_cpus)
    # sized for the cluster it can grow to, so that a cluster growing from zero is not sized at zero
    grown = cluster.grown()
    later = size_workers(cfg, grown, decode_cpus)
    if later is None:
        raise refusal(cfg, grown, "the Ray cluster, with every node its autoscaler may add,", decode_cpus)
    return Verdict(later, wait=True)


def missing(cfg: XTRAConfig, cpus: float, alive: Sequence[Bundle], decode_cpus: float = MIN_DECODE_CPUS) -> str:
    have_cpu = sum(n.get("CPU", 0.0) for n in alive)
    have_gpu = sum(n.get("GPU", 0.0) for n in alive)
    need_cpu = cfg.train.num_workers * cpus + decode_cpus
    text = f"{cfg.train.num_workers} workers x {cpus:g} CPU"
    text += " + 1 GPU" if cfg.train.use_gpu else ""
    text += f" and {decode_cpus:g} CPU of decoding (alive nodes: {have_cpu:g} of {need_cpu:g} CPUs"
    text += f", {have_gpu:g} of {cfg.train.num_workers} GPUs)" if cfg.train.use_gpu else ")"
    return text


def alive_nodes() -> list[Bundle]:
    import ray

    return [dict(n["Resources"]) for n in ray.nodes() if n.get("Alive")]


def check_resources(
    cfg: XTRAConfig,
    say: Callable[[str], None] = lambda line: print(line, flush=True),
    cluster: Callable[[], Cluster] | None = None,
    storage_path: str | None = None,
    decode_cpus: float = MIN_DECODE_CPUS,
    request: Callable[[list[Bundle]], None] | None = None,
) -> float:
    """Before the fit (Ray connected): judge the request against the cluster and what its
    autoscaler may add, wait for the nodes if needed -> CPUs per worker. `cluster` reads the
    cluster (default: the connected Ray's alive nodes and autoscaler). A local `storage_path` on
    a cluster of more than one node gets one warning (every node must reach it). `decode_cpus`:
    CPUs the workers must leave free (a sweep's `--decode-cpus`). `request`: asks the autoscaler
    for bundles (default: Ray's `ray.autoscaler.sdk.request_resources`)."""
    autoscaler: list[tuple[list[NodeType], int | None]] = []

    def read() -> Cluster:
        if cluster is not None:
            return cluster()
        if not autoscaler:  # the node types are read once; the alive nodes every poll
            autoscaler.append(autoscaler_node_types())
        return Cluster(alive_nodes(), *autoscaler[0])

    state = read()
    if storage_path and "://" not in storage_path and (len(state.alive) > 1 or state.node_types):
        log.warning(
            "train.storage_path=%s is a local path on a cluster of more than one node: every node "
            "writes its checkpoint shards there, so it must be one shared mount (NFS/EFS/FSx) on "
            "every node, or use s3://<bucket>/<prefix>", storage_path)
    verdict = judge(cfg, state, decode_cpus)
    if not verdict.wait:
        return verdict.cpus_per_worker
    if request is None:
        from ray.autoscaler.sdk import request_resources

        def request(bundles: list[Bundle]) -> None:
            request_resources(bundles=bundles)

    per_worker, limit = verdict.cpus_per_worker, cfg.train.resource_wait_s
    bundles = [worker_bundle(cfg, per_worker)] * cfg.train.num_workers + [{"CPU": decode_cpus}]
    request(bundles)  # the autoscaler starts nodes for these now
    start = last = time.monotonic()
    say(f"[xtra] waiting for the autoscaler to add nodes for {missing(cfg, per_worker, state.alive, decode_cpus)}; "
        f"up to train.resource_wait_s={limit:g} s")
    try:
        while not holds(cfg, per_worker, state.alive, decode_cpus):
            waited = time.monotonic() - start
            if waited >= limit:
                raise UserError(
                    f"the autoscaler added no room for {missing(cfg, per_worker, state.alive, decode_cpus)} "
                    f"within train.resource_wait_s={limit:g} s: raise train.resource_wait_s, lower "
                    "train.num_workers or train.cpus_per_worker, or see `ray status` for why no node started"
                )
            if time.monotonic() - last >= STATUS_EVERY_S:
                last = time.monotonic()
                say(f"[xtra] still waiting for nodes ({waited:.0f} s of {limit:g} s): "
                    f"{missing(cfg, per_worker, state.alive, decode_cpus)}")
            time.sleep(min(POLL_S, max(0.0, limit - waited)))
            state = read()
    finally:
        request([])  # the fit's own placement group keeps the nodes busy
    say(f"[xtra] nodes ready after {time.monotonic() - start:.0f} s")
    return per_worker


def cpus_to_grow_to() -> float:
    """CPUs of the connected cluster with every node its autoscaler may add (trials at once)."""
    types, cap = autoscaler_node_types()
    return sum(n.get("CPU", 0.0) for n in Cluster(alive_nodes(), types, cap).grown())
