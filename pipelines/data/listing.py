"""Which files make up a split, and their labels: metadata only, no image is opened here.

Three layouts, on S3 or a local directory (`data.uri`):

- class folders (ImageNet style): `<uri>/<split>/<class>/<name>.<ext>`; the class is the first folder
  below the split (deeper folders belong to it). Files directly in `<uri>/<split>/` are unlabelled
  (label -1). Only image extensions (`IMAGE_EXTENSIONS`, any case) are listed; hidden files
  (`.DS_Store`, `._x.jpg`) and other files are ignored, not counted as bad.
- a manifest, CSV or Parquet with a `path` column and optional `label` and `split` columns:
  `data.uri` is the manifest itself (rows filtered by `split` if that column exists), or a directory
  holding `<split>.csv` / `<split>.parquet`. Paths are relative to the manifest's folder, absolute
  local paths (local manifests only) or `s3://` URIs; all images of one manifest live on one
  filesystem. Labels are integers (kept) or class names; no label -> -1. A relative path must stay
  below the manifest's folder (`../x` that climbs out is refused); absolute paths and `s3://` URIs
  are how a manifest points elsewhere on purpose.

- shards (`xtra data prepare --format shards`): `<uri>/<split>/shard-000000.tar` ... with
  `<uri>/<split>/index.json` (how a split is recognised) and `<uri>/classes.json`; one row per sample
  (`pipelines.data.shards`: `path` = `<shard path>#<member>`, plus `shard`, `offset`, `problem`).

Class index: class names sorted, taken from both the train and the test split (class folders or
manifest labels), so that one class has the same index in every split. Rows are sorted by path
(class folders) or kept in manifest order, so a listing is deterministic.
"""

from __future__ import annotations

import io
import os
import posixpath
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipelines.data import shards
from pipelines.data.storage import (
    Location,
    S3Settings,
    Store,
    file_info,
    is_s3_uri,
    list_dirs,
    list_files,
    read_bytes,
    read_manifest_bytes,
    resolve,
    s3_settings,
)
from pipelines.errors import UserError

if TYPE_CHECKING:  # xtra_core imports torch; decode workers should not
    from xtra_core.config import DataConfig

IMAGE_EXTENSIONS = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm", ".pbm", ".pnm"}
)
MANIFEST_EXTENSIONS = (".csv", ".parquet", ".pq")
UNLABELLED = -1


@dataclass(frozen=True)
class Listing:
    """The files of one split.

    table: columns `path` (string, a path in `store`), `label` (int64, -1 = unlabelled) and
    `size` (int64 bytes from the listing; null when unknown, as for manifest rows), one row per
    file. `classes[i]` is the name of label i (empty for integer manifest labels). A split written
    as shards has one row per sample and the columns `shard`, `offset`, `problem` too
    (`pipelines.data.shards`); `skipped` then names the source's bad files left out of the shards.
    `root` is the folder (a path in `store`, ending in "/") that the files' random draws are keyed
    below (`pipelines.data.images.draw_key`): the split's folder, or a manifest's; "" keys by the
    whole path.
    """

    uri: str
    store: Store
    table: pa.Table
    classes: tuple[str, ...]
    skipped: dict[str, str] = field(default_factory=dict)  # {source uri: reason}, shards only
    root: str = ""

    def __len__(self) -> int:
        return self.table.num_rows

    @property
    def filesystem(self) -> pafs.FileSystem:
        return self.store.filesystem

    def class_counts(self) -> dict[str, int]:
        """Files per class name (`str(label)` when there are no names, `unlabelled` for -1)."""
        labels, counts = np.unique(self.table.column("label").to_numpy(), return_counts=True)
        return {self.class_name(int(k)): int(n) for k, n in zip(labels, counts)}

    @property
    def is_sharded(self) -> bool:
        return shards.is_sharded(self.table)

    def read(self, row: int) -> bytes:
        """The encoded bytes of row `row` (a file, or a sample inside its shard)."""
        if self.is_sharded:
            t = self.table.slice(row, 1).to_pylist()[0]
            if t["problem"]:
                from pipelines.data.images import BadImage

                raise BadImage(t["problem"])
            return shards.read_range(self.filesystem, t["shard"], t["offset"], t["size"])
        return read_bytes(self.filesystem, self.table.column("path")[row].as_py())

    def class_name(self, label: int) -> str:
        if label == UNLABELLED:
            return "unlabelled"
        return self.classes[label] if label < len(self.classes) else str(label)


def is_image_name(name: str) -> bool:
    base = posixpath.basename(name)
    return not base.startswith(".") and posixpath.splitext(base)[1].lower() in IMAGE_EXTENSIONS


def is_manifest_uri(uri: str) -> bool:
    return uri.lower().endswith(MANIFEST_EXTENSIONS)


def list_split(data: DataConfig, split: str) -> Listing:
    """The listing of `split` under `data.uri` (class folders or manifest, see module doc).

    Raises UserError naming the URI for a missing/empty prefix, a missing split, an unreachable
    endpoint or refused credentials.
    """
    s3 = s3_settings(data)
    root = resolve(data.uri, s3)
    if is_manifest_uri(data.uri):
        return _manifest_listing(root, s3, split=split, classes=None)
    info = file_info(root)
    if info.type == pafs.FileType.NotFound:
        raise UserError(f"{data.uri}: does not exist (no such directory or prefix)")
    if info.type == pafs.FileType.File:
        raise UserError(
            f"{data.uri}: is a file; give a directory with {split}/<class>/ folders or a "
            ".csv/.parquet manifest"
        )
    splits = list_dirs(root)
    if split in splits and shards.is_shard_split(root.join(split)):
        return _shard_listing(data, root, split)
    if split in splits:
        classes = _folder_classes(data, root)
        return _folder_listing(root.join(split), classes)
    manifest = _split_manifest(root, split)
    if manifest is not None:
        return _manifest_listing(manifest, s3, split=None, classes=_manifest_classes(data, root))
    raise UserError(
        f"{data.uri}: no split {split!r}: expected {data.uri.rstrip('/')}/{split}/<class>/<image> "
        f"or {data.uri.rstrip('/')}/{split}.csv; folders there: {splits or 'none'}"
    )


def list_every_split(data: DataConfig) -> dict[str, Listing]:
    """Every split under `data.uri`, for `xtra data inspect`: `{split: Listing}`.

    A root that has `data.train_split`/`data.test_split` folders (or manifests) gives those; a root
    of class folders without splits, or a single manifest, gives one entry under the key "".
    """
    s3 = s3_settings(data)
    root = resolve(data.uri, s3)
    if is_manifest_uri(data.uri):
        return {"": _manifest_listing(root, s3, split=None, classes=None)}
    if file_info(root).type == pafs.FileType.NotFound:
        raise UserError(f"{data.uri}: does not exist (no such directory or prefix)")
    dirs = list_dirs(root)
    named = [s for s in (data.train_split, data.test_split) if s in dirs]
    manifests = {
        s: m
        for s in (data.train_split, data.test_split)
        if s not in dirs and (m := _split_manifest(root, s)) is not None
    }
    if named or manifests:
        out = {}
        for s in named:
            if shards.is_shard_split(root.join(s)):
                out[s] = _shard_listing(data, root, s)
            else:
                out[s] = _folder_listing(root.join(s), _folder_classes(data, root))
        for s, m in manifests.items():
            out[s] = _manifest_listing(m, s3, split=None, classes=_manifest_classes(data, root))
        return out
    return {"": _folder_listing(root, tuple(dirs))}


# --------------------------------------------------------------------------- class folders


def _folder_classes(data: DataConfig, root: Location) -> tuple[str, ...]:
    names: set[str] = set()
    for split in (data.train_split, data.test_split):
        names.update(list_dirs(root.join(split)))
    return tuple(sorted(names))


def _folder_listing(split_root: Location, classes: tuple[str, ...]) -> Listing:
    infos = list_files(split_root) if split_root.is_s3 else _local_files(split_root)
    base = split_root.path.rstrip("/") + "/"
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    sizes: list[int | None] = []
    for info in sorted(infos, key=lambda i: i.path):
        if not is_image_name(info.path) or not info.path.startswith(base):
            continue
        rel = info.path[len(base) :]
        cls = rel.split("/", 1)[0] if "/" in rel else None
        paths.append(info.path)
        sizes.append(info.size)
        labels.append(UNLABELLED if cls is None else index.setdefault(cls, len(index)))
    if not paths:
        raise UserError(
            f"{split_root.uri}: no image files there (looked for {', '.join(sorted(IMAGE_EXTENSIONS))})"
        )
    if len(index) > len(classes):  # a class folder that list_dirs did not report (rare on S3)
        extra = sorted(set(index) - set(classes))
        raise UserError(f"{split_root.uri}: class folders changed while listing: {extra[:5]}")
    return Listing(split_root.uri, split_root.store, _table(paths, labels, sizes), classes, root=base)


def _local_files(root: Location) -> list[pafs.FileInfo]:
    """Every file below a local folder, like `storage.list_files`, but each real folder entered
    once: a symbolic link to a folder is followed the first time that folder is reached and
    skipped after (a link loop, or two links to one folder, lists its files once)."""
    seen: set[tuple[int, int]] = set()  # (device, inode) of every folder entered
    files: list[pafs.FileInfo] = []
    stack = [root.path.rstrip("/") or "/"]
    try:
        while stack:
            folder = stack.pop()
            st = os.stat(folder)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(folder) as entries:
                for e in entries:
                    if e.is_dir():
                        stack.append(e.path)
                    elif e.is_file():
                        files.append(pafs.FileInfo(e.path, pafs.FileType.File, size=e.stat().st_size))
    except OSError as e:
        if not seen:
            raise UserError(f"{root.uri}: no files there (empty or missing prefix)") from None
        raise UserError(f"{root.uri}: cannot list {e.filename}: {e.strerror}") from None
    if not files:
        raise UserError(f"{root.uri}: no files there (empty or missing prefix)")
    return files


def _table(paths: list[str], labels: object, sizes: list[int | None]) -> pa.Table:
    return pa.table({
        "path": pa.array(paths, pa.string()),
        "label": pa.array(labels, pa.int64()),
        "size": pa.array(sizes, pa.int64()),
    })


# --------------------------------------------------------------------------- shards


def _shard_listing(data: DataConfig, root: Location, split: str) -> Listing:
    split_root = root.join(split)
    found = shards.shard_listing(split_root, data.skip_unreadable_files)
    return Listing(split_root.uri, split_root.store, found.table, shards.read_classes(root), found.skipped,
                   root=split_root.path.rstrip("/") + "/")


# --------------------------------------------------------------------------- manifests


def _split_manifest(root: Location, split: str) -> Location | None:
    for ext in MANIFEST_EXTENSIONS:
        loc = root.join(split + ext)
        if file_info(loc).type == pafs.FileType.File:
            return loc
    return None


def _read_manifest(loc: Location) -> pa.Table:
    data = read_manifest_bytes(loc)
    try:
        if loc.path.lower().endswith(".csv"):
            table = pacsv.read_csv(
                io.BytesIO(data),
                convert_options=pacsv.ConvertOptions(
                    column_types={"path": pa.string(), "split": pa.string()}
                ),
            )
        else:
            table = pq.read_table(io.BytesIO(data))
    except (pa.ArrowInvalid, OSError) as e:
        raise UserError(f"{loc.uri}: not a readable manifest: {str(e).splitlines()[0]}") from None
    if "path" not in table.column_names:
        raise UserError(f"{loc.uri}: manifest has no 'path' column (columns: {table.column_names})")
    return table


def _manifest_classes(data: DataConfig, root: Location) -> tuple[str, ...] | None:
    """Sorted class names over the train and test manifests in `root` (None: integer labels)."""
    names: set[str] = set()
    for split in (data.train_split, data.test_split):
        loc = _split_manifest(root, split)
        if loc is None:
            continue
        table = _read_manifest(loc)
        if "label" in table.column_names and pa.types.is_string(table.column("label").type):
            names.update(v for v in table.column("label").to_pylist() if v is not None)
    return tuple(sorted(names)) if names else None


def _manifest_listing(
    loc: Location, s3: S3Settings, split: str | None, classes: tuple[str, ...] | None
) -> Listing:
    table = _read_manifest(loc)
    labels_col = table.column("label") if "label" in table.column_names else None
    string_labels = labels_col is not None and (
        pa.types.is_string(labels_col.type) or pa.types.is_large_string(labels_col.type)
    )
    if string_labels and classes is None:  # names over the whole manifest, before the split filter
        classes = tuple(sorted({v for v in labels_col.to_pylist() if v is not None}))
    if split is not None and "split" in table.column_names:
        table = table.filter(pc.equal(table.column("split"), split))
    if table.num_rows == 0:
        where = f" for split {split!r}" if split is not None and "split" in table.column_names else ""
        raise UserError(f"{loc.uri}: manifest has no rows{where}")

    raw_paths = table.column("path").to_pylist()
    if any(p is None or p == "" for p in raw_paths):
        raise UserError(f"{loc.uri}: manifest has empty 'path' values")
    store, paths = _manifest_paths(loc, s3, raw_paths)
    # relative entries are keyed below the manifest's folder (absolute ones by their whole path)
    root = posixpath.dirname(loc.path).rstrip("/") + "/" if store == loc.store else ""

    if labels_col is None:
        labels = np.full(len(paths), UNLABELLED, dtype=np.int64)
    elif string_labels:
        index = {c: i for i, c in enumerate(classes or ())}
        values = table.column("label").to_pylist()
        unknown = sorted({v for v in values if v is not None and v not in index})
        if unknown:
            raise UserError(f"{loc.uri}: labels not in the class list: {unknown[:5]}")
        labels = np.array([UNLABELLED if v is None else index[v] for v in values], dtype=np.int64)
    else:
        try:
            labels = table.column("label").fill_null(UNLABELLED).cast(pa.int64()).to_numpy()
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            raise UserError(f"{loc.uri}: 'label' must hold integers or class names") from None
    out = _table(paths, labels, [None] * len(paths))
    return Listing(loc.uri, store, out, classes or (), root=root)


def _manifest_paths(manifest: Location, s3: S3Settings, raw: list[str]) -> tuple[Store, list[str]]:
    """Manifest entries -> (one store, paths in it). A relative entry that climbs out of the
    manifest's folder is refused."""
    kinds = {"s3" if is_s3_uri(p) else "abs" if p.startswith("/") else "rel" for p in raw}
    if "s3" in kinds and kinds != {"s3"} and not (manifest.is_s3 and kinds == {"s3", "rel"}):
        raise UserError(f"{manifest.uri}: paths mix s3:// URIs and local paths")
    if "abs" in kinds and manifest.is_s3:
        raise UserError(f"{manifest.uri}: an S3 manifest cannot hold absolute local paths")
    base = posixpath.dirname(manifest.path)
    store = Store(s3) if "s3" in kinds and not manifest.is_s3 else manifest.store
    paths = []
    escaping = []
    for p in raw:
        if is_s3_uri(p):
            paths.append(p[len("s3://") :])
        elif p.startswith("/"):
            paths.append(posixpath.normpath(p))
        else:
            path = posixpath.normpath(posixpath.join(base, p))
            if not path.startswith(base.rstrip("/") + "/"):
                escaping.append(p)
            paths.append(path)
    if escaping:
        raise UserError(
            f"{manifest.uri}: {len(escaping)} relative path(s) climb out of the manifest's folder, "
            f"e.g. {escaping[0]!r}; use an absolute path or an s3:// URI to point elsewhere"
        )
    return store, paths
