"""Next-block predictions assembled into an image, as in the paper's Figure 4.

`XTRA.predict` runs with teacher forcing: the true image goes in, and under the block-causal mask
the row of block i sees only blocks 1..i (in the model's block order) and predicts block i+1.
Predictions live in per-block-normalised pixel space; each is de-normalised with the mean and
standard deviation of the true block it predicts, then the blocks are put back in their raster
places. The first block of the order has no prediction.
"""

from __future__ import annotations

import torch

from xtra_core.masks import blockify, unblockify
from xtra_core.model import XTRA


@torch.no_grad()
def next_block_predictions(model: XTRA, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """images: normalised [B, C, H, W] -> (predictions [B, C, H, W] in the same normalised space,
    predicted: bool [K], raster block order, False for the first block of the model's order).

    The first block's pixels in the returned image are zeros (it has no prediction)."""
    cfg = model.cfg
    block_px = cfg.block_size * cfg.patch_size
    order = model.layout.order.cpu()  # [K]: raster block number at each autoregressive position
    preds = model.predict(images).float().cpu()  # [B, K, P]: row i predicts block order[i + 1]
    truth = blockify(images.float().cpu(), block_px)[:, order]  # [B, K, P] in model order
    mean = truth.mean(dim=-1, keepdim=True)
    std = (truth.var(dim=-1, keepdim=True) + cfg.norm_pix_eps).sqrt()  # as XTRA.targets
    assembled = torch.zeros_like(truth)  # [B, K, P] in raster block order
    assembled[:, order[1:]] = preds[:, :-1] * std[:, 1:] + mean[:, 1:]  # de-normalise per block
    predicted = torch.ones(cfg.num_blocks, dtype=torch.bool)
    predicted[order[0]] = False
    return unblockify(assembled, block_px, cfg.in_chans), predicted  # [B, C, H, W]


def to_uint8(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Inverse of the data pipeline's `normalize`: float [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (images.float() * s + m).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
