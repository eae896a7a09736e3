"""SHA-256 of every checkpoint file, recorded on the run's MLflow run and checked before a load.

DeepSpeed reads its checkpoints with pickle, so whoever can write the run's storage could run code
on the driver and the workers through a checkpoint file. The tracking store is a separate trust
domain: when a checkpoint is saved, every rank hashes the files it wrote, and rank 0 gathers them
and records, before Ray Train uploads and registers the checkpoint (so a registered checkpoint
always has one), one digest of the whole checkpoint on the MLflow run (the tag
`xtra.checkpoint_sha256.<checkpoint dir>`, the SHA-256 of its `sha256sum`-style manifest) and the
manifest as the artifact `checkpoint_sha256/<checkpoint dir>.sha256` (to name a changed file).

Before a checkpoint is loaded (a resume, an automatic restart, the final export), its files are
hashed again and compared: a changed, missing or added file is refused in one line and nothing is
unpickled. `train.verify_checkpoints=false` skips the check (a checkpoint written before digests
were recorded, or one whose digest an MLflow outage kept from being recorded).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import pyarrow.fs as pafs

from pipelines.errors import UserError

TAG_PREFIX = "xtra.checkpoint_sha256."
MANIFEST_DIR = "checkpoint_sha256"  # the run's artifact folder of manifests
CHUNK = 1 << 20


def tag_key(checkpoint_name: str) -> str:
    return TAG_PREFIX + checkpoint_name


def file_digests(fs: pafs.FileSystem, root: str) -> dict[str, str]:
    """{path relative to `root`: SHA-256 hex} of every file under `root` (local or S3)."""
    root = root.rstrip("/")
    out: dict[str, str] = {}
    for info in fs.get_file_info(pafs.FileSelector(root, recursive=True)):
        if info.type != pafs.FileType.File:
            continue
        h = hashlib.sha256()
        with fs.open_input_stream(info.path) as f:
            while chunk := f.read(CHUNK):
                h.update(chunk)
        out[info.path[len(root) + 1 :]] = h.hexdigest()
    return out


def local_digests(directory: str) -> dict[str, str]:
    return file_digests(pafs.LocalFileSystem(), directory)


def manifest(digests: dict[str, str]) -> str:
    """`sha256sum`'s format, sorted by path: `<hex>  <path>` per line."""
    return "".join(f"{digests[p]}  {p}\n" for p in sorted(digests))


def parse_manifest(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for line in text.splitlines():
        hexdigest, _, path = line.partition("  ")
        if path:
            out[path] = hexdigest
    return out


def manifest_digest(digests: dict[str, str]) -> str:
    """The one digest recorded for a checkpoint: the SHA-256 of its manifest."""
    return hashlib.sha256(manifest(digests).encode()).hexdigest()


def merge_rank_digests(per_rank: list[dict[str, str] | None]) -> dict[str, str]:
    """The checkpoint's files from every rank's report. Two ranks writing one path with different
    contents cannot be verified later (the storage keeps one of them): refused here."""
    out: dict[str, str] = {}
    for digests in per_rank:
        for path, hexdigest in (digests or {}).items():
            if out.setdefault(path, hexdigest) != hexdigest:
                raise ValueError(f"two ranks wrote {path} with different contents")
    return out


def verify(fs: pafs.FileSystem, root: str, name: str, expected: str | None,
           recorded_manifest: Callable[[], str | None] = lambda: None, where: str = "") -> None:
    """Refuse (UserError, one line) a checkpoint whose files are not the ones recorded for it.
    `expected`: the recorded digest (None: none recorded); `recorded_manifest()`: the recorded
    manifest, read only on a mismatch to name the file; `where`: the MLflow run, for the line."""
    if expected is None:
        raise UserError(
            f"checkpoint {name} has no SHA-256 recorded on {where or 'its MLflow run'} (written "
            "before digests were recorded, or MLflow was down when it was saved): it is not loaded; "
            "if you trust the files in the run's storage, --set train.verify_checkpoints=false")
    found = file_digests(fs, root)
    if manifest_digest(found) == expected:
        return
    recorded = parse_manifest(recorded_manifest() or "")
    if recorded and manifest_digest(recorded) == expected:
        changed = sorted(p for p in recorded if p in found and found[p] != recorded[p])
        missing = sorted(p for p in recorded if p not in found)
        added = sorted(p for p in found if p not in recorded)
        what = "; ".join(f"{label}: {', '.join(paths[:3])}" + (f" (+{len(paths) - 3} more)" if len(paths) > 3 else "")
                         for label, paths in (("changed", changed), ("missing", missing), ("added", added)) if paths)
    else:
        what = "its files differ from the recorded manifest"
    raise UserError(
        f"checkpoint {name} in the run's storage is not the one this run saved ({what}; SHA-256 "
        f"recorded on {where or 'its MLflow run'}): refused before loading anything from it; "
        "restore the checkpoint or start another train.run_name")


def manifest_artifact(checkpoint_name: str) -> str:
    """The run's artifact that holds a checkpoint's manifest."""
    return f"{MANIFEST_DIR}/{checkpoint_name}.sha256"


def check_against_run(fs: pafs.FileSystem, root: str, name: str, uri: str, run_id: str,
                      expected: str | None = None) -> str:
    """`verify` the checkpoint at `root` against the digest recorded on MLflow run `run_id` (or
    `expected`, a digest already read from it); returns the digest. MLflow errors propagate."""
    from pipelines.tracking import runs as tracking

    if expected is None:
        expected = tracking.recorded_tag(uri, run_id, tag_key(name))
    verify(fs, root, name, expected, lambda: tracking.read_text(uri, run_id, manifest_artifact(name)),
           where=f"MLflow run {run_id}")
    return str(expected)
