"""WebDataset shards: `xtra data prepare --format shards`, the index, listing, the read order, and
streaming them on Ray from disk and from a real S3 server (moto).

Fast tests write shards to tmp_path; `slow` tests use the session fixtures of conftest.py.
"""

from __future__ import annotations

import json
import os
import tarfile
from collections import Counter

import numpy as np
import pytest
import ray

from pipelines.data import shards
from pipelines.data.listing import list_every_split, list_split
from pipelines.data.shards import ShardPlan
from pipelines.data.storage import resolve
from pipelines.errors import UserError
from tests.data.test_data import SIZE, bad_files, encode, good_dataset, noise, upload, write_tree
from xtra_core.config import DataConfig, XTRAConfig


def distinct_dataset(n_train: int = 40, n_test: int = 6) -> dict[str, bytes]:
    """Images that all differ (a seed each), JPEG and PNG, 2 classes; a dot in one name."""
    files = {}
    for i in range(n_train):
        cls = ("ant", "bee")[i % 2]
        fmt, ext = ("JPEG", "jpg") if i % 3 else ("PNG", "png")
        files[f"train/{cls}/img.{i}.{ext}"] = encode(noise(20 + i % 5, 18, seed=i), fmt)
    for i in range(n_test):
        files[f"test/{('ant', 'bee')[i % 2]}/t{i}.png"] = encode(noise(19, 21, seed=1000 + i))
    return files


def prepare(source: str, dest: str, shard_size: int, **kw: object) -> dict[str, int]:
    from pipelines.data.commands import prepare as run

    return run(source, dest, shard_size=shard_size, **kw)


def sample_bytes(uri: str, split: str, **data: object) -> dict[str, tuple[bytes, int]]:
    """{sample key: (bytes read through the listing, label)}."""
    listing = list_split(DataConfig(uri=uri, **data), split)
    keys = [p.split("#", 1)[1].rsplit(".", 1)[0] for p in listing.table.column("path").to_pylist()]
    labels = listing.table.column("label").to_pylist()
    return {k: (listing.read(i), labels[i]) for i, k in enumerate(keys)}


def source_bytes(files: dict[str, bytes], split: str) -> dict[str, tuple[bytes, int]]:
    """What the shards must hold: {`<class>/<stem, dots as _>`: (bytes, class index)}."""
    classes = sorted({k.split("/")[1] for k in files})
    out = {}
    for rel, content in files.items():
        s, cls, name = rel.split("/")
        if s == split:
            out[f"{cls}/{os.path.splitext(name)[0].replace('.', '_')}"] = (content, classes.index(cls))
    return out


# --------------------------------------------------------------------------- writing (fast)


def test_folder_to_shards_keeps_every_images_bytes_and_label(tmp_path, capsys) -> None:
    src, dest = str(tmp_path / "src"), str(tmp_path / "shards")
    files = distinct_dataset()
    write_tree(src, files)
    assert prepare(src, dest, shard_size=16) == {"train": 40, "test": 6}
    for split in ("train", "test"):
        assert sample_bytes(dest, split) == source_bytes(files, split)
    index = json.loads(open(f"{dest}/train/index.json").read())
    assert [(s["name"], s["samples"]) for s in index["shards"]] == [
        ("shard-000000.tar", 16), ("shard-000001.tar", 16), ("shard-000002.tar", 8)]
    assert all(s["bytes"] == os.path.getsize(f"{dest}/train/{s['name']}") for s in index["shards"])
    assert json.loads(open(f"{dest}/classes.json").read()) == ["ant", "bee"]
    # a plain WebDataset tar: `<key>.<ext>` + `<key>.cls` per sample
    with tarfile.open(f"{dest}/train/shard-000000.tar") as tar:
        names = tar.getnames()
        first = names[0].rsplit(".", 1)[0]
        assert f"{first}.cls" in names and len(names) == 32
        label = int(tar.extractfile(f"{first}.cls").read())
    assert label == ("ant", "bee").index(first.split("/")[0])
    # the shards are shuffled: the first shard holds both classes
    assert {n.split("/")[0] for n in names} == {"ant", "bee"}
    err = capsys.readouterr().err
    assert "prepare: train shard 3/3 (40 images)" in err


def test_a_rerun_keeps_verified_shards_and_rewrites_a_damaged_one(tmp_path, capsys) -> None:
    src, dest = str(tmp_path / "src"), str(tmp_path / "shards")
    write_tree(src, distinct_dataset())
    prepare(src, dest, shard_size=16)
    path = f"{dest}/train/shard-000001.tar"
    good = open(path, "rb").read()
    with open(path, "r+b") as f:  # damaged: cut short
        f.truncate(len(good) // 2)
    with pytest.raises(UserError, match="shard-000001.tar: .* bytes, the index says"):
        list_split(DataConfig(uri=dest), "train")
    kept = {n: os.stat(f"{dest}/train/{n}").st_mtime_ns for n in ("shard-000000.tar", "shard-000002.tar")}
    capsys.readouterr()
    prepare(src, dest, shard_size=16)
    assert "train: 2 of 3 shards already complete, kept" in capsys.readouterr().err
    assert open(path, "rb").read() == good  # rewritten, identical
    assert {n: os.stat(f"{dest}/train/{n}").st_mtime_ns for n in kept} == kept  # not rewritten
    assert len(list_split(DataConfig(uri=dest), "train")) == 40


def test_prepare_replaces_a_symlink_instead_of_writing_through_it(tmp_path) -> None:
    src, dest = str(tmp_path / "src"), str(tmp_path / "shards")
    write_tree(src, distinct_dataset(8, 2))
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"keep me")
    os.makedirs(f"{dest}/train")
    os.symlink(victim, f"{dest}/train/shard-000000.tar")
    prepare(src, dest, shard_size=100)
    assert victim.read_bytes() == b"keep me"
    assert not os.path.islink(f"{dest}/train/shard-000000.tar")
    os.makedirs(tmp_path / "elsewhere")
    os.symlink(tmp_path / "elsewhere", f"{dest}/test2")
    with pytest.raises(UserError, match="symbolic link"):
        shards.write_split(resolve(dest), "test2", [], 10)


def test_bad_source_files_are_skipped_named_and_listed_by_the_shards(tmp_path, capsys) -> None:
    src, dest = str(tmp_path / "src"), str(tmp_path / "shards")
    files = distinct_dataset(8, 2)
    bad = {f"train/ant/{n}": c for n, c in bad_files().items() if n != "bomb.png"}
    write_tree(src, {**files, **bad})
    assert prepare(src, dest, shard_size=4) == {"train": 8, "test": 2}
    err = capsys.readouterr().err
    assert all(f"skipped bad image {src}/{k}" in err for k in bad)
    listing = list_split(DataConfig(uri=dest), "train")
    assert set(listing.skipped) == {f"{src}/{k}" for k in bad}


def test_shard_plan_reads_whole_shards_in_a_seeded_order_with_bounded_windows() -> None:
    shards_of_rows = [f"s{i // 10}" for i in range(60)]  # 6 shards of 10
    plan = ShardPlan(shards_of_rows, seed=3, train=True, buffer=20)  # windows of 2 shards
    epoch0 = np.concatenate([plan.window_rows(0, w) for w in range(3)])
    assert sorted(epoch0) == list(range(60))
    for w in range(3):  # a window = two whole shards
        assert len({shards_of_rows[r] for r in plan.window_rows(0, w)}) == 2
    epoch1 = np.concatenate([plan.window_rows(1, w) for w in range(3)])
    assert not np.array_equal(epoch0, epoch1)
    again = ShardPlan(shards_of_rows, seed=3, train=True, buffer=20)
    assert np.array_equal(np.concatenate([again.window_rows(0, w) for w in range(3)]), epoch0)
    # units cover a window of row ids exactly, across epochs
    units = plan.units(0, 25, 60)
    rows = np.concatenate([plan.window_rows(e, w)[a:b] for e, w, a, b in units])
    assert np.array_equal(rows, np.concatenate([epoch0, epoch1])[25:85])
    evaluation = ShardPlan(shards_of_rows, seed=3, train=False, buffer=20)
    assert np.array_equal(np.concatenate([evaluation.window_rows(0, w) for w in range(3)]), np.arange(60))


def test_ranks_read_disjoint_whole_shards(tmp_path) -> None:
    from pipelines.pretrain.rank_streams import rank_shard

    src, dest = str(tmp_path / "src"), str(tmp_path / "shards")
    write_tree(src, distinct_dataset())
    prepare(src, dest, shard_size=8)  # 5 shards
    listing = list_split(DataConfig(uri=dest), "train")
    parts = [rank_shard(listing, r, 2) for r in range(2)]
    shards_of = [set(p.table.column("shard").to_pylist()) for p in parts]
    assert not shards_of[0] & shards_of[1] and len(shards_of[0]) == 3 and len(shards_of[1]) == 2
    assert sum(len(p) for p in parts) == 40
    with pytest.raises(UserError, match="5 shard\\(s\\) for 6 training workers"):
        rank_shard(listing, 0, 6)


def make_bad_shard(split_root: str) -> dict[str, str]:
    """A hand-made WebDataset tar with one good sample and the bad kinds; indexed by
    `shards.index_split`. Returns {member: what is wrong}."""
    jpg = encode(noise(32, 32), "JPEG", quality=90)
    os.makedirs(split_root)
    members = {
        "good.jpg": jpg, "good.cls": b"0",
        "trunc.jpg": jpg[: len(jpg) // 2], "trunc.cls": b"1",
        "text.txt": b"not an image", "text.cls": b"0",
        "nolabel.jpg": jpg,
    }
    with tarfile.open(f"{split_root}/shard-000000.tar", "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, __import__("io").BytesIO(data))
    shards.index_split(resolve(split_root))
    return {"trunc.jpg": "runcated", "text.txt": "no image member", "nolabel.jpg": "no .cls member"}


def test_listing_marks_samples_without_an_image_or_a_cls(tmp_path) -> None:
    make_bad_shard(str(tmp_path / "train"))
    listing = list_split(DataConfig(uri=str(tmp_path)), "train")
    problems = dict(zip(listing.table.column("path").to_pylist(), listing.table.column("problem").to_pylist()))
    base = f"{tmp_path}/train/shard-000000.tar#"
    assert problems[base + "good.jpg"] is None and problems[base + "trunc.jpg"] is None
    assert "no image member" in problems[base + "text.txt"]
    assert "no .cls member" in problems[base + "nolabel.jpg"]


# --------------------------------------------------------------------------- on Ray + S3 (slow)


def rows(ds) -> tuple[list[str], np.ndarray]:
    paths, images = [], []
    for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
        paths += list(batch["path"])
        images.append(batch["image"])
    return paths, np.concatenate(images)


@pytest.mark.slow
def test_s3_shards_round_trip_and_inspect_counts_equal_the_folders(
    ray_cluster, s3_server, tmp_path, capsys
) -> None:
    from pipelines.data.commands import inspect

    bucket = s3_server.make_bucket("shards")
    files = good_dataset()
    files.update({f"train/cat/{n}": c for n, c in bad_files().items()})
    src = f"s3://{bucket}/src"
    upload(s3_server, bucket, "src", files)
    dest = f"s3://{bucket}/shards"
    prepare(src, dest, shard_size=5, s3_endpoint=s3_server.endpoint)
    decodable = {k: v for k, v in files.items() if not k.endswith(("empty.jpg", "truncated.jpg", "text.png"))}
    for split in ("train", "test"):  # (the "bomb" is under the default pixel limit: a good image)
        assert sample_bytes(dest, split, s3_endpoint=s3_server.endpoint) == source_bytes(decodable, split)
    folder = inspect(src, s3_server.endpoint)
    sharded = inspect(dest, s3_server.endpoint)
    assert sharded == folder
    assert folder["images"] == 17 and len(folder["bad_files"]) == 3


@pytest.mark.slow
def test_rank_streams_are_deterministic_and_a_resume_sees_the_uninterrupted_samples(
    ray_cluster, tmp_path
) -> None:
    from pipelines.pretrain.rank_streams import build_train_stream

    src, dest = str(tmp_path / "src"), str(tmp_path / "shards")
    write_tree(src, distinct_dataset(64, 2))
    prepare(src, dest, shard_size=8)  # 8 shards: 4 per rank
    cfg = XTRAConfig()
    cfg.model.image_size = SIZE
    cfg.data.uri = dest
    cfg.train.global_batch_size = 8  # 4 rows per step per rank: one epoch of a rank = 8 steps
    stream = build_train_stream(cfg)
    full = [rows(stream.rank_dataset(r, 2, 0, 16, with_paths=True)) for r in range(2)]
    again = rows(stream.rank_dataset(0, 2, 0, 16, with_paths=True))
    assert again[0] == full[0][0] and np.array_equal(again[1], full[0][1])  # same seed, same samples
    epoch0 = full[0][0][:32] + full[1][0][:32]
    assert len(set(epoch0)) == 64  # every image once per epoch
    shard_of = [{p.split("#")[0] for p in full[r][0]} for r in range(2)]
    assert not shard_of[0] & shard_of[1]  # each rank reads its own shards
    assert full[0][0][:32] != full[0][0][32:64]  # each epoch in its own order
    for r in range(2):  # stopped at step 5, resumed: the same samples and pixels from step 5 on
        paths, images = rows(stream.rank_dataset(r, 2, 5, 11, with_paths=True))
        assert paths[:44] == full[r][0][20:64]
        assert np.array_equal(images[:44], full[r][1][20:64])


@pytest.mark.slow
def test_bad_samples_are_counted_named_and_shift_no_other_row(ray_cluster, tmp_path) -> None:
    from pipelines.data.stream import bad_file_counter, build_dataset

    wrong = make_bad_shard(str(tmp_path / "bad" / "train"))
    data = DataConfig(uri=str(tmp_path / "bad"), max_bad_fraction=1.0)
    counter = bad_file_counter()
    paths, _ = rows(build_dataset(data, SIZE, "train", 0, train=False, bad_files=counter, with_paths=True))
    base = f"{tmp_path}/bad/train/shard-000000.tar#"
    assert paths == [base + "good.jpg"]
    summary = ray.get(counter.summary.remote())
    assert set(summary["files"]) == {base + m for m in wrong}
    for member, why in wrong.items():
        assert why in summary["files"][base + member]

    # a sample damaged in place (same size): in training its row goes to the next sample, the
    # other rows are those of the intact shards
    src, dest = str(tmp_path / "src"), str(tmp_path / "shards")
    write_tree(src, distinct_dataset(16, 2))
    prepare(src, dest, shard_size=8)
    data = DataConfig(uri=dest, max_bad_fraction=1.0)
    listing = list_split(data, "train")
    intact, _ = rows(build_dataset(data, SIZE, "train", 0, train=True, listing=listing, with_paths=True))
    victim = intact[5]
    row = listing.table.column("path").to_pylist().index(victim)
    shard, offset = listing.table.column("shard")[row].as_py(), listing.table.column("offset")[row].as_py()
    with open(shard, "r+b") as f:
        f.seek(offset)
        f.write(b"GARBAGE!")
    counter = bad_file_counter()
    damaged, _ = rows(build_dataset(data, SIZE, "train", 0, train=True, listing=listing,
                                    bad_files=counter, with_paths=True))
    assert damaged == intact[:5] + [intact[6]] + intact[6:]
    assert list(ray.get(counter.summary.remote())["files"]) == [victim]


@pytest.mark.slow
def test_a_truncated_shard_stops_the_stream_in_one_line_naming_it(ray_cluster, tmp_path) -> None:
    from pipelines.data.stream import bad_file_counter, build_dataset, stream_stop_error

    src, dest = str(tmp_path / "src"), str(tmp_path / "shards")
    write_tree(src, distinct_dataset(16, 2))
    prepare(src, dest, shard_size=8)
    data = DataConfig(uri=dest, max_bad_fraction=1.0)
    listing = list_split(data, "train")
    shard = f"{dest}/train/shard-000001.tar"
    with open(shard, "r+b") as f:
        f.truncate(2048)
    counter = bad_file_counter()
    with pytest.raises(Exception, match="shard-000001.tar#.*still unreadable"):  # noqa: B017 (Ray wraps it)
        build_dataset(data, SIZE, "train", 0, train=False, listing=listing, bad_files=counter).take_all()
    error = stream_stop_error(counter)
    assert error is not None and shard in str(error) and "\n" not in str(error)
    assert "truncated shard" in str(error)
    skipping = DataConfig(uri=dest, max_bad_fraction=1.0, skip_unreadable_files=True)
    counter = bad_file_counter()
    kept = build_dataset(skipping, SIZE, "train", 0, train=False, listing=list_split(skipping, "train"),
                         bad_files=counter).take_all()
    assert len(kept) == 8 and ray.get(counter.count.remote()) == 8


def test_every_split_of_a_shard_dataset_is_listed(tmp_path) -> None:
    src, dest = str(tmp_path / "src"), str(tmp_path / "shards")
    write_tree(src, distinct_dataset(8, 2))
    prepare(src, dest, shard_size=3)
    splits = list_every_split(DataConfig(uri=dest))
    assert {s: len(v) for s, v in splits.items()} == {"train": 8, "test": 2}
    assert Counter(splits["train"].table.column("label").to_pylist()) == {0: 4, 1: 4}
    assert splits["train"].classes == ("ant", "bee")


@pytest.mark.slow
def test_pretrain_and_linear_probe_from_shards_through_the_cli(ray_cluster, tmp_path, capsys) -> None:
    from pipelines.cli import main
    from tests.small_run import small_sets

    data = str(tmp_path / "fm-shards")
    assert main(["data", "prepare", "--source", "fashion-mnist", "--dest", data, "--limit", "64",
                 "--format", "shards", "--shard-size", "16"]) == 0
    assert sorted(os.listdir(f"{data}/train")) == [
        "index.json", "samples.parquet", *(f"shard-00000{i}.tar" for i in range(4))]
    sets = small_sets(tmp_path, data, "shards", **{"train.max_steps": 2, "train.checkpoint_every": 2})
    args = [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v) if isinstance(v, list) else v}")]
    capsys.readouterr()
    assert main(["pretrain", *args]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert main(["probe", "--model", out["export_dir"], "--data", data, "--kind", "linear",
                 "--set", f"mlflow.tracking_uri={sets['mlflow.tracking_uri']}",
                 "--set", "probe.linear_weight_decays=[0.01]"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["kind"] == "linear" and result["n_test"] == 64
    assert result["n_train"] + result["n_val"] == 64 and result["num_classes"] == 10
