"""XTRA: block-causal auto-regressive image model, in pure PyTorch."""

from xtra_core.config import ConfigError, XTRAConfig, build_config, preset
from xtra_core.masks import block_causal_mask
from xtra_core.model import XTRA, build_model

__all__ = ["XTRA", "ConfigError", "XTRAConfig", "block_causal_mask", "build_config", "build_model", "preset"]
