"""The images a probe sees, streamed by Ray Data: the eval view and the attentive probe's
augmented train view. The only place the probe calls `pipelines.data.stream.build_dataset`.

- Eval source: each file decoded to the centred square of its shorter side, resized to
  `probe.eval_resize` (default: the encoder's image size) by the data pipeline.
- Eval view (`eval_stream` + `center_crop`): that square centre-cropped to the encoder's image size,
  i.e. resize then centre crop as the reference's eval transform (B: 300 -> 256, H: 256 -> 224).
- Augmented view (`train_stream`): RandomResizedCrop(`probe.crop_scale`, `probe.crop_ratio`) of
  the WHOLE image, resized bicubically to the image size, and horizontal flip (`probe.hflip_prob`),
  by the data pipeline's decode (as pretraining's views, a new file order per epoch, `data.seed` =
  `probe.seed`); then, in the Ray Data tasks (`AugmentSpec`), RandAugment (`probe.rand_augment`)
  and random erasing (`probe.random_erasing`): timm's `create_transform(is_training=True, ...)`
  of the reference's attentive-probe configs, in timm's order. Each file's draws come from
  (`probe.seed`, epoch, the file's path below the split's folder): (seed, epoch) reproduces every
  view, in any copy of the data.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from pipelines.data.images import draw_key, file_rng, random_resized_crop_params
from pipelines.data.listing import Listing
from pipelines.data.probe_augment import RandAugment, mean_fill, random_erasing
from xtra_core.config import DataConfig, XTRAConfig

AUGMENT_SALT = 0xA7A7  # keeps the probe's per-file streams apart from pretraining's


def source_size(cfg: XTRAConfig) -> int:
    """Side of the decoded square: `probe.eval_resize`, default the encoder's image size."""
    return cfg.probe.eval_resize or cfg.model.image_size


def _source_data(cfg: XTRAConfig, train: bool) -> DataConfig:
    """The data section the probe decodes with: for train, the probe's RandomResizedCrop of the
    whole image (timm's and the reference's) and flip, drawn from `probe.seed`."""
    data = dataclasses.replace(cfg.data, seed=cfg.probe.seed)
    if train:
        p = cfg.probe
        data = dataclasses.replace(data, crop_scale=tuple(p.crop_scale), crop_ratio=tuple(p.crop_ratio),
                                   hflip_prob=p.hflip_prob)
    return data


def _stream(cfg: XTRAConfig, listing: Listing, epoch: int, train: bool) -> Any:
    from pipelines.data.stream import build_dataset

    size = cfg.model.image_size if train else source_size(cfg)
    return build_dataset(_source_data(cfg, train), size, "probe", epoch, train=train,
                         listing=listing, with_paths=True)


def center_crop(images: np.ndarray, size: int) -> np.ndarray:
    """uint8 [B, R, R, 3] -> the centred [B, size, size, 3] (torchvision's CenterCrop offsets),
    contiguous and writable, ready for `torch.from_numpy` (Ray Data's batches are read-only: they
    are copied only then, or when the crop is not contiguous)."""
    r_h, r_w = images.shape[1:3]
    top, left = int(round((r_h - size) / 2.0)), int(round((r_w - size) / 2.0))
    return np.require(images[:, top : top + size, left : left + size], requirements=["C", "W"])


def eval_stream(cfg: XTRAConfig, listing: Listing) -> Any:
    """Eval views in listing order (bad files dropped): rows image [R, R, 3] (crop with
    `center_crop` to the image size), label, path."""
    return _stream(cfg, listing, 0, train=False)


@dataclass(frozen=True)
class AugmentSpec:
    """What the augment tasks need (picklable)."""

    size: int
    crop_scale: tuple[float, float]
    crop_ratio: tuple[float, float]
    hflip_prob: float
    rand_augment: str
    random_erasing: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    seed: int
    epoch: int
    crop: bool = True  # False: the image is already the cropped, flipped view (train_stream)
    key_root: str = ""  # the listing's root URI: draws are keyed by the path below it (draw_key)

    @classmethod
    def of(cls, cfg: XTRAConfig, epoch: int, listing: Listing) -> AugmentSpec:
        p = cfg.probe
        root = listing.store.uri_of(listing.root) if listing.root else ""
        return cls(cfg.model.image_size, tuple(p.crop_scale), tuple(p.crop_ratio), p.hflip_prob,
                   p.rand_augment, p.random_erasing, tuple(cfg.data.mean), tuple(cfg.data.std),
                   p.seed, epoch, crop=False, key_root=root)


def augment_view(image: np.ndarray, rng: np.random.Generator, spec: AugmentSpec,
                 rand_augment: RandAugment | None) -> np.ndarray:
    """uint8 [H, W, 3] -> uint8 [S, S, 3]: crop (bicubic) and flip (if `spec.crop`; else the
    image is the [S, S, 3] view already), RandAugment, erasing, in order."""
    img = Image.fromarray(image)
    if spec.crop:
        h, w = image.shape[:2]
        top, left, ch, cw = random_resized_crop_params(rng, w, h, spec.crop_scale, spec.crop_ratio)
        img = img.resize((spec.size, spec.size), Image.Resampling.BICUBIC,
                         box=(left, top, left + cw, top + ch))
        if rng.random() < spec.hflip_prob:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    if rand_augment is not None:
        img = rand_augment(img, rng)
    out = np.array(img, dtype=np.uint8)
    if spec.random_erasing > 0:
        out = random_erasing(out, rng, spec.random_erasing, spec.mean, spec.std)
    return out


def augment_batch(batch: dict[str, np.ndarray], spec: AugmentSpec) -> dict[str, np.ndarray]:
    """Ray Data task: cropped, flipped views [B, S, S, 3] -> augmented views [B, S, S, 3]."""
    ra = RandAugment.from_spec(spec.rand_augment, mean_fill(spec.mean)) if spec.rand_augment else None
    seed = spec.seed + AUGMENT_SALT
    views = [
        augment_view(img, file_rng(seed, spec.epoch, draw_key(str(path), spec.key_root)), spec, ra)
        for img, path in zip(batch["image"], batch["path"])
    ]
    size = spec.size
    return {
        "image": np.stack(views) if views else np.zeros((0, size, size, 3), np.uint8),
        "label": batch["label"],
    }


def train_stream(cfg: XTRAConfig, listing: Listing, epoch: int) -> Any:
    """Epoch `epoch` of augmented train views in a fresh order: rows image [S, S, 3], label."""
    return _stream(cfg, listing, epoch, train=True).map_batches(
        augment_batch, fn_kwargs={"spec": AugmentSpec.of(cfg, epoch, listing)}, batch_format="numpy",
        batch_size=None,
    )
