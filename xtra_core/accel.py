"""Opt-in accelerations of the training step that leave its maths unchanged.

- `maybe_compile(model, cfg)`: `torch.compile` of the model when `model.compile` is set (off by
  default: on CPU the first step compiles for minutes, see benchmarks/README.md).
- `autocast(device, bf16)`: bf16 autocast around forward + loss. Parameters, gradients and the
  optimiser state stay fp32 (mixed precision); matmuls and attention run in bf16.

The attention kernel (`model.attention`: "sdpa" | "flex"), activation checkpointing
(`model.activation_checkpointing`) and dropping the never-attended last block live in `model.py`;
the fused AdamW in `optim.py`. Each is tested equal to the plain path in tests/test_perf_features.py.
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
