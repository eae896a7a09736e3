"""`xtra submit pretrain` against a real Ray head started by the test, with cluster/runtime_env.yaml."""

from __future__ import annotations

import os
import re
from pathlib import Path

import mlflow
import pytest
from ray.job_submission import JobStatus, JobSubmissionClient

from pipelines.cli import main as cli_main
from tests.pretrain.test_job_submit import ray_head  # noqa: F401  (the fixture: a head of our own)

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


def test_submit_pretrain_registers_the_encoder_and_a_failing_job_exits_non_zero(
    ray_head, tmp_path, capsys, monkeypatch  # noqa: F811
):
    dashboard, _ = ray_head
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # the test's head runs without token auth
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    data = tmp_path / "fm"
    assert cli_main(["data", "prepare", "--source", "fashion-mnist", "--dest", str(data),
                     "--limit", "48"]) == 0
    tracking = f"sqlite:///{tmp_path}/mlflow.db"
    sets = {
        "model.image_size": 16, "model.encoder_depth": 1, "model.decoder_depth": 1,
        "train.global_batch_size": 16, "train.max_steps": 2, "train.num_workers": 2,
        "train.cpus_per_worker": 0.5, "train.checkpoint_every": 2, "train.run_name": "submitted",
        "train.storage_path": str(tmp_path / "runs"), "mlflow.tracking_uri": tracking,
        "mlflow.registered_model": "submitted-encoder",
        # a credential on the command line (unused by a local dataset): the submit line and the
        # followed job log must not show it
        "data.s3_endpoint": "http://AKIAPLANTED:SubmitPlanted9@127.0.0.1:9",
    }
    job_args = ["--config", "tiny", "--data", str(data)]
    for k, v in sets.items():
        job_args += ["--set", f"{k}={v}"]
    capsys.readouterr()
    # the head's nodes already hold the packages: --no-pip, as for any prebuilt image
    rc = cli_main(["submit", "pretrain", "--address", dashboard, "--working-dir", str(ROOT),
                   "--runtime-env", str(ROOT / "cluster" / "runtime_env.yaml"), "--no-pip",
                   "--follow", "--", *job_args])
    out = capsys.readouterr().out
    assert rc == 0, out[-4000:]
    job_id = re.search(r"\[xtra\] submitted job (\S+) to ", out).group(1)
    assert f"ray job logs --address {dashboard} --follow {job_id}" in out
    assert f"ray job stop --address {dashboard} {job_id}" in out
    assert "[xtra] step 2/2" in out  # the job's own log lines, followed
    assert "SubmitPlanted9" not in out and "AKIAPLANTED" not in out  # good path: nothing printed
    info = JobSubmissionClient(dashboard).get_job_info(job_id)
    assert info.status == JobStatus.SUCCEEDED
    assert info.runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"  # the file's env vars applied
    assert "pip" not in info.runtime_env
    client = mlflow.MlflowClient(tracking_uri=tracking)
    run = client.search_runs(
        [client.get_experiment_by_name("xtra").experiment_id],
        filter_string="tags.`xtra.run_name` = 'submitted'",
    )[0]
    assert run.info.status == "FINISHED" and run.data.metrics["loss"] > 0
    version = client.get_model_version("submitted-encoder", "1")
    assert version.status == "READY" and version.run_id == run.info.run_id
    assert os.path.isdir(tmp_path / "runs" / "submitted")

    # a job whose command fails (a bad --config) ends FAILED, and `--follow` exits 1 with its error
    rc = cli_main(["submit", "probe", "--address", dashboard, "--working-dir", str(ROOT), "--no-pip",
                   "--follow", "--", "--config", "nosuch"])
    out = capsys.readouterr().out
    assert rc == 1, out[-3000:]
    assert "--config 'nosuch' is neither a preset" in out
    failed_id = re.search(r"\[xtra\] submitted job (\S+) to ", out).group(1)
    assert failed_id.startswith("xtra-probe-")
    assert re.search(rf"\[xtra\] job {re.escape(failed_id)} FAILED", out)
