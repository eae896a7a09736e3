"""The pretraining input stream: lazy Ray Datasets of image rows for the steps of this run.

Every Ray Train worker reads its own stream, so that each rank's batches are a function of the step
alone, whatever the task timing (Ray Data's `streaming_split` hands blocks to whichever worker asks
first). `RankStreams` (the trainer's `dataset_config`) gives worker r of W, under
`get_dataset_shard("train")`:

- the files of the listing rows r, r + W, r + 2W, ... (the listing is sorted, so every rank sees
  every class), as an endless chain of epochs over that shard (each epoch in its own seeded order
  with its own crops, see `pipelines.data.stream`);
- from row `start_step * R` on, R = global_batch_size / W = micro batch x accumulation steps
  images per step, in order (`preserve_order`), so step s of rank r is always the same images.

A run resumed at step s starts every rank at row s * R, so nothing is re-read; a worker group that
Ray restarts gets fresh streams from the invocation's first step and passes over the steps its
checkpoint already holds. Exact when no file is bad: a skipped file shifts its rank's later rows
by one, and a resumed run starts at the planned row.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import ray
from ray.train import DataConfig

from pipelines.data import shards
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

    def rank_dataset(
        self,
        rank: int,
        world: int,
        start_step: int,
        num_steps: int,
        bad_files: ray.actor.ActorHandle | None = None,
        with_paths: bool = False,
    ) -> ray.data.Dataset:
        """Worker `rank` of `world`: its shard's rows for steps start_step .. start_step +
        num_steps - 1 (+ a spare margin), `global_batch_size / world` rows per step, in order."""
        per_step = self.cfg.train.global_batch_size // world
        rows = num_steps * per_step
        spare = int(rows * SPARE_FRACTION) + 2 * per_step
        ds = build_dataset(
            self.cfg.data,
            self.cfg.model.image_size,
            self.cfg.data.train_split,
            epoch=0,
            train=True,
            listing=rank_shard(self.listing, rank, world),
            bad_files=bad_files,
            with_paths=with_paths,
            first_row=start_step * per_step,
            num_rows=rows + spare,
        )
        ds.context.execution_options.preserve_order = True  # block order = row order
        return ds

    def rank_split(
        self, start_step: int, num_steps: int, bad_files: ray.actor.ActorHandle | None = None
    ) -> RankStreams:
        """The trainer's `dataset_config`: one deterministic stream per worker (module doc)."""
        return RankStreams(self, start_step, num_steps, bad_files)


def rank_shard(listing: Listing, rank: int, world: int) -> Listing:
    """The listing rows rank, rank + world, rank + 2 world, ... (a fixed, disjoint shard); of a
    listing of WebDataset shards, the whole shards rank, rank + world, ..."""
    if listing.is_sharded:
        return dataclasses.replace(listing, table=shards.rank_subset(listing.table, rank, world, listing.uri))
    rows = pa.array(range(rank, len(listing), world), type=pa.int64())
    return dataclasses.replace(listing, table=listing.table.take(rows))


class RankStreams(DataConfig):
    """Ray Train's dataset assignment for pretraining: worker r iterates
    `TrainStream.rank_dataset(r, W, ...)`; the dataset passed to the trainer as `train` only names
    the shard (Ray Train requires one) and is not read."""

    def __init__(
        self, stream: TrainStream, start_step: int, num_steps: int,
        bad_files: ray.actor.ActorHandle | None,
    ) -> None:
        super().__init__(datasets_to_split="all")
        self.stream, self.start_step, self.num_steps, self.bad_files = stream, start_step, num_steps, bad_files

    def configure(
        self, datasets: dict[str, Any], world_size: int, worker_handles: Any, worker_node_ids: Any, **kwargs: Any
    ) -> list[dict[str, Any]]:
        """One `DataIterator` per rank, of its own stream (Ray Train calls this per worker group)."""
        out = []
        for rank in range(world_size):
            ds = self.stream.rank_dataset(rank, world_size, self.start_step, self.num_steps, self.bad_files)
            options = self._resolve_execution_options("train")  # Ray Train's ingest resources
            options.preserve_order = True
            ds.context.execution_options = options
            out.append({name: ds.iterator() for name in datasets})
        return out


def build_train_stream(cfg: XTRAConfig) -> TrainStream:
    listing = list_split(cfg.data, cfg.data.train_split)
    return TrainStream(cfg, listing)
