"""A registered version is followed only where its files lie in the tracking store's artifacts:
one pointing at another folder of this machine is refused by `xtra export` (one line) unless
--allow-outside-source. A real sqlite MLflow store; the versions are made with MLflow's client."""

from __future__ import annotations

import json

import mlflow

from pipelines.cli import main as cli_main
from pipelines.tracking import store
from tests.small_run import SMALL_MODEL
from xtra_core.config import build_config
from xtra_core.export import WEIGHTS, save_encoder
from xtra_core.model import build_model


def test_export_follows_a_version_inside_the_store_and_refuses_one_outside(tmp_path, capsys) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = build_config("tiny", None, {**SMALL_MODEL, "mlflow.tracking_uri": uri})
    export = tmp_path / "outside"  # an export in some folder of this machine
    save_encoder(build_model(cfg.model).encoder.state_dict(), cfg.model, export)
    c = mlflow.MlflowClient(tracking_uri=uri)
    run = c.create_run(store.experiment_id(uri, "outside"))
    c.log_artifacts(run.info.run_id, str(export), "export")
    c.create_registered_model("enc")
    c.create_model_version("enc", f"{run.info.artifact_uri}/export", run.info.run_id)  # version 1: inside
    c.create_model_version("enc", str(export), run.info.run_id)  # version 2: a local path outside
    args = ["export", "--set", f"mlflow.tracking_uri={uri}"]

    assert cli_main([*args, "--model", "models:/enc/1", "--out", str(tmp_path / "e1")]) == 0
    assert (tmp_path / "e1" / WEIGHTS).exists()
    capsys.readouterr()
    assert cli_main([*args, "--model", "models:/enc/2", "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"files are at {export}" in err and "--allow-outside-source" in err
    assert not (tmp_path / "e2").exists()
    assert cli_main([*args, "--model", "models:/enc/2", "--out", str(tmp_path / "e2"),
                     "--allow-outside-source"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["version"] == "2"
