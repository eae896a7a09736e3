"""The pre-flight resource check against what a cluster can grow to: alive nodes plus the node types
of its autoscaler (the launcher's own cluster/aws-gpu.yaml among them). Seconds, no Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipelines.config_io import load_config
from pipelines.errors import UserError
from pipelines.pretrain import resources
from pipelines.pretrain.resources import (
    Cluster,
    NodeType,
    check_resources,
    judge,
    node_types_from_config,
)
from xtra_core.config import build_config

ROOT = Path(__file__).resolve().parents[2]
HEAD0 = {"CPU": 0.0, "memory": 8e9}  # a head that schedules nothing
TWO_CPU = [NodeType("ray.worker.cpu", {"CPU": 2.0}, max_workers=2)]  # the fake autoscaler's


def tiny(**sets):
    return build_config("tiny", None, {k.replace("__", "."): v for k, v in sets.items()})


def launcher_types() -> tuple[list[NodeType], int | None]:
    return node_types_from_config(yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text()))


def test_a_cluster_growing_from_zero_waits_instead_of_refusing():
    verdict = judge(tiny(), Cluster([HEAD0], TWO_CPU, max_workers=2))
    # 2 workers of 1 CPU on one 2-CPU node leave the other node's CPUs to decoding; 1.5 each would
    # leave half a CPU per node, too little for one decode task
    assert verdict.wait and verdict.cpus_per_worker == 1.0
    # the same nodes alive: run now, no wait
    now = judge(tiny(), Cluster([HEAD0, {"CPU": 2.0}, {"CPU": 2.0}], TWO_CPU, max_workers=2))
    assert not now.wait and now.cpus_per_worker == 1.0


def test_without_an_autoscaler_the_alive_nodes_decide_at_once():
    with pytest.raises(UserError, match=r"the Ray cluster has 0 CPUs.*train\.num_workers=2"):
        judge(tiny(), Cluster([HEAD0]))
    # the 2-core deadlock the check was written for stays refused: both CPUs to the workers
    with pytest.raises(UserError, match=r"train\.num_workers=2 x train\.cpus_per_worker=1 leaves 0"):
        judge(tiny(train__cpus_per_worker=1.0), Cluster([{"CPU": 2.0}]))
    assert judge(tiny(), Cluster([{"CPU": 2.0}])).cpus_per_worker == 0.5


def test_a_request_no_node_type_can_hold_is_refused_at_once_naming_the_keys():
    grow = Cluster([HEAD0], TWO_CPU, max_workers=2)
    with pytest.raises(UserError, match=r"train\.cpus_per_worker=3 CPUs.*on one node.*biggest node.*2 CPUs"):
        judge(tiny(train__cpus_per_worker=3.0), grow)  # a worker bigger than any node type
    with pytest.raises(UserError, match=r"has 4 CPUs.*train\.num_workers=8"):
        judge(tiny(train__num_workers=8, train__global_batch_size=128), grow)  # over the max
    with pytest.raises(UserError, match=r"needs 2 GPUs.*may add, has 0"):
        judge(tiny(train__use_gpu=True), grow)
    # the cap on worker nodes in all counts: one node of 2 CPUs cannot hold 2 workers + decoding
    with pytest.raises(UserError, match=r"train\.num_workers=2 x train\.cpus_per_worker=1 leaves 0"):
        judge(tiny(train__cpus_per_worker=1.0), Cluster([HEAD0], TWO_CPU, max_workers=1))


def test_gpu_requests_against_the_launchers_node_types():
    types, cap = launcher_types()
    assert {t.name for t in types} == {"gpu_b16", "gpu_h14", "cpu_decode"} and cap == 24
    head = [{"CPU": 0.0}]  # head_node_type: head, resources {CPU: 0}
    b16 = load_config("vit_b16_in1k", [])
    v = judge(b16, Cluster(head, types, cap))
    assert v.wait and v.cpus_per_worker == b16.train.cpus_per_worker == 8
    h14 = load_config("vit_h14_in21k", [])  # 32 workers: every GPU of the 4 p5 nodes
    assert judge(h14, Cluster(head, types, cap)).wait
    # unset cpus_per_worker: a GPU worker gets its node's CPUs per GPU, not the whole cluster's
    assert judge(tiny(train__use_gpu=True), Cluster(head, types, cap)).cpus_per_worker == 8
    with pytest.raises(UserError, match=r"train\.num_workers=72 needs 72 GPUs.*has 64"):
        judge(tiny(train__use_gpu=True, train__num_workers=72, train__global_batch_size=144),
              Cluster(head, types, cap))
    with pytest.raises(UserError, match=r"train\.cpus_per_worker=65 CPUs and 1 GPU on one node"):
        judge(tiny(train__use_gpu=True, train__cpus_per_worker=65.0), Cluster(head, types, cap))


def test_the_wait_asks_the_autoscaler_reports_and_returns_once_nodes_are_alive(monkeypatch):
    monkeypatch.setattr(resources, "POLL_S", 0.01)
    monkeypatch.setattr(resources, "STATUS_EVERY_S", 0.02)
    states = iter([[HEAD0]] * 6 + [[HEAD0, {"CPU": 2.0}]] * 3 + [[HEAD0, {"CPU": 2.0}, {"CPU": 2.0}]] * 99)
    lines, asked = [], []
    got = check_resources(tiny(), say=lines.append, request=asked.append,
                          cluster=lambda: Cluster(next(states), TWO_CPU, 2))
    assert got == 1.0
    assert asked == [[{"CPU": 1.0}, {"CPU": 1.0}, {"CPU": 1.0}], []]  # asked, then released
    assert "waiting for the autoscaler" in lines[0] and "train.resource_wait_s=1800" in lines[0]
    assert any("still waiting" in line for line in lines) and "nodes ready" in lines[-1]


def test_the_wait_gives_up_after_resource_wait_s_naming_what_is_missing(monkeypatch):
    monkeypatch.setattr(resources, "POLL_S", 0.01)
    asked = []
    with pytest.raises(UserError) as e:
        check_resources(tiny(train__resource_wait_s=0.1), say=lambda _: None, request=asked.append,
                        cluster=lambda: Cluster([HEAD0], TWO_CPU, 2))
    msg = str(e.value)
    assert "within train.resource_wait_s=0.1 s" in msg and "0 of 3 CPUs" in msg
    assert "train.num_workers" in msg and "train.cpus_per_worker" in msg
    assert asked[-1] == []  # the request is withdrawn on the way out


def test_a_local_storage_path_on_several_nodes_warns_once_naming_s3_and_shared_mounts(caplog):
    two = Cluster([HEAD0, {"CPU": 4.0}, {"CPU": 4.0}])
    with caplog.at_level("WARNING"):
        check_resources(tiny(), say=lambda _: None, cluster=lambda: two, storage_path="/tmp/runs")
        check_resources(tiny(), say=lambda _: None, cluster=lambda: two, storage_path="s3://b/runs")
        check_resources(tiny(), say=lambda _: None, cluster=lambda: Cluster([{"CPU": 4.0}]),
                        storage_path="/tmp/runs")
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "s3://" in warnings[0] and "NFS/EFS/FSx" in warnings[0]


def test_kuberay_node_types_as_its_autoscaler_derives_them_from_the_raycluster():
    from ray.autoscaler._private.kuberay.autoscaling_config import (
        _derive_autoscaling_config_from_ray_cr,
    )

    docs = list(yaml.safe_load_all((ROOT / "cluster" / "kuberay" / "raycluster.yaml").read_text()))
    (cr,) = [d for d in docs if d and d["kind"] == "RayCluster"]
    cr["metadata"]["namespace"] = "ml"
    types, cap = node_types_from_config(_derive_autoscaling_config_from_ray_cr(cr))
    by_name = {t.name: t for t in types}
    assert by_name["gpu-h14"].max_workers == 4 and by_name["gpu-h14"].resources["GPU"] == 8
    head = [{"CPU": 0.0}]  # num-cpus: "0"
    assert judge(load_config("vit_h14_in21k", []), Cluster(head, types, cap)).wait  # 32 GPUs: wait
