"""Configuration: dataclasses with defaults are the single source of truth.

A YAML file (parsed in `pipelines.config_io`) overrides them, and CLI `--set section.key=value`
overrides the YAML. Pure Python: nothing about YAML, Ray or pydantic. One job per module:

- `sections`: the five section dataclasses (`model` with the Table 6 ablation switches, `data`,
  `train`, `mlflow`, `probe`) and `XTRAConfig`; `validate()` names the values that clash;
- `ranges`: the allowed range of every bounded value, written once (also read by the CLI's
  pydantic check, `pipelines.config_validation`);
- `presets`: `tiny`, `vit_b16`, `vit_h14` (Table 1);
- `overrides`: YAML / `--set` overrides, type-checked, and `build_config`.

Everything is importable from `xtra_core.config`.
"""

from xtra_core.config.overrides import apply_overrides, build_config, config_from_dict, parse_dotted
from xtra_core.config.presets import (
    PRESETS,
    preset,
    small_data_probe,
    table2_probe,
    tiny,
    vit_b16,
    vit_h14,
)
from xtra_core.config.ranges import RANGES, ConfigError, Range, check_range
from xtra_core.config.sections import (
    SECTIONS,
    DataConfig,
    MLflowConfig,
    ModelConfig,
    ProbeConfig,
    TrainConfig,
    XTRAConfig,
)

__all__ = [
    "PRESETS",
    "small_data_probe",
    "RANGES",
    "SECTIONS",
    "ConfigError",
    "DataConfig",
    "MLflowConfig",
    "ModelConfig",
    "ProbeConfig",
    "Range",
    "TrainConfig",
    "XTRAConfig",
    "apply_overrides",
    "build_config",
    "check_range",
    "config_from_dict",
    "parse_dotted",
    "preset",
    "table2_probe",
    "tiny",
    "vit_b16",
    "vit_h14",
]
