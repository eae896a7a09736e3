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
from xtra_core.config import build_config

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

    def __init__(self, root: Path) -> None:
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
            ],
            stdout=self.log, stderr=self.log, start_new_session=True,
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


SMALL_MODEL = {
    "model.image_size": 16, "model.patch_size": 4, "model.block_size": 2,
    "model.encoder_width": 64, "model.encoder_depth": 2, "model.encoder_heads": 2,
    "model.projection_hidden": 128, "model.decoder_width": 64, "model.decoder_depth": 1,
    "model.decoder_heads": 2, "model.head_hidden": 128,
}


def small_sets(tmp_path: Path, data: str, name: str, **sets) -> dict:
    dotted = {
        **SMALL_MODEL,
        "data.uri": data,
        "train.global_batch_size": 16,
        "train.num_workers": 2,
        "train.cpus_per_worker": 0.5,
        "train.zero_stage": 2,
        "train.max_steps": 8,
        "train.warmup_steps": 2,
        "train.lr": 3e-3,
        "train.log_every": 1,
        "train.checkpoint_every": 4,
        "train.run_name": name,
        "train.storage_path": str(tmp_path / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "mlflow.experiment": "test",
        "mlflow.registered_model": f"enc-{name}",
    }
    dotted.update(sets)
    return dotted


def make_cfg(tmp_path: Path, data: str, name: str, **sets):
    return build_config("tiny", None, small_sets(tmp_path, data, name, **sets))


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> str:
    """64 train / 32 test real Fashion-MNIST images (distinct) in the class-folder layout."""
    dest = tmp_path_factory.mktemp("fmnist")
    assert cli_main(["data", "prepare", "--source", "fashion-mnist", "--dest", str(dest), "--limit", "64"]) == 0
    return str(dest)


def own_ray_env() -> dict[str, str]:
    """The environment for a CLI subprocess that starts its own Ray (no RAY_ADDRESS)."""
    return {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
