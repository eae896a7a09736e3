"""The reference implementation's maths, written out plainly, for tests and benchmarks.

- `reference_features` / `reference_loss`: a straightforward raster-order version of the XTRA
  objective, sharing the model's weights. Tokens stay in raster patch order; the dense
  block-causal mask is built on every forward; the tokens of each block are gathered by index.
  Tests prove the block-major model equal to it, and benchmarks time against it.
- `reference_param_groups` / `ReferenceWarmupCosineLR`: the reference's optimiser recipe
  (`param_groups` and `config_optimizers` in its `src/utils/utils.py`, and the
  LinearWarmupCosineAnnealingLR of pl_bolts it steps once per optimiser step), in its stepwise
  (chainable) form: tests prove the product's closed-form schedule and groups equal to them.
"""

from __future__ import annotations

import math

import torch
from torch import nn

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


# --------------------------------------------------------------------------- the optimiser recipe


def reference_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[dict]:
    """The reference's AdamW groups: decay on every parameter but those whose name contains
    "bias" or that are 1-D; both groups at `lr`."""
    def no_decay(name: str, p: torch.Tensor) -> bool:
        return "bias" in name or len(p.shape) == 1

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [
        {"params": [p for n, p in named if not no_decay(n, p)], "weight_decay": weight_decay, "lr": lr},
        {"params": [p for n, p in named if no_decay(n, p)], "weight_decay": 0.0, "lr": lr},
    ]


class ReferenceWarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """Linear warmup from `warmup_start_lr` over `warmup_steps`, then cosine to `eta_min` at
    `max_steps`, computed step by step from the previous LR as the reference's scheduler does:
    step 0 at `warmup_start_lr`, + (base - start) / (warmup_steps - 1) per warmup step, the
    base LR at `warmup_steps`, then each LR the previous one times the ratio of successive
    cosine factors (the reference's `warmup_epochs` = warmup epochs / epochs x total steps)."""

    def __init__(self, optimizer: torch.optim.Optimizer, warmup_steps: int, max_steps: int,
                 warmup_start_lr: float, eta_min: float) -> None:
        self.warmup_steps, self.max_steps = warmup_steps, max_steps
        self.warmup_start_lr, self.eta_min = warmup_start_lr, eta_min
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        s, w, t = self.last_epoch, self.warmup_steps, self.max_steps
        groups = self.optimizer.param_groups
        if s == 0:
            return [self.warmup_start_lr for _ in self.base_lrs]
        if s < w:
            return [g["lr"] + (b - self.warmup_start_lr) / (w - 1) for b, g in zip(self.base_lrs, groups)]
        if s == w:
            return list(self.base_lrs)
        ratio = (1 + math.cos(math.pi * (s - w) / (t - w))) / (1 + math.cos(math.pi * (s - w - 1) / (t - w)))
        return [ratio * (g["lr"] - self.eta_min) + self.eta_min for g in groups]
