"""bench_data keeps working: a smoke run on a real local Ray cluster writes every variant at every
size, and the loaders it compares really do the same work (same images, same crops)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import bench_data

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


def test_bench_data_smoke_writes_every_loader_at_every_size(tmp_path) -> None:
    """(Its data and Ray's session dir live in a fresh /tmp/xbd* dir that the script removes: a
    pytest tmp_path is too long for Ray's socket paths.) Run as a user runs it, in its own process:
    it starts its own Ray, which another test's Ray in this process would refuse."""
    if bench_data.find_cifar(None) is None:
        pytest.skip("no CIFAR-10 JPEGs in shared/data/cifar10")
    subprocess.run([sys.executable, "-m", "benchmarks.bench_data", "--smoke", "--results-dir", str(tmp_path)],
                   cwd=ROOT, check=True, timeout=900)
    data = json.loads((tmp_path / "data_smoke.json").read_text())
    assert [r["output_px"] for r in data["results"]] == [32, 224, 256]
    for r in data["results"]:
        counts = {k: v["images_per_run"] for k, v in r["variants"].items()}
        assert set(counts) == {bench_data.RECIPE, bench_data.PRODUCT_DL, bench_data.PRODUCT_RAY}
        assert len(set(counts.values())) == 1 and r["images"] in counts.values()  # no image lost
        for v in r["variants"].values():
            assert v["images_per_cpu_s_median"] > 0
            assert sum(v["cpu_share_by_process"].values()) == pytest.approx(1.0)
        assert r["variants"][bench_data.PRODUCT_RAY]["cpu_share_by_process"].get("ray workers", 0) > 0
    assert {g["model"] for g in data["cores_per_gpu"]} == {"vit_b16", "vit_h14"}
    assert 1.0 < data["data"]["imagenet_like_bits_per_pixel"] < 8.0
    assert data["table_markdown"].startswith("| ")


def test_recipe_and_product_draw_the_same_crops_from_the_same_file_rng(tmp_path) -> None:
    """The comparison is fair: for the same (seed, epoch, path) both produce the same picture
    (the product within codec rounding, see tests/data/test_images.py)."""
    cifar = bench_data.find_cifar(None)
    if cifar is None:
        pytest.skip("no CIFAR-10 JPEGs in shared/data/cifar10")
    src = bench_data.cifar_subset(cifar, 1)[0]
    textures = bench_data.pink_textures(1, 500, 500, seed=0)
    path = tmp_path / "x.jpg"
    bench_data.imagenet_like(src, 0, textures, 20.0).save(path, format="JPEG", quality=90)
    cfg = bench_data.XTRAConfig()
    cfg.model.image_size = 224
    data = path.read_bytes()
    for epoch in range(4):
        rng_a, rng_b = (bench_data.file_rng(0, epoch, str(path)) for _ in range(2))
        recipe = np.asarray(bench_data.PilRecipe(cfg).pil(data, rng_a), dtype=np.int16)
        product = bench_data.product_transform(cfg, data, rng_b).numpy().astype(np.int16)
        assert np.abs(recipe - product).mean() < 0.35
