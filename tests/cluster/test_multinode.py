"""Beyond one node, on Ray's own local multi-node tools (real raylets on this machine):

- autoscaling from zero: a head with 0 CPUs and the fake multi-node autoscaler (2-CPU nodes,
  0 to 2): `xtra pretrain` waits for the nodes the autoscaler adds, then finishes and registers;
  a request over the autoscaler's maximum is refused at once;
- spread + node loss (`ray.cluster_utils.Cluster`): 2 ranks on 2 worker nodes, run storage on the
  S3 server, MLflow over HTTP; then the same run with one rank's node removed after the first
  registered checkpoint and a new node added: at most `train.checkpoint_every` steps redone and
  every step's loss equal to the first run's.

The driver runs as a CLI subprocess (as `ray job submit` runs it on a head), so this process keeps
no Ray connection; only this cluster's own processes are stopped."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from pipelines.cli import main as cli_main
from tests.cluster.fake_autoscaler import FakeAutoscalingCluster, free_port
from tests.reliability.conftest import MlflowServer, record_figure
from tests.small_run import SMALL_MODEL

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("fmnist")
    assert cli_main(["data", "prepare", "--source", "fashion-mnist", "--dest", str(dest), "--limit", "64"]) == 0
    return str(dest)


def sets(tmp_path: Path, name: str, **more) -> list[str]:
    dotted = {**SMALL_MODEL, "train.global_batch_size": 16, "train.num_workers": 2,
              "train.max_steps": 6, "train.warmup_steps": 2, "train.lr": 3e-3, "train.log_every": 1,
              "train.checkpoint_every": 3, "train.run_name": name,
              "train.storage_path": str(tmp_path / "runs"),
              "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "mlflow.experiment": "multinode",
              "mlflow.registered_model": f"enc-{name}", **more}
    return [a for k, v in dotted.items() for a in ("--set", f"{k}={v}")]


def pretrain(data: str, args: list[str], env: dict[str, str], **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.cli", "pretrain", "--config", "tiny", "--data", data, *args],
        env={**env, "PYTHONPATH": os.getcwd()}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, **kw)


def test_a_cluster_scaling_from_zero_runs_on_the_nodes_its_autoscaler_adds(fmnist, tmp_path):
    import ray

    types = {"ray.worker.cpu": {"resources": {"CPU": 2}, "node_config": {}, "min_workers": 0, "max_workers": 2}}
    with FakeAutoscalingCluster(types, max_workers=2) as cluster:
        # over the autoscaler's maximum (2 nodes x 2 CPUs): refused at once, naming the keys
        t0 = time.monotonic()
        over = pretrain(fmnist, sets(tmp_path, "over", **{"train.num_workers": 8,
                                                          "train.global_batch_size": 16}), cluster.env)
        out, _ = over.communicate(timeout=600)
        refused_s = time.monotonic() - t0
        assert over.returncode == 2, out
        assert "with every node its autoscaler may add, has 4 CPUs" in out and "train.num_workers" in out
        assert "waiting for the autoscaler" not in out

        t0 = time.monotonic()
        run = pretrain(fmnist, sets(tmp_path, "from-zero"), cluster.env)
        lines, first_step = [], None
        for line in run.stdout:
            lines.append(line)
            if first_step is None and line.startswith("[xtra] step "):
                first_step = time.monotonic() - t0
        run.wait(timeout=60)
        out = "".join(lines)
        assert run.returncode == 0, out[-4000:]
        assert "waiting for the autoscaler to add nodes for 2 workers x 1 CPU" in out, out
        assert "registered" in out and "step 6/6" in out
        # the nodes the run used were added by the autoscaler (the fake provider's node ids)
        ray.init(address=cluster.address, configure_logging=False, log_to_driver=False)
        try:
            added = [n for n in ray.nodes() if n["Resources"].get("CPU") == 2.0]
            assert len(added) >= 1 and all(n["NodeID"].startswith("fffff") for n in added)
        finally:
            ray.shutdown()
    record_figure("autoscale_from_zero", seconds_to_first_step=round(first_step, 1),
                  over_max_refused_s=round(refused_s, 1))


# --------------------------------------------------------------------------- spread + node loss


def raylet_of(pid: int, raylets: dict[int, object]) -> object | None:
    """The cluster node whose raylet is an ancestor of process `pid`."""
    try:
        for parent in psutil.Process(pid).parents():
            if parent.pid in raylets:
                return raylets[parent.pid]
    except psutil.Error:
        return None
    return None


def train_worker_nodes(cluster) -> dict[int, object]:
    """pid -> node of every Ray Train worker process of this cluster."""
    from ray._private import ray_constants

    raylets = {n.all_processes[ray_constants.PROCESS_TYPE_RAYLET][0].process.pid: n
               for n in cluster.list_all_nodes()}
    out = {}
    for p in psutil.process_iter(["cmdline"]):
        if (p.info.get("cmdline") or [""])[0].startswith("ray::RayTrainWorker"):
            node = raylet_of(p.pid, raylets)
            if node is not None:
                out[p.pid] = node
    return out


def losses(uri: str, run_id: str) -> tuple[dict[int, float], list]:
    client = mlflow.MlflowClient(tracking_uri=uri)
    history = sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp)
    return {m.step: m.value for m in history}, history


@pytest.fixture
def spread_cluster(aws_test_env, monkeypatch):
    """A head with 0 CPUs + 3 worker nodes of 1 CPU: each rank on a node of its own, decoding on
    the third."""
    from ray.cluster_utils import Cluster

    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    temp = tempfile.mkdtemp(prefix="xmn")
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "gcs_server_port": free_port(), "temp_dir": temp, "include_dashboard": False})
    nodes = [cluster.add_node(num_cpus=1) for _ in range(3)]
    cluster.wait_for_nodes()
    try:
        yield cluster, nodes
    finally:
        cluster.shutdown()


def test_ranks_on_two_nodes_with_s3_storage_survive_losing_a_node(
        spread_cluster, fmnist, tmp_path, s3_server, monkeypatch):
    cluster, nodes = spread_cluster
    bucket = s3_server.make_bucket("multinode")
    server_root = tmp_path / "mlflow"
    server_root.mkdir()
    server = MlflowServer(server_root)
    server.start()
    backlog = tmp_path / "backlog"
    env = {**os.environ, "RAY_ADDRESS": cluster.address, "RAY_AUTH_MODE": "disabled",
           "XTRA_TRACKING_BACKLOG_DIR": str(backlog)}
    steps, every = 9, 3
    common = {"train.cpus_per_worker": 1.0, "train.storage_path": f"s3://{bucket}/runs",
              "data.s3_endpoint": s3_server.endpoint, "mlflow.tracking_uri": server.url,
              "train.max_steps": steps, "train.checkpoint_every": every}
    try:
        # 1. spread: both ranks, one per worker node; pictures and the MLflow run over HTTP
        seen: dict[int, object] = {}
        run = pretrain(fmnist, sets(tmp_path, "spread", **common, **{"train.visualize_every": 3}), env)
        while run.poll() is None:
            seen.update(train_worker_nodes(cluster))
            time.sleep(0.5)
        out = run.stdout.read()
        assert run.returncode == 0, out[-4000:]
        rank_nodes = {n.node_id for n in seen.values()}
        assert len(rank_nodes) == 2 and rank_nodes <= {n.node_id for n in nodes}, "ranks not on 2 nodes"
        assert "local path" not in out  # s3:// storage: no shared-storage warning
        client = mlflow.MlflowClient(tracking_uri=server.url)
        (ref_run,) = client.search_runs(client.get_experiment_by_name("multinode").experiment_id,
                                        "attributes.run_name = 'spread'")
        assert ref_run.info.status == "FINISHED"
        assert client.get_latest_versions("enc-spread")  # registered from the S3 checkpoint
        assert [a.path for a in client.list_artifacts(ref_run.info.run_id)
                if "picture" in a.path or a.path.startswith("images")], "no pictures logged"
        assert not list(backlog.glob("*.jsonl")) or all(not p.read_text() for p in backlog.glob("*.jsonl"))
        ref_loss, _ = losses(server.url, ref_run.info.run_id)

        # 2. node loss: the node of one rank goes away after the first registered checkpoint
        from pipelines.pretrain.checkpoints import latest_checkpoint_step
        from xtra_core.config import build_config

        cfg = build_config("tiny", None, {"data.s3_endpoint": s3_server.endpoint})
        lost: dict[str, object] = {}
        run = pretrain(fmnist, sets(tmp_path, "node-loss", **common, **{"train.max_failures": 2}), env)
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(run.stdout), daemon=True)
        reader.start()
        # in this thread: Ray's Node sets signal handlers, which only the main thread may
        deadline = time.time() + 900
        while run.poll() is None and time.time() < deadline and \
                latest_checkpoint_step(f"s3://{bucket}/runs", "node-loss", cfg) < every:
            time.sleep(0.2)
        workers = train_worker_nodes(cluster)
        if workers and run.poll() is None:
            lost["t"] = time.time()
            cluster.remove_node(next(iter(workers.values())), allow_graceful=False)
            cluster.add_node(num_cpus=1)  # a replacement, as an autoscaler would start
        run.wait(timeout=1200)
        reader.join(timeout=30)
        out = "".join(output)
        assert "t" in lost, "the test removed no node"
        assert run.returncode == 0, out[-4000:]
        (lost_run,) = client.search_runs(client.get_experiment_by_name("multinode").experiment_id,
                                         "attributes.run_name = 'node-loss'")
        resumed = client.get_metric_history(lost_run.info.run_id, "resumed_from_step")
        restart = max(int(m.value) for m in resumed)
        loss, history = losses(server.url, lost_run.info.run_id)
        redone = len(history) - len({m.step for m in history})
        assert restart >= every and restart % every == 0 and redone <= every, (restart, redone)
        assert sorted(loss) == list(range(1, steps + 1))
        for step in loss:  # same weights + same images on other nodes -> the same loss
            assert loss[step] == pytest.approx(ref_loss[step], rel=1e-4), (step, loss, ref_loss)
        # the first report of the restarted group is the first that carries resumed_from_step=restart
        # (a step the lost group finished just after the removal is logged too, with 0)
        back_s = min(m.timestamp for m in resumed if int(m.value) == restart) / 1000 - lost["t"]
        record_figure("node_loss", resumed_from_step=restart, steps_redone=redone, checkpoint_every=every,
                      seconds_to_first_step_after=round(back_s, 1),
                      steps_matching_uninterrupted=f"{len(loss)}/{steps}")
        assert re.search(r"step \d+/9", out)
    finally:
        server.close()
