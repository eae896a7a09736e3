"""Patch/block layout and the block-causal mask.

Two token orders appear in this package:
- raster: tokens in patch raster order (row-major over the patch grid), as a ViT produces them;
- block-major: all tokens of the first block (in the model's block order), then the second, ...;
  inside a block, tokens are in raster order of that block.
The model runs in block-major order: the block-causal mask becomes causal at block granularity
and "concatenate the k x k tokens of each block" becomes a reshape.
"""

from __future__ import annotations

import torch


def block_index(grid: int, block: int) -> torch.Tensor:
    """Raster block number of every token in raster patch order. Returns int64 [grid*grid]."""
    rows = torch.arange(grid).div(block, rounding_mode="floor")  # [grid]
    per_side = grid // block
    return (rows[:, None] * per_side + rows[None, :]).reshape(-1)


def block_causal_mask(grid: int, block: int, block_rank: torch.Tensor | None = None) -> torch.Tensor:
    """Block-causal attention mask over tokens in raster patch order.

    Returns a bool tensor [N, N], N = grid**2: entry [q, k] is True where query token q may attend
    to key token k, i.e. where k's block comes no later than q's block in the autoregressive order.
    `block_rank[b]` is the position of raster block b in that order (default: raster, rank = b).
    `block=1` gives the plain token-causal mask of AIM.
    """
    if grid % block:
        raise ValueError(f"grid {grid} is not divisible by block {block}")
    b = block_index(grid, block)
    rank = b if block_rank is None else block_rank[b]
    return rank[None, :] <= rank[:, None]


def block_order(num_blocks: int, kind: str = "raster", seed: int = 0) -> torch.Tensor:
    """The autoregressive block order: `order[i]` is the raster block number of the i-th block.

    "random" is a fixed permutation drawn from `seed` (the same for every batch and every rank).
    "pseudo_random" has several orders (`block_orders`); this is the first, the one used in eval.
    """
    return block_orders(num_blocks, kind, seed)[0]


def block_orders(num_blocks: int, kind: str = "raster", seed: int = 0) -> torch.Tensor:
    """Every block order a model of this kind trains with: int64 [R, K], row r one order.

    R = 1 for "raster" and "random". "pseudo_random" is the reference's `aim.pseudo_random`
    (`create_random_permutations`): R = K permutations, pairwise prefix-distinct, drawn one after
    another with `randperm` from a generator seeded with `seed`, a draw kept only if no row kept
    before shares a prefix with it (with K rows of K blocks this means: no two rows start with
    the same block). The reference seeds torch's global generator with the run's seed; the same
    seed here gives the same rows."""
    if kind == "raster":
        return torch.arange(num_blocks)[None]
    g = torch.Generator().manual_seed(seed)
    if kind == "random":
        return torch.randperm(num_blocks, generator=g)[None]
    if kind == "pseudo_random":
        rows: list[torch.Tensor] = []
        firsts: set[int] = set()
        while len(rows) < num_blocks:
            row = torch.randperm(num_blocks, generator=g)
            if num_blocks == 1 or int(row[0]) not in firsts:  # prefix-distinct from every row
                rows.append(row)
                firsts.add(int(row[0]))
        return torch.stack(rows)
    raise ValueError(f"unknown block order {kind!r}")


def block_major_permutation(grid: int, block: int, order: torch.Tensor) -> torch.Tensor:
    """Token permutation raster -> block-major: `perm[s]` is the raster index of sequence slot s.

    Blocks appear in `order`; within a block tokens are in the block's own raster order.
    Returns int64 [grid*grid].
    """
    per_side = grid // block
    idx = torch.arange(grid * grid).reshape(per_side, block, per_side, block)  # [By, ky, Bx, kx]
    idx = idx.permute(0, 2, 1, 3).reshape(per_side * per_side, block * block)  # [K, k*k] raster blocks
    return idx[order].reshape(-1)


def blockify(images: torch.Tensor, block_px: int) -> torch.Tensor:
    """Cut images into blocks in raster block order.

    images: [B, C, H, W] -> [B, K, (block_px**2) * C], each block flattened as (y, x, c).
    """
    b, c, h, w = images.shape
    ny, nx = h // block_px, w // block_px
    x = images.reshape(b, c, ny, block_px, nx, block_px)
    x = x.permute(0, 2, 4, 3, 5, 1)  # [B, ny, nx, py, px, C]
    return x.reshape(b, ny * nx, block_px * block_px * c)


def unblockify(blocks: torch.Tensor, block_px: int, channels: int = 3) -> torch.Tensor:
    """Exact inverse of `blockify`: [B, K, (block_px**2) * C] -> [B, C, H, W] (square images)."""
    b, k, _ = blocks.shape
    n = int(round(k**0.5))
    x = blocks.reshape(b, n, n, block_px, block_px, channels)
    x = x.permute(0, 5, 1, 3, 2, 4)  # [B, C, ny, py, nx, px]
    return x.reshape(b, channels, n * block_px, n * block_px)
