"""The allowed range of every bounded config value, written once.

`RANGES["section.key"]` bounds the value (or each item of a tuple) with pydantic's names (`gt`, `ge`,
`lt`, `le`, `pattern`, `min_length`). Two readers:
- the dataclasses' `validate()` (`sections.py`) checks, with `check_range`, the ranges a
  programmatic config must meet (the ones the model and the data code rely on);
- every CLI command checks all of them, with the types, through pydantic
  (`pipelines.config_validation`, which turns each `Range` into a `pydantic.Field`).

Pure Python: xtra_core imports no pydantic.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any


class ConfigError(ValueError):
    """An invalid configuration: an unknown key, a wrongly typed value or values that clash."""


@dataclass(frozen=True)
class Range:
    """Bounds on one value, or on each item of a tuple value."""

    gt: float | None = None
    ge: float | None = None
    lt: float | None = None
    le: float | None = None
    pattern: str | None = None  # a string value must match (re.search, as pydantic)
    min_length: int | None = None

    def bounds(self) -> dict[str, Any]:
        """The bounds that are set, by pydantic's keyword names."""
        return {k: v for k, v in vars(self).items() if v is not None}

    def holds(self, value: Any) -> bool:
        if isinstance(value, str):
            return (self.pattern is None or re.search(self.pattern, value) is not None) and (
                self.min_length is None or len(value) >= self.min_length
            )
        return not (
            (self.gt is not None and not value > self.gt)
            or (self.ge is not None and not value >= self.ge)
            or (self.lt is not None and not value < self.lt)
            or (self.le is not None and not value <= self.le)
        )

    def words(self) -> str:
        """`in [0, 1)`, `>= 1`, `> 0`, or `0, 1, 2 or 3` for a short closed integer range."""
        lo, lo_in = (self.ge, True) if self.ge is not None else (self.gt, False)
        hi, hi_in = (self.le, True) if self.le is not None else (self.lt, False)
        if lo is not None and hi is not None:
            if lo_in and hi_in and isinstance(lo, int) and isinstance(hi, int) and hi - lo < 5:
                *first, last = range(lo, hi + 1)
                return f"{', '.join(map(str, first))} or {last}"
            return f"in {'[' if lo_in else '('}{lo:g}, {hi:g}{']' if hi_in else ')'}"
        if lo is not None:
            return f"{'>=' if lo_in else '>'} {lo:g}"
        if hi is not None:
            return f"{'<=' if hi_in else '<'} {hi:g}"
        return f"a string matching {self.pattern}"


# a run name becomes a directory under train.storage_path, an MLflow tag in a search filter and part
# of Ray actor names: letters, digits, '.', '_', '-', starting with a letter or digit (no '/', no
# quotes, no '..' path step)
RUN_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
MODEL_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._ -]{0,255}$"  # lives inside models:/name/version

_POS = Range(gt=0)
_AT_LEAST_1 = Range(ge=1)
_NON_NEG = Range(ge=0)
_UNIT = Range(ge=0.0, le=1.0)
_BETA = Range(ge=0.0, lt=1.0)  # each of the two Adam betas

RANGES: dict[str, Range] = {
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
    "model.blocks_ahead": _AT_LEAST_1,  # and < the number of blocks (ModelConfig.validate)
    "model.order_seed": _NON_NEG,
    "model.drop_path": Range(ge=0.0, lt=1.0),
    "model.norm_pix_eps": _POS,
    "data.hflip_prob": _UNIT,
    "data.std": _POS,
    "data.max_image_pixels": _AT_LEAST_1,
    "data.max_image_bytes": _AT_LEAST_1,
    "data.min_image_side": _AT_LEAST_1,
    "data.max_bad_fraction": _UNIT,
    "data.s3_max_attempts": _AT_LEAST_1,
    "data.s3_connect_timeout_s": _POS,
    "data.s3_request_timeout_s": _POS,
    "data.seed": _NON_NEG,
    "train.epochs": _AT_LEAST_1,
    "train.max_steps": _AT_LEAST_1,
    "train.stop_at_step": _AT_LEAST_1,
    "train.steps_per_epoch": _AT_LEAST_1,
    "train.global_batch_size": _AT_LEAST_1,
    "train.micro_batch_size": _AT_LEAST_1,
    "train.num_workers": _AT_LEAST_1,
    "train.cpus_per_worker": _POS,
    "train.zero_stage": Range(ge=0, le=3),
    "train.zero_bucket_size": _AT_LEAST_1,
    "train.lr": _POS,
    "train.min_lr": _NON_NEG,
    "train.warmup_epochs": _NON_NEG,
    "train.warmup_steps": _NON_NEG,
    "train.weight_decay": _NON_NEG,
    "train.betas": _BETA,
    "train.grad_clip": _NON_NEG,  # 0 = no clipping (DeepSpeed's convention)
    "train.checkpoint_every": _AT_LEAST_1,
    "train.log_every": _AT_LEAST_1,
    "train.num_to_keep": _AT_LEAST_1,
    "train.max_failures": Range(ge=-1),  # -1 = restart without limit (Ray's convention)
    "train.resource_wait_s": _NON_NEG,  # 0 = do not wait for the autoscaler
    "train.seed": _NON_NEG,
    "train.run_name": Range(pattern=RUN_NAME_PATTERN),
    "train.visualize_every": _NON_NEG,  # 0 = off
    "train.visualize_images": _AT_LEAST_1,
    "mlflow.experiment": Range(min_length=1),
    "mlflow.registered_model": Range(pattern=MODEL_NAME_PATTERN),
    "probe.epochs": _AT_LEAST_1,
    "probe.lrs": _POS,
    "probe.min_lr": _NON_NEG,
    "probe.weight_decay": _NON_NEG,
    "probe.betas": _BETA,
    "probe.grad_clip": _NON_NEG,
    "probe.batch_size": Range(ge=2),  # the probes' BatchNorm needs two samples
    "probe.max_train_images": _AT_LEAST_1,
    "probe.max_test_images": _AT_LEAST_1,
    "probe.draws": _AT_LEAST_1,
    "probe.val_fraction": Range(gt=0.0, lt=1.0),
    "probe.random_erasing": _UNIT,
    "probe.attentive_last_n": _AT_LEAST_1,
    "probe.attentive_heads": _AT_LEAST_1,
    "probe.seed": _NON_NEG,
}


def check_range(key: str, value: Any) -> None:
    """ConfigError naming `key` and `value` when the value (or an item of a tuple) is outside
    `RANGES[key]`; None passes (an unset optional)."""
    rule = RANGES[key]
    items = value if isinstance(value, tuple) else (value,)
    if value is not None and not all(rule.holds(v) for v in items):
        shown = list(value) if isinstance(value, tuple) else value
        raise ConfigError(f"{key}={shown} must be {rule.words()}")
