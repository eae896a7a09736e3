"""Config values checked by type and range with pydantic, before any compute.

The dataclasses in `xtra_core.config` stay the one source of the keys, types and defaults (xtra_core
imports no pydantic); the ranges live here, once, in `CONSTRAINTS`. `validate_values(cfg)` builds a
pydantic model per section from the dataclass fields (their type hints, plus the constraint where
one is given) and raises one `ConfigError` naming every bad key with its value:

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

from xtra_core.config import SECTIONS, ConfigError, XTRAConfig

# a run name becomes a directory under train.storage_path, an MLflow tag in a search filter and part
# of Ray actor names: letters, digits, '.', '_', '-', starting with a letter or digit (no '/', no
# quotes, no '..' path step)
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,255}$"  # lives inside models:/name/version

_POS = Field(gt=0)
_AT_LEAST_1 = Field(ge=1)
_NON_NEG = Field(ge=0)
_UNIT = Field(ge=0.0, le=1.0)
_BETA = Annotated[float, Field(ge=0.0, lt=1.0)]

# "section.key": a pydantic Field (applies to the value, or to each item of a tuple) or a full type
CONSTRAINTS: dict[str, Any] = {
    "model.image_size": _AT_LEAST_1,
    "model.patch_size": _AT_LEAST_1,
    "model.in_chans": _AT_LEAST_1,
    "model.block_size": _AT_LEAST_1,
    "model.encoder_width": _AT_LEAST_1,
    "model.encoder_depth": _AT_LEAST_1,
    "model.encoder_heads": _AT_LEAST_1,
    "model.mlp_ratio": _POS,
    "model.projection_hidden": _AT_LEAST_1,
    "model.decoder_width": _AT_LEAST_1,
    "model.decoder_depth": _NON_NEG,
    "model.decoder_heads": _AT_LEAST_1,
    "model.head_hidden": _AT_LEAST_1,
    "model.blocks_ahead": _AT_LEAST_1,
    "model.order_seed": _NON_NEG,
    "model.drop_path": Field(ge=0.0, lt=1.0),
    "model.norm_pix_eps": _POS,
    "data.hflip_prob": _UNIT,
    "data.std": _POS,
    "data.max_image_pixels": _AT_LEAST_1,
    "data.seed": _NON_NEG,
    "train.epochs": _AT_LEAST_1,
    "train.max_steps": _AT_LEAST_1,
    "train.stop_at_step": _AT_LEAST_1,
    "train.steps_per_epoch": _AT_LEAST_1,
    "train.global_batch_size": _AT_LEAST_1,
    "train.micro_batch_size": _AT_LEAST_1,
    "train.num_workers": _AT_LEAST_1,
    "train.cpus_per_worker": _POS,
    "train.zero_stage": Field(ge=0, le=3),
    "train.zero_bucket_size": _AT_LEAST_1,
    "train.lr": _POS,
    "train.min_lr": _NON_NEG,
    "train.warmup_epochs": _NON_NEG,
    "train.warmup_steps": _NON_NEG,
    "train.weight_decay": _NON_NEG,
    "train.betas": tuple[_BETA, _BETA],
    "train.grad_clip": _NON_NEG,  # 0 = no clipping (DeepSpeed's convention)
    "train.checkpoint_every": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1,
    "train.num_to_keep": _AT_LEAST_1,
    "train.max_failures": Field(ge=-1),  # -1 = restart without limit (Ray's convention)
    "train.seed": _NON_NEG,
    "train.run_name": Field(pattern=RUN_NAME_PATTERN),
    "mlflow.experiment": Field(min_length=1),
    "mlflow.registered_model": Field(pattern=MODEL_NAME_PATTERN),
    "probe.epochs": _AT_LEAST_1,
    "probe.lrs": _POS,
    "probe.min_lr": _NON_NEG,
    "probe.weight_decay": _NON_NEG,
    "probe.betas": tuple[_BETA, _BETA],
    "probe.grad_clip": _NON_NEG,
    "probe.batch_size": Field(ge=2),  # the probes' BatchNorm needs two samples
    "probe.max_train_images": _AT_LEAST_1,
    "probe.max_test_images": _AT_LEAST_1,
    "probe.val_fraction": Field(gt=0.0, lt=1.0),
    "probe.attentive_last_n": _AT_LEAST_1,
    "probe.attentive_heads": _AT_LEAST_1,
    "probe.seed": _NON_NEG,
}


def _constrained(tp: Any, rule: Any) -> Any:
    """The dataclass field type `tp` with `rule` applied to the value, tuple items or the
    non-None member of an Optional."""
    if not isinstance(rule, FieldInfo):
        return rule if typing.get_origin(tp) not in (typing.Union, _UnionType) else rule | None
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
    if problems:
        raise ConfigError("; ".join(problems))
    return cfg


def _say(err: dict[str, Any]) -> str:
    """pydantic's message in our words: 'Input should be greater than 0' -> 'must be greater than 0'."""
    msg = str(err["msg"])
    if err.get("type") == "string_pattern_mismatch":
        return f"must match {err['ctx']['pattern']} (letters, digits, '.', '_', '-')"
    return msg.replace("Input should be", "must be").replace("Input", "the value")
