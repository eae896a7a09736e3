"""Sweep search space, grid checks, trial configs and result tables: unit tests (no Ray)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from pipelines import cli
from tune import results as tables
from tune.space import Axis, check_grid, grid, parse_axes, parse_axis
from tune.sweep import SweepOptions, concurrency, objective_axes, prepare_paths, run_sweep
from tune.trial import SweepSpec, run_name_of, trial_config
from xtra_core.config import ConfigError, build_config


def test_table6_axes_map_to_config_keys_and_values_parse_as_yaml():
    assert parse_axis("block_size=1,2,4") == Axis("block_size", "model.block_size", (1, 2, 4))
    assert parse_axis("order=raster,random").key == "model.block_order"
    assert parse_axis("loss=l2,l1").values == ("l2", "l1")
    assert parse_axis("train.lr=1e-3,3e-3").values == (1e-3, 3e-3)  # YAML 1.2 floats
    assert parse_axis("data.crop_scale=[[0.3,1.0],[0.5,1.0]]").values == ([0.3, 1.0], [0.5, 1.0])


@pytest.mark.parametrize("spec, words", [
    ("block_size", "name=v1,v2"),
    ("foo=1,2", "neither a Table 6 axis"),
    ("block_size=1,1", "given twice"),
    ("train.seed=0,1", "--seeds"),
    ("loss=", "one or more"),
])
def test_malformed_axes_are_refused_with_the_reason(spec, words):
    with pytest.raises(ConfigError, match=words):
        parse_axis(spec)


def test_several_axes_make_a_grid_in_the_order_given():
    axes = parse_axes(["block_size=1,2", "order=raster,random"])
    assert grid(axes) == [
        {"model.block_size": 1, "model.block_order": "raster"},
        {"model.block_size": 1, "model.block_order": "random"},
        {"model.block_size": 2, "model.block_order": "raster"},
        {"model.block_size": 2, "model.block_order": "random"},
    ]
    with pytest.raises(ConfigError, match="swept twice"):
        parse_axes(["block_size=1", "model.block_size=2"])


def test_impossible_values_name_the_valid_ones():
    base = build_config("tiny")  # 32 px / patch 4: an 8x8 patch grid
    with pytest.raises(ConfigError, match=r"block_size=3.*valid block sizes for a 8x8 patch grid: \[1, 2, 4\]"):
        check_grid(base, parse_axes(["block_size=1,3"]))
    # block 4 leaves 2x2 = 4 blocks: blocks ahead must be 1..3
    with pytest.raises(ConfigError, match=r"blocks_ahead=4.*valid blocks ahead: 1\.\.3"):
        check_grid(base, parse_axes(["block_size=2,4", "blocks_ahead=1,4"]))
    with pytest.raises(ConfigError, match=r"valid orders: \['raster', 'random', 'pseudo_random'\]"):
        check_grid(base, parse_axes(["order=raster,spiral"]))
    with pytest.raises(ConfigError, match="unknown config key train.'lrr'"):
        check_grid(base, parse_axes(["train.lrr=0.1"]))
    assert len(check_grid(base, parse_axes(["block_size=1,2,4", "train.lr=1e-3,3e-3"]))) == 6


def test_impossible_axis_value_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init called for a sweep that cannot work")

    monkeypatch.setattr(ray, "init", no_ray)
    storage = tmp_path / "runs"
    code = cli.main(["sweep", "--data", str(tmp_path), "--axis", "block_size=1,3", "--set",
                     f"train.storage_path={storage}", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and "block_size=3" in err[0] and "[1, 2, 4]" in err[0]
    assert not storage.exists() and not (tmp_path / "m.db").exists()  # nothing was started
    with pytest.raises(ConfigError, match="at least one --axis"):
        run_sweep(build_config("tiny", None, {"data.uri": str(tmp_path)}), [], SweepOptions())


def test_a_dataset_that_is_not_there_is_refused_before_ray_starts(tmp_path, monkeypatch, capsys):
    import ray

    def no_ray(*args, **kwargs):
        raise AssertionError("ray.init called for a sweep that cannot work")

    monkeypatch.setattr(ray, "init", no_ray)
    code = cli.main(["sweep", "--data", str(tmp_path / "nope"), "--axis", "block_size=1,2", "--set",
                     f"train.storage_path={tmp_path}/runs", "--set", f"mlflow.tracking_uri=sqlite:///{tmp_path}/m.db"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "nope: does not exist" in err[0], err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "m.db").exists()


def test_relative_paths_are_made_absolute_for_the_trials_own_folders(tmp_path, monkeypatch):
    # Tune starts each trial in its own folder: `--data data` or the default `sqlite:///./mlruns.db`
    # would each name another place there
    for i in range(2):
        (tmp_path / "data" / "train" / "a").mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8)).save(tmp_path / "data" / "train" / "a" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config("tiny", None, {"data.uri": "data", "train.storage_path": "runs"})
    fs, root, uri = prepare_paths(cfg)
    assert cfg.data.uri == str(tmp_path / "data")
    assert root == cfg.train.storage_path == str(tmp_path / "runs")
    assert uri == cfg.mlflow.tracking_uri and uri.startswith(f"sqlite:///{tmp_path}/")
    spec = SweepSpec(name="s", base=cfg.to_dict(), axis_names={"model.block_size": "block_size"})
    monkeypatch.chdir(tmp_path / "data")  # as a trial: another working directory
    trial = trial_config(spec, {"model.block_size": 1, "seed": 0})
    assert trial.data.uri == str(tmp_path / "data") and trial.mlflow.tracking_uri == uri


def test_concurrency_leaves_each_trial_its_workers_and_a_decode_share():
    cfg = build_config("tiny", None, {"train.num_workers": 2, "train.cpus_per_worker": 0.5})
    assert concurrency(cfg, 2, 1.0) == 1
    assert concurrency(cfg, 16, 1.0) == 8
    assert concurrency(cfg, 16, 3.0) == 4
    assert concurrency(cfg, 1, 1.0) == 1  # at least one


def test_asha_caveat_names_the_axes_that_change_what_the_loss_measures():
    axes = parse_axes(["block_size=1,2", "train.lr=1e-3,2e-3", "loss=l2,l1", "decoder_depth=2,4"])
    assert objective_axes(axes) == ["block_size", "loss"]
    assert objective_axes(parse_axes(["train.lr=1e-3,2e-3", "decoder_width=96,192"])) == []


def test_trial_config_sets_the_point_the_seed_and_a_stable_run_name():
    base = build_config("tiny", None, {"train.max_steps": 10})
    spec = SweepSpec(name="s1", base=base.to_dict(), axis_names={"model.block_size": "block_size",
                                                                  "model.block_order": "order"})
    config = {"model.block_size": 1, "model.block_order": "random", "seed": 3}
    cfg = trial_config(spec, config)
    assert (cfg.model.block_size, cfg.model.block_order) == (1, "random")
    assert (cfg.train.seed, cfg.data.seed, cfg.train.max_steps) == (3, 3, 10)
    assert cfg.train.run_name == run_name_of(spec, dict(config)) == "s1-block_size1-orderrandom-seed3"


def _rows():
    p1, p2 = {"model.block_size": 1}, {"model.block_size": 2}
    return [p1, p2], [
        {"point": p1, "seed": 0, "status": "done", "val_top1": 0.50, "top1": 0.40},
        {"point": p1, "seed": 1, "status": "done", "val_top1": 0.60, "top1": 0.50},
        {"point": p2, "seed": 0, "status": "done", "val_top1": 0.70, "top1": 0.65},
        {"point": p2, "seed": 1, "status": "failed", "val_top1": None, "top1": None},
    ]


def test_summary_is_mean_and_sample_std_over_finished_seeds(tmp_path):
    points, rows = _rows()
    s1, s2 = tables.summarize(rows, points)
    assert s1["val_top1_mean"] == pytest.approx(0.55) and s1["val_top1_std"] == pytest.approx(0.0707107, rel=1e-5)
    assert s1["top1_mean"] == pytest.approx(0.45) and s1["seeds_done"] == 2
    assert s2["val_top1_mean"] == pytest.approx(0.70) and s2["seeds_done"] == 1 and s2["seeds_failed"] == 1
    md = tables.to_markdown([s1, s2], {"model.block_size": "block_size"})
    assert "| 1 | 55.0 ± 7.1 | 45.0 ± 7.1 | 2 | 0 | 0 |" in md
    assert "| 2 | 70.0 | 65.0 | 1 | 1 | 0 |" in md
    tables.write_json(tmp_path / "r.json", {"summary": [s1, s2]})
    assert json.loads((tmp_path / "r.json").read_text())["summary"][1]["seeds_failed"] == 1
    tables.plot(tmp_path / "p.png", [s1, s2], {"model.block_size": "block_size"}, "t")
    with Image.open(tmp_path / "p.png") as im:
        assert im.format == "PNG" and im.size[0] > 300


@pytest.mark.slow  # a real MLflow sqlite store: its schema migrations take tens of seconds here
def test_a_trial_whose_pretraining_had_ended_is_probed_again_not_retrained(tmp_path):
    """Resume after a stop while the trial was probing: its MLflow run already holds the encoder."""
    import mlflow

    from pipelines.tracking import runs as tracking
    from tune.trial import finished_pretraining

    uri = f"sqlite:///{tmp_path}/m.db"
    base = build_config("tiny", None, {"mlflow.tracking_uri": uri, "mlflow.experiment": "e"})
    spec = SweepSpec(name="s", base=base.to_dict(), axis_names={"model.block_size": "block_size"},
                     tracking_uri=uri)
    cfg = trial_config(spec, {"model.block_size": 2, "seed": 0})
    assert finished_pretraining(spec, cfg) is None  # no store entry yet: pretrain
    run_id = tracking.start_or_resume_run(uri, cfg, cfg.train.run_name)
    tracking.log_step_metrics(uri, run_id, {"loss": 0.7}, 5)
    assert finished_pretraining(spec, cfg) is None  # a run without its encoder: pretrain (resume)
    export = tmp_path / "export"
    export.mkdir()
    (export / "config.json").write_text("{}")
    tracking.log_encoder_files(uri, run_id, export)
    out = finished_pretraining(spec, cfg)
    assert out["run_id"] == run_id and out["step"] == 5 and out["metrics"]["loss"] == 0.7
    assert (Path(out["export_dir"]) / "config.json").read_text() == "{}"
    other = trial_config(spec, {"model.block_size": 1, "seed": 0})
    assert finished_pretraining(spec, other) is None
    mlflow.set_tracking_uri(None)
