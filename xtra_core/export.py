"""Export: full-precision weights as safetensors next to the model config (JSON).

Two kinds of export directory, both readable with torch + safetensors alone (no Ray, MLflow or
DeepSpeed), so an encoder can be taken out of this repository:

- an encoder export: `encoder.safetensors` + `config.json` (what the registry holds; probes and
  downstream users need only this);
- a full-model export: `model.safetensors` + `config.json` (encoder, projection, decoder and
  heads: what next-block predictions, e.g. the Figure-4 picture, need).

`config.json` is `{"model": <ModelConfig fields>, ...extra}`; extra keys (run name, the input
normalisation) are kept for the reader and ignored on load. The exported config asks for the
portable attention kernel (SDPA, no torch.compile, no activation checkpointing): those are
training-time choices with identical maths, and a reader may have no compiler for FlexAttention.

    encoder = xtra_core.load_encoder("export/")        # Encoder, eval mode
    model = xtra_core.export.load_model("model_export/")  # XTRA, eval mode
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from xtra_core.config import ModelConfig, apply_overrides, preset
from xtra_core.model import XTRA, Encoder

WEIGHTS = "encoder.safetensors"
MODEL_WEIGHTS = "model.safetensors"
CONFIG = "config.json"
ENCODER_PREFIX = "encoder."


def portable(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with the training-only runtime switches off (same maths, no compiler needed)."""
    return dataclasses.replace(cfg, attention="sdpa", compile=False, activation_checkpointing=False)


def _write(
    tensors: dict[str, torch.Tensor], name: str, cfg: ModelConfig, out_dir: str | Path, extra: dict | None
) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fp32 = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in tensors.items()}
    save_file(fp32, str(out / name))
    meta = {"model": dataclasses.asdict(portable(cfg)), **(extra or {})}
    (out / CONFIG).write_text(json.dumps(meta, indent=2, default=list))
    return out


def save_encoder(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, extra: dict | None = None
) -> Path:
    """Write `encoder.safetensors` (fp32, contiguous) and `config.json` into `out_dir`."""
    return _write(state_dict, WEIGHTS, cfg, out_dir, extra)


def save_model(
    state_dict: dict[str, torch.Tensor], cfg: ModelConfig, out_dir: str | Path, extra: dict | None = None
) -> Path:
    """Write the whole XTRA (`model.safetensors`, fp32) and `config.json` into `out_dir`."""
    return _write(state_dict, MODEL_WEIGHTS, cfg, out_dir, extra)


def read_meta(export_dir: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of an export directory."""
    path = Path(export_dir) / CONFIG
    if not path.exists():
        raise FileNotFoundError(f"{export_dir}: no {CONFIG}; not an XTRA export")
    return json.loads(path.read_text())


def load_model_config(export_dir: str | Path) -> ModelConfig:
    meta = read_meta(export_dir)
    # exports written before `projection_bias` existed have the bias
    model = {"projection_bias": True, **meta["model"]}
    cfg = apply_overrides(preset("tiny"), {"model": model}).model
    cfg.validate()
    return cfg


def has_full_model(export_dir: str | Path) -> bool:
    return (Path(export_dir) / MODEL_WEIGHTS).exists() and (Path(export_dir) / CONFIG).exists()


def load_encoder(export_dir: str | Path, map_location: str = "cpu") -> Encoder:
    """Rebuild the encoder from an export directory (strict: every weight must match).

    Reads `encoder.safetensors`, or the `encoder.*` tensors of a full-model export."""
    cfg = load_model_config(export_dir)
    weights = Path(export_dir) / WEIGHTS
    if weights.exists():
        state = load_file(str(weights), device=map_location)
    elif has_full_model(export_dir):
        full = load_file(str(Path(export_dir) / MODEL_WEIGHTS), device=map_location)
        state = {k[len(ENCODER_PREFIX) :]: v for k, v in full.items() if k.startswith(ENCODER_PREFIX)}
    else:
        raise FileNotFoundError(f"{export_dir}: no {WEIGHTS} or {MODEL_WEIGHTS}; not an XTRA export")
    encoder = Encoder(cfg)
    encoder.load_state_dict(state, strict=True)
    return encoder.eval()


def load_model(export_dir: str | Path, map_location: str = "cpu") -> XTRA:
    """Rebuild the whole XTRA (encoder, projection, decoder, heads) from a full-model export."""
    cfg = load_model_config(export_dir)
    weights = Path(export_dir) / MODEL_WEIGHTS
    if not weights.exists():
        raise FileNotFoundError(
            f"{export_dir}: no {MODEL_WEIGHTS}; this export holds only the encoder"
        )
    model = XTRA(cfg)
    model.load_state_dict(load_file(str(weights), device=map_location), strict=True)
    return model.eval()
