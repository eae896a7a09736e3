"""bf16 runs: the per-block targets come from the fp32 images before the network's cast."""

from __future__ import annotations

import torch

from xtra_core.config import ModelConfig
from xtra_core.model import XTRA


def test_bf16_model_computes_targets_from_the_fp32_images():
    cfg = ModelConfig(image_size=16, patch_size=2, block_size=2, encoder_width=32, encoder_depth=2,
                      encoder_heads=2, projection_hidden=64, decoder_width=24, decoder_depth=2,
                      decoder_heads=2, head_hidden=64)
    torch.manual_seed(0)
    model = XTRA(cfg).eval().to(torch.bfloat16)
    images = torch.randn(2, 3, 16, 16)  # fp32, as the data pipeline normalises them
    loss = model.loss(images)
    assert loss.dtype == torch.float32
    with torch.no_grad():
        z = model.decoder_output_by_block(images, drop_last_block=True)  # the bf16 network's features
        preds = [head(z).float() for head in model.heads]
        fp32_targets = model.targets(images)
        cast_targets = model.targets(images.to(torch.bfloat16).float())
    assert fp32_targets.dtype == torch.float32
    assert torch.equal(loss.detach(), model.forward_loss(preds, fp32_targets))
    # the targets of the cast images differ: the loss would have seen bf16-rounded pixels
    assert not torch.equal(fp32_targets, cast_targets)
