"""The block-causal mask of a config as a picture: entry [query, key] filled where the query
token may attend to the key token, in raster token order and in the model's block-major order."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipelines.visualize.picture import Layout, compose, draw_grid, upscale, upscale_factor
from xtra_core.config import ModelConfig
from xtra_core.masks import block_causal_mask
from xtra_core.model import Layout as TokenLayout

MIN_PANEL_PX = 256
ATTEND_RGB = (31, 78, 160)  # query may attend to key
BLOCKED_RGB = (255, 255, 255)
BLOCK_LINE_RGB = (220, 40, 40)
COLUMNS = ["raster token order", "model sequence (block-major)"]


def masks_of(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(raster-order mask, block-major mask), bool [N, N], True = may attend."""
    tokens = TokenLayout(cfg)
    rank = torch.argsort(tokens.order)  # [K]: position of each raster block in the AR order
    raster = block_causal_mask(cfg.grid, cfg.block_size, None if cfg.block_order == "raster" else rank)
    return raster, tokens.attn_mask.clone()


def mask_layout(cfg: ModelConfig) -> Layout:
    n = cfg.num_patches
    return Layout(rows=1, cols=2, panel=n * upscale_factor(n, MIN_PANEL_PX))


def _panel(mask: torch.Tensor, scale: int) -> np.ndarray:
    rgb = np.where(mask.numpy()[..., None], np.array(ATTEND_RGB, np.uint8), np.array(BLOCKED_RGB, np.uint8))
    return upscale(rgb, scale)  # [N*scale, N*scale, 3]


def render_mask(cfg: ModelConfig, out: str | Path) -> tuple[np.ndarray, torch.Tensor, torch.Tensor]:
    """Write the mask picture (PNG) to `out`; return (picture, raster mask, block-major mask)."""
    raster, block_major = masks_of(cfg)
    n = cfg.num_patches
    scale = upscale_factor(n, MIN_PANEL_PX)
    k2 = cfg.block_size**2
    panels = [[_panel(raster, scale), draw_grid(_panel(block_major, scale), k2 * scale, BLOCK_LINE_RGB)]]
    title = (
        f"block-causal mask: {cfg.grid}x{cfg.grid} patches of {cfg.patch_size} px, blocks of "
        f"{cfg.block_size}x{cfg.block_size} patches ({cfg.num_blocks} blocks, {cfg.block_order} order)\n"
        "row = query token, column = key token; filled = may attend"
    )
    picture = compose(panels, out, title, COLUMNS, mask_layout(cfg))
    return picture, raster, block_major
