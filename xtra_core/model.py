"""XTRA: a block-causal encoder-decoder ViT that predicts the pixels of the next block.

forward_encoder -> projection -> forward_decoder -> heads -> forward_loss, as in MAE's
`models_mae.py`. Shapes: B batch, N = grid**2 tokens, K blocks, k block size in patches,
p patch size, D encoder width, Dd decoder width, P = C*(k*p)**2 pixel values per block.

The token sequence is kept in block-major order (see `masks.py`): the block-causal mask is
causal at block granularity, and the tokens of block i are rows i*k*k .. (i+1)*k*k - 1.
Two consequences the training step uses: the mask is a cheap block-sparse pattern (a FlexAttention
`BlockMask` with `model.attention="flex"`), and the last block, which no later token attends to
and which has no block after it to predict, is dropped from the sequence in `loss` (exactly).
"""

from __future__ import annotations

import functools
import hashlib
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention.flex_attention import BlockMask, create_block_mask, flex_attention
from torch.utils.checkpoint import checkpoint

from xtra_core.config import ModelConfig, XTRAConfig, preset
from xtra_core.masks import block_major_permutation, block_orders, blockify

AttnMask = torch.Tensor | BlockMask | None  # dense bool [N, N] (SDPA) or a BlockMask (flex)


@functools.cache
def compiled_flex_attention():
    """FlexAttention compiled once per process: without torch.compile it materialises the whole
    score matrix (an unfused reference implementation) and has no speed advantage."""
    return torch.compile(flex_attention, dynamic=False)


def flex_trains_on(device: torch.device) -> bool:
    """FlexAttention has a backward pass on GPU only (torch 2.13: CPU is forward/inference only)."""
    return device.type != "cpu"


def block_causal_block_mask(num_tokens: int, block_tokens: int, device: torch.device) -> BlockMask:
    """The block-causal mask over `num_tokens` block-major tokens as a FlexAttention BlockMask:
    query q may attend to key kv iff kv's block (kv // block_tokens) is not after q's block."""

    def block_causal(_b, _h, q_idx, kv_idx):  # FlexAttention mask_mod signature
        return kv_idx // block_tokens <= q_idx // block_tokens

    return create_block_mask(block_causal, None, None, num_tokens, num_tokens, device=device)


# --------------------------------------------------------------------------- transformer parts


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample with probability `p`."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask / keep


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, attn_mask: AttnMask = None) -> torch.Tensor:
        """x: [B, N, dim]; attn_mask: bool [N, N], True where query may attend to key (SDPA), or
        a FlexAttention BlockMask of the same pattern (fused block-sparse kernel)."""
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, heads, N, d_head]
        if isinstance(attn_mask, BlockMask):
            x = compiled_flex_attention()(q, k, v, block_mask=attn_mask)
        else:
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.proj(x.transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, out: int | None = None) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, out or dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm ViT block; the attention mask is threaded through, never hard-wired."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)

    def forward(self, x: torch.Tensor, attn_mask: AttnMask = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), attn_mask))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def run_blocks(
    blocks: nn.ModuleList,
    x: torch.Tensor,
    attn_mask: AttnMask,
    use_checkpointing: bool,
    keep_last: int = 0,
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Apply `blocks` in turn (recomputing each in backward if asked); also return the outputs of
    the last `keep_last` blocks."""
    kept: list[torch.Tensor] = []
    first_kept = len(blocks) - keep_last
    for i, blk in enumerate(blocks):
        if use_checkpointing and torch.is_grad_enabled():
            x = checkpoint(blk, x, attn_mask, use_reentrant=False)
        else:
            x = blk(x, attn_mask)
        if i >= first_kept:
            kept.append(x)
    return x, kept


# --------------------------------------------------------------------------- layout buffers


class Layout(nn.Module):
    """Non-persistent buffers for the token order: raster <-> block-major and the mask.

    A model has one block order (raster, random), or R of them (pseudo_random: the reference
    draws one per training step, `draw_order`, and uses the first in eval, `use_order(0)`).
    `order`, `perm` and `inv_perm` are those of the current one; the block-major mask is the same
    for every order.

    With R > 1 the layout has one persistent buffer, `draws` (the number of orders drawn so far):
    draw n is a function of (`model.order_seed`, n) only, so the count, saved with the module state
    in every checkpoint, makes a resumed run draw what the uninterrupted run drew."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        k2 = cfg.block_size**2
        self.block_tokens = k2
        self.attention = cfg.attention
        self._block_masks: dict[tuple[int, str], BlockMask] = {}  # (tokens, device) -> BlockMask
        with torch.device("cpu"):  # real values even when the model is built on "meta"
            orders = block_orders(cfg.num_blocks, cfg.block_order, cfg.order_seed)  # [R, K]
            perms = torch.stack([block_major_permutation(cfg.grid, cfg.block_size, o)
                                 for o in orders])  # [R, N] raster index of each slot
            slot_block = torch.arange(cfg.num_patches) // k2  # [N] block position of each slot
        self.register_buffer("orders", orders, persistent=False)
        self.register_buffer("perms", perms, persistent=False)
        self.register_buffer("inv_perms", torch.argsort(perms, dim=1), persistent=False)
        # index of the current order: a 0-dim buffer, so a compiled graph reads it, not a guard
        self.register_buffer("current", torch.zeros((), dtype=torch.long), persistent=False)
        self.order_seed = cfg.order_seed
        self._draws = 0  # host copy of `draws`: a draw reads no device tensor
        if orders.shape[0] > 1:
            with torch.device("cpu"):
                self.register_buffer("draws", torch.zeros((), dtype=torch.long))
        # block-major mask: causal at block granularity (True = may attend)
        self.register_buffer(
            "attn_mask", slot_block[None, :] <= slot_block[:, None], persistent=False
        )

    @property
    def num_orders(self) -> int:
        return self.orders.shape[0]

    @property
    def order(self) -> torch.Tensor:
        """[K]: raster block number at each autoregressive position."""
        return self._current(self.orders)

    @property
    def perm(self) -> torch.Tensor:
        """[N]: raster token index of each block-major slot."""
        return self._current(self.perms)

    @property
    def inv_perm(self) -> torch.Tensor:
        """[N]: block-major slot of each raster token."""
        return self._current(self.inv_perms)

    def _current(self, rows: torch.Tensor) -> torch.Tensor:
        return rows[0] if rows.shape[0] == 1 else rows[self.current]

    def use_order(self, index: int) -> None:
        if not 0 <= index < self.num_orders:
            raise IndexError(f"order {index} of {self.num_orders}")
        if self.num_orders > 1:
            self.current.fill_(index)

    @torch.compiler.disable  # host-side bookkeeping: a compiled forward runs it eagerly
    def draw_order(self) -> int:
        """Draw the order of a training step uniformly (the reference's `choose_perm`:
        `torch.randint` over its permutations), use it, and count the draw.

        Draw n comes from a private generator seeded by (`model.order_seed`, n), not from torch's
        global one (which is left untouched): every rank draws the same order at the same step,
        so the step's gradient is that of the loss the run reports, and a run resumed from a
        checkpoint (which holds the count, `draws`) continues with the uninterrupted run's
        orders. Host work only: no device read-back."""
        if self.num_orders == 1:
            return 0
        n = self._draws
        seed = hashlib.blake2b(f"{self.order_seed}:{n}".encode(), digest_size=8).digest()
        generator = torch.Generator().manual_seed(int.from_bytes(seed, "little"))
        index = int(torch.randint(0, self.num_orders, (1,), generator=generator))
        self._draws = n + 1
        self.draws.fill_(n + 1)  # a device write, no sync: saved with the module state
        self.use_order(index)
        return index

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs) -> None:
        """Load `draws` and its host copy; a state without it (a checkpoint written before the
        count existed, or an export) is accepted and keeps the current count."""
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
        key = prefix + "draws"
        if self.num_orders == 1:
            return
        if key in state_dict:
            self._draws = int(state_dict[key])
        elif key in missing_keys:
            missing_keys.remove(key)

    def mask(self, num_tokens: int, device: torch.device) -> AttnMask:
        """The block-causal mask over the first `num_tokens` block-major tokens, for the
        configured attention kernel: a cached BlockMask ("flex") or a view of the dense bool mask
        [num_tokens, num_tokens] ("sdpa", and "flex" when training on CPU, which has no
        FlexAttention backward)."""
        if self.attention == "flex":
            if flex_trains_on(device) or not torch.is_grad_enabled():
                key = (num_tokens, str(device))
                if key not in self._block_masks:
                    self._block_masks[key] = block_causal_block_mask(
                        num_tokens, self.block_tokens, device
                    )
                return self._block_masks[key]
            warnings.warn(
                "model.attention='flex' has no backward pass on CPU in this torch; "
                "training on CPU uses SDPA with the dense block-causal mask (same maths)",
                stacklevel=2,
            )
        return self.attn_mask[:num_tokens, :num_tokens]


# --------------------------------------------------------------------------- encoder / decoder


class Encoder(nn.Module):
    """ViT encoder with block-causal attention: conv patch embedding, learned absolute position
    embedding, no CLS token, stochastic depth, final LayerNorm."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.layout = Layout(cfg)
        d = cfg.encoder_width
        self.patch_embed = nn.Conv2d(cfg.in_chans, d, cfg.patch_size, stride=cfg.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, d))  # raster order
        rates = [cfg.drop_path * i / max(1, cfg.encoder_depth - 1) for i in range(cfg.encoder_depth)]
        self.blocks = nn.ModuleList(
            Block(d, cfg.encoder_heads, cfg.mlp_ratio, r) for r in rates
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def embed(self, images: torch.Tensor, num_tokens: int | None = None) -> torch.Tensor:
        """images [B, C, H, W] -> the first `num_tokens` (default all N) tokens in block-major
        order, [B, num_tokens, D] (pos embed permuted too). Images of another dtype are cast to
        the weights' (fp32 images into a bf16 DeepSpeed engine)."""
        images = images.to(self.patch_embed.weight.dtype)
        x = self.patch_embed(images).flatten(2).transpose(1, 2)  # [B, N, D] raster
        x = x + self.pos_embed
        return x[:, self.layout.perm[:num_tokens]]

    def forward_sequence(
        self, images: torch.Tensor, keep_last: int = 0, num_tokens: int | None = None
    ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """-> (final-normed tokens [B, n, D] block-major, outputs of the last `keep_last` blocks);
        n = `num_tokens` (default all N): a prefix of whole blocks is exact under the mask."""
        x = self.embed(images, num_tokens)
        mask = self.layout.mask(x.shape[1], x.device)
        x, kept = run_blocks(self.blocks, x, mask, self.cfg.activation_checkpointing, keep_last)
        return self.norm(x), kept

    def forward(self, images: torch.Tensor, last_n: int = 1) -> torch.Tensor:
        """Frozen-trunk features: mean of the last `last_n` blocks' outputs (before the final
        norm), tokens in raster patch order. images [B, C, H, W] -> [B, N, D]."""
        if not 1 <= last_n <= len(self.blocks):
            raise ValueError(f"last_n={last_n} must be in 1..{len(self.blocks)}")
        self.layout.use_order(0)  # pseudo_random: features in the first order, as in eval
        _, kept = self.forward_sequence(images, keep_last=last_n)
        feats = torch.stack(kept).mean(0)  # [B, N, D] block-major
        return feats[:, self.layout.inv_perm]


class Decoder(nn.Module):
    """ViT decoder with its own position embedding and the same block-causal mask."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.decoder_width
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, d))  # raster order
        self.blocks = nn.ModuleList(
            Block(d, cfg.decoder_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)
        )
        self.norm = nn.LayerNorm(d, eps=1e-6)

    def forward(self, x: torch.Tensor, layout: Layout) -> torch.Tensor:
        """x: [B, n, Dd] block-major (the first n <= N tokens) -> [B, n, Dd] block-major."""
        n = x.shape[1]
        x = x + self.pos_embed[:, layout.perm[:n]]
        mask = layout.mask(n, x.device)
        x, _ = run_blocks(self.blocks, x, mask, self.cfg.activation_checkpointing)
        return self.norm(x)


# --------------------------------------------------------------------------- the model


class XTRA(nn.Module):
    """Encoder -> projection -> decoder -> per-block heads predicting the next block(s)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.projection = nn.Sequential(
            nn.Linear(cfg.encoder_width, cfg.projection_hidden),
            nn.GELU(),
            nn.Linear(cfg.projection_hidden, cfg.decoder_width, bias=cfg.projection_bias),
        )
        self.decoder = Decoder(cfg)
        k2 = cfg.block_size**2
        self.heads = nn.ModuleList(
            Mlp(k2 * cfg.decoder_width, cfg.head_hidden, cfg.block_pixels)
            for _ in range(cfg.blocks_ahead)
        )
        self.apply(_init_weights)
        for pe in (self.encoder.pos_embed, self.decoder.pos_embed):
            nn.init.trunc_normal_(pe, std=0.02)
        w = self.encoder.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))

    # ---- pieces

    @property
    def layout(self) -> Layout:
        return self.encoder.layout

    def decoder_output_by_block(self, images: torch.Tensor, drop_last_block: bool = False) -> torch.Tensor:
        """images [B, C, H, W] -> decoder output grouped by block [B, K', k*k*Dd], model order;
        K' = K, or K - 1 with `drop_last_block` (its row predicts nothing, and under the
        block-causal mask no other token sees it, so the other rows are unchanged)."""
        k2 = self.cfg.block_size**2
        n = self.cfg.num_patches - (k2 if drop_last_block else 0)
        x, _ = self.encoder.forward_sequence(images, num_tokens=n)  # [B, n, D]
        x = self.decoder(self.projection(x), self.layout)  # [B, n, Dd]
        b, _, d = x.shape
        return x.reshape(b, n // k2, k2 * d)

    def targets(self, images: torch.Tensor) -> torch.Tensor:
        """Per-block-normalised target pixels in model block order: [B, K, P]."""
        t = blockify(images, self.cfg.block_size * self.cfg.patch_size)[:, self.layout.order]
        mean = t.mean(dim=-1, keepdim=True)
        var = t.var(dim=-1, keepdim=True)  # unbiased, as in MAE's norm_pix_loss
        return (t - mean) / (var + self.cfg.norm_pix_eps) ** 0.5

    def forward_loss(self, preds: list[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        """preds[j]: [B, K or K-1, P] from head j, row i predicting block i+1+j; target [B, K, P].
        Blocks 2..K are targets (the first never is); losses averaged over heads."""
        losses = []
        num_blocks = target.shape[1]
        for j, pred in enumerate(preds):
            p, t = pred[:, : num_blocks - (j + 1)], target[:, j + 1 :]
            err = (p - t).abs() if self.cfg.loss == "l1" else (p - t) ** 2
            losses.append(err.mean())
        return torch.stack(losses).mean()

    # ---- public API

    def predict(self, images: torch.Tensor) -> torch.Tensor:
        """First head's predictions [B, K, P]: row i sees blocks 1..i+1 and predicts block i+2 (in
        the model's block order, per-block-normalised pixel space); the last row has no target."""
        return self.predict_head(images, 0)

    def predict_head(self, images: torch.Tensor, head: int) -> torch.Tensor:
        """Head `head`'s predictions [B, K, P]: row i sees blocks 1..i+1 and predicts block
        i+2+head (model order; the first model order with pseudo_random); the last head+1 rows
        have no target."""
        if not 0 <= head < len(self.heads):
            raise IndexError(f"head {head}: the model has {len(self.heads)} (model.blocks_ahead)")
        self.layout.use_order(0)
        return self.heads[head](self.decoder_output_by_block(images))

    def loss(self, images: torch.Tensor) -> torch.Tensor:
        """Scalar next-block reconstruction loss of normalised images [B, C, H, W].

        The per-block targets are computed in fp32 from `images` as given, before the network's
        cast to its weights' dtype: pass fp32 images to a bf16 model and the targets keep fp32
        precision (the reference computes them from the fp32 batch under bf16 autocast)."""
        if self.training:
            self.layout.draw_order()  # pseudo_random: one order per step (else a no-op)
        else:
            self.layout.use_order(0)
        target = self.targets(images.float())  # [B, K, P] fp32
        z = self.decoder_output_by_block(images, drop_last_block=True)  # [B, K-1, k*k*Dd]
        return self.forward_loss([head(z).float() for head in self.heads], target)

    def encode(self, images: torch.Tensor, last_n: int = 1) -> torch.Tensor:
        """Frozen-trunk features [B, N, D]: mean of the last `last_n` encoder blocks' outputs."""
        return self.encoder(images, last_n=last_n)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """The training objective (what a DeepSpeed engine calls): the scalar loss."""
        return self.loss(images)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
        nn.init.zeros_(m.bias)


def build_model(cfg: str | XTRAConfig | ModelConfig = "tiny") -> XTRA:
    """An XTRA model from a preset name (`tiny`, `vit_b16`, `vit_h14`) or a config."""
    if isinstance(cfg, str):
        cfg = preset(cfg)
    if isinstance(cfg, XTRAConfig):
        cfg = cfg.model
    return XTRA(cfg)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
