"""Decoding and augmenting one image: PIL + numpy only (no Ray), plus `normalize` for the worker.

- `decode(data, max_pixels)`: bytes -> RGB PIL image. Grayscale, palette, RGBA/LA, CMYK and 16-bit
  images become 8-bit RGB; anything that does not decode (empty, truncated, not an image, more
  pixels than `max_pixels`) raises `BadImage` with the reason.
- `random_resized_crop_params`: torchvision's RandomResizedCrop sampling (10 attempts, then a
  centre crop clipped to the ratio range), on an explicit numpy Generator.
- `train_transform` / `eval_transform`: bytes -> uint8 array `[size, size, 3]` (HWC). The crop box is
  drawn on the full-resolution size; JPEGs are then decoded at a reduced scale (`draft`) only as far
  as the crop still has at least `size` pixels per side, so the result matches a full decode up to
  resampling and large JPEGs cost a fraction of a full decode.
- `file_rng(seed, epoch, path)`: the per-file random stream, so that (seed, epoch) reproduces every
  crop and flip whatever the block boundaries or worker scheduling.
- `normalize(x_uint8 [B, H, W, 3], mean, std) -> float32 [B, 3, H, W]`: on the training worker.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

if TYPE_CHECKING:  # torch is imported by `normalize` only: decode workers never load it
    import torch

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a bad file, not a grey stripe

CropBox = tuple[int, int, int, int]  # (top, left, height, width) in pixels of the full image


class BadImage(ValueError):
    """A file that is not a usable image; the message is the reason (no path)."""


def file_rng(seed: int, epoch: int, path: str) -> np.random.Generator:
    """A Generator that depends only on (seed, epoch, path): stable across processes and runs."""
    digest = hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([seed, epoch, int.from_bytes(digest, "little")])


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only; reject empty files, non-images and images over `max_pixels`."""
    if not data:
        raise BadImage("empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage("not an image (no known image format)") from None
    except Exception as e:  # SyntaxError from broken headers, ...
        raise BadImage(f"not an image: {type(e).__name__}: {e}") from None
    w, h = img.size
    if w < 1 or h < 1:
        raise BadImage(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}")
    return img


def to_rgb(img: Image.Image) -> Image.Image:
    """Decode (if lazy) and convert to 8-bit RGB; raises BadImage on corrupt/truncated data."""
    try:
        img.load()
        if img.mode == "RGB":
            return img
        if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
            arr = np.asarray(img, dtype=np.uint32 if img.mode == "I" else np.uint16)
            shift = 8 if img.mode != "I" or arr.max(initial=0) > 255 else 0
            img = Image.fromarray((arr >> shift).clip(0, 255).astype(np.uint8))  # mode L
        elif img.mode == "P" and "transparency" in img.info:
            img = img.convert("RGBA")
        return img.convert("RGB")
    except BadImage:
        raise
    except Exception as e:  # OSError "image file is truncated", decoder errors, ...
        raise BadImage(f"cannot decode: {type(e).__name__}: {e}") from None


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """bytes -> RGB PIL image at full resolution; raises BadImage."""
    return to_rgb(open_image(data, max_pixels))


def random_resized_crop_params(
    rng: np.random.Generator,
    width: int,
    height: int,
    scale: Sequence[float],
    ratio: Sequence[float],
) -> CropBox:
    """torchvision's RandomResizedCrop.get_params: (top, left, height, width) of the crop.

    Ten attempts at an area fraction ~U(scale) and a log-uniform aspect ratio ~ratio that fits;
    else the largest centred crop whose aspect ratio is clipped into `ratio`.
    """
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w = width
        h = int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        h = height
        w = int(round(h * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def center_crop_params(width: int, height: int) -> CropBox:
    """The centred square of side min(width, height): resize-shorter-side + centre crop in one box."""
    side = min(width, height)
    return (height - side) // 2, (width - side) // 2, side, side


def crop_resize(img: Image.Image, box: CropBox, size: int) -> np.ndarray:
    """Crop `box` of the full-size image and resize it to `size` x `size` (bilinear, antialiased).

    JPEGs still undecoded are drafted (decoded at 1/2, 1/4 or 1/8 scale) as far as the crop keeps
    >= `size` pixels per side. Returns uint8 [size, size, 3].
    """
    top, left, h, w = box
    full_w, full_h = img.size
    if img.format == "JPEG" and getattr(img, "tile", None):
        # draft picks the largest reduction whose result is still >= the requested size
        want = (max(1, math.ceil(full_w * size / w)), max(1, math.ceil(full_h * size / h)))
        img.draft("RGB", want)
    rgb = to_rgb(img)
    if rgb.size != (full_w, full_h):  # drafted: the box in reduced pixels, at least 1 px wide
        sx, sy = rgb.size[0] / full_w, rgb.size[1] / full_h
        x0, y0 = round(left * sx), round(top * sy)
        x1 = max(x0 + 1, min(rgb.size[0], round((left + w) * sx)))
        y1 = max(y0 + 1, min(rgb.size[1], round((top + h) * sy)))
    else:
        x0, y0, x1, y1 = left, top, left + w, top + h
    # crop first, then resize: the filter sees only the crop (torchvision's semantics)
    out = rgb.crop((x0, y0, x1, y1)).resize((size, size), Image.Resampling.BILINEAR)
    return np.array(out, dtype=np.uint8)  # writable (np.asarray of a PIL image is read-only)


def train_transform(
    data: bytes,
    rng: np.random.Generator,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    hflip_prob: float,
    max_pixels: int,
) -> np.ndarray:
    """Table 1: RandomResizedCrop(scale, ratio) to `size` + horizontal flip with `hflip_prob`.

    bytes -> uint8 [size, size, 3]; raises BadImage. Draws, in order: the crop, then the flip.
    """
    img = open_image(data, max_pixels)
    box = random_resized_crop_params(rng, img.size[0], img.size[1], scale, ratio)
    flip = rng.random() < hflip_prob
    out = crop_resize(img, box, size)
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


def eval_transform(data: bytes, size: int, max_pixels: int) -> np.ndarray:
    """Resize the shorter side to `size` and take the centre `size` x `size`: uint8 [size, size, 3]."""
    img = open_image(data, max_pixels)
    return crop_resize(img, center_crop_params(*img.size), size)


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 [B, H, W, 3] (as batches arrive) -> float32 [B, 3, H, W], (x/255 - mean) / std."""
    import torch

    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {tuple(images.shape)}")
    x = images.to(torch.float32).permute(0, 3, 1, 2).contiguous().div_(255.0)  # [B, 3, H, W]
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)
