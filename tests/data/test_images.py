"""The fast decode + augment path against the usual PIL recipe (fast, no Ray).

The oracle is written here straight from torchvision's recipe on PIL: full decode, crop box drawn
from the full-size image, `crop().resize(BICUBIC)`, then `transpose(FLIP_LEFT_RIGHT)`. The product
(`pipelines.data.images`) reads the size from the header, decodes with libjpeg-turbo (reduced in
the DCT domain when the crop allows) and resizes with torch's uint8 kernel.

Tolerance, "equal within codec rounding": the decoded pixels are identical (the same
libjpeg-turbo, islow IDCT); after the resize, mean |difference| < 0.35 level and at most 0.5% of
the values off by more than 1 level. Shrinking crops differ in ~0.5% of the values by 1 (mean
~0.005); a crop narrower or shorter than the output (upsampled on that axis) rounds differently in
~25% of the values by 1 (mean ~0.27); next to clipped 0 / 255 edges the two kernels' different pass
order can differ by more, rarely. A crop box one pixel off (mean >= 5.8 here) or a missed flip
(>= 35) is far outside that: tested below, so these tests can fail. With a DCT-domain reduction
(large photos only, while the crop keeps >= 2 x size pixels per side) the reduced decode is
itself a different antialiasing filter (the box is taken exactly, in fractional reduced pixels):
mean < 1 on this strongly textured image (~0.6).
"""

from __future__ import annotations

import io
from functools import cache

import numpy as np
import pytest
from PIL import Image

from pipelines.data.images import (
    SUPPORTED_FORMATS,
    BadImage,
    ImageSource,
    crop_resize,
    dct_reduction,
    decode,
    eval_transform,
    open_image,
    random_resized_crop_params,
    train_transform,
)

SCALE, RATIO = (0.3, 1.0), (3 / 4, 4 / 3)  # Table 1
BIG = 10**9


def photo_like(w: int, h: int, seed: int = 0) -> np.ndarray:
    """uint8 [h, w, 3]: smooth shapes + 1/f texture + a little sensor noise, no clipping plateaus."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / max(w, h)
    base = np.stack([
        120 + 60 * np.sin(6 * xx + 2 * yy),
        110 + 50 * np.cos(5 * yy - 3 * xx),
        100 + 40 * np.sin(9 * xx * yy + 1),
    ], -1)
    spectrum = np.fft.rfft2(rng.standard_normal((h, w)))
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    texture = np.fft.irfft2(spectrum / np.maximum(np.hypot(fx, fy), 1.0 / max(w, h)), s=(h, w))
    texture *= 25 / texture.std()
    img = base + texture[..., None] + rng.normal(0, 3, (h, w, 3))
    return np.clip(img, 10, 245).astype(np.uint8)


def jpeg(arr: np.ndarray, **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", **{"quality": 90, **kw})
    return buf.getvalue()


def pil_recipe(
    data: bytes, rng: np.random.Generator, size: int, scale=SCALE, ratio=RATIO, hflip_prob=0.5,
    shift: int = 0,
) -> tuple[np.ndarray, tuple[int, int, int, int], bool]:
    """The oracle; `shift` moves the box right by that many pixels (to prove sensitivity)."""
    img = Image.open(io.BytesIO(data)).convert("RGB")  # full decode
    top, left, h, w = random_resized_crop_params(rng, img.size[0], img.size[1], scale, ratio)
    flip = rng.random() < hflip_prob
    left = min(left + shift, img.size[0] - w)
    out = img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)
    if flip:
        out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return np.asarray(out), (top, left, h, w), flip


def diff(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(mean |a - b|, fraction of values off by more than 1)."""
    d = np.abs(a.astype(np.int16) - b.astype(np.int16))
    return float(d.mean()), float((d > 1).mean())


@pytest.mark.parametrize(("w", "h", "size"), [(500, 375, 224), (500, 375, 256), (375, 500, 224),
                                              (333, 500, 256)])
def test_fast_path_gives_the_recipes_boxes_flips_and_pixels_for_a_seed(w: int, h: int, size: int) -> None:
    data = jpeg(photo_like(w, h, seed=w + size))
    flips, means = 0, []
    for seed in range(12):
        fast = train_transform(data, np.random.default_rng(seed), size, SCALE, RATIO, 0.5, BIG)
        ref, box, flip = pil_recipe(data, np.random.default_rng(seed), size)
        assert fast.shape == ref.shape == (size, size, 3) and fast.dtype == np.uint8
        assert dct_reduction(box, size) == 1  # ImageNet-sized: decoded whole
        mean, off = diff(fast, ref)
        assert mean < 0.35 and off < 0.005, (seed, box, flip, mean, off)
        means.append(mean)
        flips += flip
        # the tolerance tells boxes and flips apart: one pixel off, or the flip missed, fails it
        shifted, _, _ = pil_recipe(data, np.random.default_rng(seed), size, shift=1)
        if not np.array_equal(shifted, ref):  # (the box may already touch the right edge)
            assert diff(fast, shifted)[0] > 3.0
        assert diff(fast, ref[:, ::-1])[0] > 10.0
    assert 0 < flips < 12


def test_libjpeg_turbo_decode_equals_pils_full_decode_exactly() -> None:
    for subsampling in (0, 2):  # 4:4:4 and 4:2:0
        data = jpeg(photo_like(500, 375), subsampling=subsampling)
        source = ImageSource.open(data, BIG)
        assert source.jpeg is not None and (source.width, source.height) == (500, 375)
        assert np.array_equal(source.pixels(), np.asarray(decode(data, BIG)))
    gray = jpeg(photo_like(64, 48)[..., 0])
    assert np.array_equal(ImageSource.open(gray, BIG).pixels(), np.asarray(decode(gray, BIG)))


def test_dct_reduction_keeps_at_least_size_pixels_per_side() -> None:
    assert dct_reduction((0, 0, 375, 500), 224) == 1  # the whole ImageNet-sized image
    assert dct_reduction((0, 0, 896, 900), 224) == 2
    assert dct_reduction((0, 0, 895, 900), 224) == 1
    assert dct_reduction((0, 0, 1800, 2000), 224) == 4
    assert dct_reduction((0, 0, 3584, 4000), 224) == 8


@cache
def large_jpeg() -> bytes:
    return jpeg(photo_like(1024, 960, seed=3))


def test_large_jpeg_is_decoded_reduced_with_the_box_drawn_on_the_full_size() -> None:
    data = large_jpeg()
    scale, ratio = (0.9, 1.0), (1.0, 1.0)  # square crops >= 940 px: reduction 2 at 224 px
    assert ImageSource.open(data, BIG).pixels(2).shape == (480, 512, 3)  # really decoded at 1/2
    for seed in range(4):
        fast = train_transform(data, np.random.default_rng(seed), 224, scale, ratio, 0.5, BIG)
        ref, box, _ = pil_recipe(data, np.random.default_rng(seed), 224, scale=scale, ratio=ratio)
        assert dct_reduction(box, 224) == 2
        assert diff(fast, ref)[0] < 1.0


def test_eval_transform_is_the_recipes_resize_and_centre_crop() -> None:
    data = jpeg(photo_like(500, 375, seed=5))
    img = Image.open(io.BytesIO(data)).convert("RGB")
    ref = img.crop((62, 0, 437, 375)).resize((224, 224), Image.Resampling.BICUBIC)
    mean, off = diff(eval_transform(data, 224, BIG), np.asarray(ref))
    assert mean < 0.35 and off < 0.005


@pytest.mark.parametrize("where", ["before a header marker", "in the scan"])
def test_jpeg_that_libjpeg_turbo_only_warns_about_is_decoded_like_pil_does(where: str) -> None:
    """Strict libjpeg-turbo refuses "Corrupt JPEG data: extraneous bytes before marker" and a stray
    restart marker; PIL accepts both files, and so does the product (PIL decides): the same files
    are good on both paths, and no good file is counted bad."""
    data = jpeg(photo_like(120, 90))
    i = data.index(b"\xff\xdb") if where == "before a header marker" else data.rindex(b"\xff\xd9") - 50
    warned = data[:i] + (b"\x00\x00\x00" if where == "before a header marker" else b"\xff\xd3") + data[i:]
    source = ImageSource.open(warned, BIG)
    assert np.array_equal(source.pixels(), np.asarray(decode(warned, BIG)))
    assert source.pil is not None and source.jpeg is None  # PIL decoded it
    fast = train_transform(warned, np.random.default_rng(0), 64, SCALE, RATIO, 0.5, BIG)
    ref, _, _ = pil_recipe(warned, np.random.default_rng(0), 64)
    assert diff(fast, ref)[0] < 0.35


def test_cmyk_jpeg_goes_through_pil() -> None:
    buf = io.BytesIO()
    Image.fromarray(photo_like(80, 60)).convert("CMYK").save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    source = ImageSource.open(data, BIG)
    assert source.jpeg is None and source.pil is not None
    assert np.array_equal(source.pixels(), np.asarray(decode(data, BIG)))


def bad_jpegs() -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, a word the reason must contain); with a pixel limit of 100_000."""
    good = jpeg(photo_like(300, 200))  # 60_000 pixels
    sos = good.index(b"\xff\xda")  # start of scan: the header is complete before it
    return {
        "truncated in the scan": (good[: (sos + len(good)) // 2], "decode"),
        "truncated in the header": (good[: sos // 2], "not an image"),
        "garbage after the SOI marker": (good[:3] + bytes(range(256)) * 4, "not an image"),
        "text named .jpg": (b"GIF? no, just text in a file named photo.jpg\n", "not an image"),
        "empty": (b"", "empty"),
        "decompression bomb": (jpeg(photo_like(500, 375)), "bomb"),  # 187_500 pixels > 100_000
    }


@pytest.mark.parametrize("name", list(bad_jpegs()))
def test_bad_jpegs_raise_bad_image_on_the_fast_path(name: str) -> None:
    data, reason = bad_jpegs()[name]
    for transform in (
        lambda: train_transform(data, np.random.default_rng(0), 224, SCALE, RATIO, 0.5, 100_000),
        lambda: eval_transform(data, 224, 100_000),
    ):
        with pytest.raises(BadImage) as e:
            transform()
        assert reason in str(e.value), str(e.value)


def test_only_the_supported_formats_are_parsed() -> None:
    arr = photo_like(40, 30)
    for fmt in SUPPORTED_FORMATS:
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        assert open_image(buf.getvalue(), BIG).format == fmt
    for fmt in ("ICO", "TGA", "PCX", "SGI"):  # formats PIL reads but a dataset of photos does not hold
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, format=fmt)
        assert Image.open(io.BytesIO(buf.getvalue())).format == fmt  # PIL alone would open it
        with pytest.raises(BadImage, match="not one of the supported formats"):
            train_transform(buf.getvalue(), np.random.default_rng(0), 16, SCALE, RATIO, 0.5, BIG)


def test_crop_resize_of_an_opened_pil_image_drafts_a_large_jpeg() -> None:
    data = large_jpeg()
    img = open_image(data, BIG)
    out = crop_resize(img, (0, 0, 960, 1024), 224)  # reduction 2 allowed
    assert img.size == (512, 480) and out.shape == (224, 224, 3)  # PIL's draft really reduced it
    ref = Image.open(io.BytesIO(data)).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
    assert diff(out, np.asarray(ref))[0] < 1.0


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])  # libjpeg-turbo's header path and PIL's
def test_min_side_is_checked_from_the_header(fmt: str) -> None:
    buf = io.BytesIO()
    Image.fromarray(photo_like(40, 1)).save(buf, format=fmt)
    data = buf.getvalue()
    rng = np.random.default_rng(0)
    with pytest.raises(BadImage, match=r"^40x1 image < data.min_image_side=2$"):
        train_transform(data, rng, 32, SCALE, RATIO, 0.5, BIG, min_side=2)
    with pytest.raises(BadImage, match=r"^40x1 image < data.min_image_side=2$"):
        eval_transform(data, 32, BIG, min_side=2)
    assert train_transform(data, rng, 32, SCALE, RATIO, 0.5, BIG).shape == (32, 32, 3)  # min_side=1
