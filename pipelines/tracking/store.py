"""The one connection to MLflow: the tracking URI from the config, a reachability check, a client
built from that URI, the experiment (found or created) and a run found by its tag.

Every other module of `pipelines.tracking` talks to MLflow through `client(uri)`; nothing sets
MLflow's process-wide tracking URI (two runs in one process would fight over it), except
`fluent_at(uri)`, which points MLflow's fluent API at `uri` for the few calls that have no client
form (`mlflow.pyfunc.log_model`) and puts it back as it was.

Environment guards for MLflow's HTTP client: `short_mlflow_retries` (one short try per call during
training) and `no_url_printing` (no "View run at <URI>" line when the URI holds credentials).
"""

from __future__ import annotations

import contextlib
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines.errors import UserError
from pipelines.redaction import redact
from xtra_core.config import XTRAConfig

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"
# MLflow's HTTP client settings for the calls made during training (read by MLflow per request)
STEP_RETRY_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def tracking_uri(cfg: XTRAConfig) -> str:
    """Config, else MLFLOW_TRACKING_URI, else a local sqlite store in the working directory."""
    uri = cfg.mlflow.tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        # make relative sqlite paths absolute so Ray workers (other cwd) share the same store
        uri = "sqlite:///" + str(Path(uri[len("sqlite:///") :]).resolve())
    return uri


def check_tracking(uri: str, timeout_s: float = 5.0) -> None:
    """Fail fast, before any compute, if the tracking store cannot be reached."""
    if uri.startswith(("http://", "https://")):
        try:
            with urllib.request.urlopen(_health_request(uri), timeout=timeout_s) as r:
                if r.status != 200:
                    raise UserError(f"MLflow tracking server {redact(uri)} answered HTTP {r.status}")
        except (urllib.error.URLError, OSError) as e:
            raise UserError(f"MLflow tracking server {redact(uri)} cannot be reached: {redact(str(e))}") from None
    elif uri.startswith("sqlite:///"):
        parent = Path(uri[len("sqlite:///") :]).parent
        if not parent.is_dir():
            raise UserError(f"MLflow tracking URI {redact(uri)}: directory {parent} does not exist")


def connect(cfg: XTRAConfig) -> str:
    """The config's tracking URI, checked reachable (a command's first MLflow step)."""
    uri = tracking_uri(cfg)
    check_tracking(uri)
    return uri


def _health_request(uri: str) -> urllib.request.Request:
    """GET <uri>/health; `user:pass@` in the URI becomes a basic-auth header (as MLflow sends it)."""
    import base64
    import urllib.parse

    parts = urllib.parse.urlsplit(uri.rstrip("/") + "/health")
    netloc = parts.netloc.rpartition("@")[2]
    req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=netloc)))
    if parts.username is not None:
        pair = f"{urllib.parse.unquote(parts.username)}:{urllib.parse.unquote(parts.password or '')}"
        req.add_header("Authorization", "Basic " + base64.b64encode(pair.encode()).decode())
    return req


def client(uri: str | None):  # -> mlflow.MlflowClient
    """An MLflow client of the store at `uri` (None: MLflow's own default, for library callers
    that pointed MLflow somewhere themselves)."""
    import mlflow

    guard_url_printing(uri)
    return mlflow.MlflowClient(tracking_uri=uri)


def guard_url_printing(uri: str | None) -> None:
    """The one guard on MLflow's "View run <name> at: <tracking URI>" line, printed on stdout by
    every run that ends (pretraining runs, probe scores, sweep parents and trials, in the driver
    or in a Ray worker whose stdout is a log file): off in this process once a tracking URI with
    credentials (`user:pass@`, a token in the query) is used. Every client is made by `client`,
    and `fluent_at` for the fluent calls, so every run the product ends passes here."""
    if uri and redact(uri) != uri:
        os.environ["MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT"] = "true"


def experiment_id(uri: str, name: str, create: bool = True) -> str | None:
    """The experiment's id, created if needed (with its artifacts next to a sqlite store);
    with `create=False`, None when there is none."""
    c = client(uri)
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    if not create:
        return None
    location = None
    if uri.startswith("sqlite:///"):
        location = Path(uri[len("sqlite:///") :]).parent.joinpath("mlartifacts").as_uri()
    return c.create_experiment(name, artifact_location=location)


def find_run(uri: str, experiment: str | None, tag: str, value: str) -> Any | None:
    """The run of experiment id `experiment` whose tag `tag` is `value` (-> mlflow Run), else None."""
    if experiment is None:
        return None
    found = client(uri).search_runs([experiment], filter_string=f"tags.`{tag}` = '{value}'", max_results=1)
    return found[0] if found else None


@contextlib.contextmanager
def fluent_at(uri: str) -> Iterator[None]:
    """MLflow's fluent API pointed at `uri` for the calls inside, then put back as it was (its
    global and MLFLOW_TRACKING_URI). Only for calls without a client form (`mlflow.pyfunc.log_model`
    logs into the active run of the global URI)."""
    import mlflow
    from mlflow.tracking._tracking_service import utils

    guard_url_printing(uri)
    saved_global = utils._tracking_uri
    saved_env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(saved_global)
        if saved_env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved_env


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
