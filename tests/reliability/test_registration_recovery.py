"""A trained run is always registrable: MLflow goes down right after the last checkpoint, the end
(export, registration) fails in one line, and the same command again, with MLflow back, finishes
it from the last checkpoint: one registered version, the alias, the run FINISHED."""

from __future__ import annotations

import os
import signal
import time

import mlflow
import pytest
from ray.train.v2.api.callback import UserCallback

from pipelines.errors import UserError
from pipelines.pretrain import driver as pretrain
from pipelines.tracking import runs as tracking
from tests.reliability.conftest import make_cfg, record_figure

pytestmark = pytest.mark.slow


class StopServerAtLastCheckpoint(UserCallback):
    """On the Ray Train controller: kill the MLflow server's process group once the last
    checkpoint is reported (after the progress callback logged its metrics)."""

    def __init__(self, server_pid: int, last_step: int) -> None:
        self.server_pid, self.last_step = server_pid, last_step

    def after_report(self, run_context, metrics, checkpoint) -> None:
        if checkpoint is not None and int(metrics[0]["step"]) >= self.last_step:
            os.killpg(self.server_pid, signal.SIGKILL)


def test_a_run_whose_end_failed_is_finished_by_the_same_command(
    ray_cluster, fmnist, mlflow_server, backlog_dir, tmp_path, monkeypatch, capsys
):
    # a stopped server refuses connections at once: one retry, not MLflow's minutes of them (a
    # slow answer of a loaded machine still gets its time)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "120")
    sets = {"train.max_steps": 4, "train.checkpoint_every": 4, "mlflow.tracking_uri": mlflow_server.url}
    cfg = make_cfg(tmp_path, fmnist, "end-fails", **sets)
    with pytest.raises(UserError, match=r"reached its last step, but exporting or registering .*run the "
                                        r"same command again"):
        pretrain.run_pretraining(cfg, callbacks=[StopServerAtLastCheckpoint(mlflow_server.proc.pid, 4)])
    try:
        mlflow_server.stop()  # reap the killed server
    except ProcessLookupError:
        mlflow_server.proc.wait(timeout=30)
        mlflow_server.proc = None
    mlflow_server.start()
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    name = cfg.mlflow.registered_model
    assert client.search_model_versions(f"name = '{name}'") == []  # nothing registered yet

    t0 = time.time()
    out = pretrain.run_pretraining(make_cfg(tmp_path, fmnist, "end-fails", **sets))
    seconds = time.time() - t0
    assert out["finished_end"] and out["step"] == 4
    assert "reached its last step 4 before, but its end did not finish" in capsys.readouterr().out
    versions = client.search_model_versions(f"name = '{name}'")
    assert [v.version for v in versions] == ["1"] and versions[0].run_id == out["run_id"]
    assert client.get_model_version_by_alias(name, cfg.mlflow.alias).version == "1"
    run = client.get_run(out["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[tracking.END_TAG] == "done"

    with pytest.raises(UserError, match="already reached its last step 4 .*nothing to train"):
        pretrain.run_pretraining(make_cfg(tmp_path, fmnist, "end-fails", **sets))
    assert len(client.search_model_versions(f"name = '{name}'")) == 1  # not registered twice
    record_figure("registration_recovery", first_end="failed, one line", finished_by_rerun=True,
                  registered_versions=1, rerun_seconds=round(seconds, 1))
