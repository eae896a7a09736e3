"""The registered encoder: portable (code, not pickle; xtra_core travels with it), with a
signature and aliases; `xtra promote` / `xtra export`; and it loads and predicts in a fresh
virtual environment built from its own requirements.txt only."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import venv
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml

import xtra_core
from pipelines.cli import main as cli_main
from pipelines.tracking import registry, runs
from xtra_core.config import build_config
from xtra_core.export import save_encoder, save_model
from xtra_core.model import build_model

pytestmark = pytest.mark.slow

SMALL = {
    "model.image_size": 16, "model.patch_size": 4, "model.block_size": 2,
    "model.encoder_width": 32, "model.encoder_depth": 2, "model.encoder_heads": 2,
    "model.projection_hidden": 64, "model.decoder_width": 32, "model.decoder_depth": 1,
    "model.decoder_heads": 2, "model.head_hidden": 64,
}


@pytest.fixture(scope="module")
def registered(tmp_path_factory):
    """Version 1 of `enc` (alias challenger) logged by a run that also keeps the full model."""
    tmp = tmp_path_factory.mktemp("registry")
    db = f"sqlite:///{tmp}/mlflow.db"
    cfg = build_config("tiny", None, SMALL).model
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    export = save_encoder(model.encoder.state_dict(), cfg, tmp / "encoder_export")
    full = save_model(model.state_dict(), cfg, tmp / "model_export")
    mlflow.set_tracking_uri(db)
    exp = mlflow.MlflowClient().create_experiment("t", artifact_location=(tmp / "artifacts").as_uri())
    with mlflow.start_run(experiment_id=exp) as run:
        info = registry.log_and_register_encoder(export, "enc", alias="challenger")
    runs.log_full_model(db, run.info.run_id, full)
    return {"db": db, "model": model, "run_id": run.info.run_id, "tmp": tmp, **info}


def test_registered_model_is_code_with_xtra_core_a_signature_and_exact_requirements(registered):
    mlflow.set_tracking_uri(registered["db"])
    local = Path(mlflow.artifacts.download_artifacts("models:/enc@challenger"))
    files = {p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()}
    assert not [f for f in files if f.endswith((".pkl", ".pickle"))], files  # nothing pickled
    assert "code/xtra_core/model.py" in files
    assert {f.split("/")[-1] for f in files if f.startswith("artifacts/")} == {"encoder.safetensors", "config.json"}
    assert not any("__pycache__" in f for f in files)
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    inputs = json.loads(mlmodel["signature"]["inputs"])
    assert inputs[0]["tensor-spec"] == {"dtype": "float32", "shape": [-1, 3, 16, 16]}
    reqs = (local / "requirements.txt").read_text().split()
    assert sorted(r.split("==")[0] for r in reqs) == ["mlflow", "numpy", "safetensors", "torch"]
    assert "torch==2.13.0" in reqs and all("==" in r for r in reqs)


def test_pyfunc_predicts_the_encoders_features_and_takes_last_n(registered):
    mlflow.set_tracking_uri(registered["db"])
    pyfunc = mlflow.pyfunc.load_model("models:/enc@challenger")
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        want1 = registered["model"].encode(x).mean(1).numpy()
        want2 = registered["model"].encode(x, last_n=2).mean(1).numpy()
    np.testing.assert_array_equal(pyfunc.predict(x.numpy()), want1)
    np.testing.assert_array_equal(pyfunc.predict(x.numpy(), params={"last_n": 2}), want2)


def test_promote_sets_champion_and_export_writes_a_loadable_encoder(registered, tmp_path, capsys):
    db = registered["db"]
    assert cli_main(["promote", "--model", "models:/enc@challenger", "--alias", "champion",
                     "--set", f"mlflow.tracking_uri={db}"]) == 0
    assert json.loads(capsys.readouterr().out) == {
        "name": "enc", "version": "1", "alias": "champion", "model_uri": "models:/enc@champion"}
    assert str(mlflow.MlflowClient(tracking_uri=db).get_model_version_by_alias("enc", "champion").version) == "1"

    mlflow.set_tracking_uri(db)
    assert registry.resolve_model("models:/enc/latest")[1]["version"] == "1"
    out = tmp_path / "exported"
    assert cli_main(["export", "--model", "models:/enc@champion", "--out", str(out), "--full",
                     "--set", f"mlflow.tracking_uri={db}"]) == 0
    assert json.loads(capsys.readouterr().out)["files"] == ["config.json", "encoder.safetensors", "model.safetensors"]
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(xtra_core.load_encoder(out)(x), registered["model"].encode(x))
        assert torch.equal(xtra_core.load_model(out).predict(x), registered["model"].predict(x))

    # reserved alias names and unknown versions are one line, exit 2
    assert cli_main(["promote", "--model", "models:/enc/1", "--alias", "latest", "--set", f"mlflow.tracking_uri={db}"]) == 2
    assert cli_main(["promote", "--model", "models:/enc/7", "--alias", "x", "--set", f"mlflow.tracking_uri={db}"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and "reserved" in err[0] and "models:/enc/7" in err[1]


FRESH_ENV_SCRIPT = r"""
import sys, numpy as np, mlflow
for name in ("pipelines", "ray", "deepspeed"):
    try:
        __import__(name)
    except ImportError:
        pass
    else:
        raise SystemExit(f"{name} is importable in the fresh environment")
model = mlflow.pyfunc.load_model(sys.argv[1])
np.save(sys.argv[3], model.predict(np.load(sys.argv[2])))
print("predicted in", sys.prefix)
"""


def test_registered_model_loads_and_predicts_in_a_fresh_venv_from_its_requirements(registered, tmp_path):
    """python -m venv + pip install -r <the model's requirements.txt>; torch 2.13.0 comes from
    the machine's local wheel (pip's configured find-links), the rest from the package index or
    pip's cache. The model is then loaded through the registry (models:/enc@challenger)."""
    mlflow.set_tracking_uri(registered["db"])
    local = Path(mlflow.artifacts.download_artifacts("models:/enc@challenger", dst_path=str(tmp_path / "m")))
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    py = env_dir / "bin" / "python"
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "-r", str(local / "requirements.txt")],
                         env=clean, capture_output=True, text=True, timeout=1800)
    assert pip.returncode == 0, pip.stderr[-3000:]
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run = subprocess.run(
        [str(py), "-c", FRESH_ENV_SCRIPT, "models:/enc@challenger", str(tmp_path / "x.npy"), str(tmp_path / "y.npy")],
        env={**clean, "MLFLOW_TRACKING_URI": registered["db"]}, cwd=tmp_path,
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert str(env_dir) in run.stdout
    with torch.no_grad():
        want = registered["model"].encode(torch.from_numpy(x)).mean(1).numpy()
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), want, rtol=0, atol=1e-6)
    assert sys.prefix != str(env_dir)
