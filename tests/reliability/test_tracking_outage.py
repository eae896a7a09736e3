"""MLflow down never stops training: metrics are kept and sent when the server is back."""

from __future__ import annotations

import threading
import time

import mlflow
import pytest

from pipelines.pretrain import driver as pretrain
from pipelines.tracking import backlog
from pipelines.tracking import runs as tracking
from tests.reliability.conftest import make_cfg, record_figure
from xtra_core.config import build_config

pytestmark = pytest.mark.slow


def _steps(client, run_id: str, key: str = "loss") -> list[int]:
    return sorted({m.step for m in client.get_metric_history(run_id, key)})


def test_metrics_logged_while_the_server_is_down_arrive_when_it_is_back(mlflow_server, backlog_dir, caplog):
    cfg = build_config("tiny", None, {"mlflow.tracking_uri": mlflow_server.url, "mlflow.experiment": "outage",
                                      "train.run_name": "outage-unit"})
    run_id = tracking.start_or_resume_run(mlflow_server.url, cfg, "outage-unit")
    for step in (1, 2):
        tracking.log_step_metrics(mlflow_server.url, run_id, {"loss": 1.0 / step, "lr": 1e-3}, step)
    mlflow_server.stop()
    t0 = time.perf_counter()
    for step in (3, 4, 5):
        tracking.log_step_metrics(mlflow_server.url, run_id, {"loss": 1.0 / step, "lr": 1e-3}, step)
    slowest = (time.perf_counter() - t0) / 3
    assert backlog.backlog_path(run_id).exists()  # kept on disk, not only in memory
    assert not tracking.finish_run(mlflow_server.url, run_id, "FINISHED", attempts=1)
    warnings = [r for r in caplog.records if r.name == "xtra.tracking" and "cannot be reached" in r.message]
    assert len(warnings) == 1  # one warning for the outage, not one per step
    mlflow_server.start()
    tracking.log_step_metrics(mlflow_server.url, run_id, {"loss": 1 / 6, "lr": 1e-3}, 6)
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    assert _steps(client, run_id) == [1, 2, 3, 4, 5, 6]
    assert client.get_run(run_id).info.status == "RUNNING"  # a status waits for finish/resume
    assert backlog.flush_backlog(mlflow_server.url, run_id)
    assert client.get_run(run_id).info.status == "FINISHED"
    assert not backlog.backlog_path(run_id).exists()
    record_figure("mlflow_outage_unit", seconds_per_call_while_down=round(slowest, 3))


def test_training_finishes_with_every_steps_metrics_when_mlflow_restarts_mid_run(
    ray_cluster, fmnist, mlflow_server, tmp_path
):
    cfg = make_cfg(tmp_path, fmnist, "mlflow-outage",
                   **{"train.max_steps": 16, "mlflow.tracking_uri": mlflow_server.url})
    down: dict[str, float] = {}

    def outage() -> None:
        client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
        deadline = time.time() + 300
        while time.time() < deadline:  # stop the server once step 3 is in MLflow
            try:
                runs = client.search_runs(client.get_experiment_by_name("test").experiment_id)
                if runs and len(client.get_metric_history(runs[0].info.run_id, "loss")) >= 3:
                    break
            except Exception:
                pass
            time.sleep(0.3)
        down["at"] = time.time()
        mlflow_server.stop()
        time.sleep(20)  # several steps' reports go nowhere
        mlflow_server.start()
        down["seconds"] = time.time() - down["at"]

    thread = threading.Thread(target=outage, daemon=True)
    thread.start()
    t0 = time.time()
    out = pretrain.run_pretraining(cfg)
    wall = time.time() - t0
    thread.join(timeout=120)
    assert "seconds" in down, "the server was never stopped"
    client = mlflow.MlflowClient(tracking_uri=mlflow_server.url)
    assert out["step"] == 16 and "model_uri" in out
    for key in ("loss", "lr", "images_per_s"):
        assert _steps(client, out["run_id"], key) == list(range(1, 17)), key
    assert client.get_run(out["run_id"]).info.status == "FINISHED"
    record_figure("mlflow_outage", server_down_s=round(down["seconds"], 1), steps=16,
                  steps_in_mlflow=len(_steps(client, out["run_id"])), run_wall_s=round(wall, 1))
