"""The image pipeline: transforms (fast, no Ray), listings, and Ray Data on a real S3 server.

Fast tests build tiny images in memory or in tmp_path. `slow` tests use the session fixtures in
conftest.py: a local Ray cluster and moto's S3 server on 127.0.0.1, read through the same
pyarrow S3FileSystem code path as AWS.
"""

from __future__ import annotations

import io
import json
import os
import socket
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
import ray
import torch
from PIL import Image
from ray.data._internal.execution.execution_callback import ExecutionCallback

from pipelines.data.images import (
    BadImage,
    crop_resize,
    decode,
    eval_transform,
    file_rng,
    normalize,
    open_image,
    random_resized_crop_params,
    train_transform,
)
from pipelines.data.listing import list_every_split, list_split
from pipelines.errors import UserError
from xtra_core.config import DataConfig, XTRAConfig

SIZE = 16  # output side in these tests
BIG = 10**9  # no pixel limit


# --------------------------------------------------------------------------- image makers


def noise(w: int, h: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3]: a smooth gradient plus noise, so every crop and flip looks different."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([xx * 255 // max(w - 1, 1), yy * 255 // max(h - 1, 1), (xx + yy) % 256], -1)
    return np.clip(base + rng.integers(-20, 20, (h, w, 3)), 0, 255).astype(np.uint8)


def encode(img: Image.Image | np.ndarray, fmt: str = "PNG", **kw: object) -> bytes:
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img)
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def bad_files() -> dict[str, bytes]:
    """The four kinds of bad file the pipeline must skip (the bomb: over a 4096-pixel limit)."""
    jpg = encode(noise(64, 64), "JPEG", quality=90)
    return {
        "truncated.jpg": jpg[: len(jpg) // 2],
        "empty.jpg": b"",
        "text.png": b"this is a text file, not a PNG\n",
        "bomb.png": encode(np.zeros((100, 100), np.uint8)),  # 10_000 pixels > BOMB_LIMIT
    }


BOMB_LIMIT = 4096


# --------------------------------------------------------------------------- transforms (fast)


def test_random_resized_crop_params_stay_inside_the_image_and_the_ranges() -> None:
    rng = np.random.default_rng(0)
    W, H = 50, 40
    fractions, aspects = [], []
    for _ in range(500):
        top, left, h, w = random_resized_crop_params(rng, W, H, (0.3, 1.0), (3 / 4, 4 / 3))
        assert 0 <= top and top + h <= H and 0 <= left and left + w <= W
        fractions.append(w * h / (W * H))
        aspects.append(w / h)
    # rounding to whole pixels moves the fraction and the ratio a little
    assert 0.27 <= min(fractions) < 0.4 and 0.9 < max(fractions) <= 1.0
    assert min(aspects) >= 0.7 and max(aspects) <= 1.4


def test_random_resized_crop_falls_back_to_a_centred_crop_clipped_to_the_ratio() -> None:
    # 100x2: any crop of >= 30% of the area is taller than 2 px at a ratio <= 4/3, so all ten
    # attempts fail and the fallback keeps the full height with the ratio clipped to 4/3.
    box = random_resized_crop_params(np.random.default_rng(0), 100, 2, (0.3, 1.0), (3 / 4, 4 / 3))
    assert box == (0, (100 - 3) // 2, 2, 3)
    # a tall image clips to the smallest ratio
    box = random_resized_crop_params(np.random.default_rng(0), 2, 100, (0.3, 1.0), (3 / 4, 4 / 3))
    assert box == ((100 - 3) // 2, 0, 3, 2)


@pytest.mark.parametrize(
    ("mode", "w", "h"),
    [("RGB", 17, 40), ("L", 300, 200), ("LA", 32, 32), ("RGBA", 1000, 30), ("P", 64, 48), ("I;16", 40, 40)],
)
def test_train_and_eval_transforms_give_uint8_rgb_of_the_model_size(mode: str, w: int, h: int) -> None:
    if mode == "I;16":
        img = Image.fromarray(noise(w, h)[..., 0].astype(np.uint16) * 256)
    else:
        img = Image.fromarray(noise(w, h)).convert(mode)
    data = encode(img)
    out = train_transform(data, np.random.default_rng(1), SIZE, (0.3, 1.0), (0.75, 4 / 3), 0.5, BIG)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8
    assert out.max() - out.min() > 40  # real image content survives (not a blank crop)
    out = eval_transform(data, SIZE, BIG)
    assert out.shape == (SIZE, SIZE, 3) and out.dtype == np.uint8


@pytest.mark.parametrize(
    ("img", "rgb"),
    [
        (Image.new("L", (20, 10), 100), (100, 100, 100)),
        (Image.new("LA", (20, 10), (100, 255)), (100, 100, 100)),
        (Image.new("RGBA", (20, 10), (10, 20, 30, 0)), (10, 20, 30)),
        (Image.new("RGB", (20, 10), (250, 5, 128)), (250, 5, 128)),
        (Image.new("P", (20, 10), 3), None),
        (Image.fromarray(np.full((10, 20), 100 * 256, np.uint16)), (100, 100, 100)),
    ],
)
def test_decode_turns_every_mode_into_8bit_rgb_with_the_same_values(
    img: Image.Image, rgb: tuple[int, int, int] | None
) -> None:
    if rgb is None:  # palette: the value is whatever the palette holds for index 3
        rgb = img.convert("RGB").getpixel((0, 0))
    out = decode(encode(img), BIG)
    assert out.mode == "RGB" and out.size == (20, 10)
    assert np.all(np.asarray(out) == np.array(rgb, np.uint8))
    # a constant image stays exactly constant through crop + resize
    assert np.all(train_transform(encode(img), np.random.default_rng(0), SIZE, (0.3, 1), (0.75, 1.34), 0.5, BIG) == rgb)


def test_horizontal_flip_mirrors_exactly_the_same_crop() -> None:
    data = encode(noise(40, 30))
    args = (SIZE, (0.3, 1.0), (0.75, 4 / 3))
    kept = train_transform(data, np.random.default_rng(7), *args, 0.0, BIG)
    flipped = train_transform(data, np.random.default_rng(7), *args, 1.0, BIG)
    assert np.array_equal(flipped, kept[:, ::-1])
    assert not np.array_equal(flipped, kept)


def test_flip_happens_for_about_half_of_the_files() -> None:
    # scale (1, 1) and ratio (1, 1) on a square image: the crop is the whole image, only the flip varies
    data = encode(noise(24, 24))
    plain = eval_transform(data, SIZE, BIG)
    flips = 0
    for i in range(200):
        out = train_transform(data, file_rng(0, 0, f"f{i}.png"), SIZE, (1, 1), (1, 1), 0.5, BIG)
        assert np.array_equal(out, plain) or np.array_equal(out, plain[:, ::-1])
        flips += np.array_equal(out, plain[:, ::-1])
    assert 70 < flips < 130


def test_crop_resize_is_crop_then_resize() -> None:
    arr = noise(60, 50)
    img = Image.open(io.BytesIO(encode(arr)))
    out = crop_resize(img, (5, 7, 30, 40), SIZE)  # top, left, h, w
    expected = Image.fromarray(arr).crop((7, 5, 47, 35)).resize((SIZE, SIZE), Image.Resampling.BICUBIC)
    # torch's uint8 bicubic kernel vs PIL's: within 1 level (tests/data/test_images.py has more)
    assert np.abs(out.astype(int) - np.asarray(expected).astype(int)).max() <= 1


def test_jpeg_draft_decode_matches_a_full_decode() -> None:
    yy, xx = np.mgrid[0:600, 0:800]
    smooth = np.stack([xx * 255 // 799, yy * 255 // 599, (np.sin(xx / 40) * 100 + 128)], -1)
    data = encode(smooth.astype(np.uint8), "JPEG", quality=95)
    box = (100, 150, 300, 400)
    drafted_img = open_image(data, BIG)
    drafted = crop_resize(drafted_img, box, 32)
    assert drafted_img.size[0] < 800  # the draft really decoded at a reduced scale
    full = crop_resize(decode(data, BIG), box, 32)
    assert np.abs(drafted.astype(int) - full.astype(int)).mean() < 3.0


def test_eval_transform_is_resize_shorter_side_then_centre_crop() -> None:
    arr = np.zeros((32, 96, 3), np.uint8)
    arr[:, 32:64] = 255  # only the centre square is white
    out = eval_transform(encode(arr), SIZE, BIG)
    assert np.all(out == 255)
    tall = np.zeros((96, 32, 3), np.uint8)
    tall[32:64] = 255
    assert np.all(eval_transform(encode(tall), SIZE, BIG) == 255)


@pytest.mark.parametrize("name", ["truncated.jpg", "empty.jpg", "text.png", "bomb.png"])
def test_bad_files_raise_bad_image_with_a_reason(name: str) -> None:
    data = bad_files()[name]
    with pytest.raises(BadImage) as e:
        train_transform(data, np.random.default_rng(0), SIZE, (0.3, 1), (0.75, 4 / 3), 0.5, BOMB_LIMIT)
    reason = {"truncated.jpg": "decode", "empty.jpg": "empty", "text.png": "not an image", "bomb.png": "bomb"}
    assert reason[name] in str(e.value)
    with pytest.raises(BadImage):
        eval_transform(data, SIZE, BOMB_LIMIT)


def test_file_rng_depends_on_seed_epoch_and_path_only() -> None:
    def draw(seed: int, epoch: int, path: str) -> np.ndarray:
        return file_rng(seed, epoch, path).random(4)

    assert np.array_equal(draw(0, 0, "a/b.jpg"), draw(0, 0, "a/b.jpg"))
    for other in (draw(1, 0, "a/b.jpg"), draw(0, 1, "a/b.jpg"), draw(0, 0, "a/c.jpg")):
        assert not np.array_equal(draw(0, 0, "a/b.jpg"), other)


def test_draws_are_keyed_by_the_path_below_the_datasets_folder() -> None:
    from pipelines.data.images import draw_key

    assert draw_key("/data/a/train/cat/1.jpg", "/data/a/train/") == "cat/1.jpg"
    assert draw_key("bucket/x/train/cat/1.jpg", "bucket/x/train/") == "cat/1.jpg"
    assert draw_key("s3://bucket/x/train/s-0.tar#cat/1.jpg", "s3://bucket/x/train/") == "s-0.tar#cat/1.jpg"
    # outside the folder (a manifest's absolute entry), or no folder: the whole path
    assert draw_key("/elsewhere/1.jpg", "/data/a/train/") == "/elsewhere/1.jpg"
    assert draw_key("/data/a/train2/1.jpg", "/data/a/train/") == "/data/a/train2/1.jpg"
    assert draw_key("/data/a/train/cat/1.jpg", "") == "/data/a/train/cat/1.jpg"


def test_epoch_order_is_a_new_seeded_permutation_every_epoch() -> None:
    from pipelines.data.stream import epoch_order

    e0, e1 = epoch_order(1000, 0, 0), epoch_order(1000, 0, 1)
    assert sorted(e0.tolist()) == list(range(1000))
    assert np.array_equal(e0, epoch_order(1000, 0, 0))
    assert (e0 != e1).mean() > 0.9 and (e0 != epoch_order(1000, 1, 0)).mean() > 0.9


def test_normalize_gives_float_nchw_with_mean_std_per_channel() -> None:
    x = torch.zeros(2, 4, 5, 3, dtype=torch.uint8)
    x[..., 0] = 255  # red full, green and blue zero
    out = normalize(x, (0.5, 0.25, 0.0), (0.5, 0.25, 2.0))
    assert out.shape == (2, 3, 4, 5) and out.dtype == torch.float32 and out.is_contiguous()
    assert torch.allclose(out[:, 0], torch.tensor(1.0))  # (1 - 0.5) / 0.5
    assert torch.allclose(out[:, 1], torch.tensor(-1.0))  # (0 - 0.25) / 0.25
    assert torch.allclose(out[:, 2], torch.tensor(0.0))
    with pytest.raises(ValueError):
        normalize(torch.zeros(2, 3, 4, 5, dtype=torch.uint8), (0, 0, 0), (1, 1, 1))


# --------------------------------------------------------------------------- listings (fast, local)


def write_tree(root: str, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(content)


def test_class_index_is_the_same_in_every_split(tmp_path: object) -> None:
    root = str(tmp_path)
    png = encode(noise(8, 8))
    write_tree(
        root,
        {
            "train/cat/1.png": png,
            "train/dog/2.JPG": png,
            "train/emu/3.png": png,
            "test/dog/4.png": png,  # test has no cat: dog must still be 1
            "test/emu/5.jpeg": png,
            "train/dog/notes.txt": b"ignored",
            "train/dog/.DS_Store": b"ignored",
            "train/dog/._2.JPG": b"ignored AppleDouble",
        },
    )
    data = DataConfig(uri=root)
    train, test = list_split(data, "train"), list_split(data, "test")
    assert (train.root, test.root) == (f"{root}/train/", f"{root}/test/")  # draws keyed below them
    assert train.classes == test.classes == ("cat", "dog", "emu")
    assert train.class_counts() == {"cat": 1, "dog": 1, "emu": 1}
    assert dict(zip(test.table["path"].to_pylist(), test.table["label"].to_pylist())) == {
        f"{root}/test/dog/4.png": 1,
        f"{root}/test/emu/5.jpeg": 2,
    }


def test_manifest_csv_with_relative_paths_names_and_a_split_column(tmp_path: object) -> None:
    root = str(tmp_path)
    png = encode(noise(8, 8))
    write_tree(root, {"img/a.png": png, "img/b.png": png, "img/c.png": png})
    manifest = os.path.join(root, "all.csv")
    with open(manifest, "w") as f:
        f.write("path,label,split\nimg/a.png,zebra,train\nimg/b.png,ant,train\n")
        f.write(f"{root}/img/c.png,zebra,test\n")
    data = DataConfig(uri=manifest)
    train, test = list_split(data, "train"), list_split(data, "test")
    assert train.classes == ("ant", "zebra")
    assert train.table["path"].to_pylist() == [f"{root}/img/a.png", f"{root}/img/b.png"]
    assert train.root == test.root == f"{root}/"  # the manifest's folder
    assert train.table["label"].to_pylist() == [1, 0]
    assert test.table["label"].to_pylist() == [1]


def test_per_split_parquet_manifests_with_integer_labels(tmp_path: object) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = str(tmp_path)
    pq.write_table(pa.table({"path": ["x/1.png", "x/2.png"], "label": [3, 7]}), f"{root}/train.parquet")
    listing = list_split(DataConfig(uri=root), "train")
    assert listing.table["label"].to_pylist() == [3, 7]
    assert listing.table["path"].to_pylist() == [f"{root}/x/1.png", f"{root}/x/2.png"]


def test_local_listing_errors_name_the_uri(tmp_path: object) -> None:
    root = str(tmp_path)
    with pytest.raises(UserError, match=f"{root}/nope.*does not exist"):
        list_split(DataConfig(uri=f"{root}/nope"), "train")
    write_tree(root, {"test/a/1.png": encode(noise(8, 8))})
    with pytest.raises(UserError, match=f"{root}: no split 'train'"):
        list_split(DataConfig(uri=root), "train")
    write_tree(root, {"train/a/readme.txt": b"no images"})
    with pytest.raises(UserError, match="no image files"):
        list_split(DataConfig(uri=root), "train")


# --------------------------------------------------------------------------- on Ray + S3 (slow)


def upload(s3, bucket: str, prefix: str, files: dict[str, bytes]) -> None:
    for rel, content in files.items():
        s3.put(f"s3://{bucket}/{prefix}/{rel}", content)


def s3_config(s3, uri: str, **data: object) -> XTRAConfig:
    cfg = XTRAConfig()
    cfg.model.image_size = SIZE
    cfg.data.uri = uri
    cfg.data.s3_endpoint = s3.endpoint
    for k, v in data.items():
        setattr(cfg.data, k, v)
    return cfg


def good_dataset(n_per_class: int = 4) -> dict[str, bytes]:
    """train: 3 classes x n images of mixed size, mode and format; test: 2 classes x 2."""
    files: dict[str, bytes] = {}
    modes = ["RGB", "L", "RGBA", "P"]
    for c, cls in enumerate(["bird", "cat", "dog"]):
        for i in range(n_per_class):
            img = Image.fromarray(noise(20 + 7 * i, 24 + 5 * c, seed=10 * c + i)).convert(modes[i % 4])
            fmt, ext = ("JPEG", "jpg") if img.mode in ("RGB", "L") else ("PNG", "png")
            files[f"train/{cls}/{i}.{ext}"] = encode(img, fmt)
    for cls in ["cat", "dog"]:
        for i in range(2):
            files[f"test/{cls}/{i}.png"] = encode(noise(30, 30, seed=100 + i))
    return files


@pytest.fixture(scope="module")
def s3_dataset(s3_server) -> str:
    """s3://bucket/ds: the good dataset plus the four bad files in train/cat (module-wide)."""
    bucket = s3_server.make_bucket("data")
    files = good_dataset()
    files.update({f"train/cat/{name}": content for name, content in bad_files().items()})
    upload(s3_server, bucket, "ds", files)
    return f"s3://{bucket}/ds"


def rows_by_path(ds) -> dict[str, dict[str, object]]:
    rows = ds.take_all()
    by_path = {r["path"]: r for r in rows}
    assert len(by_path) == len(rows), "a file came out twice"
    return by_path


@pytest.mark.slow
def test_reads_class_folders_from_s3_with_labels_and_counts(ray_cluster, s3_server, s3_dataset) -> None:
    from pipelines.data.stream import build_dataset

    cfg = s3_config(s3_server, s3_dataset, max_image_pixels=BOMB_LIMIT)
    rows = build_dataset(cfg.data, SIZE, "train", 0, train=False, with_paths=True).take_all()
    assert len(rows) == 12  # 3 classes x 4 good images; the 4 bad ones are skipped
    assert Counter(int(r["label"]) for r in rows) == {0: 4, 1: 4, 2: 4}
    assert all(r["path"].startswith(f"{s3_dataset}/train/") for r in rows)
    assert all(r["image"].shape == (SIZE, SIZE, 3) and r["image"].dtype == np.uint8 for r in rows)
    test_rows = build_dataset(cfg.data, SIZE, "test", 0, train=False).take_all()
    assert Counter(int(r["label"]) for r in test_rows) == {1: 2, 2: 2}  # cat=1, dog=2 as in train


@pytest.mark.slow
def test_reads_a_manifest_from_s3(ray_cluster, s3_server) -> None:
    from pipelines.data.stream import build_dataset

    bucket = s3_server.make_bucket("manifest")
    files = {f"flat/{i:03d}.png": encode(noise(20, 20, seed=i)) for i in range(6)}
    upload(s3_server, bucket, "m", files)
    lines = ["path,label"] + [f"flat/{i:03d}.png,{'even' if i % 2 == 0 else 'odd'}" for i in range(5)]
    lines.append(f"s3://{bucket}/m/flat/005.png,odd")  # an absolute s3:// entry
    s3_server.put(f"s3://{bucket}/m/train.csv", "\n".join(lines).encode())
    cfg = s3_config(s3_server, f"s3://{bucket}/m")
    rows = build_dataset(cfg.data, SIZE, "train", 0, train=True, with_paths=True).take_all()
    assert Counter(int(r["label"]) for r in rows) == {0: 3, 1: 3}  # even=0, odd=1
    assert {r["path"] for r in rows} == {f"s3://{bucket}/m/{k}" for k in files}


@pytest.mark.slow
def test_augmentations_vary_across_epochs_and_repeat_with_the_same_seed(
    ray_cluster, s3_server, s3_dataset, monkeypatch, tmp_path
) -> None:
    from pipelines.data import stream as data_module
    from pipelines.data.stream import build_dataset, epoch_order

    cfg = s3_config(s3_server, s3_dataset, max_image_pixels=BOMB_LIMIT)
    e0 = rows_by_path(build_dataset(cfg.data, SIZE, "train", 0, train=True, with_paths=True))
    e0_again = rows_by_path(build_dataset(cfg.data, SIZE, "train", 0, train=True, with_paths=True))
    e1 = rows_by_path(build_dataset(cfg.data, SIZE, "train", 1, train=True, with_paths=True))
    # blocks of 3 files (5 decode tasks instead of 1): the same pixels
    monkeypatch.setattr(data_module, "MIN_ROWS_PER_BLOCK", 3)
    monkeypatch.setattr(data_module, "MAX_ROWS_PER_BLOCK", 3)
    small_blocks = build_dataset(cfg.data, SIZE, "train", 0, train=True, with_paths=True).materialize()
    assert small_blocks.num_blocks() >= 5
    for p, r in rows_by_path(small_blocks).items():
        assert np.array_equal(r["image"], e0[p]["image"])
    monkeypatch.undo()
    # two epochs in one dataset are exactly epochs 0 and 1
    both = build_dataset(cfg.data, SIZE, "train", 0, train=True, num_epochs=2, with_paths=True).take_all()
    assert Counter(r["path"] for r in both) == {p: 2 for p in e0}
    for r in both:
        p = r["path"]
        assert np.array_equal(r["image"], e0[p]["image"]) or np.array_equal(r["image"], e1[p]["image"])
    # a window that starts mid-epoch (a resumed run) continues the same chain of epochs
    window = build_dataset(cfg.data, SIZE, "train", 0, train=True, first_row=5, num_rows=12, with_paths=True)
    listing = list_split(cfg.data, "train")  # 16 files: 12 good + 4 bad
    paths = [f"s3://{p}" for p in listing.table["path"].to_pylist()]
    expected = [(0, paths[i]) for i in epoch_order(16, 0, 0)[5:]] + [(1, paths[epoch_order(16, 0, 1)[0]])]
    expected = [(e, p) for e, p in expected if p in e0]  # bad files drop out
    got = window.take_all()
    assert sorted(r["path"] for r in got) == sorted(p for _, p in expected)
    for r in got:
        e = dict((p, e) for e, p in expected)[r["path"]]
        assert np.array_equal(r["image"], (e0, e1)[e][r["path"]]["image"])
    cfg.data.seed = 1
    s1 = rows_by_path(build_dataset(cfg.data, SIZE, "train", 0, train=True, with_paths=True))
    assert set(e0) == set(e0_again) == set(e1) == set(s1) and len(e0) == 12
    for p in e0:
        img = e0[p]["image"]
        assert img.shape == (SIZE, SIZE, 3) and img.dtype == np.uint8
        assert np.array_equal(img, e0_again[p]["image"])  # (seed, epoch) reproduces every pixel
    assert sum(not np.array_equal(e0[p]["image"], e1[p]["image"]) for p in e0) >= 11
    assert sum(not np.array_equal(e0[p]["image"], s1[p]["image"]) for p in e0) >= 11
    # a copy of the data in a local folder draws the very same crops and flips (keyed by the path
    # below the split's folder, not by where the copy lives)
    files = good_dataset()
    files.update({f"train/cat/{name}": content for name, content in bad_files().items()})
    write_tree(str(tmp_path / "copy"), files)
    cfg.data.seed, cfg.data.uri, cfg.data.s3_endpoint = 0, str(tmp_path / "copy"), None
    local = rows_by_path(build_dataset(cfg.data, SIZE, "train", 0, train=True, with_paths=True))
    assert {p.removeprefix(f"{tmp_path}/copy/") for p in local} == {p.removeprefix(f"{s3_dataset}/") for p in e0}
    for p, r in local.items():
        assert np.array_equal(r["image"], e0[p.replace(f"{tmp_path}/copy", s3_dataset)]["image"])


def _stream_slowly(ds, rows: int, pause_s: float) -> tuple[int, float]:
    """Iterate the first `rows` of `ds` as a slow training step would, then the rest at once (the
    execution ends cleanly): (rows read slowly, their seconds)."""
    t0, n, seconds = time.perf_counter(), 0, None
    for batch in ds.iter_batches(batch_size=8, batch_format="numpy"):
        if seconds is None:
            n += len(batch["image"])
            time.sleep(pause_s)
            if n >= rows:
                seconds = time.perf_counter() - t0
    return n, seconds


_LOOP_STEPS: list[float] = []


class _CountLoopSteps(ExecutionCallback):
    def on_execution_step(self, executor) -> None:
        _LOOP_STEPS.append(time.perf_counter())


@pytest.mark.slow
def test_a_stream_ahead_of_its_consumer_does_not_spin_its_scheduling_loop(
    ray_cluster, tmp_path, monkeypatch
) -> None:
    """The scheduling loop runs in the consuming process (a training worker): backpressured, it
    must wait, not spin (IdleBackoff). Ray Data's own loop, without it, is the control."""
    from pipelines.data import stream as data_module
    from pipelines.data.stream import IDLE_BACKOFF_S, IdleBackoff, build_dataset

    for rel, content in good_dataset(n_per_class=8).items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_bytes(content)
    cfg = XTRAConfig()
    cfg.data.uri = str(tmp_path)
    monkeypatch.setattr(data_module, "MIN_ROWS_PER_BLOCK", 8)  # 8-image blocks, 24 of them
    monkeypatch.setattr(data_module, "MAX_ROWS_PER_BLOCK", 8)

    def loop_steps_per_s(backoff: bool) -> float:
        ds = build_dataset(cfg.data, SIZE, "train", 0, train=True, num_epochs=8)
        callbacks = [c for c in ds.context.custom_execution_callback_classes if backoff or c is not IdleBackoff]
        ds.context.custom_execution_callback_classes = [*callbacks, _CountLoopSteps]
        # a small object-store budget: the stream gets ahead of the consumer and is held back
        limits = ds.context.execution_options.resource_limits
        ds.context.execution_options.resource_limits = limits.copy(object_store_memory=64 * 2**10)
        _LOOP_STEPS.clear()
        n, seconds = _stream_slowly(ds, rows=96, pause_s=0.2)  # one 8-image block per 0.2 s
        assert n == 96
        return sum(t <= _LOOP_STEPS[0] + seconds for t in _LOOP_STEPS) / seconds

    spinning = loop_steps_per_s(backoff=False)
    waiting = loop_steps_per_s(backoff=True)
    if spinning <= 4 / IDLE_BACKOFF_S:
        # the control: Ray Data's own loop did not spin on this machine at this moment (seen on a
        # loaded 2-core machine, at the commit that added the test too): nothing to compare with
        pytest.skip(f"Ray Data's loop without IdleBackoff ran {spinning:.0f} steps/s, not a spin "
                    f"(> {4 / IDLE_BACKOFF_S:.0f}/s): the backoff cannot be measured here")
    # what is left: the steps in which the stream moved (blocks taken, tasks done) + a few idle
    # ones, well under the control's rate (seen: 32 steps/s against a control of only 83/s on a
    # fast 2-core machine, 5-20 against hundreds on loaded ones)
    assert waiting < 2 / IDLE_BACKOFF_S and waiting < spinning / 2, (waiting, spinning)


@pytest.mark.slow
def test_flips_vary_per_file_and_epoch_in_the_stream(ray_cluster, s3_server, s3_dataset) -> None:
    from pipelines.data.stream import build_dataset

    # scale (1, 1) and ratio (1, 1) on the square test images: only the flip is random
    cfg = s3_config(s3_server, s3_dataset, crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))
    plain = rows_by_path(build_dataset(cfg.data, SIZE, "test", 0, train=False, with_paths=True))
    flipped = {}
    for epoch in range(8):
        for p, r in rows_by_path(build_dataset(cfg.data, SIZE, "test", epoch, train=True, with_paths=True)).items():
            same = np.array_equal(r["image"], plain[p]["image"])
            mirrored = np.array_equal(r["image"], plain[p]["image"][:, ::-1])
            assert same or mirrored
            flipped[(p, epoch)] = mirrored
    assert 8 <= sum(flipped.values()) <= 24  # 32 draws at p=0.5
    for p in plain:  # every file is flipped in some epochs and not in others
        assert 0 < sum(flipped[(p, e)] for e in range(8)) < 8


@pytest.mark.slow
def test_bad_files_are_counted_and_skipped_and_every_good_image_kept(
    ray_cluster, s3_server, s3_dataset
) -> None:
    from pipelines.data.stream import bad_file_counter, build_dataset

    # 4 bad files of 16: over the default data.max_bad_fraction, which this test is not about
    cfg = s3_config(s3_server, s3_dataset, max_image_pixels=BOMB_LIMIT, max_bad_fraction=1.0)
    counter = bad_file_counter()
    rows = build_dataset(
        cfg.data, SIZE, "train", 0, train=True, num_epochs=2, bad_files=counter, with_paths=True
    ).take_all()
    good = {f"{s3_dataset}/{k}" for k in good_dataset() if k.startswith("train/")}
    assert Counter(r["path"] for r in rows) == {p: 2 for p in good}  # every good image, each epoch
    summary = ray.get(counter.summary.remote())
    assert summary["count"] == 8  # 4 bad files x 2 epochs
    assert set(summary["files"]) == {f"{s3_dataset}/train/cat/{n}" for n in bad_files()}
    assert "bomb" in summary["files"][f"{s3_dataset}/train/cat/bomb.png"]
    assert ray.get(counter.count.remote()) == 8


@pytest.mark.slow
def test_missing_prefix_and_missing_bucket_are_one_clear_error(s3_server, s3_dataset) -> None:
    cfg = s3_config(s3_server, f"{s3_dataset}/nope")
    with pytest.raises(UserError, match=f"{s3_dataset}/nope: does not exist"):
        list_split(cfg.data, "train")
    cfg = s3_config(s3_server, s3_dataset)
    with pytest.raises(UserError, match=f"{s3_dataset}: no split 'validation'"):
        list_split(cfg.data, "validation")
    cfg = s3_config(s3_server, "s3://no-such-bucket-here/x")
    with pytest.raises(UserError, match="s3://no-such-bucket-here/x: (the bucket )?does not exist"):
        list_split(cfg.data, "train")


@pytest.mark.slow
def test_dead_endpoint_fails_fast_naming_the_uri(aws_test_env) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = DataConfig(uri="s3://bucket/prefix", s3_endpoint=f"http://127.0.0.1:{port}")
    start = time.monotonic()
    with pytest.raises(UserError, match=r"s3://bucket/prefix: cannot reach the S3 endpoint .*127\.0\.0\.1"):
        list_split(data, "train")
    assert time.monotonic() - start < 15


@pytest.mark.slow
def test_refused_credentials_are_one_clear_error(aws_test_env) -> None:
    # a second moto server, in its own process, that checks credentials (none are known to it)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": "0"}
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.2)
        data = DataConfig(uri="s3://bucket/prefix", s3_endpoint=f"http://127.0.0.1:{port}")
        with pytest.raises(UserError, match="s3://bucket/prefix: access refused") as e:
            list_split(data, "train")
        assert "testing" not in str(e.value)  # the (fake) key is never echoed
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.slow
def test_prepare_fashion_mnist_to_s3_then_inspect(ray_cluster, s3_server, capsys) -> None:
    from pipelines.cli import main

    bucket = s3_server.make_bucket("fmnist")
    uri = f"s3://{bucket}/fm"
    assert main(["data", "prepare", "--source", "fashion-mnist", "--dest", uri,
                 "--s3-endpoint", s3_server.endpoint, "--limit", "30"]) == 0
    capsys.readouterr()
    assert main(["data", "inspect", uri, "--s3-endpoint", s3_server.endpoint]) == 0
    out = capsys.readouterr().out.strip()
    report = json.loads(out)  # exactly one JSON object on stdout
    assert report["images"] == 60 and report["bad_files"] == []
    assert report["splits"] == {"train": 30, "test": 30}
    assert sum(report["per_class"].values()) == 60
    assert set(report["per_class"]) <= {
        "0_t-shirt_top", "1_trouser", "2_pullover", "3_dress", "4_coat",
        "5_sandal", "6_shirt", "7_sneaker", "8_bag", "9_ankle_boot",
    }


@pytest.mark.slow
def test_inspect_and_prepare_report_bad_files(ray_cluster, s3_server, s3_dataset, tmp_path, capsys) -> None:
    from pipelines.cli import main

    assert main(["data", "inspect", s3_dataset, "--s3-endpoint", s3_server.endpoint]) == 0
    report = json.loads(capsys.readouterr().out)
    # the default pixel limit lets the 10_000-pixel "bomb" through as a good image
    assert report["bad_files"] == sorted(f"{s3_dataset}/train/cat/{n}" for n in bad_files() if n != "bomb.png")
    assert report["images"] == 12 + 4 + 1
    assert report["per_class"] == {"bird": 4, "cat": 4 + 2 + 1, "dog": 4 + 2}
    dest = str(tmp_path / "copy")
    assert main(["data", "prepare", "--source", s3_dataset, "--dest", dest,
                 "--s3-endpoint", s3_server.endpoint]) == 0
    copied = list_every_split(DataConfig(uri=dest))
    assert {s: len(v) for s, v in copied.items()} == {"train": 13, "test": 4}


def test_cli_errors_are_one_line_exit_2(tmp_path, capsys) -> None:
    from pipelines.cli import main

    assert main(["data", "inspect", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and str(tmp_path / "missing") in err[0]

