"""`ray job submit -- python -m pipelines.pretrain ...` against a Ray head started by the test."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import pytest

from pipelines.cli import main as cli_main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head():
    """`ray start --head` with the job server (dashboard) on a free port; stopped afterwards."""
    temp = tempfile.mkdtemp(prefix="xh", dir="/tmp")
    port, gcs = free_port(), free_port()
    # every port of its own: the session's other Ray cluster (ray_cluster) holds the defaults, and a
    # dashboard agent that cannot bind leaves the head with "No available agent to submit job"
    agent_ports = [
        f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
        f"--metrics-export-port={free_port()}", f"--runtime-env-agent-port={free_port()}",
    ]
    # the job's `python` must be this environment's (the head passes its PATH to job drivers)
    # a throwaway local head: no token auth (the client and the head must agree)
    env = {**os.environ, "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_AUTH_MODE": "disabled",
           "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--num-cpus=2", f"--port={gcs}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={port}", f"--temp-dir={temp}", "--disable-usage-stats",
         *agent_ports],
        check=True, env=env, capture_output=True,
    )
    try:
        yield f"http://127.0.0.1:{port}", f"127.0.0.1:{gcs}"
    finally:
        stop_processes_mentioning(temp)  # not `ray stop`: that would stop every cluster here
        shutil.rmtree(temp, ignore_errors=True)


def stop_processes_mentioning(marker: str) -> None:
    """Terminate (then kill) this head's processes: those whose command line names its temp dir
    (gcs, raylet, dashboard) and all their children (agents and workers retitle themselves)."""
    import psutil

    procs: dict[int, psutil.Process] = {}
    for p in psutil.process_iter(["cmdline"]):
        if p.pid != os.getpid() and marker in " ".join(p.info["cmdline"] or []):
            with contextlib.suppress(psutil.Error):
                for q in [p, *p.children(recursive=True)]:
                    procs[q.pid] = q
    for p in procs.values():
        with contextlib.suppress(psutil.Error):
            p.terminate()
    procs = list(procs.values())
    _, alive = psutil.wait_procs(procs, timeout=10)
    for p in alive:
        p.kill()


def test_pretrain_runs_as_a_ray_job(ray_head, tmp_path):
    dashboard, _ = ray_head
    data = tmp_path / "fm"
    assert cli_main(["data", "prepare", "--source", "fashion-mnist", "--dest", str(data), "--limit", "48"]) == 0
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    sets = {
        "model.image_size": 16, "model.encoder_depth": 1, "model.decoder_depth": 1,
        "train.global_batch_size": 16, "train.max_steps": 2, "train.num_workers": 2,
        "train.cpus_per_worker": 0.5, "train.checkpoint_every": 2, "train.run_name": "job",
        "train.storage_path": str(tmp_path / "runs"), "mlflow.tracking_uri": tracking,
        "mlflow.registered_model": "job-encoder",
    }
    cmd = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(ROOT),
           "--", "python", "-m", "pipelines.cli", "pretrain", "--config", "tiny", "--data", str(data)]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "disabled"}
    for _ in range(30):  # the head's job agent needs a few seconds after `ray start`
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
        if "No available agent" not in proc.stdout + proc.stderr:
            break
        time.sleep(2)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "[xtra] step 2/2" in proc.stdout
    version = mlflow.MlflowClient(tracking_uri=tracking).get_model_version("job-encoder", "1")
    assert version.status == "READY"
