"""Image shards: WebDataset tar files, their index, and the order a stream reads them in (no Ray).

Layout (written by `xtra data prepare --format shards`, local or S3):

    <root>/classes.json                      ["cat", "dog", ...]: label i is classes[i]
    <root>/<split>/shard-000000.tar ...      WebDataset: per sample `<key>.<ext>` (the source file's
                                             encoded bytes, never re-encoded) + `<key>.cls` (the
                                             class index as ASCII digits; -1 = unlabelled)
    <root>/<split>/index.json                the shards: name, samples, bytes; the source's bad
                                             files skipped while writing; `complete`
    <root>/<split>/samples.parquet           one row per sample: shard, member, offset and size of
                                             the image bytes inside the tar, label, problem

A split is detected by its `index.json` (`is_shard_split`); `shard_listing` turns it into a
`Listing` with one row per sample: `path` = `<shard path>#<member>` (the sample's name in messages
and its key for the per-sample random stream), `shard`, `offset`, `size`, `label`, `problem` (why a
sample is bad before any byte is read: a key without an image member or without a `.cls`; null for
a good sample). The listing compares every shard's size with the index (one LIST of the split):
a truncated or rewritten shard is one error naming it.

Read order (`ShardPlan`): epoch e reads whole shards, in a seeded permutation of the listing's shards
(training; evaluation keeps listing order), cut into windows of consecutive shards holding about
`SHUFFLE_BUFFER` samples; a window's samples are permuted by their own seeded generator (the
bounded shuffle buffer). Everything depends on (data.seed, epoch, the listing) only, so any position
of the endless chain of epochs maps to one sample whatever the task timing: a resumed stream starts
at its row and a rank's stream is a function of the step. A read task reads one window (one ranged
GET per shard: a shard of 1,000 images costs 0.001 GET per image).

Ranks (`rank_subset`): worker r of W reads the shards r, r + W, r + 2W, ... of the listing.

Writing (`write_split`): the source's files in a seeded random order (shards of a class-sorted
folder would each hold one class), cut into chunks of `shard_size`; chunk i becomes shard i (its bad
files skipped and named, so a shard can hold fewer samples). A shard is written to a temporary name
and moved into place (locally: a symlink at the target is replaced, never written through), and the
index is rewritten after every shard, so a rerun skips the shards that exist, match the index's
size and parse as complete tars with the expected number of samples.
"""

from __future__ import annotations

import io
import json
import os
import posixpath
import re
import sys
import tarfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.data.storage import (
    Location,
    file_info,
    list_files,
    read_bytes,
    read_manifest_bytes,
    storage_error,
)
from pipelines.errors import UserError

SHARD_FORMAT = "xtra-webdataset-shards/1"
INDEX_NAME = "index.json"
SAMPLES_NAME = "samples.parquet"
CLASSES_NAME = "classes.json"
SHUFFLE_BUFFER = 1024  # samples shuffled together: a window of whole shards
SHARD_THREADS = 4  # shards built at once by prepare
FETCH_THREADS = 8  # source files read at once per shard
IMAGE_EXTS = frozenset(
    {"jpg", "jpeg", "png", "bmp", "gif", "webp", "tif", "tiff", "ppm", "pgm", "pbm", "pnm"}
)
_SHARD_SALT, _WINDOW_SALT = 0x5A4D, 0x5B0F  # the shard order's and the windows' random streams
_KEY_EXT = re.compile(r"^((?:.*/|)[^./]+)\.([^/]*)$")  # WebDataset: key = name up to the first dot


def shard_name(i: int) -> str:
    return f"shard-{i:06d}.tar"


# --------------------------------------------------------------------------- tar members


@dataclass(frozen=True)
class Sample:
    """One sample to write: `key` (no dot in its last component), `ext` (the image's extension),
    the encoded image bytes and the class index (-1 = unlabelled)."""

    key: str
    ext: str
    content: bytes
    label: int


def tar_bytes(samples: Sequence[Sample]) -> bytes:
    """A WebDataset tar of `samples` (deterministic: mtime 0, no owner)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for s in samples:
            for name, data in ((f"{s.key}.{s.ext}", s.content), (f"{s.key}.cls", str(s.label).encode())):
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o444, 0
                tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def scan_tar(data: bytes) -> list[dict[str, object]]:
    """The samples of a tar, in member order: `key`, `member` (the image member, or the first
    member of a key without one), `offset`, `size` (of that member's bytes in the tar), `label`
    (from `.cls`, -1 if missing) and `problem` (None, or why the sample is bad).

    Raises `tarfile.TarError` for a truncated or corrupt tar."""
    samples: dict[str, dict[str, object]] = {}
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        for m in tar:  # raises ReadError on a truncated archive
            if not m.isfile():
                continue
            match = _KEY_EXT.match(m.name)
            key, ext = (match.group(1), match.group(2).lower()) if match else (m.name, "")
            s = samples.setdefault(key, {"key": key, "image": None, "first": None, "cls": None})
            s["first"] = s["first"] or (m.name, m.offset_data, m.size)
            if ext in IMAGE_EXTS and s["image"] is None:
                s["image"] = (m.name, m.offset_data, m.size)
            elif ext == "cls":
                s["cls"] = data[m.offset_data : m.offset_data + m.size]
        if tar.offset > len(data):
            raise tarfile.ReadError("unexpected end of data")
    out = []
    for s in samples.values():
        member, offset, size = s["image"] or s["first"]  # type: ignore[misc]
        label, problem = -1, None
        if s["image"] is None:
            problem = f"no image member for key {s['key']!r} (found {member})"
        elif s["cls"] is None:
            problem = f"no .cls member for key {s['key']!r}"
        else:
            try:
                label = int(bytes(s["cls"]).decode("ascii").strip())  # type: ignore[arg-type]
            except ValueError:
                problem = f"{s['key']}.cls is not an integer class index"
        out.append({"key": s["key"], "member": member, "offset": offset, "size": size,
                    "label": label, "problem": problem})
    return out


# --------------------------------------------------------------------------- index and listing


def is_shard_split(split_root: Location) -> bool:
    """Whether `<split_root>/index.json` exists (a split written as shards)."""
    return file_info(split_root.join(INDEX_NAME)).type == pafs.FileType.File


def read_json(loc: Location) -> object:
    try:
        return json.loads(read_manifest_bytes(loc))
    except (ValueError, UnicodeDecodeError):
        raise UserError(f"{loc.uri}: not valid JSON") from None


def read_classes(root: Location) -> tuple[str, ...]:
    """The class names of a shard dataset (empty without `classes.json`)."""
    loc = root.join(CLASSES_NAME)
    if file_info(loc).type != pafs.FileType.File:
        return ()
    names = read_json(loc)
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise UserError(f"{loc.uri}: expected a JSON list of class names")
    return tuple(names)


def read_index(split_root: Location) -> dict:
    index = read_json(split_root.join(INDEX_NAME))
    if not isinstance(index, dict) or index.get("format") != SHARD_FORMAT:
        raise UserError(f"{split_root.uri}/{INDEX_NAME}: not an index of {SHARD_FORMAT} shards")
    return index


@dataclass(frozen=True)
class ShardSplit:
    """What `shard_listing` reads: the per-sample table (see module doc) and the bad files that
    were skipped while writing the shards (`{source uri: reason}`)."""

    table: pa.Table
    skipped: dict[str, str] = field(default_factory=dict)


def shard_listing(split_root: Location, skip_unreadable: bool) -> ShardSplit:
    """The samples of a split written as shards. Errors (one line): an incomplete index, a shard
    missing or of another size than the index says (unless `skip_unreadable`: then a warning, and
    its samples fail when read)."""
    index = read_index(split_root)
    if not index.get("complete"):
        raise UserError(
            f"{split_root.uri}: the shards are incomplete (an interrupted `xtra data prepare`): "
            "run the same command again to finish them"
        )
    sizes = {posixpath.basename(i.path): i.size for i in list_files(split_root)}
    for shard in index["shards"]:
        actual = sizes.get(shard["name"])
        if actual != shard["bytes"]:
            what = "missing" if actual is None else f"{actual} bytes, the index says {shard['bytes']}"
            message = (
                f"{split_root.uri}/{shard['name']}: {what} (truncated or rewritten); "
                "run `xtra data prepare` again to rewrite it"
            )
            if not skip_unreadable:
                raise UserError(message)
            print(f"xtra data: {message}; its samples are skipped (data.skip_unreadable_files)",
                  file=sys.stderr)
    samples_loc = split_root.join(SAMPLES_NAME)
    try:
        samples = pq.read_table(io.BytesIO(read_manifest_bytes(samples_loc)))
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{samples_loc.uri}: not readable: {str(e).splitlines()[0]}") from None
    base = split_root.path.rstrip("/")
    shard_paths = pa.array([f"{base}/{s}" for s in samples.column("shard").to_pylist()], pa.string())
    paths = pa.array(
        [f"{s}#{m}" for s, m in zip(shard_paths.to_pylist(), samples.column("member").to_pylist())],
        pa.string(),
    )
    table = pa.table({
        "path": paths,
        "label": samples.column("label").cast(pa.int64()),
        "size": samples.column("size").cast(pa.int64()),
        "shard": shard_paths,
        "offset": samples.column("offset").cast(pa.int64()),
        "problem": samples.column("problem").cast(pa.string()),
    })
    if table.num_rows == 0:
        raise UserError(f"{split_root.uri}: the shards hold no samples")
    return ShardSplit(table, dict(index.get("skipped", {})))


def is_sharded(table: pa.Table) -> bool:
    """Whether a listing table holds shard samples (rows with `shard` and `offset`)."""
    return "shard" in table.column_names and "offset" in table.column_names


def read_range(filesystem: pafs.FileSystem, shard: str, offset: int, size: int) -> bytes:
    """Bytes `offset .. offset + size` of `shard`: one ranged GET on S3 (after pyarrow's HEAD);
    OSError for a short read (a truncated shard)."""
    with filesystem.open_input_file(shard) as f:
        data = f.read_at(size, offset)
    if len(data) < size:
        raise OSError(f"truncated shard: {offset + len(data)} bytes where the index needs {offset + size}")
    return data


def rank_subset(table: pa.Table, rank: int, world: int, uri: str) -> pa.Table:
    """The rows of the shards rank, rank + world, ... (in order of first appearance)."""
    shards = table.column("shard").to_pylist()
    order = list(dict.fromkeys(shards))
    if len(order) < world:
        raise UserError(
            f"{uri}: {len(order)} shard(s) for {world} training workers: every worker reads whole "
            "shards; write more, smaller shards (`xtra data prepare --shard-size`)"
        )
    mine = set(order[rank::world])
    return table.filter(pa.array([s in mine for s in shards]))


# --------------------------------------------------------------------------- read order


class ShardPlan:
    """The read order of a sharded listing (module doc): epoch layouts, windows, and the windows
    that cover a range of row ids of the endless chain of epochs."""

    def __init__(self, shards: Sequence[str], seed: int, train: bool, buffer: int = SHUFFLE_BUFFER):
        codes: dict[str, int] = {}
        shard_of_row = np.array([codes.setdefault(s, len(codes)) for s in shards], dtype=np.int64)
        self.num_rows = len(shard_of_row)
        order = np.argsort(shard_of_row, kind="stable")
        counts = np.bincount(shard_of_row, minlength=len(codes))
        self.rows_of_shard = np.split(order, np.cumsum(counts)[:-1])  # listing rows per shard
        self.counts = counts
        self.seed, self.train = seed, train
        self.per_window = max(1, round(buffer / max(1.0, self.num_rows / max(1, len(codes)))))
        self._layouts: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def layout(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(shard order [S], window starts [W + 1] in positions of the epoch)."""
        if epoch not in self._layouts:
            n = len(self.counts)
            shards = (np.random.default_rng([self.seed, epoch, _SHARD_SALT]).permutation(n)
                      if self.train else np.arange(n))
            per_window = self.counts[shards]
            sizes = np.add.reduceat(per_window, np.arange(0, n, self.per_window))
            self._layouts[epoch] = (shards, np.concatenate([[0], np.cumsum(sizes)]))
            while len(self._layouts) > 4:
                self._layouts.pop(next(iter(self._layouts)))
        return self._layouts[epoch]

    def window_rows(self, epoch: int, window: int) -> np.ndarray:
        """int64 [n]: the listing rows of `window` of `epoch`, in read order."""
        shards, _ = self.layout(epoch)
        group = shards[window * self.per_window : (window + 1) * self.per_window]
        rows = np.concatenate([self.rows_of_shard[s] for s in group])
        if self.train:
            rows = rows[np.random.default_rng([self.seed, epoch, _WINDOW_SALT, window]).permutation(len(rows))]
        return rows

    def units(self, first_epoch: int, first_row: int, num_rows: int) -> np.ndarray:
        """int64 [U, 4]: (epoch, window, start, stop) covering row ids first_row .. first_row +
        num_rows - 1 of the chain of epochs from `first_epoch` (start/stop: positions in the
        window), in order."""
        out = []
        r, end = first_row, first_row + num_rows
        while r < end:
            epoch, pos = first_epoch + r // self.num_rows, r % self.num_rows
            _, starts = self.layout(epoch)
            w = int(np.searchsorted(starts, pos, side="right") - 1)
            stop = min(int(starts[w + 1]), pos + end - r)
            out.append((epoch, w, pos - int(starts[w]), stop - int(starts[w])))
            r += stop - pos
        return np.array(out, dtype=np.int64).reshape(-1, 4)


# --------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class SourceItem:
    """One source file to shard: its key, its extension, its label and how to get its bytes
    (`fetch()` -> bytes, or raises `BadImage`; a storage error after the retries stops prepare)."""

    key: str
    ext: str
    label: int
    uri: str
    fetch: Callable[[], bytes]


def write_split(
    dest: Location, split: str, items: Sequence[SourceItem], shard_size: int
) -> tuple[int, dict[str, str]]:
    """Write `items` (already in the shard order) as shards of `shard_size` under
    `<dest>/<split>/` with the index (module doc); shards already complete are kept.
    Returns (samples written, {bad source uri: reason})."""
    from pipelines.data.images import BadImage

    split_root = dest.join(split)
    _refuse_symlink_dir(split_root)
    chunks = [items[i : i + shard_size] for i in range(0, len(items), shard_size)]
    plan = {"items": len(items), "shard_size": shard_size}
    done = _verified_shards(split_root, plan, chunks)
    entries: dict[int, dict] = {i: e for i, (e, _) in done.items()}
    members: dict[int, list[dict]] = {i: m for i, (_, m) in done.items()}
    lock = threading.Lock()
    kept = len(done)
    if kept:
        print(f"prepare: {split}: {kept} of {len(chunks)} shards already complete, kept", file=sys.stderr)

    def write_index(complete: bool) -> None:
        skipped = {u: r for e in entries.values() for u, r in e["skipped"].items()}
        index = {
            "format": SHARD_FORMAT, "split": split, "complete": complete, "plan": plan,
            "samples": sum(e["samples"] for e in entries.values()),
            "bytes": sum(e["bytes"] for e in entries.values()),
            "shards": [entries[i] for i in sorted(entries)],
            "skipped": dict(sorted(skipped.items())),
        }
        _write(split_root.join(INDEX_NAME), json.dumps(index, indent=1).encode())

    def build(i: int) -> None:
        samples: list[Sample] = []
        skipped: dict[str, str] = {}

        def fetch(item: SourceItem) -> bytes | BadImage:
            try:
                return item.fetch()
            except BadImage as e:
                return e

        with ThreadPoolExecutor(max_workers=FETCH_THREADS) as pool:
            for item, content in zip(chunks[i], pool.map(fetch, chunks[i])):
                if isinstance(content, BadImage):
                    print(f"prepare: skipped bad image {item.uri} ({content})", file=sys.stderr)
                    skipped[item.uri] = str(content)
                else:
                    samples.append(Sample(item.key, item.ext, content, item.label))
        data = tar_bytes(samples)
        _write(split_root.join(shard_name(i)), data)
        with lock:
            entries[i] = {"name": shard_name(i), "samples": len(samples), "bytes": len(data),
                          "skipped": skipped}
            members[i] = scan_tar(data)
            write_index(complete=False)

    todo = [i for i in range(len(chunks)) if i not in done]
    with ThreadPoolExecutor(max_workers=SHARD_THREADS) as pool:
        for n, _ in enumerate(pool.map(build, todo), start=kept + 1):
            written = sum(e["samples"] for e in entries.values())
            print(f"prepare: {split} shard {n}/{len(chunks)} ({written} images)", file=sys.stderr, flush=True)
    rows = [dict(m, shard=shard_name(i)) for i in sorted(members) for m in members[i]]
    table = pa.table({
        "shard": pa.array([r["shard"] for r in rows], pa.string()),
        "key": pa.array([r["key"] for r in rows], pa.string()),
        "member": pa.array([r["member"] for r in rows], pa.string()),
        "offset": pa.array([r["offset"] for r in rows], pa.int64()),
        "size": pa.array([r["size"] for r in rows], pa.int64()),
        "label": pa.array([r["label"] for r in rows], pa.int64()),
        "problem": pa.array([r["problem"] for r in rows], pa.string()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _write(split_root.join(SAMPLES_NAME), buf.getvalue())
    write_index(complete=True)
    skipped = {u: r for e in entries.values() for u, r in e["skipped"].items()}
    return sum(e["samples"] for e in entries.values()), skipped


def index_split(split_root: Location) -> int:
    """(Re)build `index.json` + `samples.parquet` of a folder of WebDataset tars (`*.tar`, by
    name) by reading them, e.g. shards written by another tool. Returns the samples found."""
    names = sorted(posixpath.basename(i.path) for i in list_files(split_root) if i.path.endswith(".tar"))
    entries, rows = [], []
    for name in names:
        loc = split_root.join(name)
        try:
            data = read_bytes(loc.filesystem, loc.path)
            members = scan_tar(data)
        except tarfile.TarError as e:
            raise UserError(f"{loc.uri}: not a readable tar: {e}") from None
        except (OSError, ValueError) as e:
            raise storage_error(loc, e) from None
        entries.append({"name": name, "samples": len(members), "bytes": len(data), "skipped": {}})
        rows += [dict(m, shard=name) for m in members]
    table = pa.table({k: [r[k] for r in rows] for k in ("shard", "key", "member", "offset", "size", "label", "problem")})
    table = table.cast(pa.schema([("shard", pa.string()), ("key", pa.string()), ("member", pa.string()),
                                  ("offset", pa.int64()), ("size", pa.int64()), ("label", pa.int64()),
                                  ("problem", pa.string())]))
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _write(split_root.join(SAMPLES_NAME), buf.getvalue())
    index = {"format": SHARD_FORMAT, "split": posixpath.basename(split_root.path), "complete": True,
             "plan": None, "samples": len(rows), "bytes": sum(e["bytes"] for e in entries),
             "shards": entries, "skipped": {}}
    _write(split_root.join(INDEX_NAME), json.dumps(index, indent=1).encode())
    return len(rows)


def write_classes(dest: Location, classes: Sequence[str]) -> None:
    _write(dest.join(CLASSES_NAME), json.dumps(list(classes)).encode())


def _verified_shards(
    split_root: Location, plan: dict, chunks: Sequence[Sequence[SourceItem]]
) -> dict[int, tuple[dict, list[dict]]]:
    """Shards of an earlier run of the same plan that exist, have the index's size and parse as
    complete tars with the index's sample count: {shard number: (index entry, members)}."""
    if file_info(split_root.join(INDEX_NAME)).type != pafs.FileType.File:
        return {}
    try:
        index = read_index(split_root)
    except UserError:
        return {}
    if index.get("plan") != plan:
        return {}
    sizes = {posixpath.basename(i.path): i.size for i in list_files(split_root)}
    out = {}
    for entry in index.get("shards", []):
        i = int(entry["name"][len("shard-") : -len(".tar")])
        if i >= len(chunks) or sizes.get(entry["name"]) != entry["bytes"]:
            continue
        loc = split_root.join(entry["name"])
        try:
            members = scan_tar(read_bytes(loc.filesystem, loc.path))
        except (tarfile.TarError, OSError):
            continue
        keys = {it.key for it in chunks[i]}
        if len(members) == entry["samples"] and all(m["key"] in keys and m["problem"] is None for m in members):
            out[i] = (entry, members)
    return out


def _refuse_symlink_dir(loc: Location) -> None:
    parent = posixpath.dirname(loc.path.rstrip("/"))
    refuse_links_below(Location(loc.store, parent, posixpath.dirname(loc.uri.rstrip("/"))), loc.path)


def refuse_links_below(root: Location, folder: str) -> None:
    """Every folder from `root` (excluded: --dest itself may be a link) down to the local path
    `folder` (included) must be a real folder, not a symbolic link: `xtra data prepare` writes
    below --dest only. S3 has no links. `write_below` checks again before each file, so a link
    planted while writing is refused too."""
    if root.is_s3:
        return
    base = root.path.rstrip("/")
    rel = posixpath.relpath(folder, base)
    path = base
    for name in ([] if rel == "." else rel.split("/")):
        path = f"{path}/{name}"
        if os.path.islink(path):
            raise UserError(f"{path}: is a symbolic link; `xtra data prepare` does not write through links")


def write_below(root: Location, name: str, data: bytes) -> None:
    """Write `root/name` whole (`_write`), refusing symbolic links on the way (`refuse_links_below`)."""
    target = root.join(name)
    refuse_links_below(root, posixpath.dirname(target.path))
    _write(target, data)


def _write(loc: Location, data: bytes) -> None:
    """Write a whole file: S3 objects appear whole on close; a local file is written to a
    temporary name and moved into place (a symlink there is replaced, not followed)."""
    fs = loc.filesystem
    try:
        if loc.is_s3:
            with fs.open_output_stream(loc.path) as f:
                f.write(data)
            return
        folder = posixpath.dirname(loc.path)
        fs.create_dir(folder, recursive=True)
        if os.path.islink(folder):
            raise UserError(f"{folder}: is a symbolic link; `xtra data prepare` does not write through links")
        tmp = f"{loc.path}.tmp-{os.getpid()}-{threading.get_ident()}"
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, loc.path)
    except (OSError, ValueError) as e:
        raise storage_error(loc, e) from None

