"""Fake secrets planted in the environment and the config: nothing the run writes contains them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml

from tests.reliability.conftest import own_ray_env, record_figure, small_sets

pytestmark = pytest.mark.slow

ENV_SECRETS = {
    "AWS_SECRET_ACCESS_KEY": "PlantedEnvSecret1",
    "MLFLOW_TRACKING_PASSWORD": "PlantedEnvPass2",
    "HF_TOKEN": "PlantedEnvToken3",
}
# a user name is not a secret (the MLflow server records who logged a run), but it makes the
# client send the planted password
ENV_NAMES = {"MLFLOW_TRACKING_USERNAME": "planted-user"}
CONFIG_SECRETS = ("PlantedUriPass4", "PlantedEndpointKey5", "PlantedEndpointSecret6")


def _files(*roots: Path):
    for root in roots:
        for p in root.rglob("*"):
            if p.is_file() and not p.is_symlink() and not p.name.endswith((".sock", "plasma_store", "raylet")):
                yield p


def test_no_planted_secret_in_logs_store_artifacts_or_checkpoints(fmnist, mlflow_server, tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="xs", dir="/tmp"))  # unix socket paths must be short
    host = mlflow_server.url.removeprefix("http://")
    sets = small_sets(tmp_path, fmnist, "secrets", **{
        "train.max_steps": 3, "train.checkpoint_every": 2,
        "mlflow.tracking_uri": f"http://planted:{CONFIG_SECRETS[0]}@{host}",
        "data.s3_endpoint": f"http://{CONFIG_SECRETS[1]}:{CONFIG_SECRETS[2]}@127.0.0.1:9",
    })
    config = tmp_path / "run.yaml"
    nested: dict = {}
    for key, value in sets.items():
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    config.write_text(yaml.safe_dump(nested))
    env = {**own_ray_env(), **ENV_SECRETS, **ENV_NAMES, "RAY_TMPDIR": str(ray_tmp),
           "XTRA_TRACKING_BACKLOG_DIR": str(tmp_path / "backlog")}
    logs = tmp_path / "logs"
    logs.mkdir()
    try:
        with open(logs / "stdout.txt", "wb") as out, open(logs / "stderr.txt", "wb") as err:
            proc = subprocess.run(
                [sys.executable, "-m", "pipelines.cli", "pretrain", "--config", str(config)],
                env=env, stdout=out, stderr=err, timeout=900, cwd=Path(__file__).resolve().parents[2],
            )
        assert proc.returncode == 0, (logs / "stderr.txt").read_text()[-3000:]
        assert "encoder registered" in (logs / "stdout.txt").read_text()
        scanned, size, hits = 0, 0, []
        # everything the run wrote: its logs, Ray's session logs, run storage (checkpoints, the
        # encoder export), the MLflow server's store and artifacts (the test's tmp path holds them)
        for path in _files(tmp_path, ray_tmp):
            if path == config:  # the user's own input file
                continue
            data = path.read_bytes()
            scanned, size = scanned + 1, size + len(data)
            for secret in (*ENV_SECRETS.values(), *CONFIG_SECRETS):
                if secret.encode() in data:
                    hits.append(f"{path}: {secret}")
        assert scanned > 20 and any("checkpoint_step" in str(p) for p in _files(tmp_path))
        assert not hits, hits
        record_figure("planted_secrets", files_scanned=scanned, mb_scanned=round(size / 2**20, 1),
                      secrets_planted=len(ENV_SECRETS) + len(CONFIG_SECRETS), secrets_found=len(hits))
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
