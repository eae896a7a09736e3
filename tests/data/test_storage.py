"""Locations, stores and the data's safety limits (fast: no Ray, no server).

- a location is resolved once: the S3 endpoint is read when the settings are made, and a `Store`
  travels to other processes as its settings (pyarrow's S3FileSystem pickle drops the retry strategy);
- paths from data (manifest entries, labels) never leave their root;
- `data.max_image_bytes` is checked from the listing's sizes before any download.
"""

from __future__ import annotations

import pickle

import pyarrow.fs as pafs
import pytest

from pipelines.data.images import BadImage
from pipelines.data.listing import list_split
from pipelines.data.storage import Location, S3Settings, Store, resolve, s3_settings
from pipelines.data.stream import _fetch_all
from pipelines.errors import UserError
from tests.data.test_data import encode, noise, write_tree
from xtra_core.config import ConfigError, DataConfig, XTRAConfig


def test_s3_settings_read_the_endpoint_once(monkeypatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    settings = s3_settings(DataConfig(s3_max_attempts=7, s3_connect_timeout_s=1.5))
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")  # later changes do not leak in
    assert settings == S3Settings(endpoint="http://127.0.0.1:1", max_attempts=7, connect_timeout_s=1.5)
    assert s3_settings(DataConfig(s3_endpoint="http://h:9")).endpoint == "http://h:9"  # config wins
    loc = resolve("s3://bucket/some/prefix/", settings)
    assert (loc.path, loc.uri, loc.store.s3) == ("bucket/some/prefix", "s3://bucket/some/prefix", settings)
    assert loc.join("train", "cat/1.png").path == "bucket/some/prefix/train/cat/1.png"


def test_a_store_travels_as_its_settings_and_rebuilds_its_filesystem() -> None:
    settings = S3Settings(endpoint="http://127.0.0.1:9", max_attempts=9, request_timeout_s=7.0)
    store = Store(settings)
    fs = store.filesystem
    # why: a pickled S3FileSystem keeps its timeouts but not its retry strategy
    assert "retry_strategy" not in fs.__reduce__()[1][0]
    copy = pickle.loads(pickle.dumps(store))
    assert copy == store and copy.filesystem is fs  # rebuilt from the settings, cached per process
    assert fs.__reduce__()[1][0]["request_timeout"] == 7.0
    listing_fs = store.listing_filesystem  # listing: a short retry budget, its own client
    assert listing_fs is not fs and listing_fs.__reduce__()[1][0]["endpoint_override"] == "127.0.0.1:9"
    assert Store().filesystem.type_name == "local"


def test_a_malformed_endpoint_is_one_error_naming_it() -> None:
    with pytest.raises(UserError, match="ftp://x.*not a URL"):
        resolve("s3://bucket/p", S3Settings(endpoint="ftp://x"))


def test_join_refuses_names_that_climb_out() -> None:
    root = Location(Store(), "/data/out", "/data/out")
    assert root.join("train/./cat", "a.png").path == "/data/out/train/cat/a.png"
    for bad in ("train/../../etc/passwd", "..", "train/cat/.."):
        with pytest.raises(UserError, match="climbs out"):
            root.join(bad)


def test_a_relative_manifest_path_that_climbs_out_is_refused(tmp_path) -> None:
    root = tmp_path / "ds"
    write_tree(str(root), {"img/a.png": encode(noise(8, 8))})
    write_tree(str(tmp_path), {"secret.png": encode(noise(8, 8))})
    (root / "train.csv").write_text("path,label\nimg/a.png,0\nimg/../../secret.png,1\n")
    with pytest.raises(UserError, match=r"train\.csv: 1 relative path\(s\) climb out.*'img/\.\./\.\./secret\.png'"):
        list_split(DataConfig(uri=str(root)), "train")
    # an absolute path (or an s3:// URI) is how a manifest points elsewhere on purpose
    (root / "train.csv").write_text(f"path,label\nimg/a.png,0\n{tmp_path}/secret.png,1\n")
    listing = list_split(DataConfig(uri=str(root)), "train")
    assert listing.table["path"].to_pylist() == [f"{root}/img/a.png", f"{tmp_path}/secret.png"]


def test_prepare_refuses_a_label_that_climbs_out_and_writes_nothing(tmp_path) -> None:
    from pipelines.data.commands import prepare

    src = tmp_path / "src"
    write_tree(str(src), {"a.png": encode(noise(8, 8)), "b.png": encode(noise(8, 8, seed=1))})
    (src / "train.csv").write_text("path,label\na.png,cat\nb.png,../../../escaped\n")
    dest = tmp_path / "deep" / "er" / "dest"
    with pytest.raises(UserError, match=r"train\.csv: class '\.\./\.\./\.\./escaped' is not a plain folder name"):
        prepare(str(src), str(dest))
    written = [p for p in tmp_path.rglob("*") if p.is_file() and src not in p.parents]
    assert written == []


def test_listing_sizes_come_from_the_listing(tmp_path) -> None:
    big, small = encode(noise(64, 64)), encode(noise(4, 4))
    write_tree(str(tmp_path), {"train/a/big.png": big, "train/a/small.png": small})
    listing = list_split(DataConfig(uri=str(tmp_path)), "train")
    assert listing.table["size"].to_pylist() == [len(big), len(small)]


def test_byte_limit_is_checked_from_the_listing_before_any_download(tmp_path) -> None:
    ok = tmp_path / "ok.png"
    ok.write_bytes(b"x" * 100)
    over = tmp_path / "over.png"
    over.write_bytes(b"y" * 5000)
    fs = pafs.LocalFileSystem()
    paths = [str(ok), str(tmp_path / "never-read.png"), str(over), str(tmp_path / "missing.png")]
    # the listing says 10**9 bytes for a file that does not exist: no read is attempted
    got = _fetch_all(fs, paths, [100, 10**9, None, None], max_bytes=1000)
    assert got[0] == b"x" * 100
    assert isinstance(got[1], BadImage) and "1000000000 bytes > data.max_image_bytes=1000" in str(got[1])
    assert isinstance(got[2], BadImage) and "over data.max_image_bytes=1000" in str(got[2])  # no size
    assert isinstance(got[3], OSError)  # unreadable: a storage error, not a bad image


@pytest.mark.parametrize(
    "key, value",
    [("max_image_bytes", 0), ("max_bad_fraction", 1.5), ("max_bad_fraction", -0.1),
     ("s3_max_attempts", 0), ("s3_connect_timeout_s", 0.0), ("s3_request_timeout_s", -1.0),
     ("min_image_side", 0)],
)
def test_data_reliability_keys_are_range_checked(key: str, value: object) -> None:
    cfg = XTRAConfig()
    setattr(cfg.data, key, value)
    with pytest.raises(ConfigError, match=f"data.{key}="):
        cfg.validate()

