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

from xtra_core.config import ConfigError, ModelConfig, apply_overrides, preset
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


class ExportError(ConfigError):
    """An export directory that cannot be read as one: its config.json is not JSON or has no
    `model`, or the config does not describe the weights next to it. One line, naming the file."""


def read_meta(export_dir: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of an export directory."""
    path = Path(export_dir) / CONFIG
    if not path.is_file():
        raise ExportError(f"{export_dir}: no {CONFIG}; not an XTRA export")
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ExportError(f"{path}: not valid JSON ({e}); not an XTRA export") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model"), dict):
        raise ExportError(f"{path}: no 'model' mapping of ModelConfig fields; not an XTRA export")
    return meta


def load_model_config(export_dir: str | Path) -> ModelConfig:
    meta = read_meta(export_dir)
    # exports written before `projection_bias` existed have the bias
    model = {"projection_bias": True, **meta["model"]}
    try:
        cfg = apply_overrides(preset("tiny"), {"model": model}).model
        cfg.validate()
    except ConfigError as e:
        raise ExportError(f"{Path(export_dir) / CONFIG}: {e}") from None
    return cfg


def weight_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """The tensor shapes of a safetensors file, read from its header (nothing is loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}  # noqa: SIM118


def _depth(shapes: dict[str, tuple[int, ...]], prefix: str) -> int:
    """Blocks `<prefix>N.` in a state dict: 1 + the largest N."""
    found = [int(k[len(prefix):].split(".", 1)[0]) for k in shapes
             if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()]
    return max(found) + 1 if found else 0


def check_weights(cfg: ModelConfig, path: str | Path, full: bool) -> None:
    """The config of an export must describe the weights beside it, checked before anything is
    built: first the sizes that bound what a build allocates (tokens and width from `pos_embed`,
    the number of blocks), then every tensor's shape against the model built on the meta device
    (no memory). A config.json that claims a width of 1,048,576 next to small weights is refused
    here, in one line, instead of allocating terabytes."""
    shapes = weight_shapes(path)
    enc = ENCODER_PREFIX if full else ""
    pos = shapes.get(f"{enc}pos_embed")
    claims = (1, cfg.num_patches, cfg.encoder_width)
    if pos is None:
        raise ExportError(f"{path}: no {enc}pos_embed tensor; not XTRA weights")
    if tuple(pos) != claims:
        raise ExportError(
            f"{Path(path).parent / CONFIG}: the config (image_size={cfg.image_size}, "
            f"patch_size={cfg.patch_size}, encoder_width={cfg.encoder_width}) needs pos_embed "
            f"{list(claims)}, but {Path(path).name} holds {list(pos)}")
    depths = {"encoder_depth": (cfg.encoder_depth, _depth(shapes, f"{enc}blocks."))}
    if full:
        depths["decoder_depth"] = (cfg.decoder_depth, _depth(shapes, "decoder.blocks."))
        depths["blocks_ahead"] = (cfg.blocks_ahead, _depth(shapes, "heads."))
    for key, (claimed, held) in depths.items():
        if claimed != held:
            raise ExportError(f"{Path(path).parent / CONFIG}: model.{key}={claimed}, but "
                              f"{Path(path).name} holds {held}")
    with torch.device("meta"):  # shapes only; sizes bounded by the weights' own above
        model = XTRA(cfg) if full else Encoder(cfg)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [f"{k} {list(expected[k])} vs {list(shapes[k])}" for k in expected
             if k in shapes and expected[k] != shapes[k]]
    missing = sorted(set(expected) - set(shapes))
    extra = sorted(set(shapes) - set(expected)) if full else []
    if wrong or missing or extra:
        said = "; ".join(filter(None, [
            f"shapes differ (config vs weights): {', '.join(wrong[:3])}" if wrong else "",
            f"missing: {', '.join(missing[:3])}" if missing else "",
            f"unexpected: {', '.join(extra[:3])}" if extra else ""]))
        raise ExportError(f"{Path(path).parent / CONFIG} does not describe {Path(path).name}: {said}")


def has_full_model(export_dir: str | Path) -> bool:
    return (Path(export_dir) / MODEL_WEIGHTS).exists() and (Path(export_dir) / CONFIG).exists()


def load_encoder(export_dir: str | Path, map_location: str = "cpu") -> Encoder:
    """Rebuild the encoder from an export directory (strict: every weight must match).

    Reads `encoder.safetensors`, or the `encoder.*` tensors of a full-model export."""
    cfg = load_model_config(export_dir)
    weights = Path(export_dir) / WEIGHTS
    if weights.exists():
        check_weights(cfg, weights, full=False)
        state = load_file(str(weights), device=map_location)
    elif has_full_model(export_dir):
        check_weights(cfg, Path(export_dir) / MODEL_WEIGHTS, full=True)
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
    check_weights(cfg, weights, full=True)
    model = XTRA(cfg)
    model.load_state_dict(load_file(str(weights), device=map_location), strict=True)
    return model.eval()
