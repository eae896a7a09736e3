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
import urllib.parse
from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationError, create_model
from pydantic.fields import FieldInfo

from pipelines.data.probe_augment import parse_rand_augment
from pipelines.redaction import redact
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


def validate_values(cfg: XTRAConfig, problems: list[str] | None = None) -> XTRAConfig:
    """Raise one ConfigError naming every out-of-range or wrongly typed value, every clash a
    section's own `validate()` finds, every unusable URL, and `problems` found before (keys that
    could not be applied); else return cfg."""
    problems = list(problems or [])
    for section in SECTIONS:
        obj = getattr(cfg, section)
        values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        before = len(problems)
        try:
            _section_model(section, type(obj)).model_validate(values)
        except ValidationError as e:
            for err in e.errors(include_url=False):
                name = err["loc"][0]
                where = "".join(f"[{i}]" for i in err["loc"][1:] if isinstance(i, int))
                value = err["input"] if where else values[name]
                problems.append(f"{section}.{name}{where}={_shown(value)} {_say(err)}")
        if len(problems) == before:  # types and ranges hold: the section's own cross-checks
            try:
                obj.validate()
            except ConfigError as e:
                problems.append(str(e))
            except (TypeError, ValueError, ArithmeticError) as e:  # a programmatic value pydantic let by
                problems.append(f"{section}: {e}")
    if isinstance(cfg.probe.rand_augment, str) and cfg.probe.rand_augment:
        try:
            parse_rand_augment(cfg.probe.rand_augment)
        except ValueError as e:
            problems.append(f"probe.rand_augment: {e}")
    for key, value in (("mlflow.tracking_uri", cfg.mlflow.tracking_uri), ("data.s3_endpoint", cfg.data.s3_endpoint)):
        if isinstance(value, str) and value:
            problem = url_problem(value)
            if problem:
                problems.append(f"{key}={redact(value)!r} {problem}")
    if problems:
        raise ConfigError(redact("; ".join(dict.fromkeys(" ".join(p.split()) for p in problems))))
    return cfg


def url_problem(url: str) -> str | None:
    """Why an http(s) URL cannot be used (a port that is no number, no host, a password whose
    '@', '/', ':' or '%' is not percent-encoded), else None. Other schemes pass."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https"):
        return None
    hint = " (percent-encode '@', '/', ':', '%' in a user name or password: '@' is %40, '/' is %2F)"
    if "@" in parts.path or "@" in parts.query:
        return "has an '@' after the host" + hint
    if not parts.hostname:
        return "names no host" + hint
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number in 0-65535
    except ValueError:
        return "has a port that is not a number in 0-65535" + hint
    if "%" in (parts.netloc.rpartition("@")[0]):
        try:
            urllib.parse.unquote(parts.netloc.rpartition("@")[0], errors="strict")
        except UnicodeDecodeError:
            return "has a user name or password that is not valid percent-encoding" + hint
    return None


def _shown(value: Any) -> str:
    """A value as an error line shows it: repr, cut at 80 characters (a huge value stays one line)."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _say(err: dict[str, Any]) -> str:
    """pydantic's message in our words: 'Input should be greater than 0' -> 'must be greater than 0'."""
    msg = str(err["msg"])
    if err.get("type") == "string_pattern_mismatch":
        return f"must match {err['ctx']['pattern']} (letters, digits, '.', '_', '-')"
    return msg.replace("Input should be", "must be").replace("Input", "the value")
