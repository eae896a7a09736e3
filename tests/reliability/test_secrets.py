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


@pytest.mark.slow
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


# -- every command's failing path: the line it prints holds no planted credential -----------------

PW = "Pl@nted/Pass:9%x"  # '@', '/', ':' and '%' unencoded, as a user pastes it
KEY = "PlantedKey7"
FAILING = {
    "data inspect": ["data", "inspect", f"s3://AKIAPLANTED:{KEY}@127.0.0.1:9/bucket"],
    "data inspect endpoint": ["data", "inspect", "s3://bucket/x", "--s3-endpoint", f"http://AKIAPLANTED:{KEY}@127.0.0.1:9"],
    "pretrain": ["pretrain", "--data", f"s3://AKIAPLANTED:{KEY}@127.0.0.1:9/bucket",
                 "--set", f"mlflow.tracking_uri=http://u:{PW}@127.0.0.1:9"],
    "pretrain uri": ["pretrain", "--data", "/nonexistent", "--set", f"mlflow.tracking_uri=http://u:{KEY}@127.0.0.1:9"],
    "probe": ["probe", "--model", "models:/enc/1", "--data", "/nonexistent",
              "--set", f"mlflow.tracking_uri=http://u:{KEY}@127.0.0.1:9"],
    "sweep": ["sweep", "--data", f"s3://u:{KEY}@127.0.0.1:9/b", "--axis", "train.lr=1e-3",
              "--set", "data.s3_max_attempts=1"],
    "visualize": ["visualize", "--model", "models:/enc/1", "--data", "/nonexistent", "--out", "/tmp/xtra-none.png",
                  "--set", f"mlflow.tracking_uri=http://u:{KEY}@127.0.0.1:9"],
    "export": ["export", "--model", "models:/enc/1", "--out", "/tmp/xtra-none-export",
               "--set", f"mlflow.tracking_uri=http://u:{KEY}@127.0.0.1:9"],
    "promote": ["promote", "--model", "models:/enc/1", "--alias", "champion",
                "--set", f"mlflow.tracking_uri=http://u:{KEY}@127.0.0.1:9"],
    "submit": ["submit", "pretrain", "--address", f"http://u:{KEY}@127.0.0.1:9", "--",
               "--set", f"mlflow.tracking_uri=http://u:{PW}@h:1"],
}


SCANNED: list[str] = []


@pytest.mark.parametrize("name", sorted(FAILING))
def test_failing_paths_print_no_planted_credential(name, capsys, monkeypatch, tmp_path):
    from pipelines.cli import main as cli_main

    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "PlantedEnvSecret1")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "PlantedEnvPass2")
    monkeypatch.setenv("XTRA_TRACKING_BACKLOG_DIR", str(tmp_path / "backlog"))
    monkeypatch.chdir(tmp_path)
    code = cli_main(FAILING[name])
    out, err = capsys.readouterr()
    for secret in (KEY, PW, "PlantedEnvSecret1", "PlantedEnvPass2", "Pass:9"):
        assert secret not in out + err, (name, secret, out[-500:], err[-2000:])
    assert code != 0 and err.strip(), (name, out, err)
    SCANNED.append(name)


def test_failing_paths_figure():
    """One row for the failing paths above (run after them in the file)."""
    if SCANNED:
        record_figure("secrets_failing_paths", commands=len(SCANNED), secrets_found=0,
                      planted=", ".join(("S3 URI", "S3 endpoint", "tracking URI with '@ / : %'", "env")))
