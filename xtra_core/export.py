"""Encoder export: full-precision weights as safetensors next to the model config (JSON)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from xtra_core.config import ModelConfig, apply_overrides, preset
from xtra_core.model import Encoder

WEIGHTS = "encoder.safetensors"
CONFIG = "config.json"


def save_encoder(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, extra: dict | None = None
) -> Path:
    """Write `encoder.safetensors` (fp32, contiguous) and `config.json` into `out_dir`."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in state_dict.items()}
    save_file(tensors, str(out / WEIGHTS))
    meta = {"model": dataclasses.asdict(cfg), **(extra or {})}
    (out / CONFIG).write_text(json.dumps(meta, indent=2, default=list))
    return out


def load_model_config(export_dir: str | Path) -> ModelConfig:
    path = Path(export_dir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{export_dir}: no {CONFIG}; not an XTRA encoder export")
    meta = json.loads(path.read_text())
    cfg = apply_overrides(preset("tiny"), {"model": meta["model"]}).model
    cfg.validate()
    return cfg


def load_encoder(export_dir: str | Path, map_location: str = "cpu") -> Encoder:
    """Rebuild the encoder from an export directory (strict: every weight must match)."""
    cfg = load_model_config(export_dir)
    weights = Path(export_dir) / WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(f"{export_dir}: no {WEIGHTS}; not an XTRA encoder export")
    encoder = Encoder(cfg)
    encoder.load_state_dict(load_file(str(weights), device=map_location), strict=True)
    return encoder.eval()
