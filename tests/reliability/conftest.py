"""Fixtures of the fault tests: an MLflow server process that the test can stop and start again,
the small pretraining config of tests/pretrain, and a figures file the benchmark table reads."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipelines.cli import main as cli_main

# each fault test appends its figure here (one JSON object per line) when XTRA_RELIABILITY_FIGURES
# names a file; benchmarks/reliability.py runs the tests with it and prints the table
FIGURES_ENV = "XTRA_RELIABILITY_FIGURES"


def record_figure(test: str, **figures) -> None:
    """Print a fault test's figures (pytest -s shows them) and append them to the figures file."""
    line = json.dumps({"test": test, **figures})
    print(f"[figure] {line}", flush=True)
    path = os.environ.get(FIGURES_ENV)
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


class MlflowServer:
    """`mlflow server` on 127.0.0.1 with a sqlite store under `root`; `stop()` kills the process,
    `start()` brings it back on the same port and store."""

    def __init__(self, root: Path, extra_args: tuple[str, ...] = (), env: dict[str, str] | None = None) -> None:
        self.extra_args, self.env = extra_args, env
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.root = root
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None
        self.log = open(root / "mlflow-server.log", "ab")  # noqa: SIM115 (closed in close())

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                "--backend-store-uri", f"sqlite:///{self.root}/server.db",
                "--default-artifact-root", str(self.root / "server-artifacts"), "--workers", "1",
                *self.extra_args,
            ],
            stdout=self.log, stderr=self.log, start_new_session=True,
            env={**os.environ, **(self.env or {})},
        )
        for _ in range(240):
            try:
                urllib.request.urlopen(self.url + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            os.killpg(self.proc.pid, 9)  # the server and its uvicorn worker, nothing else
            self.proc.wait(timeout=30)
            self.proc = None

    def close(self) -> None:
        self.stop()
        self.log.close()


@pytest.fixture
def mlflow_server(tmp_path) -> Iterator[MlflowServer]:
    root = tmp_path / "mlflow"
    root.mkdir()
    server = MlflowServer(root)
    server.start()
    try:
        yield server
    finally:
        server.close()


@pytest.fixture
def backlog_dir(tmp_path, monkeypatch) -> Path:
    """The tracking backlog of this test's runs under its tmp path (the controller inherits it
    when the test starts its own Ray; an in-process cluster started earlier keeps ~/.cache)."""
    path = tmp_path / "backlog"
    monkeypatch.setenv("XTRA_TRACKING_BACKLOG_DIR", str(path))
    return path


from tests.small_run import SMALL_MODEL, make_cfg, small_sets  # noqa: E402,F401  (the tests' shared run)


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> str:
    """64 train / 32 test real Fashion-MNIST images (distinct) in the class-folder layout."""
    dest = tmp_path_factory.mktemp("fmnist")
    assert cli_main(["data", "prepare", "--source", "fashion-mnist", "--dest", str(dest), "--limit", "64"]) == 0
    return str(dest)


def own_ray_env() -> dict[str, str]:
    """The environment for a CLI subprocess that starts its own Ray (no RAY_ADDRESS)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
