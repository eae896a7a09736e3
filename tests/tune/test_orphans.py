"""The placement groups a killed Train controller leaves behind are freed (`tune.orphans`), on a
real Ray cluster without a dashboard (where Ray Train's own cleaner cannot see the controller die)."""

from __future__ import annotations

import time

import pytest

from tune.orphans import orphaned_placement_groups, reap_orphans, reaping

pytestmark = pytest.mark.slow


def _cpu_free(want: float, timeout_s: float = 30) -> bool:
    import ray

    end = time.time() + timeout_s
    while time.time() < end:
        if ray.available_resources().get("CPU", 0) >= want - 1e-9:
            return True
        time.sleep(0.2)
    return False


def _killed_creator(cpus: float):
    """An actor that reserves a placement group of `cpus` CPUs (as a Train controller does for its
    workers), then is killed (as Tune kills a stopped trial). -> the placement group's hex id"""
    import ray
    from ray.util.placement_group import placement_group

    @ray.remote(num_cpus=0)
    class Controller:
        def reserve(self) -> str:
            pg = placement_group([{"CPU": cpus / 2}, {"CPU": cpus / 2}])
            ray.get(pg.ready())
            return pg.id.hex()

    controller = Controller.remote()
    pg_id = ray.get(controller.reserve.remote())
    ray.kill(controller)
    return pg_id


def test_a_dead_actors_placement_group_is_removed_and_the_drivers_own_is_kept(ray_cluster):
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    assert _cpu_free(2.0), ray.available_resources()
    own = placement_group([{"CPU": 0.5}])  # the driver's (as Tune's trial groups are): kept
    ray.get(own.ready())
    try:
        orphan = _killed_creator(1.0)
        time.sleep(1.0)  # the GCS marks the creator dead
        assert orphaned_placement_groups() == [orphan]
        assert ray.available_resources().get("CPU", 0) == pytest.approx(0.5)  # Ray keeps it reserved
        assert reap_orphans() == 1
        assert _cpu_free(1.5), ray.available_resources()
        assert ray.util.placement_group_table(own)["state"] == "CREATED"
        assert orphaned_placement_groups() == []
    finally:
        remove_placement_group(own)
    assert _cpu_free(2.0)


def test_reaping_frees_a_stopped_trials_cpus_while_the_block_runs(ray_cluster):
    assert _cpu_free(2.0)
    with reaping(every_s=0.2):
        _killed_creator(2.0)
        assert _cpu_free(2.0, timeout_s=20)  # without the reaper: never


def test_a_trial_stopped_as_the_sweep_ends_is_freed_before_reaping_returns(ray_cluster):
    import ray

    assert _cpu_free(2.0)
    with reaping(every_s=3600, settle_s=20):  # the thread never fires: only the settling frees it
        _killed_creator(2.0)
    assert _cpu_free(2.0, timeout_s=10), ray.available_resources()  # without the settling: never
