"""MLflow runs for pretraining: create or resume the run, log params / metrics / artifacts.

Called from the driver and from the Ray Train controller's callback (which sees rank 0's
rank-averaged metrics), so no tracking I/O happens inside the training loop and a local sqlite
store works even when the workers sit on other nodes.

MLflow trouble never stops training. `log_step_metrics` and `finish_run` never raise: MLflow gets
one short try per call (`STEP_RETRY_ENV`: no retry loop, 10 s timeout, instead of MLflow's ~4 min of
retries); metrics it cannot take are kept in memory and appended to a backlog file
(`backlog_path(run_id)`, on the driver's node, where Ray Train's controller runs too), one warning is
logged, and the whole backlog is sent with the next call that gets through. A final status that cannot
be set is kept in the same file and set by `flush_backlog` (called again by the next resume).

Nothing secret reaches MLflow: params and the `config.yaml` artifact go through
`pipelines.redaction` (URL user info and secret query values blanked, credential-named keys dropped).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.redaction import is_secret_key, redact, redact_config
from pipelines.tracking.registry import check_tracking, log_and_register_encoder, tracking_uri
from xtra_core.config import XTRAConfig

__all__ = [
    "check_tracking", "tracking_uri", "start_or_resume_run", "log_step_metrics", "finish_run",
    "flush_backlog", "register_encoder",
]

logger = logging.getLogger("xtra.tracking")

RUN_NAME_TAG = "xtra.run_name"
# MLflow's HTTP client settings for the calls made during training (read by MLflow per request)
STEP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}
BACKLOG_DIR_ENV = "XTRA_TRACKING_BACKLOG_DIR"  # default ~/.cache/xtra/tracking-backlog
METRIC_KEYS = ("loss", "lr", "images_per_s", "bad_files", "epoch", "resumed_from_step")
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit

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
        stale = _backlog(run_id)
        stale.status = None  # the run goes on: an earlier end's status is moot
        _flush(uri, run_id, stale, set_status=False, quiet=False)  # metrics an outage left behind
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
        path.write_text(yaml.safe_dump(public_config(cfg), sort_keys=False))
        client.log_artifact(run_id, str(path))
    return run_id


def log_step_metrics(uri: str, run_id: str, metrics: dict[str, Any], step: int) -> None:
    """Log one report's metrics at `step`; never raises (kept in the backlog if MLflow is down)."""
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    chosen = [k for k in metrics if k in METRIC_KEYS or k.startswith("optimizer_state_mb/")]
    backlog = _backlog(run_id)
    backlog.add([Metric(k, float(metrics[k]), now, step) for k in chosen])
    _flush(uri, run_id, backlog, set_status=False, quiet=False)


def finish_run(uri: str, run_id: str, status: str = "FINISHED", attempts: int = 3) -> bool:
    """Send the backlog and set the final status; never raises. Tries `attempts` times (2 s, 4 s
    apart); if MLflow stays down the status waits in the backlog file. True if it was set."""
    backlog = _backlog(run_id)
    backlog.set_status(status)
    if _flush_patiently(uri, run_id, backlog, attempts):
        return True
    logger.warning(
        "xtra: MLflow at %s is unreachable: run %s stays %s there until the next resume sends "
        "its final status %s and %d buffered metrics (kept in %s)",
        redact(uri), run_id, "RUNNING", status, len(backlog.metrics), backlog.path,
    )
    return False


def _flush_patiently(uri: str, run_id: str, backlog: _Backlog, attempts: int) -> bool:
    """`attempts` tries, 2 s, 4 s, ... apart: the end of a run may wait a little for MLflow."""
    for i in range(attempts):
        if _flush(uri, run_id, backlog, set_status=True, quiet=i < attempts - 1):
            return True
        if i < attempts - 1:
            time.sleep(2.0 * 2**i)
    return False


def flush_backlog(uri: str, run_id: str, set_status: bool = True, quiet: bool = False) -> bool:
    """Send a run's buffered metrics (and, with `set_status`, its pending final status).
    Returns True when nothing is left; never raises."""
    return _flush(uri, run_id, _backlog(run_id), set_status, quiet)


def _flush(uri: str, run_id: str, backlog: _Backlog, set_status: bool, quiet: bool) -> bool:
    if backlog.empty(with_status=set_status):
        return True
    try:
        with short_mlflow_retries(), no_url_printing(uri):
            client = _client(uri)
            while backlog.metrics:
                chunk = backlog.metrics[:MAX_METRICS_PER_BATCH]
                client.log_batch(run_id, metrics=chunk)
                backlog.sent(len(chunk))
            if set_status and backlog.status:
                client.set_terminated(run_id, status=backlog.status)
                backlog.status = None
    except Exception as e:  # an outage, a 5xx, a timeout: keep everything, training goes on
        if run_id not in _WARNED and not quiet:
            _WARNED.add(run_id)
            logger.warning(
                "xtra: MLflow at %s cannot be reached (%s); training goes on, metrics are kept "
                "in %s and sent when it is back",
                redact(uri), redact(_first_line(e)), backlog.path,
            )
        backlog.save()
        return False
    if run_id in _WARNED:
        _WARNED.discard(run_id)
        logger.warning("xtra: MLflow at %s is back; buffered metrics sent", redact(uri))
    backlog.save()  # removes the file once nothing (no metric, no pending status) is left
    return True


@contextlib.contextmanager
def short_mlflow_retries() -> Iterator[None]:
    """MLflow's HTTP client with `STEP_RETRY_ENV` for the calls inside (user settings win)."""
    saved = {k: os.environ.get(k) for k in STEP_RETRY_ENV}
    for k, v in STEP_RETRY_ENV.items():
        os.environ.setdefault(k, v)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)


@contextlib.contextmanager
def no_url_printing(uri: str) -> Iterator[None]:
    """MLflow prints "View run at <tracking URI>" on stdout when a run ends: not when that URI
    holds credentials (`user:pass@`, a token in the query)."""
    if redact(uri) == uri:
        yield
        return
    key = "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"
    saved = os.environ.get(key)
    os.environ[key] = "true"
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = saved


def backlog_path(run_id: str) -> Path:
    root = os.environ.get(BACKLOG_DIR_ENV) or Path("~/.cache/xtra/tracking-backlog").expanduser()
    return Path(root, f"{run_id}.jsonl")


class _Backlog:
    """One run's metrics not yet in MLflow (oldest first) and its pending final status, kept in a
    JSONL file: the controller (which logs the steps) and the driver (which sets the final
    status) are two processes on the same node, and a restarted controller finds it too."""

    def __init__(self, run_id: str) -> None:
        self.path = backlog_path(run_id)
        self.metrics: list[Any] = []
        self.status: str | None = None
        if self.path.exists():  # left by an earlier process
            from mlflow.entities import Metric

            for line in self.path.read_text().splitlines():
                rec = json.loads(line)
                if "status" in rec:
                    self.status = rec["status"]
                else:
                    self.metrics.append(Metric(rec["key"], rec["value"], rec["timestamp"], rec["step"]))

    def add(self, batch: list[Any]) -> None:
        self.metrics.extend(batch)

    def set_status(self, status: str) -> None:
        self.status = status

    def empty(self, with_status: bool) -> bool:
        return not self.metrics and not (with_status and self.status)

    def sent(self, n: int) -> None:
        del self.metrics[:n]

    def save(self) -> None:
        if self.empty(with_status=True):
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step})
            for m in self.metrics
        ]
        if self.status:
            lines.append(json.dumps({"status": self.status}))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(self.path)


_WARNED: set[str] = set()  # runs whose outage this process has already warned about


def _backlog(run_id: str) -> _Backlog:
    return _Backlog(run_id)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]


def log_encoder_files(uri: str, run_id: str | None, export_dir: str | os.PathLike) -> None:
    """The encoder export (safetensors + config) as plain artifacts `encoder/` of the run."""
    if run_id:
        _client(uri).log_artifacts(run_id, str(export_dir), artifact_path="encoder")
        _flush_patiently(uri, run_id, _backlog(run_id), attempts=3)  # steps an outage held back


def register_encoder(uri: str, run_id: str | None, export_dir: str | os.PathLike, name: str) -> dict[str, Any]:
    """Log the encoder export to the run and register it; returns name / version / model_uri."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    # MLflow's own retries: the run's end may wait for it
    with no_url_printing(uri), mlflow.start_run(run_id=run_id):
        info = log_and_register_encoder(export_dir, name)
    _client(uri).set_model_version_tag(name, info["version"], "xtra.run_id", str(run_id))
    if run_id:  # MLflow answers again: send the steps an outage held back
        _flush_patiently(uri, run_id, _backlog(run_id), attempts=3)
    return info
