"""Probe scores into MLflow: metrics `probe/<kind>/<key>` on the pretraining run of the probed
model version (or a new run tagged with the model), tags on the registered model version.
Random-init scores use the prefix `probe_random/`."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pipelines.tracking.store import client, experiment_id
from xtra_core.config import XTRAConfig

METRIC_KEYS = ("top1", "top5", "best_lr", "best_weight_decay", "val_top1", "top1_std", "draws")
TAG_KEYS = ("top1", "top5", "best_lr", "best_weight_decay", "top1_std")


def log_scores(
    tracking_uri: str, cfg: XTRAConfig, info: dict[str, Any], results: Sequence[dict[str, Any]]
) -> str:
    """Metrics on the pretraining run (or a new run tagged with the model), tags on the model
    version. Returns the run id the metrics went to."""
    from mlflow.exceptions import MlflowException

    c = client(tracking_uri)
    prefix = "probe_random" if info.get("random_init") else "probe"
    run_id = info.get("run_id")
    if run_id:
        try:
            if c.get_run(run_id).info.lifecycle_stage == "deleted":
                run_id = None
        except MlflowException:
            run_id = None
    new_run = run_id is None
    if new_run:
        exp_id = experiment_id(tracking_uri, cfg.mlflow.experiment)
        tags = {"xtra.probe_of": str(info.get("source")), "xtra.random_init": str(info.get("random_init"))}
        if info.get("run_id"):
            tags["xtra.pretrain_run_id"] = info["run_id"]
        if info.get("name"):
            tags["xtra.model_version"] = f"{info['name']}/{info['version']}"
        run_id = c.create_run(exp_id, run_name=f"{prefix}-{'-'.join(r['kind'] for r in results)}",
                              tags=tags).info.run_id
    ts = int(time.time() * 1000)
    for r in results:
        for key in METRIC_KEYS:
            if r.get(key) is not None:
                c.log_metric(run_id, f"{prefix}/{r['kind']}/{key}", float(r[key]), timestamp=ts)
        if info.get("name") and info.get("version"):
            for key in TAG_KEYS:
                if r.get(key) is not None:
                    c.set_model_version_tag(info["name"], info["version"],
                                                 f"{prefix}/{r['kind']}/{key}", f"{r[key]:.6g}")
    if new_run:
        c.set_terminated(run_id)
    return run_id
