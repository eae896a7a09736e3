"""The pretraining input stream: one lazy Ray Dataset of image rows for the steps of this run.

Pretraining reads row ids `first_row .. first_row + num_rows - 1` of the endless chain of epochs
(epoch e = ids e*N .. (e+1)*N - 1, each in its own seeded order with its own crops, see
`pipelines.data`); the trainer hands it to the workers with `get_dataset_shard("train")`. A run
resumed at step s starts its stream at row s * global_batch_size, so nothing is re-read.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow.fs as pafs
import ray

from pipelines.data import storage
from pipelines.data.listing import Listing, list_split
from pipelines.data.stream import build_dataset
from xtra_core.config import XTRAConfig

# rows added past the planned end, so that skipped bad files never leave a worker short of batches
SPARE_FRACTION = 0.02


@dataclass
class TrainStream:
    cfg: XTRAConfig
    listing: Listing

    @property
    def num_images(self) -> int:
        return len(self.listing)

    def dataset(
        self, first_row: int, num_rows: int, bad_files: ray.actor.ActorHandle | None = None
    ) -> ray.data.Dataset:
        """Rows first_row .. first_row + num_rows (+ a spare margin); skipped files are recorded in
        the `bad_files` counter actor (`pipelines.data.BadFileCounter`)."""
        spare = int(num_rows * SPARE_FRACTION) + 2 * self.cfg.train.global_batch_size
        return build_dataset(
            self.cfg.data,
            self.cfg.model.image_size,
            self.cfg.data.train_split,
            epoch=0,
            train=True,
            listing=self.listing,
            bad_files=bad_files,
            first_row=first_row,
            num_rows=num_rows + spare,
        )


def build_train_stream(cfg: XTRAConfig) -> TrainStream:
    listing = list_split(cfg.data, cfg.data.train_split)
    return TrainStream(cfg, listing)



def open_storage(storage_path: str, cfg: XTRAConfig) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) of a run storage location, local or s3://."""
    if storage.is_s3_uri(storage_path):
        loc = storage.resolve(storage_path, storage.s3_settings(cfg.data))
        return loc.filesystem, loc.path.rstrip("/")
    return pafs.LocalFileSystem(), str(storage_path).rstrip("/")
