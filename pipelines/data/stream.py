"""Ray Data: stream decoded, augmented uint8 images from S3 or a local directory.

`build_dataset(data_cfg, image_size, split, epoch, train)` returns a lazy `ray.data.Dataset`
(nothing is read or materialised until it is iterated) with, per row:

    image: uint8 [H, W, 3] (HWC, H = W = image_size)                 label: int64 (-1 = unlabelled)
    path:  str, the file's URI                                       (only with `with_paths=True`)

so `iter_torch_batches(batch_size=B)` yields `image` uint8 [B, H, W, 3] and `label` int64 [B]; the
training worker turns images into float [B, 3, H, W] with `pipelines.data.images.normalize`. Only uint8
crosses the object store.

How it streams. The listing (paths + labels + sizes, `pipelines.data.listing`) is put once into the
object store, with its `Store` (the S3 settings, from which each process builds its filesystem with
the configured retries). The dataset is a window of row ids of the endless chain of epochs (id r =
position r % N of epoch `epoch + r // N`; by default `num_epochs * N` ids from 0, or `num_rows` ids
from `first_row` for a resumed run): a `ray.data.range` cut into blocks of `rows_per_block(image_size)`
ids (~32 MiB of output each). One fused Ray task per block maps each id to (epoch, position),
position to a file through that epoch's permutation, fetches the files (`FETCH_THREADS` concurrent
GETs from S3; one after the other from a local directory) and decodes + augments them with PIL
(`pipelines.data.images`). Nothing holds image bytes at list time, so listings of ImageNet size work.

Shards. A listing of WebDataset shards (`pipelines.data.shards`, one row per sample) streams by
whole shards instead: the window of row ids is cut into read units of `ShardPlan` (an epoch reads
its shards in a seeded order, in windows of ~`SHUFFLE_BUFFER` samples shuffled together), one unit
per Ray block; its task reads each of its shards in one ranged request and decodes the samples
through the same `_decode_rows` (bad files, crops, flips: as below, keyed by `<shard>#<member>`
below the split's folder).
In training a bad sample's row goes to the next good sample of its unit, so a skipped sample shifts
no other row and a resume stays exact.

Randomness. Epoch e reads the files in the order `epoch_order(N, seed, e)` (a fresh permutation per
epoch; evaluation keeps listing order) and draws each file's crop and flip from
`file_rng(seed, e, key)`, key = the file's path below the listing's root (`draw_key`: the same for
every copy of the data, in another folder or bucket). Both depend only on (data.seed, epoch, key),
never on block boundaries, task placement or retries, so (seed, epoch) reproduces every pixel.
`num_epochs > 1` chains epochs `epoch .. epoch + num_epochs - 1` in one dataset, for a trainer
that is handed a single dataset.

Network errors are not bad files. A read goes through the S3 SDK's own retries
(`data.s3_max_attempts`, backoff, see `pipelines.data.storage`); a file still unreadable after them
stops the stream with `UnreadableFile` naming it, unless `data.skip_unreadable_files` is set (then it
is skipped and named like a bad file).

Bad files. A file whose content is not a usable image (empty, truncated, not an image, over
`data.max_image_pixels`, a side under `data.min_image_side`, or over `data.max_image_bytes` by the
listing's size, checked before any download) is dropped from its batch and logged by the worker as one line
`xtra data: skipped bad image <uri> (<reason>)`. When a `BadFileCounter` actor is passed
(`bad_files=`), every task reports its rows and bad files there (bad files keyed by (epoch, file), so
retried tasks do not double-count them); once `min(BAD_FRACTION_MIN_SEEN, rows in the dataset)` images
have been seen, bad files over `data.max_bad_fraction` of them stop the stream with `TooManyBadFiles`.
Ray Data hands the driver such an error wrapped, without its type: `stream_stop_error(counter)`
gives the data's reason back as one `UserError` line.

Idle executor. When the stream is ahead of its consumer and backpressured, Ray Data 2.60's
scheduling loop does not block (its `ray.wait` returns at once on finished tasks whose outputs are
held back): it spins, re-computing resource budgets hundreds of times a second, in the process that
iterates the dataset, i.e. the training worker, where it takes the GIL from the training step
(measured: tiny on 2 workers x 0.5 CPU trained at half speed until its stream was fully produced).
Every dataset built here carries `IdleBackoff`, which sleeps `IDLE_BACKOFF_S` after a loop step
that returned at once with nothing moved; a step that waited on running tasks is not slowed.
The training loop reads `ray.get(counter.count.remote())` at every logging interval and logs the
increase as its bad-file metric; `counter.summary.remote()` gives the paths and reasons.
"""

from __future__ import annotations

import logging
import math
import time
from collections import OrderedDict
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import ray
from ray.data._internal.execution.execution_callback import ExecutionCallback

from pipelines.data.images import BadImage, draw_key, eval_transform, file_rng, train_transform
from pipelines.data.listing import Listing, list_split
from pipelines.data.shards import ShardPlan, is_sharded, read_range
from pipelines.data.storage import Store, read_bytes
from pipelines.errors import UserError

if TYPE_CHECKING:  # for annotations only: the config is read on the driver (the decode tasks get
    # a `_DecodeSpec`); they import torch anyway, through pipelines.data.images (the resize kernel)
    from xtra_core.config import DataConfig

logger = logging.getLogger("xtra.data")

BLOCK_BYTES = 32 * 2**20  # decoded output per Ray block (= per decode task), ~32 MiB
MIN_ROWS_PER_BLOCK, MAX_ROWS_PER_BLOCK = 64, 1024
MAX_BLOCKS = 100_000  # beyond this, blocks grow instead (Ray plans one read task per block)
FETCH_THREADS = 8  # concurrent S3 reads per task (GET latency), decoding stays on one core
_ORDER_SALT = 0x0F11E5  # keeps the file-order stream apart from the per-file crop streams
BAD_FRACTION_MIN_SEEN = 500  # images seen before data.max_bad_fraction is judged
IDLE_BACKOFF_S = 0.05  # pause of a Ray Data loop step in which nothing moved


class IdleBackoff(ExecutionCallback):
    """Ray Data execution callback: a loop step that came back at once (under `IDLE_BACKOFF_S`
    since the last) and in which nothing moved (no task submitted or finished, no output
    produced, handed on or taken by the consumer) sleeps `IDLE_BACKOFF_S` instead of spinning. A
    step that blocked in Ray's own wait for running tasks is never slowed (module doc)."""

    def __init__(self) -> None:
        self.last: tuple | None = None
        self.last_t = 0.0

    def on_execution_step(self, executor: Any) -> None:
        topology = getattr(executor, "_topology", None) or {}
        now = tuple(
            tuple(getattr(op.metrics, k, 0) for k in _PROGRESS_METRICS) for op in topology
        )
        if now == self.last and time.perf_counter() - self.last_t < IDLE_BACKOFF_S:
            time.sleep(IDLE_BACKOFF_S)
        self.last, self.last_t = now, time.perf_counter()


# per-operator counters of Ray Data's runtime metrics that move whenever the stream makes progress
_PROGRESS_METRICS = (
    "num_tasks_submitted", "num_tasks_finished", "num_task_outputs_generated",
    "num_outputs_taken", "num_external_outqueue_blocks",
)


def with_idle_backoff(ds: ray.data.Dataset) -> ray.data.Dataset:
    """`ds` with `IdleBackoff` among its execution callbacks (the dataset's own context)."""
    callbacks = ds.context.custom_execution_callback_classes
    if IdleBackoff not in callbacks:
        ds.context.custom_execution_callback_classes = [*callbacks, IdleBackoff]
    return ds


class UnreadableFile(UserError):
    """A file that could not be read after the storage's retries (a network or storage error)."""


class TooManyBadFiles(UserError):
    """Bad files passed data.max_bad_fraction of the images seen."""


@ray.remote(num_cpus=0)
class BadFileCounter:
    """What the decode tasks saw: rows, distinct bad (epoch, path) pairs, latest reasons.

    Memory grows with the bad files only. A task that Ray retries reports its rows again: the rows
    seen can only be over-counted, which errs towards going on, never towards a false stop."""

    def __init__(self) -> None:
        self._seen: set[tuple[int, str]] = set()
        self._reasons: dict[str, str] = {}
        self._rows = 0
        self._stop_reason: str | None = None

    def add(self, rows: int, items: list[tuple[int, str, str]]) -> tuple[int, int]:
        """A decode task's report: its `rows` and its bad files `[(epoch, uri, reason), ...]`.
        Returns (bad files, rows seen) so far."""
        self._rows += rows
        for epoch, uri, reason in items:
            self._seen.add((epoch, uri))
            self._reasons[uri] = reason
        return len(self._seen), self._rows

    def count(self) -> int:
        """Distinct (epoch, file) pairs skipped so far (monotonic: diff it per logging interval)."""
        return len(self._seen)

    def stop(self, reason: str) -> None:
        """A decode task stops the stream (`UnreadableFile`, `TooManyBadFiles`): the first reason is
        kept, since Ray Data hands the driver a wrapped error that no longer has the type."""
        self._stop_reason = self._stop_reason or reason

    def stop_reason(self) -> str | None:
        """Why the stream stopped (one line naming the file or the fraction), or None."""
        return self._stop_reason

    def summary(self) -> dict[str, Any]:
        """`{"count": int, "rows": int, "files": {uri: reason}}`, files sorted by URI."""
        return {"count": len(self._seen), "rows": self._rows, "files": dict(sorted(self._reasons.items()))}


def bad_file_counter(name: str | None = None) -> ray.actor.ActorHandle:
    """A new `BadFileCounter` actor (or, with `name`, the existing one of that name), on the
    caller's node: the driver holds it for a whole fit, and a worker node lost mid-run (which Ray
    Train restarts from) must not take the counter with it."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    if name is None:
        return BadFileCounter.options(scheduling_strategy=here).remote()
    return BadFileCounter.options(name=name, get_if_exists=True, scheduling_strategy=here).remote()


def stream_stop_error(counter: ray.actor.ActorHandle) -> UserError | None:
    """After a failed stream: the data's own reason as a one-line UserError, or None if the data
    did not stop it (or the counter is gone with its node). A driver re-raises it instead of Ray's
    wrapped traceback."""
    try:
        reason = ray.get(counter.stop_reason.remote())
    except ray.exceptions.RayActorError:
        return None
    return UserError(reason) if reason else None


def epoch_order(num_files: int, seed: int, epoch: int) -> np.ndarray:
    """int64 [num_files]: the listing rows in the order epoch `epoch` reads them."""
    return np.random.default_rng([seed, epoch, _ORDER_SALT]).permutation(num_files)


@dataclass(frozen=True)
class _DecodeSpec:
    """What a decode task needs besides the listing (small, pickled into every task)."""

    first_epoch: int  # the epoch of row id 0
    first_row: int  # the row id of the dataset's first row
    train: bool
    image_size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip_prob: float
    max_image_pixels: int
    max_image_bytes: int
    min_image_side: int
    max_bad_fraction: float
    min_seen: int  # images seen before the bad fraction is judged
    skip_unreadable: bool
    read_attempts: int  # for messages
    seed: int
    with_paths: bool
    key_root: str = ""  # the listing's root: draws are keyed by the path below it (draw_key)


def build_dataset(
    data: DataConfig,
    image_size: int,
    split: str,
    epoch: int,
    train: bool,
    *,
    num_epochs: int = 1,
    listing: Listing | None = None,
    bad_files: ray.actor.ActorHandle | None = None,
    with_paths: bool = False,
    first_row: int = 0,
    num_rows: int | None = None,
) -> ray.data.Dataset:
    """A lazy, streaming dataset of epochs `epoch .. epoch + num_epochs - 1` of `split`.

    Rows: `image` uint8 [S, S, 3] (S = image_size), `label` int64, and `path` (file URI) if
    `with_paths`. `train=True`: a new file order and RandomResizedCrop + flip per epoch (Table 1,
    from `data`); `train=False`: listing order, resize + centre crop. Pass a `listing` from
    `pipelines.data.listing.list_split` to avoid listing the bucket again for every epoch, and a
    `BadFileCounter` handle as `bad_files` to count skipped files (see the module doc).

    A window of the endless chain of epochs (row id r is position r % N of epoch `epoch` + r // N):
    rows `first_row .. first_row + num_rows - 1`, by default to the end of epoch
    `epoch + num_epochs - 1`. A resumed run starts at `first_row = step * global_batch_size`.
    """
    if num_epochs < 1 or first_row < 0:
        raise ValueError(f"need num_epochs >= 1 and first_row >= 0, got {num_epochs}, {first_row}")
    listing = listing if listing is not None else list_split(data, split)
    total = len(listing) * num_epochs - first_row if num_rows is None else num_rows
    if total < 1:
        raise ValueError(f"empty window: first_row={first_row}, num_rows={num_rows}")
    spec = _DecodeSpec(
        first_epoch=epoch,
        first_row=first_row,
        train=train,
        image_size=image_size,
        crop_scale=tuple(data.crop_scale),
        crop_ratio=tuple(data.crop_ratio),
        hflip_prob=data.hflip_prob,
        max_image_pixels=data.max_image_pixels,
        max_image_bytes=data.max_image_bytes,
        min_image_side=data.min_image_side,
        max_bad_fraction=data.max_bad_fraction,
        min_seen=min(BAD_FRACTION_MIN_SEEN, total),
        skip_unreadable=data.skip_unreadable_files,
        read_attempts=listing.store.s3.max_attempts if listing.store.s3 is not None else 1,
        seed=data.seed,
        with_paths=with_paths,
        key_root=listing.root,
    )
    listing_ref = ray.put((listing.table, listing.store))  # the store pickles as its settings
    if is_sharded(listing.table):
        return _shard_dataset(listing, listing_ref, spec, total, bad_files)
    blocks = max(1, min(MAX_BLOCKS, math.ceil(total / rows_per_block(image_size))))
    return with_idle_backoff(ray.data.range(total, override_num_blocks=blocks).map_batches(
        _decode_batch,
        batch_format="numpy",
        batch_size=None,  # a whole block (rows_per_block ids) per call
        fn_kwargs={"listing_ref": [listing_ref], "spec": spec, "bad_files": bad_files},
    ))


def rows_per_block(image_size: int) -> int:
    """File ids per Ray block: ~BLOCK_BYTES of uint8 output, 64..1024 rows (1024 at 32 px, 222 at
    224 px). Big enough to amortise the per-task cost, small enough to keep blocks in memory."""
    rows = BLOCK_BYTES // (3 * image_size * image_size)
    return int(min(MAX_ROWS_PER_BLOCK, max(MIN_ROWS_PER_BLOCK, rows)))


# --------------------------------------------------------------------------- decode tasks

_LISTINGS: OrderedDict[str, tuple[pa.Table, Store]] = OrderedDict()
_ORDERS: OrderedDict[tuple[str, int], np.ndarray] = OrderedDict()


def _cached_listing(ref: ray.ObjectRef) -> tuple[pa.Table, Store]:
    key = ref.hex()
    if key not in _LISTINGS:
        _LISTINGS[key] = ray.get(ref)  # zero-copy view of the object store
        while len(_LISTINGS) > 2:
            _LISTINGS.popitem(last=False)
    return _LISTINGS[key]


def _cached_order(ref: ray.ObjectRef, n: int, seed: int, epoch: int) -> np.ndarray:
    key = (ref.hex(), epoch)
    if key not in _ORDERS:
        _ORDERS[key] = epoch_order(n, seed, epoch)
        while len(_ORDERS) > 2:
            _ORDERS.popitem(last=False)
    return _ORDERS[key]


def _fetch_all(
    filesystem: pafs.FileSystem, paths: list[str], sizes: list[int | None], max_bytes: int
) -> list[bytes | BadImage | OSError]:
    """The files' bytes, fetched `FETCH_THREADS` at a time from S3 (one after the other from a
    local filesystem, where there is no latency to hide and the threads only cost CPU: 2x the CPU
    per file measured): `BadImage` for a file over `max_bytes` (from the listing's size: nothing
    downloaded; else after at most `max_bytes + 1` bytes), the storage's error (after its retries)
    for a file that cannot be read."""

    def fetch(i: int) -> bytes | BadImage | OSError:
        if sizes[i] is not None and sizes[i] > max_bytes:
            return BadImage(f"{sizes[i]} bytes > data.max_image_bytes={max_bytes}")
        try:
            content = read_bytes(filesystem, paths[i], max_bytes)
        except (OSError, ValueError) as e:  # pyarrow raises OSError for storage/network errors
            return e if isinstance(e, OSError) else OSError(str(e))
        if len(content) > max_bytes:  # no size in the listing (a manifest row)
            return BadImage(f"over data.max_image_bytes={max_bytes} bytes")
        return content

    if filesystem.type_name == "local" or len(paths) < 2:
        return [fetch(i) for i in range(len(paths))]
    with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(paths))) as pool:
        return list(pool.map(fetch, range(len(paths))))


def _decode_batch(
    batch: dict[str, np.ndarray],
    listing_ref: list[ray.ObjectRef],
    spec: _DecodeSpec,
    bad_files: ray.actor.ActorHandle | None,
) -> dict[str, np.ndarray]:
    """Row ids [B] -> decoded images [B', S, S, 3] uint8 + labels [B'] (B' <= B: bad files dropped)."""
    ref = listing_ref[0]
    table, store = _cached_listing(ref)
    n = table.num_rows
    ids = spec.first_row + np.asarray(batch["id"], dtype=np.int64)  # row ids in the epoch chain
    epochs = spec.first_epoch + ids // n
    rows = ids % n
    if spec.train:
        for e in np.unique(epochs):
            sel = epochs == e
            rows[sel] = _cached_order(ref, n, spec.seed, int(e))[rows[sel]]
    take = pa.array(rows)
    paths = table.column("path").take(take).to_pylist()
    sizes = table.column("size").take(take).to_pylist()
    labels = table.column("label").to_numpy()[rows]
    contents = _fetch_all(store.filesystem, paths, sizes, spec.max_image_bytes)

    images, keep = _decode_rows(paths, contents, epochs, store, spec, bad_files, len(ids))
    size = spec.image_size
    out: dict[str, np.ndarray] = {
        "image": np.stack(images) if images else np.zeros((0, size, size, 3), np.uint8),
        "label": labels[keep].astype(np.int64),
    }
    if spec.with_paths:
        out["path"] = np.array([store.uri_of(paths[i]) for i in keep], dtype=object)
    return out


def _decode_rows(
    paths: list[str],
    contents: list[bytes | BadImage | OSError],
    epochs: np.ndarray,
    store: Store,
    spec: _DecodeSpec,
    bad_files: ray.actor.ActorHandle | None,
    rows_seen: int,
) -> tuple[list[np.ndarray], list[int]]:
    """Decode + augment every content (train: `file_rng(seed, epoch, draw_key(path, root))` draws
    its crop and flip): (images uint8 [S, S, 3], the indices they came from). Bad files are
    logged, reported to `bad_files` with `rows_seen`, and stop the stream past
    data.max_bad_fraction; a read error stops it unless data.skip_unreadable_files."""
    size = spec.image_size
    images: list[np.ndarray] = []
    keep: list[int] = []
    bad: list[tuple[int, str, str]] = []
    for i, (path, content) in enumerate(zip(paths, contents)):
        epoch = int(epochs[i])
        try:
            if isinstance(content, OSError):
                raise _unreadable(store.uri_of(path), content, spec, bad_files)
            if isinstance(content, BadImage):
                raise content
            # the transforms check data.min_image_side on the header they read anyway (a second
            # header parse with PIL cost ~5% of the decode time at 224 px)
            if spec.train:
                image = train_transform(
                    content,
                    file_rng(spec.seed, epoch, draw_key(path, spec.key_root)),
                    size,
                    spec.crop_scale,
                    spec.crop_ratio,
                    spec.hflip_prob,
                    spec.max_image_pixels,
                    spec.min_image_side,
                )
            else:
                image = eval_transform(content, size, spec.max_image_pixels, spec.min_image_side)
        except BadImage as e:
            uri = store.uri_of(path)
            logger.warning("xtra data: skipped bad image %s (%s)", uri, e)
            bad.append((epoch, uri, str(e)))
            continue
        images.append(image)
        keep.append(i)
    if bad_files is not None and rows_seen:
        count, seen = ray.get(bad_files.add.remote(rows_seen, bad))
        if seen >= spec.min_seen and count > spec.max_bad_fraction * seen:
            example = f"; e.g. {bad[0][1]} ({bad[0][2]})" if bad else ""
            reason = (
                f"xtra data: {count} bad files in {seen} images seen ({count / seen:.1%}) passes "
                f"data.max_bad_fraction={spec.max_bad_fraction}{example}; "
                "`xtra data inspect <uri>` lists them all"
            )
            ray.get(bad_files.stop.remote(reason))
            raise TooManyBadFiles(reason)
    return images, keep


# --------------------------------------------------------------------------- shard windows


def _shard_dataset(
    listing: Listing,
    listing_ref: ray.ObjectRef,
    spec: _DecodeSpec,
    total: int,
    bad_files: ray.actor.ActorHandle | None,
) -> ray.data.Dataset:
    """The window of row ids as read units of whole shards (`ShardPlan`): one unit per Ray block,
    one decode task per unit, one ranged read per shard."""
    plan = ShardPlan(listing.table.column("shard").to_pylist(), spec.seed, spec.train)
    units = plan.units(spec.first_epoch, spec.first_row, total)  # int64 [U, 4]
    units_ref = ray.put(units)
    return with_idle_backoff(
        ray.data.range(len(units), override_num_blocks=min(len(units), MAX_BLOCKS)).map_batches(
            _read_windows,
            batch_format="numpy",
            batch_size=None,
            fn_kwargs={"listing_ref": [listing_ref], "units_ref": [units_ref], "spec": spec,
                       "bad_files": bad_files},
        )
    )


_PLANS: OrderedDict[tuple[str, int, bool], ShardPlan] = OrderedDict()


def _cached_plan(ref: ray.ObjectRef, table: pa.Table, spec: _DecodeSpec) -> ShardPlan:
    key = (ref.hex(), spec.seed, spec.train)
    if key not in _PLANS:
        _PLANS[key] = ShardPlan(table.column("shard").to_pylist(), spec.seed, spec.train)
        while len(_PLANS) > 2:
            _PLANS.popitem(last=False)
    return _PLANS[key]


def _read_windows(
    batch: dict[str, np.ndarray],
    listing_ref: list[ray.ObjectRef],
    units_ref: list[ray.ObjectRef],
    spec: _DecodeSpec,
    bad_files: ray.actor.ActorHandle | None,
) -> Iterator[dict[str, np.ndarray]]:
    """Unit ids [B] -> their samples decoded, in read order, `rows_per_block` rows per output.

    Training: a bad sample's row is taken by the next good sample of its unit (the same image and
    crop twice), so that every other sample keeps its row and a resumed stream stays aligned."""
    ref = listing_ref[0]
    table, store = _cached_listing(ref)
    plan = _cached_plan(ref, table, spec)
    units = ray.get(units_ref[0])
    chunk = rows_per_block(spec.image_size)
    for u in np.asarray(batch["id"], dtype=np.int64):
        epoch, window, start, stop = (int(v) for v in units[u])
        rows = plan.window_rows(epoch, window)[start:stop]
        take = pa.array(rows)
        paths = table.column("path").take(take).to_pylist()
        labels = table.column("label").to_numpy()[rows]
        contents = _fetch_samples(store.filesystem, table.take(take), spec.max_image_bytes)
        images, keep = _decode_rows(
            paths, contents, np.full(len(rows), epoch), store, spec, bad_files, len(rows)
        )
        order = _fill_bad_rows(keep, len(rows)) if spec.train else np.arange(len(keep))
        source = np.asarray(keep, dtype=np.int64)[order] if len(keep) else np.zeros(0, np.int64)
        for lo in range(0, len(order), chunk):
            sel = order[lo : lo + chunk]
            out: dict[str, np.ndarray] = {
                "image": np.stack([images[k] for k in sel]),
                "label": labels[source[lo : lo + chunk]].astype(np.int64),
            }
            if spec.with_paths:
                out["path"] = np.array([store.uri_of(paths[i]) for i in source[lo : lo + chunk]], dtype=object)
            yield out


def _fill_bad_rows(keep: list[int], n: int) -> np.ndarray:
    """Indices into `keep` for rows 0..n-1: a kept row itself, a bad row the next kept row after
    it; bad rows after the last kept one are dropped."""
    out: list[int] = []
    k = 0
    for row in range(n):
        while k < len(keep) and keep[k] < row:
            k += 1
        if k < len(keep):
            out.append(k)
    return np.asarray(out, dtype=np.int64)


def _fetch_samples(
    filesystem: pafs.FileSystem, rows: pa.Table, max_bytes: int
) -> list[bytes | BadImage | OSError]:
    """The samples' bytes: one ranged read per shard (from the first needed member to the end of
    the last), shards read `FETCH_THREADS` at a time from S3. `BadImage` for a sample the index
    marks as bad or over `max_bytes`; the storage's error for every sample of an unreadable shard."""
    shards = rows.column("shard").to_pylist()
    offsets = rows.column("offset").to_pylist()
    sizes = rows.column("size").to_pylist()
    problems = rows.column("problem").to_pylist()
    out: list[bytes | BadImage | OSError] = [b""] * len(shards)
    groups: dict[str, list[int]] = {}
    for i, (shard, problem, size) in enumerate(zip(shards, problems, sizes)):
        if problem:
            out[i] = BadImage(problem)
        elif size > max_bytes:
            out[i] = BadImage(f"{size} bytes > data.max_image_bytes={max_bytes}")
        else:
            groups.setdefault(shard, []).append(i)

    def fetch(shard: str) -> None:
        members = groups[shard]
        lo = min(offsets[i] for i in members)
        hi = max(offsets[i] + sizes[i] for i in members)
        try:
            data = read_range(filesystem, shard, lo, hi - lo)
        except (OSError, ValueError) as e:  # after the storage's retries
            error = e if isinstance(e, OSError) else OSError(str(e))
            for i in members:
                out[i] = error
            return
        for i in members:
            out[i] = data[offsets[i] - lo : offsets[i] - lo + sizes[i]]

    if filesystem.type_name == "local" or len(groups) < 2:
        for shard in groups:
            fetch(shard)
    else:
        with ThreadPoolExecutor(max_workers=min(FETCH_THREADS, len(groups))) as pool:
            list(pool.map(fetch, groups))
    return out


def _unreadable(
    uri: str, error: OSError, spec: _DecodeSpec, bad_files: ray.actor.ActorHandle | None
) -> BadImage:
    """A read error after the storage's retries: a bad file if the user opted in, else the end."""
    reason = f"{type(error).__name__}: {(str(error).splitlines() or [''])[0]}"
    if spec.skip_unreadable:
        return BadImage(f"unreadable after {spec.read_attempts} attempt(s): {reason}")
    message = (
        f"{uri}: still unreadable after {spec.read_attempts} attempt(s) ({reason}); stopping rather "
        "than training without it (data.skip_unreadable_files=true skips such files, named in the log)"
    )
    if bad_files is not None:
        ray.get(bad_files.stop.remote(message))
    raise UnreadableFile(message)
