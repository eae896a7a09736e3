"""XTRA: block-causal auto-regressive image model, in pure PyTorch."""

from xtra_core.config import ConfigError, XTRAConfig, build_config, preset
from xtra_core.export import load_encoder, load_model
from xtra_core.masks import block_causal_mask
from xtra_core.model import XTRA, build_model

__all__ = [
    "XTRA",
    "ConfigError",
    "XTRAConfig",
    "block_causal_mask",
    "build_config",
    "build_model",
    "load_encoder",
    "load_model",
    "preset",
]
