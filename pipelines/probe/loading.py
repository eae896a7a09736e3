"""The frozen encoder a probe reads: from the registry, an export directory or a seeded random
init (`--random-init`, the baseline every pretrained score is read against). Frozen = eval mode
(no stochastic depth), `requires_grad=False`, features under `no_grad`; `state_checksum` proves the
weights did not change."""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from pipelines.data.images import normalize
from pipelines.errors import UserError
from xtra_core.accel import autocast
from xtra_core.config import ModelConfig, XTRAConfig
from xtra_core.model import Encoder, build_model


def freeze(encoder: Encoder) -> Encoder:
    """Eval mode (no stochastic depth) and no gradients: the trunk of a probe."""
    encoder.eval()
    encoder.requires_grad_(False)
    return encoder


def state_checksum(module: torch.nn.Module) -> str:
    """blake2b over every parameter and buffer (name, dtype, bytes): equal iff bit-identical."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def encode_images(
    encoder: Encoder,
    images: torch.Tensor,
    last_n: int,
    mean: Sequence[float],
    std: Sequence[float],
    bf16: bool = False,
) -> torch.Tensor:
    """uint8 images [B, H, W, 3] -> frozen features [B, N, D] float32 (mean of the last `last_n`
    blocks), the encoder under bf16 autocast when `bf16` (`xtra_core.precision` decides)."""
    device = next(encoder.parameters()).device
    with torch.no_grad():
        x = normalize(images.to(device), mean, std)  # [B, 3, H, W]
        with autocast(device, bf16):
            return encoder(x, last_n=last_n).float()


def encode_pooled_and_tokens(
    encoder: Encoder,
    images: torch.Tensor,
    tokens_last_n: int,
    mean: Sequence[float],
    std: Sequence[float],
    bf16: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One encoder pass for both probes: uint8 images [B, H, W, 3] -> (the linear probe's token
    mean of the last block [B, D], the attentive probe's mean of the last `tokens_last_n` blocks
    [B, N, D] in raster order, or None when `tokens_last_n` is 0), float32."""
    device = next(encoder.parameters()).device
    with torch.no_grad():
        x = normalize(images.to(device), mean, std)  # [B, 3, H, W]
        with autocast(device, bf16):
            _, kept = encoder.forward_sequence(x, keep_last=max(1, tokens_last_n))
        pooled = kept[-1].float().mean(1)  # [B, D]: the token mean does not depend on the order
        if not tokens_last_n:
            return pooled, None
        tokens = torch.stack(kept[-tokens_last_n:]).float().mean(0)  # [B, N, D] block-major
        return pooled, tokens[:, encoder.layout.inv_perm]  # as Encoder.forward: raster order


def random_encoder(model_cfg: ModelConfig, seed: int) -> Encoder:
    """A freshly initialised encoder (XTRA's own init) of `model_cfg`, the same for the same seed."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_model(copy.deepcopy(model_cfg)).encoder


def load_frozen_encoder(
    cfg: XTRAConfig, model_ref: str | None, random_init: bool, uri: str | None = None
) -> tuple[Encoder, ModelConfig, dict[str, Any]]:
    """(frozen encoder, its ModelConfig, info) for `--model` / `--random-init`; a registry URI
    is looked up in the MLflow store at `uri`.

    info: the registry's name/version/run_id for registry URIs, `source`, and `random_init`."""
    from pipelines.tracking.registry import load_encoder_with_info

    if model_ref:
        encoder, model_cfg, info = load_encoder_with_info(model_ref, uri)
    elif random_init:
        encoder, model_cfg, info = None, copy.deepcopy(cfg.model), {"source": "config"}
    else:
        raise UserError(
            "xtra probe needs --model (models:/name/version, models:/name@alias or an export "
            "directory), or --random-init to probe a random encoder of the config's model"
        )
    if random_init:
        encoder = random_encoder(model_cfg, cfg.probe.seed)
    info = {**info, "random_init": random_init}
    return freeze(encoder), model_cfg, info
