"""Reading configs: a preset name or a YAML file, then `--set section.key=value` overrides."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml

from pipelines.config_validation import validate_values
from xtra_core.config import PRESETS, ConfigError, XTRAConfig, apply_overrides, parse_dotted, preset

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader, with YAML 1.2's floats: `1e-3` and `3E+2` are numbers (YAML 1.1,
    PyYAML's default, needs a dot and a signed exponent, so `lr: 1e-3` was the string '1e-3')."""


_Loader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"""),
    list("-+0123456789"),
)


def load_yaml(text: str) -> Any:
    """`yaml.safe_load` that reads `1e-3` as a float (configs, `--set` and `--axis` values)."""
    return yaml.load(text, Loader=_Loader)  # noqa: S506 - a SafeLoader subclass


def parse_set(items: list[str] | None) -> dict[str, Any]:
    """`["train.max_steps=5", "probe.lrs=[0.001,0.003]"]` -> dotted dict, values parsed as YAML."""
    out: dict[str, Any] = {}
    for item in items or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r} must look like section.key=value")
        key, raw = item.split("=", 1)
        try:
            out[key.strip()] = load_yaml(raw) if raw.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"--set {key}: value {raw!r} is not valid YAML: {e}") from None
    return out


def load_config(config: str = "tiny", sets: list[str] | None = None) -> XTRAConfig:
    """`config` is a preset name (`tiny`, `vit_b16`, `vit_h14`), a YAML path, or the stem of a
    file in `configs/` (`vit_b16_in1k`). The YAML may name a `preset:` and override sections.

    Every bad key (unknown, wrongly typed, out of range, clashing) is named in one ConfigError."""
    dotted = parse_set(sets)
    if config in PRESETS:
        return build_checked(config, {}, dotted)
    path = Path(config)
    if not path.exists() and (CONFIG_DIR / f"{config}.yaml").exists():
        path = CONFIG_DIR / f"{config}.yaml"
    if not path.exists():
        raise ConfigError(
            f"--config {config!r} is neither a preset {sorted(PRESETS)} nor a YAML file "
            f"(also looked in {CONFIG_DIR})"
        )
    if not path.is_file():
        raise ConfigError(f"--config {config!r} is a directory, not a YAML file")
    try:
        data = load_yaml(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"--config {config!r} cannot be read: {e.strerror if isinstance(e, OSError) else e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections")
    try:
        return build_checked(data.pop("preset", "tiny"), data, dotted)
    except ConfigError as e:
        raise ConfigError(f"{path}: {e}") from None


def build_checked(base: Any, nested: dict[str, Any], dotted: dict[str, Any]) -> XTRAConfig:
    """Preset name (or a config) <- YAML sections <- `--set`, each key applied on its own so that
    every bad one is named (not only the first), then checked (`validate_values`: types and
    ranges before the sections' cross-checks). The one validation of every command, sweep grid
    points included."""
    if isinstance(base, XTRAConfig):
        cfg = base
    elif isinstance(base, str) and base in PRESETS:
        cfg = preset(base)
    else:
        raise ConfigError(f"preset {base!r} is not one of {sorted(PRESETS)}")
    problems: list[str] = []
    for layer in (nested, parse_dotted(dotted)):
        for section, values in layer.items():
            if not isinstance(values, dict):
                try:
                    apply_overrides(cfg, {section: values})
                except ConfigError as e:
                    problems.append(str(e))
                continue
            for key, value in values.items():
                try:
                    cfg = apply_overrides(cfg, {section: {key: value}})
                except ConfigError as e:
                    problems.append(str(e))
    return validate_values(cfg, problems)
