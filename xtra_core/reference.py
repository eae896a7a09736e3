"""A straightforward raster-order version of the XTRA objective, sharing the model's weights.

Tokens stay in raster patch order; the dense block-causal mask is built on every forward; the
tokens of each block are gathered by index. This is the maths as the reference implementation
writes it: tests prove the block-major model equal to it, and benchmarks time against it.
"""

from __future__ import annotations

import torch

from xtra_core.masks import block_causal_mask, block_index
from xtra_core.model import XTRA


def reference_features(model: XTRA, images: torch.Tensor) -> torch.Tensor:
    """Decoder outputs grouped by block, [B, K, k*k*Dd], blocks in the model's order."""
    cfg = model.cfg
    enc, dec = model.encoder, model.decoder
    order = enc.layout.order  # [K] raster block number at each AR position
    rank = torch.empty_like(order)
    rank[order] = torch.arange(len(order), device=order.device)
    mask = block_causal_mask(cfg.grid, cfg.block_size, rank).to(images.device)  # [N, N] raster

    x = enc.patch_embed(images).flatten(2).transpose(1, 2) + enc.pos_embed  # [B, N, D] raster
    for blk in enc.blocks:
        x = blk(x, mask)
    x = model.projection(enc.norm(x)) + dec.pos_embed
    for blk in dec.blocks:
        x = blk(x, mask)
    x = dec.norm(x)  # [B, N, Dd] raster

    owner = block_index(cfg.grid, cfg.block_size).to(images.device)  # [N]
    groups = [torch.nonzero(owner == b).flatten() for b in order.tolist()]  # raster within block
    return torch.stack([x[:, g].flatten(1) for g in groups], dim=1)


def reference_loss(model: XTRA, images: torch.Tensor) -> torch.Tensor:
    z = reference_features(model, images)
    return model.forward_loss([head(z) for head in model.heads], model.targets(images))
