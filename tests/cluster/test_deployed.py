"""The cluster files as deployed: the KubeRay MLflow Deployment's own command answers the Ray pods'
tracking calls (Host header of their MLFLOW_TRACKING_URI), and deepspeed is a named dependency."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
KUBERAY = ROOT / "cluster" / "kuberay"


def docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def mlflow_container() -> dict:
    (dep,) = [d for d in docs(KUBERAY / "mlflow.yaml") if d["kind"] == "Deployment"]
    (container,) = dep["spec"]["template"]["spec"]["containers"]
    return container


def pods_tracking_hosts() -> set[str]:
    """The Host headers the Ray pods send: the netloc of every MLFLOW_TRACKING_URI they are given."""
    text = "".join(p.read_text() for p in KUBERAY.glob("ray*.yaml"))
    return {urlsplit(u).netloc for u in re.findall(r'MLFLOW_TRACKING_URI, value: "([^"]+)"', text)}


def test_deepspeed_is_a_named_dependency_with_its_install_note():
    pin = re.search(r"deepspeed==(\S+)", (ROOT / "Makefile").read_text()).group(1)
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'"deepspeed=={pin}"' in pyproject and "--no-build-isolation" in pyproject
    req = (ROOT / "requirements.txt").read_text()
    # named with its note, as a comment: `pip install -r` runs before torch-dependent builds can
    assert f"DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed=={pin}" in req
    assert not re.search(r"^deepspeed", req, re.M)


def test_the_mlflow_pod_writes_its_volume_as_the_images_user():
    (dep,) = [d for d in docs(KUBERAY / "mlflow.yaml") if d["kind"] == "Deployment"]
    ctx = dep["spec"]["template"]["spec"]["securityContext"]
    dockerfile = (ROOT / "cluster" / "Dockerfile").read_text()
    assert "rayproject/ray" in dockerfile and "--chown=ray:users" in dockerfile  # uid 1000, gid 100
    assert ctx["fsGroup"] == 100 and ctx["runAsUser"] == 1000
    launcher = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    (mount,) = launcher["docker"]["head_run_options"]
    host_dir = mount.split("=", 1)[1].split(":")[0]
    assert any(host_dir in c and "chown 1000:100" in c for c in launcher["initialization_commands"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, host: str, path: str, body: dict | None = None) -> int:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}", headers={"Host": host, "Content-Type": "application/json"},
        data=json.dumps(body).encode() if body is not None else None)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code


def start_server(args: list[str], tmp: Path) -> subprocess.Popen:
    """`mlflow server` with the Deployment's arguments: the stores moved under tmp, its own port."""
    port = free_port()
    moved = []
    for a in args:
        if a.startswith("--backend-store-uri="):
            a = f"--backend-store-uri=sqlite:///{tmp}/mlflow.db"
        elif a.startswith("--artifacts-destination="):
            a = f"--artifacts-destination={tmp}/artifacts"
        elif a.startswith("--port="):
            a = f"--port={port}"
        elif a.startswith("--host="):
            a = "--host=127.0.0.1"
        moved.append(a)
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", *moved, "--workers=1"],
                            stdout=subprocess.DEVNULL, stderr=open(tmp / "server.log", "wb"),
                            start_new_session=True)
    proc.port = port  # type: ignore[attr-defined]
    for _ in range(240):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1)
            return proc
        except OSError:
            time.sleep(0.5)
    os.killpg(proc.pid, 9)
    raise RuntimeError(f"mlflow server did not start: {(tmp / 'server.log').read_text()[-2000:]}")


@pytest.mark.slow
def test_the_manifests_mlflow_command_answers_the_ray_pods(tmp_path):
    container = mlflow_container()
    assert container["command"] == ["mlflow", "server"]
    hosts = pods_tracking_hosts()
    assert hosts == {"xtra-mlflow:5000"}
    search = "/api/2.0/mlflow/experiments/search"
    proc = start_server(container["args"], tmp_path)
    try:
        port = proc.port  # type: ignore[attr-defined]
        assert call(port, "10.1.2.3:5000", "/health") == 200  # the kubelet's readiness probe
        codes = {h: call(port, h, search, {"max_results": 1}) for h in hosts}
        codes["namespaced"] = call(port, "xtra-mlflow.ml.svc.cluster.local:5000", search, {"max_results": 1})
        codes["port-forward"] = call(port, "localhost:5000", search, {"max_results": 1})
        codes["elsewhere"] = call(port, "evil.example.com", search, {"max_results": 1})
    finally:
        os.killpg(proc.pid, 9)
        proc.wait(timeout=30)
    assert codes == {"xtra-mlflow:5000": 200, "namespaced": 200, "port-forward": 200,
                     "elsewhere": 403}, codes
    # the test can fail: without the flag MLflow's own default list (localhost, private IPs)
    # refuses the Service name, the 403 the pods got (one server start less than running it)
    from mlflow.server.security_utils import get_default_allowed_hosts, is_allowed_host_header

    assert not any(is_allowed_host_header(get_default_allowed_hosts(), h) for h in hosts)
    assert is_allowed_host_header(get_default_allowed_hosts(), "10.1.2.3:5000")
