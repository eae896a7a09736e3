"""The one connection to MLflow: MLflow's process-wide URI is left as it was, and the experiment
is created once, with its artifacts next to a sqlite store, whoever asks first."""

from __future__ import annotations

import os
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking._tracking_service import utils

from pipelines.tracking import store


@pytest.mark.parametrize("env", [None, "sqlite:////tmp/from-env.db"])
def test_fluent_at_points_mlflow_at_the_uri_only_inside(monkeypatch, env):
    monkeypatch.setattr(utils, "_tracking_uri", None)
    if env is None:
        monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    else:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", env)
    with store.fluent_at("sqlite:////tmp/inside.db"):
        assert mlflow.get_tracking_uri() == "sqlite:////tmp/inside.db"
    assert utils._tracking_uri is None
    assert os.environ.get("MLFLOW_TRACKING_URI") == env


def test_experiment_is_created_once_with_artifacts_beside_the_sqlite_store(tmp_path: Path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    assert store.experiment_id(uri, "e", create=False) is None
    first = store.experiment_id(uri, "e")
    assert store.experiment_id(uri, "e") == first
    location = store.client(uri).get_experiment(first).artifact_location
    assert location == (tmp_path / "mlartifacts").as_uri()
    run = store.client(uri).create_run(first, tags={"xtra.run_name": "r1"})
    assert store.find_run(uri, first, "xtra.run_name", "r1").info.run_id == run.info.run_id
    assert store.find_run(uri, first, "xtra.run_name", "r2") is None
