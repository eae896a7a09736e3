"""The Figure-4 picture: a row per image with the input and its assembled next-block predictions,
the block grid drawn over both. As in the paper, the first block of the order (no prediction)
is de-normalised like the others: it shows its true mean colour."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from pipelines.data.images import normalize
from pipelines.visualize.picture import Layout, compose, draw_grid, upscale, upscale_factor
from pipelines.visualize.predictions import next_block_predictions, to_uint8
from xtra_core.config import ModelConfig
from xtra_core.model import XTRA

MIN_PANEL_PX = 160  # small images are upscaled (nearest) to at least this
COLUMNS = ["input", "next-block predictions"]


def figure4_layout(num_images: int, cfg: ModelConfig) -> Layout:
    return Layout(rows=num_images, cols=2, panel=cfg.image_size * upscale_factor(cfg.image_size, MIN_PANEL_PX))


def figure4_panels(
    inputs: np.ndarray, predictions: np.ndarray, predicted: np.ndarray, cfg: ModelConfig
) -> list[list[np.ndarray]]:
    """inputs, predictions: uint8 [B, H, W, 3]; predicted: bool [K] (raster block order, kept
    for callers; the unpredicted blocks are drawn as given) -> [[input panel, prediction panel],
    ...], upscaled, grid drawn."""
    scale = upscale_factor(cfg.image_size, MIN_PANEL_PX)
    cell = cfg.block_size * cfg.patch_size * scale  # one block, in panel pixels
    return [[draw_grid(upscale(x, scale), cell), draw_grid(upscale(p, scale), cell)]
            for x, p in zip(inputs, predictions)]


def render_figure4(
    inputs: np.ndarray,
    predictions: np.ndarray,
    predicted: np.ndarray,
    cfg: ModelConfig,
    out: str | Path,
    title: str = "",
    head: int = 0,
) -> np.ndarray:
    """Write the picture (PNG) to `out`; return it as uint8 [height, width, 3]."""
    layout = figure4_layout(len(inputs), cfg)
    order = f"{cfg.block_order} order" + (
        f" (seed {cfg.order_seed})" if cfg.block_order in ("random", "pseudo_random") else "")
    ahead = "next block" if head == 0 else f"block {head + 1} ahead (head {head})"
    heading = (title + "\n" if title else "") + (
        f"{cfg.blocks_per_side}x{cfg.blocks_per_side} blocks of {cfg.block_size * cfg.patch_size} px, "
        f"{order}\nteacher forcing, {ahead}; blocks without a prediction: their mean colour"
    )
    return compose(figure4_panels(inputs, predictions, predicted, cfg), out, heading, COLUMNS, layout)


def figure4(
    model: XTRA,
    images: np.ndarray,
    mean: Sequence[float],
    std: Sequence[float],
    out: str | Path,
    title: str = "",
    head: int = 0,
) -> np.ndarray:
    """images: uint8 [B, H, W, 3] at the model's size -> the Figure-4 picture of `model`'s head
    `head` (0: next block; 1: next-next, with model.blocks_ahead > 1) on them.

    `mean`/`std` are the data normalisation the model was trained with."""
    x = normalize(torch.as_tensor(images), mean, std)  # [B, 3, H, W]
    model = model.eval()
    pred, predicted = next_block_predictions(model, x, head)
    return render_figure4(
        images, to_uint8(pred, tuple(mean), tuple(std)).numpy(), predicted.numpy(), model.cfg, out,
        title, head,
    )
