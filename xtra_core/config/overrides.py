"""Overrides: nested `{section: {key: value}}` (a YAML file) and dotted `{"section.key": value}`
(`--set`) applied to a preset, each value checked against its field's type (ints for floats, lists
for tuples); unknown sections and keys are errors naming the valid ones. `build_config` is the one
way in: preset <- YAML <- `--set`, validated.

Hand-written rather than pydantic: xtra_core imports no pydantic (workers and `load_encoder` build
configs here), and the rules are YAML's (a `1e-3` string is a float, `1.0` an int, a bool is no int).
"""

from __future__ import annotations

import copy
import dataclasses
import math
import types
import typing
from typing import Any

from xtra_core.config.presets import preset
from xtra_core.config.ranges import ConfigError
from xtra_core.config.sections import SECTIONS, XTRAConfig


def parse_dotted(pairs: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """`{"train.max_steps": 5}` -> `{"train": {"max_steps": 5}}`; a key without a dot is an error."""
    nested: dict[str, dict[str, Any]] = {}
    for key, value in pairs.items():
        if "." not in key:
            raise ConfigError(
                f"override key {key!r} must be section.key with section one of {list(SECTIONS)}"
            )
        section, name = key.split(".", 1)
        nested.setdefault(section, {})[name] = value
    return nested


def apply_overrides(cfg: XTRAConfig, overrides: dict[str, Any]) -> XTRAConfig:
    """A copy of `cfg` with nested overrides `{section: {key: value}}` applied and type-checked.

    Unknown sections or keys raise ConfigError naming the valid ones.
    """
    cfg = copy.deepcopy(cfg)
    for section, values in overrides.items():
        if section == "preset":
            continue
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r}; valid sections: {list(SECTIONS)}")
        if not isinstance(values, dict):
            raise ConfigError(f"config section {section!r} must be a mapping, got {values!r}")
        obj = getattr(cfg, section)
        hints = typing.get_type_hints(type(obj))
        valid = [f.name for f in dataclasses.fields(obj)]
        for key, value in values.items():
            if key not in valid:
                raise ConfigError(
                    f"unknown config key {section}.{key!r}; valid keys of {section!r}: {valid}"
                )
            setattr(obj, key, _coerce(f"{section}.{key}", value, hints[key]))
    return cfg


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Check `value` against the field type `tp`; accept ints for floats, lists for tuples."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        for member in inner[:-1]:  # the first member that takes the value
            try:
                return _coerce(key, value, member)
            except ConfigError:
                pass
        return _coerce(key, value, inner[-1])
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise ConfigError(f"{key} must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(key, v, a) for v, a in zip(value, args))
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                out = float(value)
            except ValueError:
                pass
            else:
                if math.isfinite(out):
                    return out
        raise ConfigError(f"{key} must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def build_config(
    base: str | XTRAConfig = "tiny",
    overrides: dict[str, Any] | None = None,
    dotted: dict[str, Any] | None = None,
) -> XTRAConfig:
    """Preset (or config) <- nested overrides (YAML) <- dotted overrides (`--set`), validated."""
    cfg = preset(base) if isinstance(base, str) else base
    overrides = dict(overrides or {})
    name = overrides.pop("preset", None)
    if name is not None:
        if not isinstance(name, str):
            raise ConfigError(f"preset must be a name, got {name!r}")
        cfg = preset(name)
    cfg = apply_overrides(cfg, overrides)
    if dotted:
        cfg = apply_overrides(cfg, parse_dotted(dotted))
    return cfg.validate()


def config_from_dict(d: dict[str, Any]) -> XTRAConfig:
    """Inverse of `XTRAConfig.to_dict()` (used to load exported configs)."""
    d = dict(d)
    base = preset(d.pop("preset", "tiny"))
    return apply_overrides(base, d).validate()
