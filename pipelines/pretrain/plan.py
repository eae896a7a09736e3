"""What a pretraining invocation trains (`RunPlan`), and the run defaults every job shares: the
run name (`default_run_name`) and where runs are stored (`storage_path`, default ~/xtra_runs;
`open_storage` opens it, local or s3://)."""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pipelines.errors import UserError
from xtra_core.config import XTRAConfig

if TYPE_CHECKING:
    import pyarrow.fs as pafs

DEFAULT_STORAGE = "~/xtra_runs"


def default_run_name(prefix: str) -> str:
    """`<prefix>-YYYYmmdd-HHMMSS` (local time): the name of a run the user did not name."""
    return f"{prefix}-{time.strftime('%Y%m%d-%H%M%S')}"


def storage_path(configured: str | None) -> str:
    """`train.storage_path` as given (a local dir or s3://), else ~/xtra_runs expanded."""
    return configured or str(Path(DEFAULT_STORAGE).expanduser())


def open_storage(storage_path: str, cfg: XTRAConfig) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) of a run storage location, local or s3://."""
    import pyarrow.fs as pafs

    from pipelines.data import storage

    if storage.is_s3_uri(storage_path):
        loc = storage.resolve(storage_path, storage.s3_settings(cfg.data))
        return loc.filesystem, loc.path.rstrip("/")
    return pafs.LocalFileSystem(), str(storage_path).rstrip("/")


@dataclass
class RunPlan:
    """What this invocation trains: steps [start_step, stop_step) of a run of total_steps."""

    total_steps: int
    steps_per_epoch: int
    rows_per_epoch: int
    start_step: int
    stop_step: int
    bad_files_actor: str = ""

    @property
    def trained(self) -> bool:
        """The run's checkpoints already reached its last step: only the end may be missing."""
        return self.start_step >= self.total_steps


def plan_run(cfg: XTRAConfig, num_images: int, start_step: int) -> RunPlan:
    """Steps per epoch from the dataset size (or `train.steps_per_epoch`), the run's length from
    `train.max_steps` or `train.epochs`, this invocation's end from `train.stop_at_step`. A run
    whose checkpoints reached its last step gets a plan with nothing to train (`trained`)."""
    t = cfg.train
    steps_per_epoch = t.steps_per_epoch or num_images // t.global_batch_size
    if steps_per_epoch < 1:
        raise UserError(
            f"{cfg.data.uri}: {num_images} images is less than one global batch "
            f"(train.global_batch_size={t.global_batch_size})"
        )
    total = t.max_steps or t.epochs * steps_per_epoch
    stop = min(total, t.stop_at_step) if t.stop_at_step else total
    if stop <= start_step < total:
        raise UserError(f"run {t.run_name!r} already reached step {start_step} of {stop}; nothing to train")
    return RunPlan(total, steps_per_epoch, num_images, start_step, stop,
                   bad_files_actor=f"xtra-bad-files-{t.run_name}-{uuid.uuid4().hex[:8]}")
