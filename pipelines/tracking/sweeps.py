"""MLflow for sweeps: the sweep's parent run and its trials' runs, from plain arguments.

The parent run is found again by its `xtra.sweep_parent` tag on a resume; each trial's run is the
pretraining run of the trial (nested under the parent, found by its run-name tag), tagged with
the sweep and its axis values (`xtra.sweep`, `xtra.sweep.<axis>`).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from pipelines.tracking.runs import find_pretraining_run, finish_run
from pipelines.tracking.store import client, experiment_id, find_run

PARENT_TAG = "xtra.sweep_parent"


def parent_run(uri: str, experiment: str, name: str, preset: str, params: Mapping[str, Any]) -> str:
    """The sweep's MLflow parent run: found by name (a resume, set RUNNING again), else created
    with `params`."""
    c = client(uri)
    exp = experiment_id(uri, experiment)
    found = find_run(uri, exp, PARENT_TAG, name)
    if found is not None:
        run_id = found.info.run_id
        c.update_run(run_id, status="RUNNING")
        return run_id
    run = c.create_run(exp, run_name=name, tags={PARENT_TAG: name, "xtra.preset": preset})
    for key, value in params.items():
        c.log_param(run.info.run_id, key, value)
    return run.info.run_id


def close_parent(uri: str, run_id: str, files: Iterable[str], metrics: Mapping[str, float],
                 tags: Mapping[str, str], finished: bool) -> None:
    """The sweep's files as artifacts of the parent run, its metrics and tags; its status."""
    c = client(uri)
    for path in files:
        c.log_artifact(run_id, path)
    for key, value in metrics.items():
        c.log_metric(run_id, key, value)
    for key, value in tags.items():
        c.set_tag(run_id, key, value)
    c.set_terminated(run_id, "FINISHED" if finished else "KILLED")


def tag_trial(uri: str, run_id: str, sweep: str, axis_values: Mapping[str, str]) -> None:
    """Tags a trial's run with its sweep and axis values (`xtra.sweep`, `xtra.sweep.<axis>`)."""
    c = client(uri)
    c.set_tag(run_id, "xtra.sweep", sweep)
    for axis, value in axis_values.items():
        c.set_tag(run_id, f"xtra.sweep.{axis}", value)


def finished_trial(uri: str, experiment: str, run_name: str) -> dict[str, Any] | None:
    """A trial whose pretraining logged its encoder: {run_id, export_dir (downloaded), step (the
    last of its loss curve), metrics: {loss}}; None when it has no run or no encoder yet."""
    import mlflow

    c = client(uri)
    run = find_pretraining_run(uri, experiment, run_name)
    if run is None or not any(a.path == "encoder" for a in c.list_artifacts(run.info.run_id)):
        return None
    export_dir = mlflow.artifacts.download_artifacts(
        run_id=run.info.run_id, artifact_path="encoder", tracking_uri=uri)
    curve = c.get_metric_history(run.info.run_id, "loss")
    return {"run_id": run.info.run_id, "export_dir": export_dir,
            "step": max((m.step for m in curve), default=0),
            "metrics": {"loss": run.data.metrics.get("loss")}}


def close_stopped_trial(uri: str, experiment: str, run_name: str, sweep: str,
                        axis_values: Mapping[str, str], step: Any) -> str | None:
    """The run of a trial the scheduler stopped (nothing closed it): KILLED if still RUNNING,
    tagged like a probed trial plus `xtra.sweep.stopped_at_step`. Its run id, None if none."""
    run = find_pretraining_run(uri, experiment, run_name)
    if run is None:
        return None
    run_id = run.info.run_id
    if run.info.status == "RUNNING":
        finish_run(uri, run_id, "KILLED")
    tag_trial(uri, run_id, sweep, axis_values)
    client(uri).set_tag(run_id, "xtra.sweep.stopped_at_step", str(step))
    return run_id
