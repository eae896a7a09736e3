"""A worker SIGKILLed at a random step: the run completes, at most one checkpoint interval is redone,
and every step after the restart sees exactly the images of an uninterrupted run."""

from __future__ import annotations

import random
import threading
import time

import mlflow
import numpy as np
import pytest

from pipelines.pretrain import driver as pretrain
from pipelines.pretrain.rank_streams import build_train_stream
from tests.reliability.conftest import make_cfg, record_figure

pytestmark = pytest.mark.slow
SAME_LOSS = 1e-4  # relative: the restarted run's loss at a step equals the uninterrupted one's


def _rows(ds) -> tuple[list[str], np.ndarray]:
    paths, images = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        paths += list(batch["path"])
        images.append(batch["image"])
    return paths, np.concatenate(images)


def test_each_rank_reads_a_fixed_stream_that_a_resume_reenters_at_its_step(ray_cluster, fmnist, tmp_path):
    cfg = make_cfg(tmp_path, fmnist, "streams")  # 64 images, global batch 16, 2 workers: 8 rows/step/rank
    stream = build_train_stream(cfg)
    full = [_rows(stream.rank_dataset(r, 2, 0, 8, with_paths=True)) for r in range(2)]
    # one epoch = 4 steps: the two shards together hold every image once
    epoch0 = full[0][0][:32] + full[1][0][:32]
    assert sorted(epoch0) == sorted(set(epoch0)) and len(epoch0) == 64
    assert not set(full[0][0]) & set(full[1][0])  # disjoint shards
    # a stream started at step 3 (a resumed run) is the tail of the step-0 stream, pixel for pixel
    for r in range(2):
        paths, images = _rows(stream.rank_dataset(r, 2, 3, 5, with_paths=True))
        assert paths[:40] == full[r][0][24:64]
        assert np.array_equal(images[:40], full[r][1][24:64])
    assert full[0][0][:32] != full[0][0][32:64]  # each epoch in its own order


def _steps_redone(client, run_id: str) -> int:
    """Steps logged twice (trained before the kill, then again after the restart)."""
    steps = [m.step for m in client.get_metric_history(run_id, "loss")]
    return len(steps) - len(set(steps))


def _loss(cfg, run_id: str) -> dict[int, float]:
    """The last logged loss of every step (a redone step is logged twice)."""
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    out: dict[int, float] = {}
    for m in sorted(client.get_metric_history(run_id, "loss"), key=lambda m: m.timestamp):
        out[m.step] = m.value
    return out


def test_sigkilled_worker_restarts_and_sees_the_uninterrupted_runs_images(ray_cluster, fmnist, tmp_path):
    import psutil

    steps, every = 18, 3
    sets = {"train.max_steps": steps, "train.checkpoint_every": every}
    reference = pretrain.run_pretraining(make_cfg(tmp_path, fmnist, "uninterrupted", **sets))
    ref_loss = _loss(make_cfg(tmp_path, fmnist, "uninterrupted", **sets), reference["run_id"])

    cfg = make_cfg(tmp_path, fmnist, "killed", **sets, **{"train.max_failures": 2})
    # the kill lands after the checkpoint before `kill_step` and at least two checkpoint
    # intervals before the end, so the run cannot finish before the worker dies
    kill_step = random.Random(time.time_ns()).randint(every, steps - 2 * every - 1)
    seen: dict[str, object] = {}

    def train_workers() -> dict[int, psutil.Process]:
        """This test's cluster's Ray Train worker processes (children of this process)."""
        out = {}
        for p in psutil.Process().children(recursive=True):
            try:  # a worker of the run before may be exiting (zombie) while we look
                if (p.cmdline() or [""])[0].startswith("ray::RayTrainWorker"):
                    out[p.pid] = p
            except psutil.Error:
                continue
        return out

    stale = set(train_workers())  # the reference run's workers may still be shutting down

    def kill_a_worker_at_step() -> None:
        """SIGKILL a worker once Ray has registered the checkpoint before `kill_step`, a random
        0-0.5 s later (read from the run's storage, as a resume would)."""
        storage = str(tmp_path / "runs")
        deadline = time.time() + 600
        while time.time() < deadline and pretrain.latest_checkpoint_step(storage, "killed", cfg) < every * (kill_step // every):
            time.sleep(0.05)
        time.sleep(random.Random(kill_step).uniform(0.0, 0.5))  # a step takes ~0.2 s here
        for pid, proc in train_workers().items():  # a worker of this run, not a stale one
            if pid not in stale:
                seen["after_step"] = pretrain.latest_checkpoint_step(storage, "killed", cfg)
                proc.kill()  # SIGKILL
                seen["pid"] = pid
                return

    killer = threading.Thread(target=kill_a_worker_at_step, daemon=True)
    killer.start()
    out = pretrain.run_pretraining(cfg)
    killer.join(timeout=10)
    assert "pid" in seen, "the test did not kill a worker"
    assert out["step"] == steps and "model_uri" in out
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    resumed = {int(m.value) for m in client.get_metric_history(out["run_id"], "resumed_from_step")} - {0}
    assert len(resumed) == 1, resumed
    restart = resumed.pop()
    lost = _steps_redone(client, out["run_id"])
    assert restart % every == 0 and restart >= int(seen["after_step"]) and lost <= every, (seen, restart, lost)

    loss = _loss(cfg, out["run_id"])
    assert sorted(loss) == list(range(1, steps + 1))
    for step in range(1, steps + 1):  # same weights + same images -> the same loss, step by step
        assert loss[step] == pytest.approx(ref_loss[step], rel=SAME_LOSS), (step, loss, ref_loss)
    # distinct images: a stream shifted by even one step would show (neighbouring steps differ by
    # well over the tolerance of the comparison above)
    gaps = [abs(ref_loss[s + 1] - ref_loss[s]) / ref_loss[s] for s in range(restart + 1, steps)]
    assert min(gaps) > 3 * SAME_LOSS, gaps
    record_figure("worker_sigkill", killed_after_step=restart + lost, resumed_from_step=restart,
                  steps_redone=lost, checkpoint_every=every,
                  steps_matching_uninterrupted=f"{steps}/{steps}")
