"""A local autoscaling Ray cluster for tests: a head with its own port and temp dir plus Ray's fake
multi-node autoscaler (provider `fake_multinode`, RAY_FAKE_CLUSTER=1), whose worker nodes are
raylets on this machine. Unlike `ray.cluster_utils.AutoscalingCluster.start()/shutdown()` (which
run `ray stop --force`, killing every Ray on the machine), only this cluster's processes are
stopped: the `ray start --block` process group and every process naming its GCS address."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def autoscaling_config(gcs_address: str, worker_types: dict[str, Any], max_workers: int) -> dict:
    """What `ray up` would write to ~/ray_bootstrap_config.yaml, for the fake provider (the
    example.yaml that AutoscalingCluster reads is not in the wheel)."""
    return {
        "cluster_name": "xtra-fake",
        "max_workers": max_workers,
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 1,
        "provider": {"type": "fake_multinode", "gcs_address": gcs_address,
                     "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True},
        "auth": {"ssh_user": "ubuntu"},
        "docker": {},
        "head_node_type": "ray.head.default",
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            **worker_types,
        },
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [], "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }


class FakeAutoscalingCluster:
    """`with FakeAutoscalingCluster({...node types...}, max_workers) as c:` -> c.address, c.env."""

    def __init__(self, worker_types: dict[str, Any], max_workers: int):
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.temp_dir = tempfile.mkdtemp(prefix="xas")  # short: Ray's socket paths have a limit
        self.config_path = os.path.join(self.temp_dir, "autoscaling.json")
        Path(self.config_path).write_text(json.dumps(autoscaling_config(self.address, worker_types, max_workers)))
        self.env = {**os.environ, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                    "RAY_AUTH_MODE": "disabled", "RAY_ADDRESS": self.address}
        self.proc: subprocess.Popen | None = None

    def __enter__(self) -> FakeAutoscalingCluster:
        log = open(os.path.join(self.temp_dir, "ray-start.log"), "w")
        self.proc = subprocess.Popen(
            [RAY, "start", "--head", "--block", f"--port={self.port}", "--num-cpus=0",
             f"--autoscaling-config={self.config_path}", f"--temp-dir={self.temp_dir}",
             "--include-dashboard=false", "--node-ip-address=127.0.0.1",
             f"--ray-client-server-port={free_port()}", "--disable-usage-stats"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 120
        while not self.monitor_pids():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"the head did not start: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
        return self

    def own_processes(self) -> list[psutil.Process]:
        """The head's process tree and every process that names this cluster's GCS address or
        temp dir (the fake worker nodes' raylets and their workers)."""
        procs: dict[int, psutil.Process] = {}
        if self.proc is not None:
            try:
                root = psutil.Process(self.proc.pid)
                procs[root.pid] = root
                procs.update({p.pid: p for p in root.children(recursive=True)})
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info.get("cmdline") or [])
            if self.address in cmd or self.temp_dir in cmd:
                procs[p.pid] = p
                try:
                    procs.update({c.pid: c for c in p.children(recursive=True)})
                except psutil.NoSuchProcess:
                    pass
        procs.pop(os.getpid(), None)
        return list(procs.values())

    def monitor_pids(self) -> list[int]:
        return [p.pid for p in self.own_processes()
                if any("monitor.py" in a for a in (p.cmdline() if p.is_running() else []))]

    def __exit__(self, *exc: object) -> None:
        procs = self.own_processes()
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # `ray start --block` stops the head's processes
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)
