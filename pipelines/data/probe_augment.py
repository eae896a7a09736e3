"""The probe's augmentations (Table 2 and the reference's eval configs; pretraining's crop + flip
live in `images.py`): timm's RandAugment spec parser, RandAugment and random erasing on PIL /
numpy, with every random draw taken from an explicit numpy Generator.

- `RandAugment.from_spec("rand-m9-mstd0.5-inc1")`: timm's RandAugment string. `n` ops per image
  (default 2) drawn with replacement from the 15 ops (`inc1`: the variants whose severity grows with
  the magnitude), each applied with probability 0.5 at a magnitude ~ N(m, mstd) clipped to
  [0, 10]; geometric ops resample bicubically and fill with the dataset's mean colour.
- `random_erasing(image, rng, prob, mean, std)`: timm's RandomErasing (`re_mode='pixel'`, one box):
  with probability `prob` one box of 2%-33% of the area, aspect ratio in [0.3, 3.3], is replaced by
  per-pixel noise N(0, 1) in normalised space. timm erases the normalised float tensor; here the
  noise is mapped back to uint8 (mean + std * z) * 255, clipped to [0, 255], so images stay uint8
  on their way to the encoder (only the |z| tails beyond the uint8 range differ).

Images are uint8 RGB: PIL images for RandAugment, numpy [H, W, 3] for erasing. Same seed, same
output: each function takes a `numpy.random.Generator` and draws from nothing else.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

LEVEL_DENOM = 10.0  # magnitudes are on a 0..10 scale ("m9")

# timm's _RAND_TRANSFORMS and _RAND_INCREASING_TRANSFORMS (Cutout is random erasing, separately)
RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY", "TranslateXRel",
    "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)
TRANSLATE_PCT = 0.45  # TranslateXRel/YRel move by up to 45% of the side at magnitude 10


def mean_fill(mean: Sequence[float]) -> tuple[int, int, int]:
    """The fill colour of geometric ops: the dataset mean in uint8, as timm's `img_mean`."""
    return tuple(min(255, round(255 * m)) for m in mean)  # type: ignore[return-value]


# --------------------------------------------------------------------------- ops


def _signed(v: float, rng: np.random.Generator) -> float:
    """With probability 1/2, -v (timm's `_randomly_negate`)."""
    return -v if rng.random() > 0.5 else v


def _enhance_increasing(level: float, rng: np.random.Generator) -> float:
    """Blend factor moving away from 1 (no change) with the level: in [0.1, 1.9]."""
    return max(0.1, 1.0 + _signed(level / LEVEL_DENOM * 0.9, rng))


def _enhance(level: float, _rng: np.random.Generator) -> float:
    return level / LEVEL_DENOM * 1.8 + 0.1


def _affine(img: Image.Image, coeffs: tuple[float, ...], fill: tuple[int, int, int]) -> Image.Image:
    return img.transform(img.size, Image.Transform.AFFINE, coeffs,
                         resample=Image.Resampling.BICUBIC, fillcolor=fill)


def _solarize_add(img: Image.Image, add: int, thresh: int = 128) -> Image.Image:
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _posterize(img: Image.Image, bits: int) -> Image.Image:
    """Keep the `bits` high bits of each channel; 0 bits is black (older PIL's result, which
    timm's PosterizeIncreasing reaches at magnitude 10 and PIL >= 11 refuses)."""
    if bits >= 8:
        return img
    if bits <= 0:
        return Image.new(img.mode, img.size)
    return ImageOps.posterize(img, bits)


Op = Callable[[Image.Image, float, np.random.Generator, tuple[int, int, int]], Image.Image]

OPS: dict[str, Op] = {
    "AutoContrast": lambda img, lv, rng, fill: ImageOps.autocontrast(img),
    "Equalize": lambda img, lv, rng, fill: ImageOps.equalize(img),
    "Invert": lambda img, lv, rng, fill: ImageOps.invert(img),
    "Rotate": lambda img, lv, rng, fill: img.rotate(
        _signed(lv / LEVEL_DENOM * 30.0, rng), resample=Image.Resampling.BICUBIC, fillcolor=fill),
    "Posterize": lambda img, lv, rng, fill: _posterize(img, int(lv / LEVEL_DENOM * 4)),
    "PosterizeIncreasing": lambda img, lv, rng, fill: _posterize(img, 4 - int(lv / LEVEL_DENOM * 4)),
    "Solarize": lambda img, lv, rng, fill: ImageOps.solarize(img, int(lv / LEVEL_DENOM * 256)),
    "SolarizeIncreasing": lambda img, lv, rng, fill: ImageOps.solarize(
        img, 256 - int(lv / LEVEL_DENOM * 256)),
    "SolarizeAdd": lambda img, lv, rng, fill: _solarize_add(img, int(lv / LEVEL_DENOM * 110)),
    "Color": lambda img, lv, rng, fill: ImageEnhance.Color(img).enhance(_enhance(lv, rng)),
    "ColorIncreasing": lambda img, lv, rng, fill: ImageEnhance.Color(img).enhance(
        _enhance_increasing(lv, rng)),
    "Contrast": lambda img, lv, rng, fill: ImageEnhance.Contrast(img).enhance(_enhance(lv, rng)),
    "ContrastIncreasing": lambda img, lv, rng, fill: ImageEnhance.Contrast(img).enhance(
        _enhance_increasing(lv, rng)),
    "Brightness": lambda img, lv, rng, fill: ImageEnhance.Brightness(img).enhance(_enhance(lv, rng)),
    "BrightnessIncreasing": lambda img, lv, rng, fill: ImageEnhance.Brightness(img).enhance(
        _enhance_increasing(lv, rng)),
    "Sharpness": lambda img, lv, rng, fill: ImageEnhance.Sharpness(img).enhance(_enhance(lv, rng)),
    "SharpnessIncreasing": lambda img, lv, rng, fill: ImageEnhance.Sharpness(img).enhance(
        _enhance_increasing(lv, rng)),
    "ShearX": lambda img, lv, rng, fill: _affine(
        img, (1, _signed(lv / LEVEL_DENOM * 0.3, rng), 0, 0, 1, 0), fill),
    "ShearY": lambda img, lv, rng, fill: _affine(
        img, (1, 0, 0, _signed(lv / LEVEL_DENOM * 0.3, rng), 1, 0), fill),
    "TranslateXRel": lambda img, lv, rng, fill: _affine(
        img, (1, 0, _signed(lv / LEVEL_DENOM * TRANSLATE_PCT, rng) * img.size[0], 0, 1, 0), fill),
    "TranslateYRel": lambda img, lv, rng, fill: _affine(
        img, (1, 0, 0, 0, 1, _signed(lv / LEVEL_DENOM * TRANSLATE_PCT, rng) * img.size[1]), fill),
}


def apply_op(
    img: Image.Image, name: str, level: float, rng: np.random.Generator,
    fill: tuple[int, int, int] = (128, 128, 128),
) -> Image.Image:
    """One RandAugment op at `level` (0..10) on an RGB image; signed ops draw their sign from rng."""
    if name not in OPS:
        raise ValueError(f"unknown RandAugment op {name!r}; valid ops: {sorted(OPS)}")
    return OPS[name](img, level, rng, fill)


# --------------------------------------------------------------------------- RandAugment


def parse_rand_augment(spec: str) -> dict[str, Any]:
    """timm's RandAugment spec `rand-m9-mstd0.5-inc1` -> keyword arguments (magnitude, num_ops,
    magnitude_std, increasing; m defaults to 10); ValueError naming a bad section."""
    parts = spec.split("-")
    if parts[0] != "rand":
        raise ValueError(f"RandAugment spec {spec!r} must start with 'rand'")
    kw: dict[str, Any] = {"magnitude": 10.0, "increasing": False}
    for part in parts[1:]:
        m = re.fullmatch(r"([a-z]+)(\d.*)", part)
        if not m:
            raise ValueError(f"RandAugment spec {spec!r}: cannot read section {part!r}")
        key, val = m.groups()
        try:
            if key == "m":
                kw["magnitude"] = float(val)
            elif key == "n":
                kw["num_ops"] = int(val)
            elif key == "mstd":
                kw["magnitude_std"] = float(val)
            elif key == "inc":
                kw["increasing"] = bool(int(val))
            else:
                raise ValueError(f"RandAugment spec {spec!r}: unknown section {key!r} "
                                 "(valid: m, n, mstd, inc)")
        except ValueError as e:
            if "unknown section" in str(e):
                raise
            raise ValueError(f"RandAugment spec {spec!r}: bad number in section {part!r}") from None
    kw.setdefault("magnitude_std", 0.0)
    return kw


@dataclass(frozen=True)
class RandAugment:
    """timm's RandAugment: `num_ops` ops per image, each applied with `prob` at magnitude
    ~ N(magnitude, magnitude_std) clipped to [0, 10]."""

    magnitude: float = 9.0
    num_ops: int = 2
    magnitude_std: float = 0.5
    increasing: bool = True
    prob: float = 0.5
    fill: tuple[int, int, int] = (128, 128, 128)

    @classmethod
    def from_spec(cls, spec: str, fill: tuple[int, int, int] = (128, 128, 128)) -> RandAugment:
        """timm's `rand-m9-mstd0.5-inc1` (read by `parse_rand_augment`)."""
        kw = parse_rand_augment(spec)
        return cls(fill=fill, **kw)

    @property
    def ops(self) -> tuple[str, ...]:
        return RAND_INCREASING_OPS if self.increasing else RAND_OPS

    def __call__(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        """RGB image -> augmented RGB image of the same size."""
        ops = self.ops
        for i in rng.integers(0, len(ops), size=self.num_ops):  # with replacement, as timm
            if rng.random() > self.prob:
                continue
            level = self.magnitude
            if self.magnitude_std > 0:
                level = rng.normal(level, self.magnitude_std)
            level = float(min(max(level, 0.0), LEVEL_DENOM))
            img = apply_op(img, ops[int(i)], level, rng, self.fill)
        return img


# --------------------------------------------------------------------------- random erasing


def random_erasing(
    image: np.ndarray,
    rng: np.random.Generator,
    prob: float,
    mean: Sequence[float],
    std: Sequence[float],
    area: tuple[float, float] = (0.02, 1 / 3),
    ratio: tuple[float, float] = (0.3, 1 / 0.3),
) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [H, W, 3], one box erased with per-pixel noise w.p. `prob`.

    timm's RandomErasing(mode='pixel', max_count=1): up to 10 attempts at a box of area fraction
    ~U(area) and log-uniform aspect ratio that fits strictly inside the image."""
    if rng.random() > prob:
        return image
    h_img, w_img = image.shape[:2]
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = rng.uniform(*area) * h_img * w_img
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        h = int(round(math.sqrt(target * aspect)))
        w = int(round(math.sqrt(target / aspect)))
        if w < w_img and h < h_img:
            top = int(rng.integers(0, h_img - h + 1))
            left = int(rng.integers(0, w_img - w + 1))
            z = rng.standard_normal((h, w, 3))  # noise in normalised space
            pixels = (np.asarray(mean) + np.asarray(std) * z) * 255.0  # [h, w, 3]
            out = image.copy()
            out[top : top + h, left : left + w] = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)
            return out
    return image
