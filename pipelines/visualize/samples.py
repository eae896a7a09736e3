"""A fixed, deterministic set of images from a dataset, for pictures: evenly spaced over the
split's sorted listing (so class folders are all visited), resized and centre-cropped."""

from __future__ import annotations

import itertools

import numpy as np

from pipelines.data.images import BadImage, eval_transform
from pipelines.data.listing import Listing, list_split
from pipelines.errors import UserError
from xtra_core.config import DataConfig


def pick_images(data: DataConfig, split: str, n: int, size: int) -> tuple[np.ndarray, list[str]]:
    """-> (uint8 [n', size, size, 3], their paths), n' = min(n, decodable images in the split)."""
    return sample_images(list_split(data, split), n, size, data.max_image_pixels)


def sample_images(listing: Listing, n: int, size: int, max_pixels: int) -> tuple[np.ndarray, list[str]]:
    """Evenly spaced rows of `listing`; an undecodable file is skipped for the next one."""
    paths = listing.table.column("path").to_pylist()
    if not paths:
        raise UserError(f"{listing.uri}: no images")
    start = np.linspace(0, len(paths), num=min(n, len(paths)), endpoint=False).astype(int).tolist()
    spaced = set(start)
    candidates = itertools.chain(start, (i for i in range(len(paths)) if i not in spaced))  # lazy
    images, chosen = [], []
    for i in candidates:
        if len(images) == n:
            break
        try:
            images.append(eval_transform(listing.read(i), size, max_pixels))
        except BadImage:
            continue
        chosen.append(paths[i])
    if not images:
        raise UserError(f"{listing.uri}: no decodable image")
    return np.stack(images), chosen


def pick_split(data: DataConfig, preferred: str | None) -> str:
    """`preferred`, else the test split if the dataset has one, else the train split."""
    if preferred:
        return preferred
    try:
        list_split(data, data.test_split)
        return data.test_split
    except UserError:
        return data.train_split
