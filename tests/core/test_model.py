"""Unit tests of the XTRA maths in xtra_core: mask, causality, order, loss, sizes, learning."""

from __future__ import annotations

import math

import pytest
import torch

from xtra_core import block_causal_mask, build_model
from xtra_core.config import ModelConfig
from xtra_core.masks import block_major_permutation, block_order, blockify, unblockify
from xtra_core.model import XTRA, count_parameters
from xtra_core.optim import param_groups, warmup_cosine_lr
from xtra_core.reference import reference_features, reference_loss


def small_cfg(**kw) -> ModelConfig:
    """A very small model: 16 px, patch 2, block 2 -> 8x8 patches, 4x4 = 16 blocks."""
    base = dict(
        image_size=16, patch_size=2, block_size=2, encoder_width=32, encoder_depth=2,
        encoder_heads=2, projection_hidden=64, decoder_width=24, decoder_depth=2,
        decoder_heads=2, head_hidden=64,
    )
    base.update(kw)
    return ModelConfig(**base)


def make(cfg: ModelConfig, seed: int = 0) -> XTRA:
    torch.manual_seed(seed)
    return XTRA(cfg).eval()


# --------------------------------------------------------------------------- the mask


def test_block_causal_mask_hand_checked_entries():
    m = block_causal_mask(4, 2)  # 4x4 patches, 2x2 blocks: block b = (row//2)*2 + col//2
    assert m.shape == (16, 16) and m.dtype == torch.bool
    # token 0 (block 0) sees exactly block 0 = tokens 0, 1, 4, 5
    assert torch.nonzero(m[0]).flatten().tolist() == [0, 1, 4, 5]
    # token 5 is in block 0 too, and sees its whole block, including token 4 and 1 (not later)
    assert m[5, 4] and m[5, 1] and m[0, 5]
    assert not m[5, 2]
    # token 2 (block 1) sees blocks 0 and 1 = the first two rows of patches
    assert torch.nonzero(m[2]).flatten().tolist() == list(range(8))
    # token 8 (block 2) sees blocks 0, 1, 2, not block 3 (tokens 10, 11, 14, 15)
    assert torch.nonzero(m[8]).flatten().tolist() == list(range(8)) + [8, 9, 12, 13]
    assert torch.nonzero(m[15]).numel() == 16


def test_block_size_one_is_plain_causal_mask():
    n = 5 * 5
    assert torch.equal(block_causal_mask(5, 1), torch.ones(n, n).tril().bool())


def test_block_causal_mask_with_rank_follows_order():
    rank = torch.tensor([3, 2, 1, 0])  # reverse raster
    m = block_causal_mask(4, 2, rank)
    assert torch.nonzero(m[15]).flatten().tolist() == [10, 11, 14, 15]  # block 3 goes first
    assert m[0].all()  # block 0 goes last


def test_blockify_unblockify_are_exact_inverses():
    x = torch.randn(2, 3, 16, 16)
    b = blockify(x, 4)
    assert b.shape == (2, 16, 4 * 4 * 3)
    assert torch.equal(unblockify(b, 4, 3), x)
    # block 1 is the top row, columns 4..7
    assert torch.equal(b[0, 1].reshape(4, 4, 3).permute(2, 0, 1), x[0, :, 0:4, 4:8])


def test_block_major_permutation_groups_tokens_of_each_block():
    perm = block_major_permutation(4, 2, block_order(4))
    assert perm.tolist() == [0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15]


# --------------------------------------------------------------------------- causality


@pytest.mark.parametrize("order", ["raster", "random"])
def test_predictions_ignore_future_blocks(order):
    """Changing block j (AR position j) leaves prediction rows 0..j-1 unchanged, changes j.."""
    cfg = small_cfg(block_order=order, order_seed=3)
    model = make(cfg)
    x = torch.randn(1, 3, 16, 16)
    px = cfg.block_size * cfg.patch_size
    with torch.no_grad():
        base = model.predict(x)
        for j in (0, 5, cfg.num_blocks - 1):
            raster_block = int(model.layout.order[j])
            by, bx = divmod(raster_block, cfg.blocks_per_side)
            y = x.clone()
            y[:, :, by * px : (by + 1) * px, bx * px : (bx + 1) * px] += torch.randn(1, 3, px, px)
            out = model.predict(y)
            diff = (out - base).abs().amax(dim=(0, 2))  # [K]
            assert diff[:j].max().item() == 0.0 if j else True, f"rows before {j} changed"
            assert (diff[j:] > 1e-6).all(), f"rows from {j} on did not change"


def test_encoder_features_ignore_future_blocks():
    cfg = small_cfg()
    model = make(cfg)
    x = torch.randn(1, 3, 16, 16)
    y = x.clone()
    y[:, :, 12:, 12:] = 0.0  # last block only (raster block 15)
    with torch.no_grad():
        fx, fy = model.encode(x), model.encode(y)
    changed = (fx - fy).abs().amax(-1)[0].reshape(8, 8)  # raster token grid
    assert changed[:6].max() == 0 and changed[6:, :6].max() == 0
    assert (changed[6:, 6:] > 0).all()


# --------------------------------------------------------------------------- block-major == raster


@pytest.mark.parametrize(
    "kw", [{}, {"block_order": "random", "order_seed": 7}, {"blocks_ahead": 3}, {"block_size": 1}]
)
def test_block_major_model_equals_raster_reference(kw):
    cfg = small_cfg(**kw)
    model = make(cfg)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(model.decoder_output_by_block(x), reference_features(model, x), atol=1e-5)
        assert torch.allclose(model.loss(x), reference_loss(model, x), atol=1e-6)


def test_reference_gradients_match():
    model = make(small_cfg(block_order="random"))
    x = torch.randn(2, 3, 16, 16)
    model.loss(x).backward()
    g1 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    reference_loss(model, x).backward()
    for a, p in zip(g1, model.parameters()):
        assert torch.allclose(a, p.grad, atol=1e-6)


# --------------------------------------------------------------------------- the loss


def test_targets_are_normalised_per_block_and_invariant_to_block_affine():
    model = make(small_cfg())
    x = torch.randn(2, 3, 16, 16)
    t = model.targets(x)
    assert torch.allclose(t.mean(-1), torch.zeros(2, 16), atol=1e-5)
    assert torch.allclose(t.var(-1), torch.ones(2, 16), atol=1e-3)
    y = x.clone()
    y[:, :, :4, :4] = 3.0 * y[:, :, :4, :4] + 5.0  # an affine change of block 0 alone
    assert torch.allclose(model.targets(y), t, atol=1e-4)


def test_first_block_is_never_a_target():
    model = make(small_cfg(blocks_ahead=2))
    target = torch.randn(2, 16, model.cfg.block_pixels)
    preds = [torch.randn_like(target) for _ in range(2)]
    base = model.forward_loss(preds, target)
    t2 = target.clone()
    t2[:, 0] += 10.0
    assert model.forward_loss(preds, t2) == base
    t3 = target.clone()
    t3[:, 1] += 10.0
    assert model.forward_loss(preds, t3) != base
    p2 = [p.clone() for p in preds]
    p2[0][:, -1] += 10.0  # the last row of head 0 has no target
    p2[1][:, -2:] += 10.0  # nor the last two rows of head 1
    assert model.forward_loss(p2, target) == base


def test_l1_and_l2_losses_and_multi_head_average():
    for loss, f in (("l2", lambda d: d**2), ("l1", abs)):
        model = make(small_cfg(loss=loss, blocks_ahead=2))
        target = torch.zeros(1, 16, model.cfg.block_pixels)
        # head 0 off by 0.5 everywhere, head 1 off by 2.0
        preds = [torch.full_like(target, 0.5), torch.full_like(target, 2.0)]
        expected = (f(0.5) + f(2.0)) / 2
        assert math.isclose(model.forward_loss(preds, target).item(), expected, rel_tol=1e-6)


def test_model_loss_uses_each_head_shifted_by_its_distance():
    model = make(small_cfg(blocks_ahead=2))
    x = torch.randn(2, 3, 16, 16)
    z = model.decoder_output_by_block(x)
    t = model.targets(x)
    h0, h1 = model.heads[0](z), model.heads[1](z)
    by_hand = (((h0[:, :-1] - t[:, 1:]) ** 2).mean() + ((h1[:, :-2] - t[:, 2:]) ** 2).mean()) / 2
    assert torch.allclose(model.loss(x), by_hand)


# --------------------------------------------------------------------------- sizes


def test_tiny_preset_size():
    model = build_model("tiny")
    assert 6.0e6 < count_parameters(model) < 6.6e6
    assert 2.6e6 < count_parameters(model.encoder) < 2.8e6


@pytest.mark.parametrize("name, expected", [("vit_b16", 85.8e6), ("vit_h14", 631e6)])
def test_encoder_parameter_counts_on_meta_device(name, expected):
    with torch.device("meta"):
        model = build_model(name)
    n = count_parameters(model.encoder)
    assert abs(n - expected) / expected < 0.01, n


def test_vit_b16_shapes_on_meta_device():
    with torch.device("meta"):
        model = build_model("vit_b16").to("meta")  # layout buffers too
        x = torch.empty(2, 3, 256, 256)
        assert model.predict(x).shape == (2, 16, 3 * 64 * 64)
        assert model.encode(x, last_n=6).shape == (2, 256, 768)


# --------------------------------------------------------------------------- training pieces


def test_param_groups_exclude_biases_and_norms_from_decay_and_decay_position_embeddings():
    model = build_model("tiny")
    decay, no_decay = param_groups(model, 0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    names = {id(p): n for n, p in model.named_parameters()}
    nd = {names[id(p)] for p in no_decay["params"]}
    d = {names[id(p)] for p in decay["params"]}
    assert "encoder.pos_embed" in d and "decoder.pos_embed" in d  # as the reference
    assert "encoder.blocks.0.norm1.weight" in nd and "encoder.blocks.0.attn.qkv.bias" in nd
    assert "encoder.blocks.0.attn.qkv.weight" in d and "encoder.patch_embed.weight" in d
    assert len(d) + len(nd) == len(names) and not d & nd


def test_warmup_cosine_schedule():
    lrs = [warmup_cosine_lr(s, 100, 10, 1e-3, 1e-6) for s in range(101)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))
    assert lrs[100] == pytest.approx(1e-6)
    assert lrs[55] == pytest.approx(1e-6 + 0.5 * (1e-3 - 1e-6), rel=1e-6)


def test_drop_path_is_active_in_training_only():
    model = make(small_cfg(drop_path=0.5))
    x = torch.randn(4, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(model.loss(x), model.loss(x))
        model.train()
        torch.manual_seed(0)
        a = model.loss(x)
        torch.manual_seed(1)
        assert a != model.loss(x)


def test_activation_checkpointing_gives_same_loss_and_gradients():
    plain = make(small_cfg())
    ckpt = make(small_cfg(activation_checkpointing=True))
    ckpt.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 16, 16)
    la, lb = plain.loss(x), ckpt.loss(x)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb)
    for a, b in zip(plain.parameters(), ckpt.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6)


def test_a_few_adamw_steps_drive_the_loss_down():
    torch.manual_seed(0)
    model = build_model("tiny").train()
    x = torch.randn(8, 3, 32, 32).cumsum(-1).cumsum(-2) / 8  # smooth images: learnable structure
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=1e-3, betas=(0.9, 0.95))
    losses = []
    for _ in range(25):
        loss = model.loss(x)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses
