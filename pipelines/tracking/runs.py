"""MLflow runs for pretraining: create or resume the run, log params / metrics / artifacts.

Called from the driver and from the Ray Train controller's callback (which sees rank 0's
rank-averaged metrics), so no tracking I/O happens inside the training loop and a local sqlite
store works even when the workers sit on other nodes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from pipelines.tracking.registry import check_tracking, log_and_register_encoder, tracking_uri
from xtra_core.config import XTRAConfig

__all__ = ["check_tracking", "tracking_uri", "start_or_resume_run", "log_step_metrics", "register_encoder"]

RUN_NAME_TAG = "xtra.run_name"
SECRET_WORDS = ("secret", "password", "token", "credential", "access_key")


def _client(uri: str):
    import mlflow

    return mlflow.MlflowClient(tracking_uri=uri)


def experiment_id(uri: str, name: str) -> str:
    """The experiment's id, creating it (artifacts next to a sqlite store) if needed."""
    client = _client(uri)
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = None
    if uri.startswith("sqlite:///"):
        location = Path(uri[len("sqlite:///") :]).parent.joinpath("mlartifacts").as_uri()
    return client.create_experiment(name, artifact_location=location)


def public_params(cfg: XTRAConfig) -> dict[str, str]:
    """The resolved config as flat params, minus anything that could hold a credential."""
    out = {}
    for k, v in cfg.flat().items():
        if any(w in k.lower() for w in SECRET_WORDS):
            continue
        out[k] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    return out


def start_or_resume_run(
    uri: str, cfg: XTRAConfig, run_name: str, parent_run_id: str | None = None
) -> str:
    """The MLflow run of this training run (same `train.run_name` -> same MLflow run); nested
    under `parent_run_id` when given."""
    client = _client(uri)
    exp = experiment_id(uri, cfg.mlflow.experiment)
    found = client.search_runs([exp], filter_string=f"tags.`{RUN_NAME_TAG}` = '{run_name}'", max_results=1)
    if found:
        run_id = found[0].info.run_id
        if found[0].info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
        return run_id
    tags = {RUN_NAME_TAG: run_name, "xtra.preset": cfg.preset}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = public_params(cfg)
    items = list(params.items())
    from mlflow.entities import Param

    for i in range(0, len(items), 90):
        client.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 90]])
    with tempfile.TemporaryDirectory() as d:
        import yaml

        path = Path(d, "config.yaml")
        path.write_text(yaml.safe_dump(json.loads(json.dumps(cfg.to_dict(), default=list)), sort_keys=False))
        client.log_artifact(run_id, str(path))
    return run_id


def log_step_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    keys = ("loss", "lr", "images_per_s", "bad_files", "epoch", "resumed_from_step")
    chosen = [k for k in metrics if k in keys or k.startswith("optimizer_state_mb/")]
    _client(uri).log_batch(run_id, metrics=[Metric(k, float(metrics[k]), now, step) for k in chosen])


def finish_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    _client(uri).set_terminated(run_id, status=status)


def log_encoder_files(uri: str, run_id: str | None, export_dir: str | os.PathLike) -> None:
    """The encoder export (safetensors + config) as plain artifacts `encoder/` of the run."""
    if run_id:
        _client(uri).log_artifacts(run_id, str(export_dir), artifact_path="encoder")


def register_encoder(uri: str, run_id: str | None, export_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """Log the encoder export to the run and register it; returns name / version / model_uri."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id):
        info = log_and_register_encoder(export_dir, name)
    _client(uri).set_model_version_tag(name, info["version"], "xtra.run_id", str(run_id))
    return info
