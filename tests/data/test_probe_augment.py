"""The attentive probe's augmentations: RandAugment ops and random erasing are deterministic per
seed and keep uint8 range and shape; the augmented view is Table 2's pipeline."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.data.probe_augment import (
    OPS,
    RAND_INCREASING_OPS,
    RandAugment,
    apply_op,
    random_erasing,
)
from pipelines.probe.views import AugmentSpec, augment_view, center_crop


def photo(seed: int = 0, size: int = 24) -> np.ndarray:
    """A smooth colour gradient plus noise: uint8 [size, size, 3], every op changes it."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx * 255 / size, yy * 255 / size, (xx + yy) * 127 / size], -1)
    return np.clip(base + rng.integers(-20, 21, base.shape), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(OPS))
@pytest.mark.parametrize("level", [0.0, 4.5, 10.0])
def test_every_op_is_deterministic_per_seed_and_keeps_uint8_shape(name: str, level: float):
    img = Image.fromarray(photo())
    a = np.asarray(apply_op(img, name, level, np.random.default_rng(7), (124, 116, 104)))
    b = np.asarray(apply_op(img, name, level, np.random.default_rng(7), (124, 116, 104)))
    assert a.dtype == np.uint8 and a.shape == (24, 24, 3)
    np.testing.assert_array_equal(a, b)


def test_geometric_ops_fill_with_the_mean_colour_and_move_pixels():
    img = Image.fromarray(photo())
    fill = (124, 116, 104)
    # a translation by 45% of the side at level 10: the uncovered columns are the fill colour
    out = np.asarray(apply_op(img, "TranslateXRel", 10.0, np.random.default_rng(0), fill))
    cols = np.where((out == fill).all(axis=(0, 2)))[0]
    assert len(cols) >= int(0.45 * 24) - 1
    # magnitude 0 of an increasing op is the identity; magnitude 10 is not
    src = np.asarray(img)
    same = np.asarray(apply_op(img, "SolarizeIncreasing", 0.0, np.random.default_rng(0)))
    np.testing.assert_array_equal(same, src)
    assert not np.array_equal(np.asarray(apply_op(img, "SolarizeIncreasing", 10.0,
                                                  np.random.default_rng(0))), src)


def test_rand_augment_spec_parses_timm_strings():
    ra = RandAugment.from_spec("rand-m9-mstd0.5-inc1")
    assert (ra.magnitude, ra.num_ops, ra.magnitude_std, ra.increasing) == (9.0, 2, 0.5, True)
    assert ra.ops == RAND_INCREASING_OPS and len(ra.ops) == 15
    assert RandAugment.from_spec("rand-n3").magnitude == 10.0
    assert RandAugment.from_spec("rand-n3").num_ops == 3 and not RandAugment.from_spec("rand").increasing
    with pytest.raises(ValueError, match="unknown section 'x'"):
        RandAugment.from_spec("rand-m9-x1")
    with pytest.raises(ValueError, match="must start with 'rand'"):
        RandAugment.from_spec("v0")


def test_rand_augment_is_deterministic_per_seed_and_varies_across_seeds():
    ra = RandAugment.from_spec("rand-m9-mstd0.5-inc1", (124, 116, 104))
    img = Image.fromarray(photo())
    outs = [np.asarray(ra(img, np.random.default_rng(s))) for s in range(20)]
    again = [np.asarray(ra(img, np.random.default_rng(s))) for s in range(20)]
    for a, b in zip(outs, again):
        assert a.dtype == np.uint8 and a.shape == (24, 24, 3)
        np.testing.assert_array_equal(a, b)
    distinct = {o.tobytes() for o in outs}
    assert len(distinct) >= 12  # two ops of 15 at p=0.5: most seeds give a different image


def test_random_erasing_replaces_one_box_with_noise_and_keeps_uint8():
    img = photo(1, 32)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    a = random_erasing(img, np.random.default_rng(3), 1.0, mean, std)
    b = random_erasing(img, np.random.default_rng(3), 1.0, mean, std)
    np.testing.assert_array_equal(a, b)
    assert a.dtype == np.uint8 and a.shape == img.shape
    changed = (a != img).any(-1)  # [H, W]
    rows, cols = np.where(changed)
    box = (rows.max() - rows.min() + 1) * (cols.max() - cols.min() + 1)
    assert 0.02 * 32 * 32 * 0.5 <= box <= 32 * 32 / 3 * 1.3  # one box of 2%..33% of the area
    assert changed.sum() >= 0.8 * box  # noise fills the box (a few pixels may match by chance)
    np.testing.assert_array_equal(random_erasing(img, np.random.default_rng(3), 0.0, mean, std), img)
    hits = sum(not np.array_equal(random_erasing(img, np.random.default_rng(s), 0.25, mean, std), img)
               for s in range(400))
    assert 60 <= hits <= 140  # probability 0.25


def test_augmented_view_is_seeded_and_has_the_encoder_size():
    spec = AugmentSpec(size=16, crop_scale=(0.08, 1.0), crop_ratio=(0.75, 4 / 3), hflip_prob=0.5,
                       rand_augment="rand-m9-mstd0.5-inc1", random_erasing=0.25,
                       mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), seed=0, epoch=0)
    ra = RandAugment.from_spec(spec.rand_augment)
    src = photo(2, 40)
    a = augment_view(src, np.random.default_rng(5), spec, ra)
    b = augment_view(src, np.random.default_rng(5), spec, ra)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (16, 16, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, augment_view(src, np.random.default_rng(6), spec, ra))


def test_center_crop_takes_the_middle():
    images = np.arange(2 * 10 * 10 * 3, dtype=np.int64).reshape(2, 10, 10, 3)
    out = center_crop(images, 6)
    assert out.shape == (2, 6, 6, 3)
    np.testing.assert_array_equal(out, images[:, 2:8, 2:8])


def test_center_crop_of_a_read_only_batch_is_a_writable_array_torch_takes_without_a_warning():
    import warnings

    import torch

    images = np.arange(2 * 10 * 10 * 3, dtype=np.uint8).reshape(2, 10, 10, 3)
    images.setflags(write=False)  # as Ray Data hands batches to map_batches / iter_batches
    out = center_crop(images, 6)
    assert out.flags.writeable and out.flags.c_contiguous
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch's "The given NumPy array is not writable"
        tensor = torch.from_numpy(out)
    np.testing.assert_array_equal(tensor.numpy(), images[:, 2:8, 2:8])
    whole = np.zeros((1, 6, 6, 3), np.uint8)  # already the size, writable: no copy
    assert np.shares_memory(center_crop(whole, 6), whole)
