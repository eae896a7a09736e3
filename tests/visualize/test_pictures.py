"""Figure-4 and mask pictures: the assembled predictions, and pixels where the layout says."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.data.images import normalize
from pipelines.visualize.figure4 import figure4, figure4_layout, render_figure4
from pipelines.visualize.mask import ATTEND_RGB, BLOCKED_RGB, mask_layout, render_mask
from pipelines.visualize.picture import GRID_RGB, HATCH_RGB, upscale_factor
from pipelines.visualize.predictions import next_block_predictions, to_uint8
from xtra_core.config import build_config
from xtra_core.masks import block_causal_mask
from xtra_core.model import XTRA

SMALL = {
    "model.image_size": 16, "model.patch_size": 4, "model.block_size": 1,
    "model.encoder_width": 32, "model.encoder_depth": 1, "model.encoder_heads": 2,
    "model.projection_hidden": 64, "model.decoder_width": 32, "model.decoder_depth": 1,
    "model.decoder_heads": 2, "model.head_hidden": 64,
}
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def small_cfg(**sets):
    return build_config("tiny", None, {**SMALL, **sets}).model


class PerfectPredictor(XTRA):
    """Predicts every block exactly: head j's row i returns the true normalised block i+1+j."""

    def predict_head(self, images: torch.Tensor, head: int) -> torch.Tensor:
        t = self.targets(images)  # [B, K, P], model order
        return torch.cat([t[:, 1 + head :], torch.zeros_like(t[:, : 1 + head])], dim=1)


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


@pytest.mark.parametrize("order", ["raster", "random"])
def test_perfect_predictor_reassembles_the_input_on_blocks_2_to_K(order):
    torch.manual_seed(0)
    cfg = small_cfg(**{"model.block_order": order, "model.order_seed": 3})
    model = PerfectPredictor(cfg).eval()
    x = normalize(torch.as_tensor(random_images(3, 16)), MEAN, STD)
    pred, predicted = next_block_predictions(model, x)
    first = int(model.layout.order[0])
    assert predicted.sum() == cfg.num_blocks - 1 and not predicted[first]
    if order == "random":
        assert first != 0  # the first block follows the permutation (seed 3 does not start at 0)
    block_px = cfg.block_size * cfg.patch_size
    per_side = cfg.blocks_per_side
    for b in range(cfg.num_blocks):
        ys, xs = slice(b // per_side * block_px, (b // per_side + 1) * block_px), slice(
            b % per_side * block_px, (b % per_side + 1) * block_px)
        if b == first:  # no prediction: de-normalised like the others, i.e. its own mean
            block_mean = x[:, :, ys, xs].mean(dim=(1, 2, 3))  # [B]
            torch.testing.assert_close(pred[:, :, ys, xs], block_mean[:, None, None, None].expand(
                -1, 3, block_px, block_px), atol=1e-5, rtol=0)
        else:
            torch.testing.assert_close(pred[:, :, ys, xs], x[:, :, ys, xs], atol=1e-4, rtol=0)
    # and through uint8: exactly the input pixels, give or take rounding
    back = to_uint8(pred, MEAN, STD).numpy().astype(int)
    mask = np.ones((16, 16), bool)
    r, c = divmod(first, per_side)
    mask[r * block_px : (r + 1) * block_px, c * block_px : (c + 1) * block_px] = False
    assert np.abs(back[:, mask] - random_images(3, 16).astype(int)[:, mask]).max() <= 1


@pytest.mark.parametrize("order", ["raster", "random"])
def test_a_block_prediction_sees_only_the_true_blocks_before_it(order):
    torch.manual_seed(0)
    cfg = small_cfg(**{"model.block_order": order})
    model = XTRA(cfg).eval()
    x = torch.randn(1, 3, 16, 16)
    pred, _ = next_block_predictions(model, x)
    order_list = model.layout.order.tolist()
    j = 5  # perturb the block at position 5 of the order
    b = order_list[j]
    r, c = divmod(b, cfg.blocks_per_side)
    x2 = x.clone()
    x2[:, :, r * 4 : r * 4 + 4, c * 4 : c * 4 + 4] += 1.0
    pred2, _ = next_block_predictions(model, x2)
    for pos, blk in enumerate(order_list[1:], start=1):
        rr, cc = divmod(blk, cfg.blocks_per_side)
        same = torch.allclose(pred[..., rr * 4 : rr * 4 + 4, cc * 4 : cc * 4 + 4],
                              pred2[..., rr * 4 : rr * 4 + 4, cc * 4 : cc * 4 + 4], atol=1e-6)
        # positions up to j only see blocks before j (block j's own prediction is de-normalised
        # with its own, now changed, statistics); positions after j see the change
        assert same == (pos < j), (pos, j)


def test_figure4_picture_has_the_layout_size_grid_lines_and_a_mean_coloured_first_block(tmp_path):
    torch.manual_seed(0)
    cfg = small_cfg(**{"model.block_size": 2})  # 2x2 blocks of 8 px
    model = XTRA(cfg).eval()
    images = random_images(3, 16)
    out = tmp_path / "fig4.png"
    picture = figure4(model, images, MEAN, STD, out, title="test")
    layout = figure4_layout(3, cfg)
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (layout.height, layout.width, 3) == picture.shape
    assert np.array_equal(png, picture)
    scale = upscale_factor(16, 160)  # 10: panels of 160 px, blocks of 80 px
    p, cell = layout.panel, 80
    assert p == 160 == 16 * scale
    for row in range(3):
        top, left = layout.origin(row, 0)
        panel = png[top : top + p, left : left + p]
        for line in (0, cell, p - 1):  # grid lines on the block boundaries and the far border
            assert (panel[line, :] == GRID_RGB).all() and (panel[:, line] == GRID_RGB).all()
        # inside a block the input pixels, upscaled by nearest neighbour
        assert np.array_equal(panel[10, 95], images[row, 10 // scale, 95 // scale])
        ptop, pleft = layout.origin(row, 1)
        pred = png[ptop : ptop + p, pleft : pleft + p]
        first = {tuple(c) for c in pred[1:cell, 1:cell].reshape(-1, 3)}  # first block (raster)
        assert len(first) == 1 and HATCH_RGB not in first  # one flat colour, not hatched
        assert (pred[cell, :] == GRID_RGB).all()
        predicted_block = {tuple(c) for c in pred[cell + 1 : p - 1, cell + 1 : p - 1].reshape(-1, 3)}
        assert HATCH_RGB not in predicted_block and len(predicted_block) > 2


@pytest.mark.parametrize("title", [
    "xtra-encoder v1 on /tmp/fresh4/demo_out/fashion-mnist (test)",  # the demo's: it ran off both sides
    "xtra-encoder v12 on s3://bucket/" + "a-deep-prefix/" * 20 + " (test)",  # cut, with an ellipsis
])
def test_a_long_title_is_wrapped_inside_the_picture_above_the_column_titles(tmp_path, title):
    from pipelines.visualize.picture import COL_TITLE_BAND

    cfg = small_cfg(**{"model.block_size": 2})
    picture = figure4(XTRA(cfg).eval(), random_images(1, 16), MEAN, STD, tmp_path / "f.png", title=title)
    layout = figure4_layout(1, cfg)
    band = picture[: layout.title_h - COL_TITLE_BAND]
    ink = (band < 200).any(axis=2)
    assert ink.any()  # the title is drawn
    assert not ink[:, : layout.pad].any() and not ink[:, -layout.pad :].any()  # not cut at the sides
    assert not ink[-2:].any()  # ends above the column titles


def test_render_figure4_puts_the_prediction_pixels_in_their_blocks(tmp_path):
    cfg = small_cfg(**{"model.block_size": 2})
    inputs = random_images(1, 16, seed=1)
    preds = random_images(1, 16, seed=2)
    predicted = np.array([False, True, True, True])
    picture = render_figure4(inputs, preds, predicted, cfg, tmp_path / "p.png")
    layout = figure4_layout(1, cfg)
    top, left = layout.origin(0, 1)
    scale = layout.panel // 16
    assert np.array_equal(picture[top + 130, left + 20], preds[0, 130 // scale, 20 // scale])


def test_mask_picture_fills_exactly_the_pairs_that_may_attend(tmp_path):
    cfg = build_config("tiny", None, {"model.block_order": "random"}).model
    out = tmp_path / "mask.png"
    picture, raster, block_major = render_mask(cfg, out)
    layout = mask_layout(cfg)
    png = np.asarray(Image.open(out).convert("RGB"))
    assert png.shape == (layout.height, layout.width, 3)
    n = cfg.num_patches  # 64 tokens, 4 px per entry
    scale = layout.panel // n
    assert scale == 4
    rank = torch.argsort(torch.randperm(cfg.num_blocks, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(raster, block_causal_mask(cfg.grid, cfg.block_size, rank))
    assert torch.equal(block_major, torch.tril(torch.ones(16, 16, dtype=torch.bool)).repeat_interleave(4, 0).repeat_interleave(4, 1))
    for col, mask in ((0, raster), (1, block_major)):
        top, left = layout.origin(0, col)
        panel = png[top : top + layout.panel, left : left + layout.panel]
        centres = panel[scale // 2 :: scale, scale // 2 :: scale]  # [N, N, 3], one per entry
        expect = np.where(mask.numpy()[..., None], np.array(ATTEND_RGB), np.array(BLOCKED_RGB))
        assert np.array_equal(centres, expect)


def test_head_k_draws_the_block_k_ahead_and_leaves_the_first_k_plus_1_blocks_flat():
    torch.manual_seed(0)
    cfg = small_cfg(**{"model.blocks_ahead": 2})
    model = PerfectPredictor(cfg).eval()
    x = normalize(torch.as_tensor(random_images(2, 16)), MEAN, STD)
    pred, predicted = next_block_predictions(model, x, head=1)
    assert not predicted[0] and not predicted[1] and predicted[2:].all()  # raster order
    torch.testing.assert_close(pred[..., 4:, :], x[..., 4:, :], atol=1e-4, rtol=0)  # rows 2..4
    torch.testing.assert_close(pred[..., :4, 8:], x[..., :4, 8:], atol=1e-4, rtol=0)
    real = XTRA(cfg).eval()
    with pytest.raises(IndexError, match="has 2"):
        real.predict_head(x, 2)
    assert not torch.equal(next_block_predictions(real, x, 1)[0], next_block_predictions(real, x, 0)[0])
