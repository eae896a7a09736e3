"""Shared fixtures: a real local Ray cluster and a real S3 HTTP server (moto) on 127.0.0.1.

- `aws_test_env` (session): fake AWS credentials and region in the environment, instance metadata
  lookups off, no AWS_ENDPOINT_URL; restored at the end. Ray workers inherit it because
  `ray_cluster` depends on it.
- `s3_server` (session): moto's ThreadedMotoServer on a free port; `.endpoint` is its URL,
  `.make_bucket()` a fresh bucket, `.put(key_uri, bytes)` an object. Stopped after the session.
- `checkout_stays_clean` (session, autouse): fails the session if a test wrote MLflow's default
  stores (`mlruns/`, `mlartifacts/`, `mlruns.db`) into the checkout instead of its tmp path.
- `ray_cluster` (session): `ray.init(num_cpus=2)` with a short temp dir (unix socket paths must be
  short) and no dashboard; shut down and removed after the session. Workers' and actors' output
  is not forwarded to the test's console, as in the product without `--verbose` (a test that
  counts the lines a user sees would otherwise count a Ray actor's late warning);
  `XTRA_TEST_RAY_LOGS=1` forwards it when debugging.
"""

from __future__ import annotations

import itertools
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

# OpenMP threads sleep instead of spinning between kernels: on a loaded 2-core machine the
# spin-waiting default makes a tiny training step take seconds (set before torch is imported)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Ray Train polls workers every 2 s by default, so every ray.train.report would wait that long
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_SESSION_TOKEN": "testing",
    "AWS_REGION": "us-east-1",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}


CHECKOUT = Path(__file__).resolve().parents[1]
MLFLOW_DEFAULT_STORES = ("mlruns", "mlartifacts", "mlruns.db")


@pytest.fixture(scope="session", autouse=True)
def checkout_stays_clean() -> Iterator[None]:
    before = {name for name in MLFLOW_DEFAULT_STORES if (CHECKOUT / name).exists()}
    yield
    made = [name for name in MLFLOW_DEFAULT_STORES if name not in before and (CHECKOUT / name).exists()]
    assert not made, (f"a test wrote MLflow's default store {made} into {CHECKOUT}: give its experiment "
                      "an artifact_location under tmp_path (pipelines.tracking.store.experiment_id does)")


@pytest.fixture(scope="session")
def aws_test_env() -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in [*FAKE_AWS_ENV, "AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3"]}
    os.environ.update(FAKE_AWS_ENV)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    os.environ.pop("AWS_ENDPOINT_URL_S3", None)
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@dataclass
class S3Server:
    """A running moto S3 server: `endpoint` is `http://127.0.0.1:<port>`."""

    endpoint: str
    client: Any  # a boto3 S3 client for the test's own setup and checks
    _buckets: Iterator[int] = field(default_factory=itertools.count)

    def make_bucket(self, prefix: str = "bucket") -> str:
        name = f"{prefix}-{next(self._buckets)}"
        self.client.create_bucket(Bucket=name)
        return name

    def put(self, uri: str, body: bytes) -> None:
        bucket, key = uri.removeprefix("s3://").split("/", 1)
        self.client.put_object(Bucket=bucket, Key=key, Body=body)


@pytest.fixture(scope="session")
def s3_server(aws_test_env: None) -> Iterator[S3Server]:
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no access log per request
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    try:
        yield S3Server(endpoint, client)
    finally:
        server.stop()


@pytest.fixture(scope="session")
def ray_cluster(aws_test_env: None) -> Iterator[None]:
    import ray

    tmp = tempfile.mkdtemp(prefix="xr", dir="/tmp")
    ray.init(
        address="local",
        num_cpus=2,
        _temp_dir=tmp,
        include_dashboard=False,
        configure_logging=False,
        log_to_driver=os.environ.get("XTRA_TEST_RAY_LOGS") == "1",
    )
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    try:
        yield
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture
def ray_must_not_start(monkeypatch):
    """The command under test may not start or use Ray: `ray.init` fails the test, whether or not
    another test's Ray is up in this process (`ray.is_initialized()` reads False meanwhile)."""
    import ray

    def refuse(*args, **kwargs):
        raise AssertionError("the command started Ray")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", refuse)
