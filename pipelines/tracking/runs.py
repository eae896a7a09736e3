"""MLflow runs: create or resume a pretraining run, log params / metrics / artifacts / pictures,
end it.

Called from the driver and from the Ray Train controller's callback (which sees rank 0's
rank-averaged metrics), so no tracking I/O happens inside the training loop and a local sqlite
store works even when the workers sit on other nodes.

MLflow trouble never stops training. `log_step_metrics` and `finish_run` never raise: MLflow gets
one short try per call (no retry loop, 10 s timeout, instead of MLflow's ~4 min of retries); metrics
it cannot take wait in the outage backlog (`backlog.py`) and are sent with the next call that gets
through. A final status that cannot be set waits there too, set by the next resume.

Nothing secret reaches MLflow: params and the `config.yaml` artifact go through
`pipelines.redaction` (URL user info and secret query values blanked, credential-named keys dropped).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from pipelines.redaction import is_secret_key, redact, redact_config
from pipelines.tracking.backlog import Backlog, flush, flush_patiently
from pipelines.tracking.store import (
    client,
    experiment_id,
    find_run,
    no_url_printing,
    short_mlflow_retries,
)
from xtra_core.config import XTRAConfig

logger = logging.getLogger("xtra.tracking")

RUN_NAME_TAG = "xtra.run_name"
METRIC_KEYS = ("loss", "lr", "images_per_s", "bad_files", "epoch", "resumed_from_step")
# the end of a pretraining run, as tags: the version it registered, then "done" once the encoder
# is registered (or logged) with its alias; a re-run of a trained run finishes what is missing
REGISTERED_VERSION_TAG = "xtra.registered_version"
END_TAG = "xtra.end"
TAGS_BACKLOG = "tags"  # rank 0's tags (checkpoint digests) wait in their own backlog file
FULL_MODEL_ARTIFACT = "full_model"  # a pretraining run's artifact: the whole XTRA (model.safetensors)


def public_params(cfg: XTRAConfig) -> dict[str, str]:
    """The resolved config as flat params: credential-named keys dropped, URIs redacted."""
    out = {}
    for k, v in cfg.flat().items():
        if is_secret_key(k):
            continue
        out[k] = redact(json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v))
    return out


def public_config(cfg: XTRAConfig) -> dict[str, Any]:
    """The nested config as written to the run's `config.yaml` artifact, through the same filter."""
    return redact_config(json.loads(json.dumps(cfg.to_dict(), default=list)))


def find_pretraining_run(uri: str, experiment: str, run_name: str) -> Any | None:
    """The MLflow run of pretraining run `run_name` (by its `xtra.run_name` tag), else None."""
    return find_run(uri, experiment_id(uri, experiment, create=False), RUN_NAME_TAG, run_name)


def start_or_resume_run(
    uri: str, cfg: XTRAConfig, run_name: str, parent_run_id: str | None = None
) -> str:
    """The MLflow run of this training run (same `train.run_name` -> same MLflow run); nested
    under `parent_run_id` when given."""
    c = client(uri)
    exp = experiment_id(uri, cfg.mlflow.experiment)
    found = find_run(uri, exp, RUN_NAME_TAG, run_name)
    if found is not None:
        run_id = found.info.run_id
        stale = Backlog(run_id)
        stale.status = None  # the run goes on: an earlier end's status is moot
        flush(uri, run_id, stale, set_status=False, quiet=False)  # metrics an outage left behind
        flush(uri, run_id, Backlog(run_id, TAGS_BACKLOG), set_status=False, quiet=False)
        if found.info.status != "RUNNING":
            c.update_run(run_id, status="RUNNING")
        return run_id
    tags = {RUN_NAME_TAG: run_name, "xtra.preset": cfg.preset}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = c.create_run(exp, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    params = public_params(cfg)
    items = list(params.items())
    from mlflow.entities import Param

    for i in range(0, len(items), 90):
        c.log_batch(run_id, params=[Param(k, v[:6000]) for k, v in items[i : i + 90]])
    with tempfile.TemporaryDirectory() as d:
        import yaml

        path = Path(d, "config.yaml")
        path.write_text(yaml.safe_dump(public_config(cfg), sort_keys=False))
        c.log_artifact(run_id, str(path))
    return run_id


def record_resume_changes(uri: str, run_id: str, step: int, changes: list[str], cfg: XTRAConfig) -> None:
    """Config changes accepted on a resume at `step` (MLflow params are write-once): a tag
    `xtra.resume_changes.step<N>` and the resumed config as the artifact `config_step<N>.yaml`."""
    import yaml

    c = client(uri)
    c.set_tag(run_id, f"xtra.resume_changes.step{step}", redact("; ".join(changes))[:5000])
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, f"config_step{step}.yaml")
        path.write_text(yaml.safe_dump(public_config(cfg), sort_keys=False))
        c.log_artifact(run_id, str(path))


def run_tags(uri: str, run_id: str) -> dict[str, str]:
    return dict(client(uri).get_run(run_id).data.tags)


def set_run_tag(uri: str, run_id: str, key: str, value: str) -> None:
    client(uri).set_tag(run_id, key, value)


def log_step_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Log one report's metrics at `step`; never raises (kept in the backlog if MLflow is down)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    chosen = [k for k in metrics if k in METRIC_KEYS or k.startswith("optimizer_state_mb/")]
    backlog = Backlog(run_id)
    backlog.add([Metric(k, float(metrics[k]), now, step) for k in chosen])
    flush(uri, run_id, backlog, set_status=False, quiet=False)


def finish_run(uri: str, run_id: str, status: str = "FINISHED", attempts: int = 3) -> bool:
    """Send the backlog and set the final status; never raises. Tries `attempts` times (2 s, 4 s
    apart); if MLflow stays down the status waits in the backlog file. True if it was set."""
    backlog = Backlog(run_id)
    backlog.set_status(status)
    if flush_patiently(uri, run_id, backlog, attempts):
        return True
    logger.warning(
        "xtra: MLflow at %s is unreachable: run %s stays %s there until the next resume sends "
        "its final status %s and %d buffered metrics (kept in %s)",
        redact(uri), run_id, "RUNNING", status, len(backlog.metrics), backlog.path,
    )
    return False


def log_encoder_files(uri: str, run_id: str | None, export_dir: str | os.PathLike) -> None:
    """The encoder export (safetensors + config) as plain artifacts `encoder/` of the run."""
    if run_id:
        client(uri).log_artifacts(run_id, str(export_dir), artifact_path="encoder")
        flush_patiently(uri, run_id, Backlog(run_id), attempts=3)  # steps an outage held back


def log_full_model(uri: str, run_id: str | None, model_dir: str | Path) -> None:
    """The full-model export (model.safetensors + config.json) as the run's `full_model/`."""
    if run_id:
        client(uri).log_artifacts(run_id, str(model_dir), FULL_MODEL_ARTIFACT)


def record_tag(uri: str, run_id: str, key: str, value: str) -> bool:
    """A tag on the run that must not be lost: kept in the outage backlog when MLflow is down (the
    next flush sends it); never raises. True if MLflow has it now."""
    backlog = Backlog(run_id, TAGS_BACKLOG)
    backlog.add_tags({key: value})
    return flush(uri, run_id, backlog, set_status=False, quiet=False)


def recorded_tag(uri: str, run_id: str, key: str) -> str | None:
    """A tag of the run as MLflow has it, else as this node's outage backlog holds it (recorded
    while MLflow was down), else None. Raises if MLflow cannot be read."""
    value = client(uri).get_run(run_id).data.tags.get(key)
    return value if value is not None else Backlog(run_id, TAGS_BACKLOG).tags.get(key)


def log_text(uri: str, run_id: str, text: str, artifact_file: str) -> bool:
    """A small text artifact; never raises. True if it was logged."""
    try:
        with short_mlflow_retries(), no_url_printing(uri):
            client(uri).log_text(run_id, text, artifact_file)
        return True
    except Exception as e:  # an outage: the caller's record does not depend on it
        logger.warning("xtra: could not log %s to MLflow run %s (%s)", artifact_file, run_id,
                       redact(str(e).splitlines()[0] if str(e) else type(e).__name__)[:200])
        return False


def read_text(uri: str, run_id: str, artifact_file: str) -> str | None:
    """A text artifact of the run, None if it is not there or cannot be read."""
    try:
        with short_mlflow_retries(), no_url_printing(uri), tempfile.TemporaryDirectory() as d:
            path = client(uri).download_artifacts(run_id, artifact_file, d)
            return Path(path).read_text()
    except Exception:
        return None


def log_file(uri: str, run_id: str, path: str | Path, folder: str | None = None) -> None:
    """One file as an artifact of the run (in `folder`)."""
    client(uri).log_artifact(run_id, str(path), folder)


def log_picture(uri: str, run_id: str, picture: Any, key: str, step: int) -> None:
    """A picture (PIL image or array) in the run's images under `key` at `step` (the MLflow UI
    shows one key's pictures on a step slider)."""
    client(uri).log_image(run_id, picture, key=key, step=step, synchronous=True)
