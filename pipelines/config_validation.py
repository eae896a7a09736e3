"""Config values checked by type and range with pydantic, before any compute.

The dataclasses in `xtra_core.config` stay the one source of the keys, types and defaults, and
`xtra_core.config.ranges` the one source of the ranges (xtra_core imports no pydantic; its sections'
`validate()` checks some of the same ranges from the same table). `validate_values(cfg)` builds a
pydantic model per section from the dataclass fields (their type hints, plus the range where one is
given), checks timm's `probe.rand_augment` spec, and raises one `ConfigError` naming every bad key
with its value:

    train.lr=-1.0 must be greater than 0; train.num_to_keep=0 must be greater than or equal to 1

`pipelines.config_io.load_config` (every CLI command) and `run_pretraining` call it.
"""

from __future__ import annotations

import dataclasses
import functools
import typing
from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from pipelines.data.probe_augment import parse_rand_augment
from xtra_core.config import RANGES, SECTIONS, ConfigError, XTRAConfig

# "section.key": a pydantic Field, applied to the value or to each item of a tuple; the ranges are
# xtra_core's, written once in `xtra_core.config.ranges`
CONSTRAINTS: dict[str, FieldInfo] = {key: Field(**rule.bounds()) for key, rule in RANGES.items()}


def _constrained(tp: Any, rule: FieldInfo) -> Any:
    """The dataclass field type `tp` with `rule` applied to the value, tuple items or the
    non-None member of an Optional."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, _UnionType):
        inner = [_constrained(a, rule) if a is not type(None) else a for a in args]
        return typing.Union[tuple(inner)]  # noqa: UP007 (built from a runtime list)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple[Annotated[args[0], rule], ...]
        return tuple[tuple(Annotated[a, rule] for a in args)]
    return Annotated[tp, rule]


_UnionType = type(int | None)


@functools.cache
def _section_model(section: str, cls: type) -> type:
    """A pydantic model of one config section: the dataclass's fields and types, our ranges."""
    hints = typing.get_type_hints(cls)
    fields: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        rule = CONSTRAINTS.get(f"{section}.{f.name}")
        fields[f.name] = (_constrained(tp, rule) if rule is not None else tp, ...)
    return create_model(
        f"{cls.__name__}Values",
        __config__=ConfigDict(strict=False, allow_inf_nan=False, extra="forbid"),
        **fields,
    )


def validate_values(cfg: XTRAConfig) -> XTRAConfig:
    """Raise one ConfigError naming every out-of-range or wrongly typed value; else return cfg."""
    problems: list[str] = []
    for section in SECTIONS:
        obj = getattr(cfg, section)
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        try:
            _section_model(section, type(obj)).model_validate(values)
        except ValidationError as e:
            for err in e.errors(include_url=False):
                name = err["loc"][0]
                where = "".join(f"[{i}]" for i in err["loc"][1:] if isinstance(i, int))
                value = err["input"] if where else values[name]
                problems.append(f"{section}.{name}{where}={value!r} {_say(err)}")
    if isinstance(cfg.probe.rand_augment, str) and cfg.probe.rand_augment:
        try:
            parse_rand_augment(cfg.probe.rand_augment)
        except ValueError as e:
            problems.append(f"probe.rand_augment: {e}")
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def _say(err: dict[str, Any]) -> str:
    """pydantic's message in our words: 'Input should be greater than 0' -> 'must be greater than 0'."""
    msg = str(err["msg"])
    if err.get("type") == "string_pattern_mismatch":
        return f"must match {err['ctx']['pattern']} (letters, digits, '.', '_', '-')"
    return msg.replace("Input should be", "must be").replace("Input", "the value")
