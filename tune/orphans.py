"""Placement groups that a stopped trial leaves behind, freed while the sweep runs.

A trial that ASHA stops is ended by Tune killing its actor; its Train controller dies with it, and
the workers' placement group (`train.num_workers` x `train.cpus_per_worker` CPUs) stays reserved:
Ray removes a placement group with its creator only once the job ends too. Ray Train's own
`PlacementGroupCleaner` removes it through the State API, which exists only where the cluster
runs its dashboard; without one (`ray start --include-dashboard=false`, a minimal install) every
stopped trial kept its CPUs and the next trial's data stream waited for them forever.

`reap_orphans()` removes the placement groups of this job whose creating actor is dead. The
placement groups Tune makes for trials are created by the driver (no creator actor) and are never
touched; nor are detached ones or other jobs'.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("xtra.sweep")

REAP_EVERY_S = 2.0
SETTLE_S = 15.0


def actor_placement_groups() -> dict[str, bool]:
    """This job's live placement groups that an actor created (as a Train controller creates its
    workers'): hex id -> whether that actor is dead."""
    import ray
    from ray._private.state import state  # the GCS table with the creator fields (public: dropped)
    from ray.core.generated import gcs_pb2

    job = ray.get_runtime_context().get_job_id()
    found = {}
    for raw in state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        if (pg.state != gcs_pb2.PlacementGroupTableData.REMOVED and not pg.is_detached
                and not ray.ActorID(pg.creator_actor_id).is_nil() and pg.creator_job_id.hex() == job):
            found[pg.placement_group_id.hex()] = pg.creator_actor_dead
    return found


def orphaned_placement_groups() -> list[str]:
    """Hex ids of this job's live placement groups whose creating actor has died."""
    return [pg for pg, dead in actor_placement_groups().items() if dead]


def reap_orphans() -> int:
    """Removes `orphaned_placement_groups()`; -> how many."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    ids = orphaned_placement_groups()
    for pg_id in ids:
        remove_placement_group(PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id))))
        logger.debug("removed placement group %s of a stopped trial", pg_id)
    return len(ids)


@contextmanager
def reaping(every_s: float = REAP_EVERY_S, settle_s: float = SETTLE_S) -> Iterator[None]:
    """`reap_orphans()` every `every_s` seconds on a daemon thread while the block runs (Tune's
    fit). After it, for up to `settle_s`, until no actor-made placement group of this job is left:
    the last trial Tune stopped may still be dying, and the driver (a notebook, a test) lives on."""
    done = threading.Event()
    warned = False

    def reap() -> None:
        nonlocal warned
        try:
            reap_orphans()
        except Exception as e:  # noqa: BLE001 - a Ray API change must not stop the sweep
            if not warned:
                warned = True
                logger.warning("cannot free the placement groups of stopped trials (%s): a "
                               "stopped trial may keep its CPUs until the sweep ends", e)

    def loop() -> None:
        while not done.wait(every_s):
            reap()

    thread = threading.Thread(target=loop, name="xtra-reap-placement-groups", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join(timeout=every_s + 5)
        end = time.monotonic() + settle_s
        while not warned:
            reap()
            try:
                if not actor_placement_groups() or time.monotonic() > end:
                    break
            except Exception:  # noqa: BLE001
                break
            time.sleep(0.5)
