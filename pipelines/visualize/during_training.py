"""The Figure-4 picture during pretraining, drawn from checkpoints, off the training path.

Every `train.visualize_every` steps (at the first checkpoint at or after each multiple, and at
the final checkpoint) the picture of a fixed set of train images is drawn and logged to the
run's MLflow images (key `predictions`, one per step: the UI shows them on a step slider) and,
for local run storage, written to `<storage>/<run>/pictures/predictions_step<step>.png`.

Why from checkpoints, in an actor: the workers then do nothing at all for it (no gather of
ZeRO-3 shards, no forward pass, no matplotlib on a rank, no change to the loop). The Ray Train
controller's callback only forwards the persisted checkpoint to `PictureRenderer`, an actor of
the driver (0 CPUs, placed on the driver's node) that renders in its own thread: the controller
never waits (a slow callback would stall the workers' next `ray.train.report`), and the driver
waits for the queued pictures after the fit. The price: a picture exists only at checkpoints,
so `train.checkpoint_every` should divide `train.visualize_every`. A checkpoint Ray Train deletes
(`train.num_to_keep`) before its picture is drawn stays readable: the callback hard-links its files
(local storage; no copy, instant) and the renderer removes the links when done.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import ray
from ray.train import Checkpoint
from ray.train.v2.api.callback import UserCallback

from pipelines.data.listing import Listing
from pipelines.tracking.runs import log_picture
from pipelines.visualize.figure4 import figure4
from pipelines.visualize.samples import sample_images
from xtra_core.config import XTRAConfig, config_from_dict

logger = logging.getLogger("xtra.visualize")
IMAGE_KEY = "predictions"  # MLflow image key of the periodic picture

WeightsLoader = Callable[[str], dict]  # checkpoint directory -> the full model's state dict


@ray.remote(num_cpus=0, max_concurrency=2)
class PictureRenderer:
    """Renders queued checkpoints in a background thread; `drain` waits for the queue."""

    def __init__(
        self,
        config: dict[str, Any],
        images: np.ndarray,
        load_weights: WeightsLoader,
        uri: str,
        run_id: str | None,
        out_dir: str | None,
    ) -> None:
        import torch

        torch.set_num_threads(1)  # stay small next to the training workers
        self.cfg: XTRAConfig = config_from_dict(config)
        self.images, self.load_weights = images, load_weights
        self.uri, self.run_id, self.out_dir = uri, run_id, out_dir
        self.queue: queue.Queue[tuple[int, Checkpoint]] = queue.Queue()
        self.done: list[dict[str, Any]] = []
        self.submitted: set[int] = set()
        threading.Thread(target=self._work, daemon=True).start()

    def submit(self, step: int, checkpoint: Checkpoint) -> None:
        self.submitted.add(step)
        self.queue.put((step, checkpoint))

    def drain(self, final_step: int | None = None, timeout_s: float = 60.0) -> list[dict[str, Any]]:
        """Wait until every submitted picture is drawn (or failed); one record per picture.

        `final_step`: also wait (up to `timeout_s`) for the controller's submission of that step,
        which may still be in flight when the fit returns."""
        import time

        deadline = time.monotonic() + timeout_s
        while final_step is not None and final_step not in self.submitted and time.monotonic() < deadline:
            time.sleep(0.05)
        self.queue.join()
        return sorted(self.done, key=lambda r: r["step"])

    def _work(self) -> None:
        while True:
            step, checkpoint = self.queue.get()
            try:
                self.done.append(self._render(step, checkpoint))
            except Exception as e:  # noqa: BLE001 - a picture never fails the run
                logger.warning("picture at step %d skipped: %s", step, e)
                self.done.append({"step": step, "error": str(e)})
            finally:
                self.queue.task_done()

    def _render(self, step: int, checkpoint: Checkpoint) -> dict[str, Any]:
        import tempfile

        from xtra_core.model import XTRA

        try:
            with checkpoint.as_directory() as d:
                state = self.load_weights(d)
        finally:
            if Path(checkpoint.path).parent.as_posix().endswith(PINNED_DIR):
                import shutil

                shutil.rmtree(checkpoint.path, ignore_errors=True)  # the pinned links are done with
        model = XTRA(self.cfg.model)
        model.load_state_dict(state, strict=True)
        name = f"predictions_step{step:09d}.png"
        out_dir = Path(self.out_dir) if self.out_dir else Path(tempfile.mkdtemp(prefix="xtra-pic-"))
        title = f"{self.cfg.train.run_name}, step {step}"
        d = self.cfg.data
        picture = figure4(model, self.images, d.mean, d.std, out_dir / name, title=title)
        record: dict[str, Any] = {"step": step, "png": str(out_dir / name)}
        if self.run_id:
            log_picture(self.uri, self.run_id, picture, IMAGE_KEY, step)
            record["mlflow_key"] = IMAGE_KEY
        logger.info("picture of step %d logged", step)
        return record


class PicturesAtCheckpoints(UserCallback):
    """On the Ray Train controller: hands a due checkpoint to the renderer, never waits."""

    def __init__(self, renderer: ray.actor.ActorHandle, every: int, final_step: int, start_step: int) -> None:
        self.renderer, self.every, self.final = renderer, every, final_step
        self.last = start_step

    def due(self, step: int) -> bool:
        """A multiple of `every` was passed since the last picture, or this invocation's end."""
        return step // self.every > self.last // self.every or step == self.final

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint: Checkpoint | None) -> None:  # noqa: ANN001
        step = int(metrics[0]["step"])
        if checkpoint is not None and step > self.last and self.due(step):
            self.renderer.submit.remote(step, pin(checkpoint))  # fire and forget
            self.last = step


PINNED_DIR = "pictures/.pinned"  # under the run's storage directory


def pin(checkpoint: Checkpoint) -> Checkpoint:
    """Keep a checkpoint readable until its picture is drawn, although Ray Train deletes it after
    `train.num_to_keep` newer ones: on local storage, hard links to its files (instant, no copy)
    under `<run>/pictures/.pinned/`; the renderer removes them. Other storage: as is."""
    import os
    import shutil

    if checkpoint.filesystem.type_name != "local":
        return checkpoint
    src = Path(checkpoint.path)
    dst = src.parent / PINNED_DIR / src.name
    for f in (p for p in src.rglob("*") if p.is_file()):
        target = dst / f.relative_to(src)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(f, target)
        except OSError:  # no hard links here (another device, a filesystem without them)
            shutil.copy2(f, target)
    return Checkpoint(str(dst))


def training_pictures(
    cfg: XTRAConfig,
    run_id: str | None,
    uri: str,
    start_step: int,
    final_step: int,
    listing: Listing,
    load_weights: WeightsLoader,
) -> list[PicturesAtCheckpoints]:
    """The callbacks to add to the trainer: none when `train.visualize_every` is 0.

    Steps `start_step` -> `final_step` are this invocation's (the final one is always drawn);
    `listing` is the train split (its evenly spaced images are the fixed set); `load_weights`
    turns a checkpoint directory into the full model's state dict."""
    t = cfg.train
    if not t.visualize_every:
        return []
    if t.visualize_every % t.checkpoint_every:
        logger.warning(
            "train.visualize_every=%d is not a multiple of train.checkpoint_every=%d: pictures are "
            "drawn at the first checkpoint after each multiple", t.visualize_every, t.checkpoint_every,
        )
    images, _ = sample_images(listing, t.visualize_images, cfg.model.image_size, cfg.data.max_image_pixels)
    storage = t.storage_path or ""
    out_dir = None if "://" in storage else str(Path(storage, str(t.run_name), "pictures"))
    here = ray.util.scheduling_strategies.NodeAffinitySchedulingStrategy(
        ray.get_runtime_context().get_node_id(), soft=True
    )
    renderer = PictureRenderer.options(scheduling_strategy=here).remote(
        cfg.to_dict(), images, load_weights, uri, run_id, out_dir
    )
    return [PicturesAtCheckpoints(renderer, t.visualize_every, final_step, start_step)]


def finish_pictures(callbacks: list[PicturesAtCheckpoints], succeeded: bool = True) -> list[dict[str, Any]]:
    """After the fit: wait for the queued pictures (the final step's too), end the renderer; one
    record per picture: step, png, or error. After a failure, end it at once (nothing waits)."""
    records: list[dict[str, Any]] = []
    for cb in callbacks:
        try:
            if succeeded:
                records += ray.get(cb.renderer.drain.remote(cb.final))
        except Exception as e:  # noqa: BLE001 - pictures never fail (or mask the error of) a run
            logger.warning("training pictures lost: %s", e)
        finally:
            ray.kill(cb.renderer)
    return records
