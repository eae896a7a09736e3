"""Paired sweep axes (Table 6b: resolution with patch size) and `xtra sweep --dry-run` (no Ray)."""

from __future__ import annotations

import pytest

from pipelines import cli
from tune.space import check_grid, dry_run, expand_point, parse_axes
from tune.trial import SweepSpec, trial_config
from xtra_core.config import ConfigError, build_config

PAIR = "model.image_size,model.patch_size=224:14,256:16"


def test_a_paired_axis_is_two_points_not_a_grid_of_four():
    base = build_config("tiny")
    points = check_grid(base, parse_axes([PAIR]))
    assert [expand_point(p) for p in points] == [
        {"model.image_size": 224, "model.patch_size": 14},
        {"model.image_size": 256, "model.patch_size": 16},
    ]
    # as two axes they cross: 224/16 and 256/14 do not divide, so that grid cannot run at all
    with pytest.raises(ConfigError, match="not divisible"):
        check_grid(base, parse_axes(["model.image_size=224,256", "model.patch_size=14,16"]))
    two = check_grid(base, parse_axes([PAIR, "block_size=1,2"]))
    assert len(two) == 4  # pairs cross with the other axes


@pytest.mark.parametrize("spec, words", [
    ("model.image_size,model.patch_size=224,256:16", "must give 2 values"),
    ("model.image_size,model.patch_size=224:14:2", "must give 2 values"),
    ("model.image_size,model.patch_size=224:14,224:14", "given twice"),
    ("model.image_size,model.image_size=224:14", "appears twice"),
    ("model.image_size,train.seed=224:1", "--seeds"),
    ("model.image_size,patch=224:14", "neither a Table 6 axis"),
    ("model.image_size,model.patch_size=224:14,250:16", "250 is not divisible"),
])
def test_every_pair_is_checked_before_ray_starts(spec, words):
    with pytest.raises(ConfigError, match=words):
        check_grid(build_config("tiny"), parse_axes([spec]))


def test_a_pair_and_a_single_axis_on_the_same_key_are_refused():
    with pytest.raises(ConfigError, match="swept twice"):
        parse_axes([PAIR, "model.patch_size=8,16"])


def test_trial_config_splits_the_pair_into_its_keys():
    spec = SweepSpec(name="s", base=build_config("tiny").to_dict(),
                     axis_names={"model.image_size,model.patch_size": "res"})
    cfg = trial_config(spec, {"model.image_size,model.patch_size": "224:14", "seed": 1})
    assert (cfg.model.image_size, cfg.model.patch_size, cfg.train.seed) == (224, 14, 1)


def test_dry_run_prints_one_line_per_trial_and_starts_nothing(capsys, ray_must_not_start):
    rc = cli.main(["sweep", "--config", "tiny", "--axis", PAIR, "--axis", "block_size=1,2",
                   "--seeds", "2", "--dry-run"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert rc == 0 and len(lines) == 8
    assert lines[0] == ("trial 1/8: model.image_size=224 model.patch_size=14 model.block_size=1 "
                        "train.seed=0 data.seed=0")
    assert lines[-1].endswith("model.image_size=256 model.patch_size=16 model.block_size=2 "
                              "train.seed=1 data.seed=1")
    assert dry_run(build_config("tiny"), ["order=raster,pseudo_random"], 1) == [
        "trial 1/2: model.block_order=raster train.seed=0 data.seed=0",
        "trial 2/2: model.block_order=pseudo_random train.seed=0 data.seed=0"]


def test_dry_run_of_a_point_that_cannot_work_is_one_error_line_exit_2(capsys, ray_must_not_start):
    rc = cli.main(["sweep", "--config", "tiny", "--axis", "block_size=3", "--dry-run"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "block_size=3" in err[0]
