"""Next-block predictions assembled into an image, as in the paper's Figure 4.

`XTRA.predict` runs with teacher forcing: the true image goes in, and under the block-causal mask
the row of block i sees only blocks 1..i (in the model's block order) and predicts block i+1.
Predictions live in per-block-normalised pixel space; each is de-normalised with the mean and
standard deviation of the true block it predicts, then the blocks are put back in their raster
places. The first block of the order has no prediction: it shows its own mean colour (a
prediction of 0, de-normalised like the others), as in the paper's Figure 4.
"""

from __future__ import annotations

import torch

from xtra_core.masks import blockify, unblockify
from xtra_core.model import XTRA


@torch.no_grad()
def next_block_predictions(
    model: XTRA, images: torch.Tensor, head: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """images: normalised [B, C, H, W] -> (predictions [B, C, H, W] in the same normalised space,
    predicted: bool [K], raster block order, False for the first `head + 1` blocks of the model's
    order).

    `head` picks the head: 0 predicts the next block, 1 the next-next (`model.blocks_ahead` > 1),
    as the reference's `--aim_idx`. As there, the blocks without a prediction (the first
    `head + 1`) get a prediction of 0 in normalised space, and every block is de-normalised with
    its own true mean and std: those blocks show their mean colour."""
    cfg = model.cfg
    block_px = cfg.block_size * cfg.patch_size
    preds = model.predict_head(images, head).float().cpu()  # [B, K, P]: row i -> order[i+1+head]
    order = model.layout.order.cpu()  # [K]: raster block number at each autoregressive position
    truth = blockify(images.float().cpu(), block_px)[:, order]  # [B, K, P] in model order
    mean = truth.mean(dim=-1, keepdim=True)
    std = (truth.var(dim=-1, keepdim=True) + cfg.norm_pix_eps).sqrt()  # as XTRA.targets
    shifted = torch.zeros_like(truth)  # [B, K, P] model order: row i = the prediction of block i
    shifted[:, head + 1 :] = preds[:, : cfg.num_blocks - head - 1]
    assembled = torch.empty_like(truth)  # [B, K, P] raster block order
    assembled[:, order] = shifted * std + mean  # de-normalise every block with its own stats
    predicted = torch.ones(cfg.num_blocks, dtype=torch.bool)
    predicted[order[: head + 1]] = False
    return unblockify(assembled, block_px, cfg.in_chans), predicted  # [B, C, H, W]


def to_uint8(images: torch.Tensor, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """Inverse of the data pipeline's `normalize`: float [B, 3, H, W] -> uint8 [B, H, W, 3]."""
    m = torch.as_tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    x = (images.float() * s + m).clamp(0.0, 1.0)
    return (x * 255.0).round().to(torch.uint8).permute(0, 2, 3, 1).contiguous()
