"""Plain-PyTorch compile and bf16 autocast of the XTRA model, for measuring and testing it.

The product's training step uses neither: it compiles through DeepSpeed's `engine.compile`
(`model.compile`) and runs bf16 through DeepSpeed's config (`train.bf16`), see
`pipelines/pretrain/trainer.py`. These two are what `benchmarks/train_step.py` times the model's
own step with, and what tests/core/test_perf_features.py checks the maths against.

- `maybe_compile(model, cfg)`: `torch.compile` of the model when `model.compile` is set.
- `autocast(device, bf16)`: bf16 autocast around forward + loss (parameters stay fp32).
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from xtra_core.config import ModelConfig


def maybe_compile(model: nn.Module, cfg: ModelConfig, **compile_kwargs) -> nn.Module:
    """`torch.compile(model)` if `cfg.compile`, else `model` itself. The compiled module shares
    parameters and state_dict keys (under `_orig_mod.`) with `model`; keep a handle on `model` to
    save checkpoints with the plain keys."""
    if not cfg.compile:
        return model
    return torch.compile(model, **compile_kwargs)


def autocast(device: torch.device | str, bf16: bool) -> contextlib.AbstractContextManager:
    """bf16 autocast on `device`'s type (cuda or cpu) when `bf16`, else a no-op context."""
    device_type = torch.device(device).type
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16, enabled=bf16)
