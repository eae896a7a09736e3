"""A crash while a checkpoint is being uploaded, then the same command again: the run resumes from
the last complete (Ray-registered) checkpoint; and resume from S3 run storage works end to end."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import pytest

from pipelines.pretrain import driver as pretrain
from tests.reliability.conftest import make_cfg, own_ray_env, record_figure, small_sets

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def _cli(sets: dict, env: dict, log: Path) -> subprocess.Popen:
    args = [sys.executable, "-m", "pipelines.cli", "pretrain"]
    for k, v in sets.items():
        args += ["--set", f"{k}={v}"]
    return subprocess.Popen(args, env=env, cwd=REPO, stdout=open(log, "wb"), stderr=subprocess.STDOUT,
                            start_new_session=True)


def _kill_tree(proc: subprocess.Popen, ray_tmp: Path) -> None:
    """SIGKILL the CLI's process group and any Ray process of its own temp dir (nothing else)."""
    with_children = [proc.pid]
    try:
        with_children += [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["pid", "cmdline"]):
        if str(ray_tmp) in " ".join(p.info["cmdline"] or []):
            with_children.append(p.info["pid"])
    for pid in with_children:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait(timeout=60)


def test_crash_during_checkpoint_upload_then_rerun_resumes_from_last_complete(fmnist, tmp_path):
    ray_tmp = Path(tempfile.mkdtemp(prefix="xc", dir="/tmp"))
    env = {**own_ray_env(), "RAY_TMPDIR": str(ray_tmp),
           "XTRA_TRACKING_BACKLOG_DIR": str(tmp_path / "backlog")}
    sets = small_sets(tmp_path, fmnist, "crash", **{"train.max_steps": 9, "train.checkpoint_every": 3})
    run_dir = tmp_path / "runs" / "crash"
    cfg = make_cfg(tmp_path, fmnist, "crash", **{"train.max_steps": 9, "train.checkpoint_every": 3})
    try:
        proc = _cli(sets, env, tmp_path / "first.log")
        target = run_dir / "checkpoint_step000000006"
        deadline = time.time() + 600
        while not target.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert target.exists(), (tmp_path / "first.log").read_text()[-3000:]
        _kill_tree(proc, ray_tmp)  # the upload of step 6 has begun (the folder exists)
        registered = pretrain.latest_checkpoint_step(str(tmp_path / "runs"), "crash", cfg)
        files_at_crash = sum(1 for p in target.rglob("*") if p.is_file())
        assert registered in (3, 6), registered

        again = _cli(sets, env, tmp_path / "second.log")
        assert again.wait(timeout=900) == 0, (tmp_path / "second.log").read_text()[-3000:]
        client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
        run = client.search_runs([client.get_experiment_by_name("test").experiment_id],
                                 filter_string="tags.`xtra.run_name` = 'crash'")[0]
        resumed = sorted({int(m.value) for m in client.get_metric_history(run.info.run_id, "resumed_from_step")})
        assert resumed[-1] == registered  # the last complete checkpoint, never the partial one
        assert max(m.step for m in client.get_metric_history(run.info.run_id, "loss")) == 9
        assert "encoder registered" in (tmp_path / "second.log").read_text()
        record_figure("checkpoint_upload_crash", crashed_during_step=6, files_of_step6_at_crash=files_at_crash,
                      last_registered=registered, resumed_from_step=resumed[-1], finished_step=9)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def test_resume_from_s3_run_storage(ray_cluster, s3_server, fmnist, tmp_path):
    bucket = s3_server.make_bucket("resume")
    sets = {"train.storage_path": f"s3://{bucket}/runs", "data.s3_endpoint": s3_server.endpoint,
            "train.checkpoint_every": 2}
    first = pretrain.run_pretraining(make_cfg(tmp_path, fmnist, "s3resume", **sets, **{"train.stop_at_step": 4}))
    assert first["step"] == 4 and "model_uri" not in first
    cfg = make_cfg(tmp_path, fmnist, "s3resume", **sets)
    assert pretrain.latest_checkpoint_step(f"s3://{bucket}/runs", "s3resume", cfg) == 4
    out = pretrain.run_pretraining(cfg)
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    assert out["run_id"] == first["run_id"] and out["step"] == 8 and "model_uri" in out
    assert {int(m.value) for m in client.get_metric_history(out["run_id"], "resumed_from_step")} == {0, 4}
    assert sorted({m.step for m in client.get_metric_history(out["run_id"], "loss")}) == list(range(1, 9))
    keys = [o["Key"] for o in s3_server.client.list_objects_v2(Bucket=bucket, Prefix="runs/s3resume/")["Contents"]]
    assert any(k.startswith("runs/s3resume/checkpoint_step000000008/") for k in keys)
    record_figure("s3_resume", stopped_at=4, resumed_from_step=4, finished_step=8)
