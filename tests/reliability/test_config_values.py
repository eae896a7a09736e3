"""Config values are checked by type and range (pydantic) with one error naming key and value."""

from __future__ import annotations

import pytest

from pipelines.cli import main as cli_main
from pipelines.config_io import load_config
from pipelines.config_validation import CONSTRAINTS, validate_values
from xtra_core.config import SECTIONS, ConfigError, build_config, preset


@pytest.mark.parametrize(
    ("key", "value", "said"),
    [
        ("train.lr", -1, "train.lr=-1.0 must be greater than 0"),
        ("train.lr", 0, "train.lr=0.0 must be greater than 0"),
        ("train.lr", ".nan", "train.lr=nan must be a finite number"),
        ("train.max_failures", -5, "train.max_failures=-5 must be greater than or equal to -1"),
        ("train.num_to_keep", 0, "train.num_to_keep=0 must be greater than or equal to 1"),
        ("train.cpus_per_worker", 0, "train.cpus_per_worker=0.0 must be greater than 0"),
        ("train.epochs", 0, "train.epochs=0 must be greater than or equal to 1"),
        ("train.warmup_steps", -3, "train.warmup_steps=-3 must be greater than or equal to 0"),
        ("probe.epochs", 0, "probe.epochs=0 must be greater than or equal to 1"),
        ("train.betas", "[0.9, 1.5]", "train.betas[1]=1.5 must be less than 1"),
        ("probe.lrs", "[0.001, -1]", "probe.lrs[1]=-1.0 must be greater than 0"),
        ("train.run_name", "\"a'b\"", "train.run_name=\"a'b\" must match"),
        ("train.run_name", "x/../y", "train.run_name='x/../y' must match"),
        ("train.run_name", "..", "train.run_name='..' must match"),
        ("mlflow.registered_model", "a/b", "mlflow.registered_model='a/b' must match"),
    ],
)
def test_out_of_range_values_are_refused_naming_key_and_value(key, value, said):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [f"{key}={value}"])
    assert said in str(e.value)
    assert "\n" not in str(e.value)


def test_every_bad_value_is_named_in_one_error():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["train.lr=-1", "train.epochs=0", "probe.epochs=0"])
    msg = str(e.value)
    assert msg.count("; ") == 2 and "train.lr=" in msg and "train.epochs=0" in msg and "probe.epochs=0" in msg


def test_presets_and_config_files_pass_and_boundaries_are_inclusive():
    for name in ("tiny", "vit_b16", "vit_h14", "vit_b16_in1k", "vit_h14_in21k"):
        load_config(name)
    cfg = load_config("tiny", ["train.max_failures=-1", "train.warmup_steps=0", "train.num_to_keep=1",
                               "train.run_name=my-run_1.2", "train.grad_clip=0", "train.lr=1e-9"])
    assert (cfg.train.max_failures, cfg.train.warmup_steps, cfg.train.run_name) == (-1, 0, "my-run_1.2")


def test_programmatic_configs_are_checked_too():
    cfg = build_config("tiny", None, {"train.lr": 1e-3})
    cfg.train.lr = "fast"  # a Tune search space or a script can set fields directly
    with pytest.raises(ConfigError, match="train.lr='fast' must be a valid number"):
        validate_values(cfg)


def test_constraints_name_only_existing_keys():
    cfg = preset("tiny")
    keys = {f"{s}.{k}" for s in SECTIONS for k in vars(getattr(cfg, s))}
    assert set(CONSTRAINTS) <= keys, set(CONSTRAINTS) - keys


def test_cli_prints_one_line_and_exits_2(capsys):
    assert cli_main(["pretrain", "--data", "/nonexistent", "--set", "train.lr=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "xtra: error: train.lr=-1.0 must be greater than 0"
