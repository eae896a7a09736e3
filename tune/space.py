"""The sweep's search space: axes parsed from `--axis key=v1,v2,...`, their grid, and its check.

The six axes of Table 6 have short names; any config key (`train.lr`, `model.drop_path`) is an
axis too. A paired axis sets several keys together, one value of each per point:
`--axis "model.image_size,model.patch_size=224:14,256:16"` is 2 points (Table 6b), where two
axes would be a grid of 4. Every grid point is turned into a config before Ray starts, so a value
that cannot work (a block size that does not divide the patch grid, blocks ahead >= the number of
blocks, a pair of the wrong length) is refused with the valid values named, and no trial is ever
started for it. `dry_run` lists every trial's overrides without starting Ray.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any

import yaml

from pipelines.config_io import load_yaml
from xtra_core.config import ConfigError, XTRAConfig

# Table 6's ablation switches -> config keys
TABLE6_AXES = {
    "block_size": "model.block_size",
    "blocks_ahead": "model.blocks_ahead",
    "loss": "model.loss",
    "order": "model.block_order",
    "decoder_depth": "model.decoder_depth",
    "decoder_width": "model.decoder_width",
}
SEED_KEYS = ("train.seed", "data.seed")  # what `--seeds N` varies


PAIR_SEP = ":"  # between the values of one point of a paired axis: 224:14


@dataclass(frozen=True)
class Axis:
    """One swept setting: `name` as the user wrote it, `key` the config key, `values` in order.

    A paired axis has `key` = the keys joined by commas (`model.image_size,model.patch_size`)
    and each value the text of one pair (`"224:14"`): one Tune parameter, split by
    `expand_point` into its keys."""

    name: str
    key: str
    values: tuple[Any, ...]

    @property
    def keys(self) -> tuple[str, ...]:
        return tuple(self.key.split(","))


def _split_pair(name: str, keys: tuple[str, ...], raw: str) -> tuple[Any, ...]:
    """`"224:14"` -> (224, 14), one value per key of the paired axis."""
    parts = str(raw).split(PAIR_SEP)
    if len(parts) != len(keys) or any(not p.strip() for p in parts):
        raise ConfigError(
            f"--axis {name}: {raw!r} must give {len(keys)} values joined by "
            f"{PAIR_SEP!r} ({PAIR_SEP.join(k.rsplit('.', 1)[-1] for k in keys)}), one for each of {list(keys)}"
        )
    try:
        return tuple(load_yaml(p) for p in parts)
    except yaml.YAMLError as e:
        raise ConfigError(f"--axis {name}: {raw!r} is not valid YAML: {e}") from None


def expand_point(point: dict[str, Any]) -> dict[str, Any]:
    """A grid point (or Tune config) as config overrides: paired keys split into their keys."""
    out: dict[str, Any] = {}
    for key, value in point.items():
        if "," in key:
            keys = tuple(key.split(","))
            out.update(zip(keys, _split_pair(key, keys, value)))
        else:
            out[key] = value
    return out


def _parse_values(name: str, raw: str) -> tuple[Any, ...]:
    """`1,2,4` -> (1, 2, 4); `[[0.3,1],[0.5,1]]` (a YAML list) for values that hold commas."""
    raw = raw.strip()
    try:
        if raw.startswith("["):
            values = load_yaml(raw)
            if not isinstance(values, list):
                raise ConfigError(f"--axis {name}: {raw!r} is not a list")
        else:
            values = [load_yaml(v) if v.strip() else None for v in raw.split(",")]
    except yaml.YAMLError as e:
        raise ConfigError(f"--axis {name}: values {raw!r} are not valid YAML: {e}") from None
    if not values or any(v is None for v in values):
        raise ConfigError(f"--axis {name}={raw!r}: give one or more comma-separated values")
    out: list[Any] = []
    for v in values:
        if v in out:
            raise ConfigError(f"--axis {name}: value {v!r} is given twice")
        out.append(v)
    return tuple(out)


def parse_axis(spec: str) -> Axis:
    """`block_size=1,2,4`, `order=raster,random`, `train.lr=1e-3,3e-3` -> Axis."""
    if "=" not in spec:
        raise ConfigError(
            f"--axis {spec!r} must look like name=v1,v2 with name one of {sorted(TABLE6_AXES)} "
            "or a config key section.key"
        )
    name, raw = (s.strip() for s in spec.split("=", 1))
    if "," in name:
        return _parse_paired(name, raw)
    key = TABLE6_AXES.get(name, name)
    if "." not in key:
        raise ConfigError(
            f"--axis {name!r} is neither a Table 6 axis {sorted(TABLE6_AXES)} nor a config key "
            "section.key (e.g. train.lr)"
        )
    if key in SEED_KEYS:
        raise ConfigError(f"--axis {name}: seeds are swept with --seeds N, not as an axis")
    return Axis(name, key, _parse_values(name, raw))


def _parse_paired(name: str, raw: str) -> Axis:
    """`model.image_size,model.patch_size` = `224:14,256:16` -> one axis of 2 points."""
    keys = tuple(TABLE6_AXES.get(k.strip(), k.strip()) for k in name.split(","))
    for k in keys:
        if "." not in k:
            raise ConfigError(f"--axis {name}: {k!r} is neither a Table 6 axis "
                              f"{sorted(TABLE6_AXES)} nor a config key section.key")
        if k in SEED_KEYS:
            raise ConfigError(f"--axis {name}: seeds are swept with --seeds N, not as an axis")
    if len(set(keys)) != len(keys):
        raise ConfigError(f"--axis {name}: a key appears twice in the pair")
    values = [v.strip() for v in raw.split(",")]
    if not raw.strip() or any(not v for v in values):
        raise ConfigError(f"--axis {name}={raw!r}: give one or more comma-separated pairs, "
                          f"e.g. {name}=224:14,256:16")
    parsed = [_split_pair(name, keys, v) for v in values]
    if len(set(parsed)) != len(parsed):
        raise ConfigError(f"--axis {name}: a pair is given twice")
    # the canonical text of each pair: what Tune sweeps and the tables show
    texts = tuple(PAIR_SEP.join(str(x) for x in p) for p in parsed)
    return Axis(name, ",".join(keys), texts)


def parse_axes(specs: list[str]) -> list[Axis]:
    if not specs:
        raise ConfigError(f"a sweep needs at least one --axis (e.g. --axis block_size=1,2); "
                          f"Table 6 axes: {sorted(TABLE6_AXES)}")
    axes = [parse_axis(s) for s in specs]
    keys = [k for a in axes for k in a.keys]
    for k in keys:
        if keys.count(k) > 1:
            raise ConfigError(f"--axis: {k} is swept twice; give all its values in one --axis")
    return axes


def grid(axes: list[Axis]) -> list[dict[str, Any]]:
    """Every combination of axis values, in the order given: [{config key: value}, ...]."""
    return [dict(zip([a.key for a in axes], combo)) for combo in itertools.product(*(a.values for a in axes))]


def valid_values(key: str, cfg: XTRAConfig) -> str:
    """What would work for a Table 6 axis, given the rest of the (base or point) config."""
    m = cfg.model
    if key == "model.block_size":
        ok = [k for k in range(1, m.grid + 1) if m.grid % k == 0 and m.grid // k > 1]
        return f"valid block sizes for a {m.grid}x{m.grid} patch grid: {ok}"
    if key == "model.blocks_ahead":
        return f"valid blocks ahead: 1..{m.num_blocks - 1}"
    if key == "model.loss":
        return "valid losses: ['l2', 'l1']"
    if key == "model.block_order":
        return "valid orders: ['raster', 'random', 'pseudo_random']"
    if key in ("model.image_size", "model.patch_size"):
        return (f"model.image_size must be a multiple of model.patch_size, and the patch grid "
                f"(image_size / patch_size) a multiple of model.block_size={m.block_size}")
    if key == "model.decoder_width":
        return f"the decoder width must be a multiple of model.decoder_heads={m.decoder_heads}"
    if key == "model.decoder_depth":
        return "the decoder depth must be an integer >= 1"
    return ""


def point_config(base: XTRAConfig, point: dict[str, Any]) -> XTRAConfig:
    """The config of one grid point, through the same validation as `xtra pretrain` (types,
    ranges, cross-checks: `pipelines.config_validation.validate_values`): `base` with the
    point's keys set."""
    from pipelines.config_io import build_checked

    return build_checked(base, {}, expand_point(point))


def check_grid(base: XTRAConfig, axes: list[Axis]) -> list[dict[str, Any]]:
    """Build the config of every grid point; the first that cannot work raises ConfigError naming
    the axis value and the valid values. Returns the grid."""
    points = grid(axes)
    for point in points:
        try:
            point_config(base, point)
        except ConfigError as e:
            shown = ", ".join(f"{a.name}={point[a.key]!r}" for a in axes)
            # name the valid values of the axis the error is about (the first one it mentions)
            mentioned = sorted((str(e).find(k), i, k) for i, a in enumerate(axes) for k in a.keys
                               if k in str(e))
            hint = ""
            if mentioned:
                _, i, key = mentioned[0]
                hint = valid_values(key, _lenient(base, point, axes[i].key))
            raise ConfigError(f"--axis grid point ({shown}) cannot work: {e}"
                              + (f"; {hint}" if hint else "")) from None
    return points


def _lenient(base: XTRAConfig, point: dict[str, Any], leave_out: str) -> XTRAConfig:
    """The point's config without the offending key (so its valid values can be computed)."""
    rest = {k: v for k, v in point.items() if k != leave_out}
    try:
        return point_config(base, rest)
    except ConfigError:
        return base


def axis_label(axes: list[Axis], config: dict[str, Any]) -> str:
    """`block_size=2 order=raster seed=0` for a trial's Tune config."""
    parts = [f"{a.name}={config[a.key]}" for a in axes if a.key in config]
    if "seed" in config:
        parts.append(f"seed={config['seed']}")
    return " ".join(parts)


def dry_run(base: XTRAConfig, axis_specs: list[str], seeds: int) -> list[str]:
    """One line per trial (every grid point, for each seed) with its full override set (the grid
    point's keys and the seed keys); every point validated first. Nothing is started."""
    if seeds < 1:
        raise ConfigError(f"--seeds {seeds}: give at least one seed")
    axes = parse_axes(axis_specs)
    points = check_grid(base, axes)
    n = len(points) * seeds
    lines = []
    for seed in range(seeds):
        for point in points:
            sets = {**expand_point(point), **{k: seed for k in SEED_KEYS}}
            shown = " ".join(f"{k}={v}" for k, v in sets.items())
            lines.append(f"trial {len(lines) + 1}/{n}: {shown}")
    return lines
