"""`xtra sweep` end to end on CPU: a real Ray cluster, real Tune trials that pretrain (Ray Train +
DeepSpeed) and probe, a real MLflow sqlite store, real Fashion-MNIST images."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import mlflow
import pytest
from PIL import Image

from pipelines.cli import main as cli_main
from tests.small_run import SMALL_MODEL
from tune.sweep import SweepOptions, run_sweep
from xtra_core.config import build_config

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> str:
    """100 train / 100 test real Fashion-MNIST images in the class-folder layout."""
    dest = tmp_path_factory.mktemp("fmnist")
    assert cli_main(["data", "prepare", "--source", "fashion-mnist", "--dest", str(dest), "--limit", "100"]) == 0
    return str(dest)


def sweep_sets(tmp_path: Path) -> dict:
    """Same 4-step budget for every trial; one probe LR, 2 epochs on cached features."""
    return {
        **SMALL_MODEL,
        "train.global_batch_size": 16, "train.num_workers": 2, "train.cpus_per_worker": 0.5,
        "train.max_steps": 4, "train.warmup_steps": 1, "train.log_every": 2, "train.checkpoint_every": 2,
        "train.storage_path": str(tmp_path / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "mlflow.experiment": "sweeps",
        "probe.lrs": [0.01], "probe.epochs": 2,
    }


def nested_runs(uri: str, name: str) -> list:
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name("sweeps")
    return client.search_runs([exp.experiment_id], filter_string=f"tags.`xtra.sweep` = '{name}'")


def run_cli_until(args: list[str], interrupt_on: str | None = None, timeout_s: float = 1200) -> tuple[int, str]:
    """`python -m pipelines.cli <args>` as its own Ray job on the test cluster (as `ray job submit`
    would run it); Ctrl-C (SIGINT) once a stdout line contains `interrupt_on`. -> (exit code, stdout)"""
    import ray

    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    proc = subprocess.Popen([sys.executable, "-m", "pipelines.cli", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    timer = threading.Timer(timeout_s, proc.kill)
    timer.start()
    lines = []
    try:
        for line in proc.stdout:
            lines.append(line)
            if interrupt_on and interrupt_on in line:
                proc.send_signal(signal.SIGINT)
                interrupt_on = None
        return proc.wait(), "".join(lines)
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()


def test_interrupted_sweep_resumes_only_the_other_trial_and_tracks_parent_and_nested_runs(
    ray_cluster, fmnist, tmp_path
):
    sets = sweep_sets(tmp_path)
    args = ["sweep", "--data", fmnist, "--axis", "block_size=1,2", "--name", "s1", "--max-concurrent", "1",
            *[a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]]
    # one trial at a time: when the second starts, the first is done; Ctrl-C then
    code, first = run_cli_until(args, interrupt_on="(block_size=2 seed=0): started")
    assert code == 130, first
    assert "(block_size=1 seed=0): probed: linear val top-1" in first
    assert "(block_size=2 seed=0): probed" not in first
    assert "was interrupted" in first

    code, second = run_cli_until(args)  # the same command resumes
    assert code == 0, second
    assert "resuming: finished trials are kept" in second
    assert "(block_size=1 seed=0): started" not in second  # the finished trial is not re-run
    assert "(block_size=2 seed=0): started" in second
    assert "(block_size=2 seed=0): probed: linear val top-1" in second

    # MLflow: one parent run with the table, one nested run per trial with its probe scores
    uri = sets["mlflow.tracking_uri"]
    client = mlflow.MlflowClient(uri)
    parents = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id],
                                 filter_string="tags.`xtra.sweep_parent` = 's1'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    parent = parents[0].info.run_id
    trials = nested_runs(uri, "s1")
    assert len(trials) == 2
    assert {r.data.tags["mlflow.parentRunId"] for r in trials} == {parent}
    assert {r.data.tags["xtra.sweep.block_size"] for r in trials} == {"1", "2"}
    assert all(r.info.status == "FINISHED" for r in trials)
    for r in trials:  # each trial's curve has every step of the same budget exactly once
        steps = [m.step for m in client.get_metric_history(r.info.run_id, "loss")]
        assert sorted(set(steps)) == [2, 4], steps
    artifacts = {a.path for a in client.list_artifacts(parent)}
    assert {"sweep_table.md", "sweep_results.json", "sweep_plot.png"} <= artifacts
    # the probe scores are on the trial runs only: no separate probe run per trial
    every_run = client.search_runs([client.get_experiment_by_name("sweeps").experiment_id])
    assert not [r.info.run_name for r in every_run if "xtra.probe_of" in r.data.tags]

    # the table, JSON and PNG agree with the trials' own metrics
    local = Path(mlflow.artifacts.download_artifacts(run_id=parent, tracking_uri=uri, dst_path=str(tmp_path / "dl")))
    result = json.loads((local / "sweep_results.json").read_text())
    table = (local / "sweep_table.md").read_text()
    by_point = {s["point"]["model.block_size"]: s for s in result["summary"]}
    for r in trials:
        s = by_point[int(r.data.tags["xtra.sweep.block_size"])]
        assert s["seeds_done"] == 1
        assert s["val_top1_mean"] == pytest.approx(r.data.metrics["probe/linear/val_top1"])
        assert s["top1_mean"] == pytest.approx(r.data.metrics["probe/linear/top1"])
        row = f"| {r.data.tags['xtra.sweep.block_size']} | {100 * s['val_top1_mean']:.1f} | {100 * s['top1_mean']:.1f} | 1 | 0 | 0 |"
        assert row in table and row in second
    with Image.open(local / "sweep_plot.png") as im:
        assert im.format == "PNG"


def test_a_failing_trial_is_reported_failed_while_the_other_completes(ray_cluster, fmnist, tmp_path, capsys):
    # 4096 images per step from a 90-image train split: that trial's pretraining refuses to start
    # both probes: linear is the metric, the attentive probe's scores go beside it
    cfg = build_config("tiny", None, {**sweep_sets(tmp_path), "data.uri": fmnist,
                                      "probe.attentive_features": "cached"})
    out = run_sweep(cfg, ["train.global_batch_size=16,4096"],
                    SweepOptions(name="s2", max_concurrent=1, kinds=("linear", "attentive")))
    printed = capsys.readouterr().out
    rows = {r["point"]["train.global_batch_size"]: r for r in out["rows"]}
    assert rows[4096]["status"] == "failed" and "less than one global batch" in rows[4096]["error"]
    assert rows[16]["status"] == "done" and 0.0 <= rows[16]["val_top1"] <= 1.0
    assert "(train.global_batch_size=4096 seed=0): failed:" in printed
    assert "less than one global batch" in printed
    assert "(train.global_batch_size=16 seed=0): probed" in printed
    assert not out["interrupted"]
    assert "| 4096 | - | - | 0 | 1 | 0 |" in out["markdown"]
    runs = nested_runs(cfg.mlflow.tracking_uri, "s2")
    assert len(runs) == 1 and runs[0].data.metrics["probe/linear/val_top1"] == pytest.approx(rows[16]["val_top1"])
    assert 0.0 <= runs[0].data.metrics["probe/attentive/val_top1"] <= 1.0
    assert "attentive val top-1" in printed and "linear probe val top-1" in out["markdown"]



def test_asha_stops_the_trial_whose_pretraining_loss_lags(ray_cluster, fmnist, tmp_path, capsys):
    # one trial at a time: the first (a real LR) sets the rungs and, reaching max_t, is probed; the
    # second (an LR that cannot move the weights) reaches the first rung with a higher loss and is
    # stopped there, unprobed. Its Train workers' CPUs must come back: later tests need them.
    import ray

    cfg = build_config("tiny", None, {**sweep_sets(tmp_path), "data.uri": fmnist, "train.max_steps": 8})
    out = run_sweep(cfg, ["train.lr=3e-3,1e-12"],
                    SweepOptions(name="s3", max_concurrent=1, asha=True, asha_grace_steps=2))
    printed = capsys.readouterr().out
    rows = {r["point"]["train.lr"]: r for r in out["rows"]}
    assert rows[3e-3]["status"] == "done" and rows[3e-3]["val_top1"] is not None, rows[3e-3]
    assert rows[1e-12]["status"] == "stopped", rows[1e-12]
    assert "(train.lr=1e-12 seed=0): stopped early at step" in printed
    assert "(train.lr=1e-12 seed=0): probed" not in printed
    assert "| 1e-12 | - | - | 0 | 0 | 1 |" in out["markdown"]
    runs = {r.data.tags["xtra.sweep.train.lr"]: r for r in nested_runs(cfg.mlflow.tracking_uri, "s3")}
    assert runs["0.003"].info.status == "FINISHED" and "probe/linear/val_top1" in runs["0.003"].data.metrics
    stopped = runs["1e-12"]  # the cut-off pretraining run is closed, not left RUNNING
    assert stopped.info.status == "KILLED" and "probe/linear/val_top1" not in stopped.data.metrics
    assert int(stopped.data.tags["xtra.sweep.stopped_at_step"]) < 8
    deadline = time.time() + 30  # the stopped trial's placement group is gone: every CPU is free
    while ray.available_resources().get("CPU", 0) < 2 and time.time() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU", 0) == pytest.approx(2.0), ray.available_resources()
