"""Config changes accepted on a resume are recorded on the MLflow run (params are write-once):
a tag per resume step and the resumed config as an artifact, credentials redacted."""

from __future__ import annotations

import mlflow
import yaml

from pipelines.tracking import runs as tracking
from xtra_core.config import build_config


def test_accepted_changes_are_a_tag_and_a_config_artifact_on_the_run(tmp_path) -> None:
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = build_config("tiny", None, {"mlflow.tracking_uri": uri, "train.run_name": "r", "train.lr": 1e-3})
    run_id = tracking.start_or_resume_run(uri, cfg, "r")
    cfg.train.lr, cfg.data.uri = 5e-4, "s3://u:SECRET@host/images"
    tracking.record_resume_changes(uri, run_id, 40, ["train.lr=0.001 -> 0.0005",
                                                     "data.uri='' -> 's3://u:SECRET@host/images'"], cfg)
    c = mlflow.MlflowClient(tracking_uri=uri)
    run = c.get_run(run_id)
    tag = run.data.tags["xtra.resume_changes.step40"]
    assert "train.lr=0.001 -> 0.0005" in tag and "SECRET" not in tag
    assert run.data.params["train.lr"] == "0.001"  # the params keep the first values
    path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="config_step40.yaml",
                                               tracking_uri=uri, dst_path=str(tmp_path / "dl"))
    saved = yaml.safe_load(open(path))
    assert saved["train"]["lr"] == 5e-4 and "SECRET" not in open(path).read()
