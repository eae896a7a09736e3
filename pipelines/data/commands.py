"""`xtra data prepare` and `xtra data inspect`.

prepare: write a dataset in the class-folder layout `<dest>/<split>/<class>/<name>` (local or S3),
  or with `shard_size` (`--format shards`) as WebDataset shards (`pipelines.data.shards`: the
  source files' own bytes, in a seeded random order, `shard_size` per shard; resumable).
  `--source fashion-mnist` reads Debian's `dataset-fashion-mnist` idx files
  (`/usr/share/datasets/fashion-mnist/`, or `$XTRA_FASHION_MNIST_DIR`) into 28x28 grayscale PNGs
  under class folders `0_t-shirt_top` .. `9_ankle_boot` (sorted names = the original label order).
  `--source <folder or s3://...>` copies a class-folder or manifest dataset: JPEG and PNG files are
  copied byte for byte, other formats re-encoded as PNG, files that do not decode (or are over
  `data.max_image_bytes`) are skipped and reported, a file that cannot be read stops the copy naming
  it; a source without split folders goes to `<dest>/train/`. Every file lands below `<dest>`: a
  class name that is not a plain folder name (`..`, `a/b`) is refused before anything is written. `--limit N`: a seeded random
  subsample of at most N images per split. Progress goes to stderr, a summary line to stdout.

inspect: decode every file through the pipeline (`pipelines.data`, evaluation transform) on Ray and
  print one JSON object on stdout: `images` (good images), `per_class` (class -> good images, over
  all splits), `bad_files` (sorted URIs, unreadable files included), and `splits` (split -> good
  images; "" for a root without splits). For shards, `bad_files` also lists the source files that
  `prepare` skipped (from the index), so it equals the report on the source folder.
"""

from __future__ import annotations

import gzip
import io
import os
import posixpath
import struct
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow.fs as pafs
from PIL import Image

from pipelines import console
from pipelines.data import shards
from pipelines.data.images import BadImage, decode
from pipelines.data.listing import Listing, list_every_split
from pipelines.data.storage import (
    Location,
    file_info,
    read_bytes,
    resolve,
    s3_settings,
    storage_error,
)
from pipelines.errors import UserError

if TYPE_CHECKING:
    from xtra_core.config import DataConfig

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "0_t-shirt_top",
    "1_trouser",
    "2_pullover",
    "3_dress",
    "4_coat",
    "5_sandal",
    "6_shirt",
    "7_sneaker",
    "8_bag",
    "9_ankle_boot",
)
FASHION_MNIST_FILES = {"train": "train", "test": "t10k"}
PREPARE_SEED = 0
WRITE_THREADS = 8


# --------------------------------------------------------------------------- prepare


def prepare(
    source: str,
    dest_uri: str,
    s3_endpoint: str | None = None,
    limit: int | None = None,
    shard_size: int | None = None,
) -> dict[str, int]:
    """Write `source` ('fashion-mnist' or an image folder) to `dest_uri` in the class-folder
    layout, or as WebDataset shards of `shard_size` samples (`pipelines.data.shards`); returns
    images written per split."""
    from xtra_core.config import DataConfig

    if limit is not None and limit < 1:
        raise UserError(f"--limit {limit}: give a positive number of images per split")
    if shard_size is not None and shard_size < 1:
        raise UserError(f"--shard-size {shard_size}: give a positive number of images per shard")
    dest = resolve(dest_uri, s3_settings(DataConfig(s3_endpoint=s3_endpoint)))
    if dest.is_s3:  # fail before any work: the bucket must exist and be reachable
        bucket = dest.path.split("/", 1)[0]
        if file_info(Location(dest.store, bucket, f"s3://{bucket}")).type == pafs.FileType.NotFound:
            raise UserError(f"{dest_uri}: the bucket s3://{bucket} does not exist")
    if shard_size is not None:
        written, bad = _prepare_shards(source, DataConfig(uri=source, s3_endpoint=s3_endpoint), dest,
                                       limit, shard_size)
    elif source == "fashion-mnist":
        written, bad = _prepare_fashion_mnist(dest, limit), 0
    else:
        written, bad = _prepare_folder(DataConfig(uri=source, s3_endpoint=s3_endpoint), dest, limit)
    total = sum(written.values())
    per_split = ", ".join(f"{s}: {n}" for s, n in written.items())
    print(f"wrote {total} images to {dest_uri} ({per_split}; {bad} bad files skipped)")
    return written


def read_idx(path: str) -> np.ndarray:
    """An idx(.gz) file (MNIST format) -> uint8 array [N] (labels) or [N, H, W] (images)."""
    opener = gzip.open if path.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read idx file: {e}") from None
    if len(raw) < 4 or raw[:2] != b"\x00\x00" or raw[2] != 0x08:
        raise UserError(f"{path}: not a uint8 idx file")
    ndim = raw[3]
    dims = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise UserError(f"{path}: truncated idx file ({data.size} of {int(np.prod(dims))} values)")
    return data.reshape(dims)


def _subsample(n: int, limit: int | None) -> np.ndarray:
    """Sorted indices of a seeded random subsample of at most `limit` of `n` items."""
    if limit is None or limit >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(PREPARE_SEED).permutation(n)[:limit])


def _prepare_fashion_mnist(dest: Location, limit: int | None) -> dict[str, int]:
    src = os.environ.get("XTRA_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    written: dict[str, int] = {}
    for split, stem in FASHION_MNIST_FILES.items():
        images_path = os.path.join(src, f"{stem}-images-idx3-ubyte.gz")
        labels_path = os.path.join(src, f"{stem}-labels-idx1-ubyte.gz")
        if not os.path.exists(images_path):
            raise UserError(
                f"{images_path}: missing; install the Debian package dataset-fashion-mnist "
                "(or set XTRA_FASHION_MNIST_DIR)"
            )
        images, labels = read_idx(images_path), read_idx(labels_path)
        if len(images) != len(labels):
            raise UserError(f"{images_path}: {len(images)} images but {len(labels)} labels")
        keep = _subsample(len(images), limit)

        def jobs(split: str = split, images: np.ndarray = images, labels: np.ndarray = labels,
                 keep: np.ndarray = keep) -> Iterator[tuple[str, Callable[[], bytes | None]]]:
            for i in keep:
                name = f"{split}/{FASHION_MNIST_CLASSES[labels[i]]}/{split}_{i:05d}.png"
                yield name, lambda i=i, images=images: _png(images[i])

        written[split] = _write_all(dest, split, len(keep), jobs())
    return written


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def _prepare_folder(src_cfg: DataConfig, dest: Location, limit: int | None) -> tuple[dict[str, int], int]:
    splits = list_every_split(src_cfg)
    written: dict[str, int] = {}
    bad_total = 0
    for split, listing in splits.items():
        out_split = split or "train"
        keep = _subsample(len(listing), limit)
        paths = listing.table.column("path").to_pylist()
        labels = listing.table.column("label").to_numpy()
        sizes = listing.table.column("size").to_pylist()
        names = _dest_names(listing, paths, labels, keep, out_split)
        for name in names:  # every target below dest, checked before anything is written
            dest.join(name)
        bad: list[str] = []
        lock = threading.Lock()

        def convert(path: str, size: int | None, listing: Listing = listing, bad: list[str] = bad,
                    lock: threading.Lock = lock) -> bytes | None:
            uri = listing.store.uri_of(path)
            limit_bytes = src_cfg.max_image_bytes
            content = b""
            if (size or 0) <= limit_bytes:  # from the listing: an oversized file is not downloaded
                try:
                    content = read_bytes(listing.filesystem, path, limit_bytes)
                except (OSError, ValueError) as e:  # after the storage's retries: stop, naming it
                    raise storage_error(Location(listing.store, path, uri), e) from None
            try:
                if (size or 0) > limit_bytes or len(content) > limit_bytes:
                    raise BadImage(f"file over data.max_image_bytes={limit_bytes}")
                img = decode(content, src_cfg.max_image_pixels)
            except BadImage as e:
                print(f"prepare: skipped bad image {uri} ({e})", file=sys.stderr)
                with lock:
                    bad.append(uri)
                return None
            if content[:3] == b"\xff\xd8\xff" or content[:8] == b"\x89PNG\r\n\x1a\n":
                return content
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()

        jobs = ((names[k], lambda p=paths[i], n=sizes[i]: convert(p, n)) for k, i in enumerate(keep))
        written[out_split] = _write_all(dest, out_split, len(keep), jobs)
        written[out_split] -= len(bad)
        bad_total += len(bad)
    return written, bad_total


def _prepare_shards(
    source: str, src_cfg: DataConfig, dest: Location, limit: int | None, shard_size: int
) -> tuple[dict[str, int], int]:
    """Every split of `source` as shards under `dest` (`pipelines.data.shards.write_split`), the
    files in a seeded random order; `classes.json` at the top."""
    splits = _fashion_mnist_items(limit) if source == "fashion-mnist" else _folder_items(src_cfg, limit)
    written: dict[str, int] = {}
    bad_total = 0
    classes: tuple[str, ...] = ()
    for split, (items, split_classes) in splits.items():
        classes = classes or split_classes
        order = np.random.default_rng(PREPARE_SEED).permutation(len(items))
        written[split], skipped = shards.write_split(dest, split, [items[i] for i in order], shard_size)
        bad_total += len(skipped)
    shards.write_classes(dest, classes)
    return written, bad_total


def _fashion_mnist_items(limit: int | None) -> dict[str, tuple[list[shards.SourceItem], tuple[str, ...]]]:
    src = os.environ.get("XTRA_FASHION_MNIST_DIR", FASHION_MNIST_DIR)
    out = {}
    for split, stem in FASHION_MNIST_FILES.items():
        images_path = os.path.join(src, f"{stem}-images-idx3-ubyte.gz")
        if not os.path.exists(images_path):
            raise UserError(
                f"{images_path}: missing; install the Debian package dataset-fashion-mnist "
                "(or set XTRA_FASHION_MNIST_DIR)"
            )
        images = read_idx(images_path)
        labels = read_idx(os.path.join(src, f"{stem}-labels-idx1-ubyte.gz"))
        if len(images) != len(labels):
            raise UserError(f"{images_path}: {len(images)} images but {len(labels)} labels")
        out[split] = ([
            shards.SourceItem(
                key=f"{FASHION_MNIST_CLASSES[labels[i]]}/{split}_{i:05d}", ext="png", label=int(labels[i]),
                uri=f"{images_path}[{i}]", fetch=lambda i=i, images=images: _png(images[i]),
            )
            for i in _subsample(len(images), limit)
        ], FASHION_MNIST_CLASSES)
    return out


def _folder_items(
    src_cfg: DataConfig, limit: int | None
) -> dict[str, tuple[list[shards.SourceItem], tuple[str, ...]]]:
    """The files of every split of a folder or manifest as shard items: key `<class>/<stem>`
    (dots of the stem become `_`, WebDataset's key ends at the first dot), the file's own
    extension and bytes; a file that does not decode is a bad file (`BadImage`)."""
    out = {}
    for split, listing in list_every_split(src_cfg).items():
        paths = listing.table.column("path").to_pylist()
        labels = listing.table.column("label").to_numpy()
        sizes = listing.table.column("size").to_pylist()
        seen: set[str] = set()
        items = []
        for i in _subsample(len(listing), limit):
            stem, ext = posixpath.splitext(posixpath.basename(paths[i]))
            stem = stem.replace(".", "_") or "_"
            folder = "" if labels[i] < 0 else listing.class_name(int(labels[i])).replace(".", "_") + "/"
            key, k = f"{folder}{stem}", 1
            while key in seen:
                key, k = f"{folder}{stem}_{k}", k + 1
            seen.add(key)
            uri = listing.store.uri_of(paths[i])
            items.append(shards.SourceItem(
                key=key, ext=ext.lstrip(".").lower(), label=int(labels[i]), uri=uri,
                fetch=lambda listing=listing, i=i, size=sizes[i], uri=uri: _checked_bytes(
                    listing, i, size, uri, src_cfg),
            ))
        out[split or "train"] = (items, listing.classes)
    return out


def _checked_bytes(listing: Listing, row: int, size: int | None, uri: str, cfg: DataConfig) -> bytes:
    """A source file's bytes if they decode (BadImage otherwise); a read error stops, naming it."""
    limit_bytes = cfg.max_image_bytes
    if (size or 0) > limit_bytes:
        raise BadImage(f"file over data.max_image_bytes={limit_bytes}")
    path = listing.table.column("path")[row].as_py()
    try:
        content = read_bytes(listing.filesystem, path, limit_bytes)
    except (OSError, ValueError) as e:  # after the storage's retries: stop, naming it
        raise storage_error(Location(listing.store, path, uri), e) from None
    if len(content) > limit_bytes:
        raise BadImage(f"file over data.max_image_bytes={limit_bytes}")
    decode(content, cfg.max_image_pixels)
    return content


def _dest_names(
    listing: Listing, paths: list[str], labels: np.ndarray, keep: np.ndarray, split: str
) -> list[str]:
    """`<split>/<class>/<file name>` per kept file; PNG names for re-encoded files; no collisions.
    A class name that is not a plain folder name (`..`, `a/b`, empty) is refused."""
    for name in listing.classes:
        if name in ("", ".", "..") or "/" in name or "\\" in name or "\0" in name:
            raise UserError(
                f"{listing.uri}: class {name!r} is not a plain folder name; `xtra data prepare` "
                "writes one folder per class below --dest"
            )
    seen: set[str] = set()
    names = []
    for i in keep:
        base = posixpath.basename(paths[i])
        stem, ext = posixpath.splitext(base)
        if ext.lower() not in (".jpg", ".jpeg", ".png"):
            ext = ".png"
        folder = split if labels[i] < 0 else f"{split}/{listing.class_name(int(labels[i]))}"
        name, k = f"{folder}/{stem}{ext}", 1
        while name in seen:
            name, k = f"{folder}/{stem}_{k}{ext}", k + 1
        seen.add(name)
        names.append(name)
    return names


def _write_all(
    dest: Location,
    split: str,
    total: int,
    jobs: Iterator[tuple[str, Callable[[], bytes | None]]],
) -> int:
    """Run `(relative name, make bytes)` jobs on a thread pool, writing under `dest`; progress on
    stderr every ~10%. Returns the number of jobs (a job returning None writes nothing)."""
    step = max(1, total // 10)
    done = 0
    shards.refuse_links_below(dest, dest.join(split).path)  # before any work

    def run(job: tuple[str, Callable[[], bytes | None]]) -> None:
        name, make = job
        content = make()
        if content is not None:
            shards.write_below(dest, name, content)  # whole files, never through a symbolic link

    with ThreadPoolExecutor(max_workers=WRITE_THREADS) as pool:
        for _ in pool.map(run, jobs):
            done += 1
            if done % step == 0 or done == total:
                print(f"prepare: {split} {done}/{total}", file=sys.stderr, flush=True)
    return done


# --------------------------------------------------------------------------- inspect


def inspect(uri: str, s3_endpoint: str | None = None) -> dict[str, Any]:
    """Decode every file of `uri` through the pipeline: images, per class, per split, bad files."""
    import ray

    from pipelines.data.stream import bad_file_counter, build_dataset
    from xtra_core.config import DataConfig, ModelConfig

    # every bad or unreadable file is reported, none stops the inspection
    data = DataConfig(uri=uri, s3_endpoint=s3_endpoint, skip_unreadable_files=True, max_bad_fraction=1.0)
    splits = list_every_split(data)  # fails fast, before Ray starts, on a bad URI
    started = not ray.is_initialized()
    if started:
        ray.init(address=os.environ.get("RAY_ADDRESS"), include_dashboard=False,
                 **console.ray_init_kwargs())
    console.quiet_ray_data()  # Ray Data's progress lines only with --verbose
    try:
        counter = bad_file_counter()
        per_class: dict[str, int] = {}
        per_split: dict[str, int] = {}
        for split, listing in splits.items():
            ds = build_dataset(
                data, ModelConfig().image_size, split, 0, train=False, listing=listing, bad_files=counter
            )
            labels = ds.map_batches(_labels_only, batch_format="numpy")
            counts: dict[int, int] = {}
            for batch in labels.iter_batches(batch_size=4096, batch_format="numpy"):
                for k, n in zip(*np.unique(batch["label"], return_counts=True)):
                    counts[int(k)] = counts.get(int(k), 0) + int(n)
            per_split[split] = sum(counts.values())
            for k, n in sorted(counts.items()):
                name = listing.class_name(k)
                per_class[name] = per_class.get(name, 0) + n
        summary = ray.get(counter.summary.remote())
        for listing in splits.values():  # bad source files left out when the shards were written
            summary["files"].update(listing.skipped)
    finally:
        if started:
            ray.shutdown()
    report = {
        "images": sum(per_split.values()),
        "per_class": dict(sorted(per_class.items())),
        "bad_files": sorted(summary["files"]),
        "splits": per_split,
    }
    return report


def _labels_only(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {"label": batch["label"]}
