"""The attentive probe's train view: RandomResizedCrop of the whole image (timm, the reference),
not of its centred square."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.data.listing import list_split
from pipelines.probe.views import train_stream
from xtra_core.config import build_config


@pytest.mark.slow
def test_train_view_crops_from_the_whole_image_not_the_centred_square(tmp_path, ray_cluster):
    # a 96x32 image: red left third, green centre square, blue right third
    img = np.zeros((32, 96, 3), np.uint8)
    img[:, :32, 0] = img[:, 32:64, 1] = img[:, 64:, 2] = 255
    d = tmp_path / "train" / "a"
    d.mkdir(parents=True)
    Image.fromarray(img).save(d / "x.png")
    # scale 1 and ratio 3: the crop is the whole 3:1 image (the centred square holds only green)
    cfg = build_config("tiny", None, {
        "data.uri": str(tmp_path), "probe.crop_scale": [1.0, 1.0], "probe.crop_ratio": [3.0, 3.0],
        "probe.hflip_prob": 0.0, "probe.rand_augment": "", "probe.random_erasing": 0.0})
    listing = list_split(cfg.data, "train")
    rows = train_stream(cfg, listing, 0).take_all()
    view = rows[0]["image"]
    assert view.shape == (32, 32, 3)
    means = view.reshape(-1, 3).mean(0)
    assert means[0] > 40 and means[2] > 40 and means[1] > 40  # red, green and blue all in view


@pytest.mark.slow
def test_augmented_views_are_the_same_in_every_copy_of_the_data(tmp_path, ray_cluster):
    """Crops, flips, RandAugment and erasing are drawn per file from its path below the split's
    folder: a copy elsewhere gives the very same views (and another seed other ones)."""
    for copy in ("a", "b/deeper"):
        for i in range(6):
            d = tmp_path / copy / "train" / f"c{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.random.default_rng(i).integers(0, 256, (40, 48, 3), np.uint8)).save(d / f"{i}.png")

    def views(copy: str, seed: int = 0) -> list[bytes]:  # the views' pixels, in a set order
        cfg = build_config("tiny", None, {"data.uri": str(tmp_path / copy), "probe.seed": seed,
                                          "probe.random_erasing": 0.5})
        rows = train_stream(cfg, list_split(cfg.data, "train"), 0).take_all()
        return sorted(r["image"].tobytes() + bytes([r["label"]]) for r in rows)

    a, b, other_seed = views("a"), views("b/deeper"), views("a", seed=1)
    assert len(a) == len(set(a)) == 6
    assert a == b
    assert len(set(a) & set(other_seed)) <= 1
