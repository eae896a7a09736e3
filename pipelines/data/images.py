"""Decoding and augmenting one image (no Ray), plus `normalize` for the training worker.

- `ImageSource.open(data, max_pixels)`: the header only (size, format); pixels are decoded later,
  at the reduction the crop allows. Formats: `SUPPORTED_FORMATS` (what `pipelines.data.listing`
  lists); anything else, empty, truncated or corrupt data, or more pixels than `max_pixels`
  (decompression bomb) raises `BadImage` with the reason. Grayscale, palette, RGBA/LA, CMYK and 16-bit images
  become 8-bit RGB.
- `random_resized_crop_params`: torchvision's RandomResizedCrop sampling (10 attempts, then a
  centre crop clipped to the ratio range), on an explicit numpy Generator.
- `train_transform` / `eval_transform`: bytes -> uint8 array `[size, size, 3]` (HWC).

The fast path (what makes ImageNet-sized JPEGs cheap), pixel for pixel the usual PIL recipe
(full decode, RandomResizedCrop with bicubic resampling as the reference code's
`interpolation=3`, horizontal flip, as torchvision does it):
1. The crop box and the flip are drawn from the full-size dimensions read in the header, in the
   same order as the recipe (crop, then flip): the same boxes and flips for a seed.
2. JPEGs (YCbCr or grayscale) are decoded by libjpeg-turbo (`simplejpeg`) straight into a numpy
   array, reduced in the DCT domain by 2, 4 or 8 only as far as the crop keeps >= 2 x `size`
   pixels per side, so that the bicubic filter still does at least a 2x reduction (this keeps the
   DCT filter's own difference small: mean |diff| ~0.6 level on a strongly textured photo at 1/2,
   vs ~2.2 at 1/4 followed by a 1.1x resize). ImageNet-sized images are decoded whole (a 224 px
   crop would need >= 896 px per side); large photos gain. Factors between 1 and 2 exist in
   libjpeg-turbo but decode slower than 1, so they are not used. Other JPEGs (CMYK, unusual
   sampling) and anything libjpeg-turbo's strict mode rejects go through PIL, whose verdict
   counts: the same files are bad on both paths.
3. Crop, then resize the crop alone (torchvision's semantics: the filter sees only the crop) with
   torch's uint8 antialiased bicubic kernel (PIL's filter, vectorised: ~5x faster than PIL's
   resize). Differences against PIL's `crop().resize(BICUBIC)`: 0 or 1 level for >= 99.9% of the
   values; rare values next to clipped (0 / 255) edges differ by more, because the two kernels
   run their separable passes in a different order and clip the intermediate image there.
4. uint8 HWC out: 1/4 of the bytes of float through the object store; `normalize` runs on the
   training worker's device.

`file_rng(seed, epoch, key)`: the per-file random stream, so that (seed, epoch) reproduces every
crop and flip whatever the block boundaries or worker scheduling; `draw_key(path, root)` is the key,
the file's path below the dataset's folder, so a copy of the data elsewhere draws the same ones.
`normalize(x_uint8 [B, H, W, 3], mean, std) -> float32 [B, 3, H, W]`: on the training worker.

Decoding on GPU nodes instead (no CPU pool), with the cores-per-GPU figure: benchmarks/README.md,
section 5.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import simplejpeg
import torch
import torch.nn.functional as F
from PIL import Image, ImageFile, UnidentifiedImageError

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is a bad file, not a grey stripe

CropBox = tuple[int, int, int, int]  # (top, left, height, width) in pixels of the full image

# PIL plugins tried on a file (the formats of pipelines.data.listing.IMAGE_EXTENSIONS; MPO, the
# multi-picture JPEG of cameras, opens through "JPEG"). Nothing else is parsed, whatever the bytes.
SUPPORTED_FORMATS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF", "PPM")
DCT_REDUCTIONS = (8, 4, 2)  # libjpeg-turbo's SIMD-fast DCT-domain downscales, largest first
_JPEG_SOI = b"\xff\xd8\xff"
_FAST_COLORSPACES = ("YCbCr", "Gray")  # what simplejpeg turns into RGB exactly as PIL does


class BadImage(ValueError):
    """A file that is not a usable image; the message is the reason (no path)."""


def file_rng(seed: int, epoch: int, path: str) -> np.random.Generator:
    """A Generator that depends only on (seed, epoch, path): stable across processes and runs."""
    digest = hashlib.blake2b(path.encode("utf-8"), digest_size=8).digest()
    return np.random.default_rng([seed, epoch, int.from_bytes(digest, "little")])


def draw_key(path: str, root: str) -> str:
    """The name a file's random draws are keyed by (`file_rng`'s `path`): its path below the
    dataset's folder `root` (ending in "/"), so that every copy of a dataset (another folder,
    another bucket, local or S3) draws the same crops and flips; a path outside `root` (or
    `root` "") keys by itself."""
    return path[len(root) :] if root and path.startswith(root) else path


def _check_size(w: int, h: int, max_pixels: int) -> None:
    if w < 1 or h < 1:
        raise BadImage(f"image has no pixels ({w}x{h})")
    if w * h > max_pixels:
        raise BadImage(f"decompression bomb: {w}x{h} = {w * h} pixels > limit {max_pixels}")


def allow_pillow_pixels(max_pixels: int) -> None:
    """Raise Pillow's own decompression-bomb cap (an error above 2 x `Image.MAX_IMAGE_PIXELS`,
    i.e. 178,956,970 pixels by default) as far as `max_pixels` needs, so that
    `data.max_image_pixels` is the limit for every format (PNG, TIFF, ... included). Only ever
    raised, never lowered; `_check_size` enforces `max_pixels` itself after every header."""
    cap = Image.MAX_IMAGE_PIXELS
    if cap is not None and 2 * cap < max_pixels:
        Image.MAX_IMAGE_PIXELS = -(-max_pixels // 2)


def open_image(data: bytes, max_pixels: int) -> Image.Image:
    """Parse the header only (PIL, `SUPPORTED_FORMATS`); reject empty files, other formats,
    non-images and images over `max_pixels` (whatever Pillow's own cap: `allow_pillow_pixels`)."""
    if not data:
        raise BadImage("empty file")
    allow_pillow_pixels(max_pixels)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.DecompressionBombError as e:
        raise BadImage(f"decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise BadImage(
            f"not an image (not one of the supported formats {', '.join(SUPPORTED_FORMATS)})"
        ) from None
    except Exception as e:  # SyntaxError from broken headers, ...
        raise BadImage(f"not an image: {type(e).__name__}: {e}") from None
    _check_size(*img.size, max_pixels)
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


def dct_reduction(box: CropBox, size: int) -> int:
    """The largest of 8, 4, 2 (else 1) that leaves the crop >= 2 x `size` pixels per side."""
    _, _, h, w = box
    return next((f for f in DCT_REDUCTIONS if min(h, w) >= 2 * size * f), 1)


@dataclass
class ImageSource:
    """An image whose header has been read and whose pixels are not decoded yet.

    `width`, `height`: the full-size dimensions (what crop boxes are drawn from). `jpeg`: the bytes,
    when libjpeg-turbo decodes them (YCbCr or grayscale JPEG); `pil`: else the image opened by PIL.
    `pixels(reduction)`: uint8 [ceil(H / r'), ceil(W / r'), 3] RGB, r' <= `reduction` (JPEGs are
    reduced in the DCT domain, other formats are decoded whole).
    """

    width: int
    height: int
    max_pixels: int
    jpeg: bytes | None = None
    pil: Image.Image | None = None

    @classmethod
    def open(cls, data: bytes, max_pixels: int, min_side: int = 1) -> ImageSource:
        """Read the header of `data`; raises BadImage (see `open_image`, and for a side under
        `min_side`: `data.min_image_side`)."""
        header = _fast_jpeg_header(data)
        if header is None:
            img = open_image(data, max_pixels)
            source = cls(*img.size, max_pixels, pil=img)
        else:
            _check_size(*header, max_pixels)
            source = cls(*header, max_pixels, jpeg=data)
        if min(source.width, source.height) < min_side:
            raise BadImage(f"{source.width}x{source.height} image < data.min_image_side={min_side}")
        return source

    def pixels(self, reduction: int = 1) -> np.ndarray:
        if self.jpeg is not None:
            try:
                return simplejpeg.decode_jpeg(
                    self.jpeg,
                    colorspace="rgb",
                    min_height=-(-self.height // reduction),
                    min_width=-(-self.width // reduction),
                    min_factor=reduction,
                )  # uint8 [ceil(H / r), ceil(W / r), 3]
            except ValueError:  # truncated, corrupt, or a warning in strict mode: PIL decides
                self.pil, self.jpeg = open_image(self.jpeg, self.max_pixels), None
        img = self.pil
        assert img is not None
        if reduction > 1 and img.format in ("JPEG", "MPO") and getattr(img, "tile", None):
            # draft picks the largest of 1/2, 1/4, 1/8 with the result >= the requested size
            img.draft("RGB", (max(1, self.width // reduction), max(1, self.height // reduction)))
        return np.array(to_rgb(img), dtype=np.uint8)  # [h, w, 3], writable


def _fast_jpeg_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a JPEG that libjpeg-turbo decodes to RGB like PIL; else None."""
    if not data.startswith(_JPEG_SOI):
        return None
    try:
        height, width, colorspace, _ = simplejpeg.decode_jpeg_header(data)
    except ValueError:  # broken header, unusual sampling: PIL decides
        return None
    return (width, height) if colorspace in _FAST_COLORSPACES else None


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


def resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """uint8 [h, w, 3] -> uint8 [size, size, 3]: bicubic, antialiased when shrinking (PIL's filter).

    torch's uint8 kernel on a strided view (no copy in); one thread per decode worker."""
    x = torch.from_numpy(pixels).permute(2, 0, 1).unsqueeze(0)  # [1, 3, h, w], HWC strides
    out = F.interpolate(x, size=(size, size), mode="bicubic", antialias=True, align_corners=False)
    return np.ascontiguousarray(out[0].permute(1, 2, 0).numpy())  # [size, size, 3]


def crop_resize(source: ImageSource | Image.Image, box: CropBox, size: int) -> np.ndarray:
    """Crop `box` (full-size pixels) of `source` and resize it to `size` x `size`: uint8 [S, S, 3].

    Decoded at the DCT reduction the box allows (`dct_reduction`). Whole (the usual case): crop,
    then torch's bicubic resize. Reduced: the box in reduced pixels is fractional, so PIL's
    bicubic resize takes it exactly (`box=` in floats; rounding it to whole reduced pixels would
    shift the crop by up to half a reduced pixel). A PIL image still undecoded is drafted the same
    way."""
    if isinstance(source, Image.Image):
        source = ImageSource(*source.size, max_pixels=source.size[0] * source.size[1], pil=source)
    top, left, h, w = box
    pixels = source.pixels(dct_reduction(box, size))  # [h', w', 3]
    ph, pw = pixels.shape[:2]
    if (pw, ph) == (source.width, source.height):
        return resize(pixels[top : top + h, left : left + w], size)  # the filter sees only the crop
    sx, sy = pw / source.width, ph / source.height  # reduced by >= 2: crop >= 2 x size px still
    reduced_box = (left * sx, top * sy, (left + w) * sx, (top + h) * sy)
    out = Image.fromarray(pixels).resize((size, size), Image.Resampling.BICUBIC, box=reduced_box)
    return np.array(out, dtype=np.uint8)


def train_transform(
    data: bytes,
    rng: np.random.Generator,
    size: int,
    scale: Sequence[float],
    ratio: Sequence[float],
    hflip_prob: float,
    max_pixels: int,
    min_side: int = 1,
) -> np.ndarray:
    """Table 1: RandomResizedCrop(scale, ratio) to `size` + horizontal flip with `hflip_prob`.

    bytes -> uint8 [size, size, 3]; raises BadImage (also for a side under `min_side`, from the
    header, before anything is drawn or decoded). Draws, in order: the crop, then the flip.
    """
    source = ImageSource.open(data, max_pixels, min_side)
    box = random_resized_crop_params(rng, source.width, source.height, scale, ratio)
    flip = rng.random() < hflip_prob
    out = crop_resize(source, box, size)
    return np.ascontiguousarray(out[:, ::-1]) if flip else out


def eval_transform(data: bytes, size: int, max_pixels: int, min_side: int = 1) -> np.ndarray:
    """Resize the shorter side to `size` and take the centre `size` x `size`: uint8 [size, size, 3]
    (BadImage for a side under `min_side`, from the header)."""
    source = ImageSource.open(data, max_pixels, min_side)
    return crop_resize(source, center_crop_params(source.width, source.height), size)


def normalize(
    images: torch.Tensor, mean: Sequence[float], std: Sequence[float]
) -> torch.Tensor:
    """uint8 [B, H, W, 3] (as batches arrive) -> float32 [B, 3, H, W], (x/255 - mean) / std."""
    if images.dim() != 4 or images.shape[-1] != 3:
        raise ValueError(f"expected uint8 images [B, H, W, 3], got shape {tuple(images.shape)}")
    x = images.to(torch.float32).permute(0, 3, 1, 2).contiguous().div_(255.0)  # [B, 3, H, W]
    m = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return x.sub_(m).div_(s)
