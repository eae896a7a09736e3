"""The speed features of the training step give the same results as the plain path.

Each alternate path is compared with the plain one on the same weights and the same batch:
the FlexAttention BlockMask (mask pattern, kernel, model), dropping the never-attended last block,
fused AdamW, bf16 autocast and torch.compile. Activation checkpointing is proved equal in
tests/test_model.py.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_mask, flex_attention

from xtra_core.accel import autocast, maybe_compile
from xtra_core.config import ConfigError, ModelConfig, build_config
from xtra_core.model import XTRA, Layout, block_causal_block_mask
from xtra_core.optim import adamw


def small_cfg(**kw) -> ModelConfig:
    """16 px, patch 2, block 2 -> 8x8 patches (64 tokens), 4x4 = 16 blocks; head dim 16."""
    base = dict(
        image_size=16, patch_size=2, block_size=2, encoder_width=32, encoder_depth=2,
        encoder_heads=2, projection_hidden=64, decoder_width=32, decoder_depth=2,
        decoder_heads=2, head_hidden=64,
    )
    base.update(kw)
    return ModelConfig(**base)


def twin(cfg: ModelConfig, **changes) -> tuple[XTRA, XTRA]:
    """Two models with identical weights, the second with `changes` to its config."""
    torch.manual_seed(0)
    a = XTRA(cfg)
    b = XTRA(ModelConfig(**{**cfg.__dict__, **changes}))
    b.load_state_dict(a.state_dict())
    return a, b


def grads(model: torch.nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


# --------------------------------------------------------------------------- config


def test_attention_backend_is_validated_and_settable():
    assert ModelConfig().attention == "sdpa"
    with pytest.raises(ConfigError, match=r"model.attention='bogus' is not one of \['sdpa', 'flex'\]"):
        ModelConfig(attention="bogus").validate()
    cfg = build_config("tiny", dotted={"model.attention": "flex", "model.compile": True})
    assert cfg.model.attention == "flex" and cfg.model.compile


# --------------------------------------------------------------------------- FlexAttention


@pytest.mark.parametrize("block_size, order", [(2, "raster"), (4, "random"), (1, "raster")])
def test_flex_block_mask_is_the_dense_block_causal_mask(block_size, order):
    cfg = small_cfg(image_size=32, block_size=block_size, block_order=order, order_seed=5)
    layout = Layout(cfg)
    n = cfg.num_patches  # 256 tokens
    bm = block_causal_block_mask(n, block_size**2, torch.device("cpu"))
    dense = create_mask(bm.mask_mod, None, None, n, n, device="cpu")[0, 0]  # [N, N]
    assert torch.equal(dense, layout.attn_mask)
    # a prefix of whole blocks has the same pattern (the training step drops the last block)
    m = n - block_size**2
    assert torch.equal(
        create_mask(block_causal_block_mask(m, block_size**2, "cpu").mask_mod, None, None, m, m)[0, 0],
        layout.attn_mask[:m, :m],
    )


def test_flex_block_mask_skips_tiles_above_the_diagonal():
    """Block-major order makes the mask causal at tile granularity: with 128-token tiles at 1024
    tokens, tile row r visits r + 1 tiles of keys (r full, 1 partial); the rest are never read."""
    bm = block_causal_block_mask(1024, 16, torch.device("cpu"))
    visited = bm.kv_num_blocks[0, 0] + bm.full_kv_num_blocks[0, 0]  # [8] tiles per query-tile row
    assert visited.tolist() == list(range(1, 9))
    assert bm.full_kv_num_blocks[0, 0].tolist() == list(range(8))
    assert bm.sparsity() == pytest.approx(100 * (1 - 36 / 64))


def test_flex_attention_kernel_equals_dense_sdpa():
    """FlexAttention (eager: the unfused implementation) with the BlockMask = SDPA with the mask."""
    torch.manual_seed(0)
    n, k2 = 96, 4
    q, k, v = (torch.randn(2, 3, n, 16) for _ in range(3))
    slot = torch.arange(n) // k2
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=slot[None, :] <= slot[:, None])
    with pytest.warns(UserWarning, match="without torch.compile"):
        flex = flex_attention(q, k, v, block_mask=block_causal_block_mask(n, k2, "cpu"))
    assert torch.allclose(flex, dense, atol=1e-5)


@pytest.mark.slow  # compiles the FlexAttention kernel for CPU (~25 s per shape on 2 cores)
def test_flex_model_equals_sdpa_model_in_inference_on_cpu():
    sdpa, flex = twin(small_cfg(block_order="random"), attention="flex")
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(flex.predict(x), sdpa.predict(x), atol=1e-5)
        assert torch.allclose(flex.loss(x), sdpa.loss(x), atol=1e-6)


def test_flex_training_on_cpu_falls_back_to_sdpa_with_equal_gradients():
    sdpa, flex = twin(small_cfg(), attention="flex")
    x = torch.randn(2, 3, 16, 16)
    sdpa.loss(x).backward()
    with pytest.warns(UserWarning, match="no backward pass on CPU"):
        flex.loss(x).backward()
    for a, b in zip(grads(sdpa), grads(flex)):
        assert torch.equal(a, b)


# --------------------------------------------------------------------------- the last block


@pytest.mark.parametrize("kw", [{}, {"blocks_ahead": 3, "block_order": "random"}, {"block_size": 1}])
def test_dropping_the_last_block_leaves_every_other_row_and_the_loss_unchanged(kw):
    model = XTRA(small_cfg(**kw)).eval()
    x = torch.randn(3, 3, 16, 16)
    full = model.decoder_output_by_block(x)  # [B, K, k*k*Dd]
    short = model.decoder_output_by_block(x, drop_last_block=True)  # [B, K-1, k*k*Dd]
    assert short.shape[1] == full.shape[1] - 1
    assert torch.allclose(short, full[:, :-1], atol=1e-6)
    by_full = model.forward_loss([h(full) for h in model.heads], model.targets(x))
    loss = model.loss(x)
    assert torch.allclose(loss, by_full, atol=1e-6)
    loss.backward()
    g_short = grads(model)
    model.zero_grad()
    by_full.backward()
    for a, b in zip(g_short, grads(model)):
        assert torch.allclose(a, b, atol=1e-6)


# --------------------------------------------------------------------------- optimiser


def test_fused_adamw_is_chosen_on_cpu_and_steps_like_the_for_loop_adamw():
    torch.manual_seed(0)
    model = XTRA(small_cfg())
    plain_model = copy.deepcopy(model)
    fused = adamw(model, lr=1e-2, weight_decay=0.05)
    plain = adamw(plain_model, lr=1e-2, weight_decay=0.05, fused=False)
    assert fused.defaults["fused"] and not plain.defaults["fused"]
    assert [g["weight_decay"] for g in fused.param_groups] == [0.05, 0.0]
    x = torch.randn(2, 3, 16, 16)
    for _ in range(3):  # the same gradients into both: only the optimiser arithmetic differs
        fused.zero_grad()
        model.loss(x).backward()
        for a, b in zip(model.parameters(), plain_model.parameters()):
            b.grad = a.grad.clone()
        fused.step()
        plain.step()
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert torch.allclose(a, b, atol=1e-6)
    assert not torch.equal(model.encoder.pos_embed, XTRA(small_cfg()).encoder.pos_embed)


# --------------------------------------------------------------------------- bf16 autocast


def test_bf16_autocast_runs_on_cpu_close_to_fp32_with_fp32_master_gradients():
    model = XTRA(small_cfg())
    x = torch.randn(4, 3, 16, 16)
    ref = model.loss(x)
    ref.backward()
    g32 = grads(model)
    model.zero_grad()
    with autocast("cpu", bf16=True):
        z = model.decoder_output_by_block(x)
        loss = model.loss(x)
        pred = model.heads[0](z)
    # matmuls run in bf16 (LayerNorm outputs, like z, stay fp32 under CPU autocast); loss in fp32
    assert pred.dtype == torch.bfloat16 and loss.dtype == torch.float32
    loss.backward()
    assert all(p.grad.dtype == torch.float32 for p in model.parameters())
    assert abs(loss.item() - ref.item()) < 2e-2 * ref.item()
    flat32 = torch.cat([g.flatten() for g in g32])
    flat16 = torch.cat([g.flatten() for g in grads(model)])
    assert F.cosine_similarity(flat32, flat16, dim=0) > 0.99
    with autocast("cpu", bf16=False):
        assert model.decoder_output_by_block(x).dtype == torch.float32


# --------------------------------------------------------------------------- torch.compile


def test_maybe_compile_is_the_identity_when_switched_off():
    model = XTRA(small_cfg())
    assert maybe_compile(model, model.cfg) is model


@pytest.mark.slow  # the first compiled forward + backward takes ~30-60 s on 2 CPU cores
def test_compiled_model_gives_the_same_loss_and_gradients():
    plain, other = twin(small_cfg(compile=True))
    compiled = maybe_compile(other, other.cfg)
    assert compiled is not other
    x = torch.randn(2, 3, 16, 16)
    la, lb = plain.loss(x), compiled(x)
    la.backward()
    lb.backward()
    assert torch.allclose(la, lb, atol=1e-5)
    for a, b in zip(grads(plain), grads(other)):
        assert torch.allclose(a, b, atol=1e-5)
