"""Inputs that ended in a traceback or a wrong message end in one line naming the problem, exit 2,
and start nothing (no Ray)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pipelines.cli import known_failure
from pipelines.cli import main as cli_main
from tests.reliability.conftest import SMALL_MODEL
from xtra_core.config import build_config
from xtra_core.export import CONFIG, WEIGHTS, save_encoder
from xtra_core.model import build_model


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("xtra: error: ") and "Traceback" not in err, err
    return err


def test_config_that_is_a_directory_is_one_line(tmp_path, capsys):
    assert cli_main(["pretrain", "--config", str(tmp_path)]) == 2
    assert "is a directory" in _one_line(capsys)


@pytest.mark.parametrize("uri", ["http://127.0.0.1:notaport", "http://u:pa/ss@127.0.0.1:5000",
                                 "http://u:pa:ss@127.0.0.1:99999"])
def test_unusable_tracking_uri_is_one_line_without_its_password(uri, capsys):
    assert cli_main(["pretrain", "--data", "/nonexistent", "--set", f"mlflow.tracking_uri={uri}"]) == 2
    err = _one_line(capsys)
    assert "mlflow.tracking_uri=" in err and "pa/ss" not in err and "pa:ss" not in err


def test_every_bad_key_is_named_in_one_line(capsys):
    assert cli_main(["pretrain", "--data", "/x", "--set", "train.lr=-1", "--set", "data.max_bad_fraction=2",
                     "--set", "train.epochs=many", "--set", "model.width=3"]) == 2
    err = _one_line(capsys)
    for key in ("train.lr=", "data.max_bad_fraction=", "train.epochs", "'width'"):
        assert key in err, (key, err)


def test_sweep_grid_points_get_pretrain_validation_before_ray(capsys, ray_must_not_start):
    assert cli_main(["sweep", "--data", "/nonexistent", "--axis", "train.lr=-1,1e-3"]) == 2
    assert "train.lr=-1.0 must be greater than 0" in _one_line(capsys)


@pytest.mark.parametrize("name", ["../escape", "a'b", 'x"y', "a/b", ".."])
def test_sweep_name_follows_the_run_name_rule(name, capsys):
    assert cli_main(["sweep", "--data", "/nonexistent", "--axis", "train.lr=1e-3", "--name", name]) == 2
    assert "--name" in _one_line(capsys)


def _export(tmp_path):
    cfg = build_config("tiny", None, SMALL_MODEL)
    out = tmp_path / "export"
    save_encoder(build_model(cfg.model).encoder.state_dict(), cfg.model, out)
    return out


@pytest.mark.parametrize(("text", "said"), [
    ("{not json", "not valid JSON"),
    (json.dumps({"run": "x"}), "no 'model'"),
    (json.dumps(["model"]), "no 'model'"),
    (json.dumps({"model": {"encoder_width": "wide"}}), "model.encoder_width must be an integer"),
])
def test_broken_export_config_is_one_line(tmp_path, capsys, text, said):
    export = _export(tmp_path)
    (export / CONFIG).write_text(text)
    assert cli_main(["probe", "--model", str(export), "--data", str(tmp_path)]) == 2
    err = _one_line(capsys)
    assert said in err and CONFIG in err, err


def test_export_config_claiming_a_huge_width_is_refused_before_any_allocation(tmp_path, capsys):
    export = _export(tmp_path)
    meta = json.loads((export / CONFIG).read_text())
    meta["model"].update(encoder_width=1_048_576, encoder_heads=1)
    (export / CONFIG).write_text(json.dumps(meta))
    before = torch.cuda.memory_allocated() if torch.cuda.is_available() else 0
    assert cli_main(["probe", "--model", str(export), "--data", str(tmp_path)]) == 2
    err = _one_line(capsys)
    assert "encoder_width=1048576" in err and "pos_embed" in err, err
    assert (torch.cuda.memory_allocated() if torch.cuda.is_available() else 0) == before


def test_export_weights_of_another_shape_are_named(tmp_path, capsys):
    export = _export(tmp_path)
    state = build_model(build_config("tiny", None, {**SMALL_MODEL, "model.mlp_ratio": 2.0}).model).encoder.state_dict()
    save_file({k: v.contiguous() for k, v in state.items()}, str(export / WEIGHTS))
    assert cli_main(["probe", "--model", str(export), "--data", str(tmp_path)]) == 2
    err = _one_line(capsys)
    assert "shapes differ" in err and "mlp.fc1.weight" in err, err


def test_ray_cluster_that_wants_a_token_is_one_line_saying_how_to_pass_it():
    from ray.exceptions import AuthenticationError

    line = known_failure(AuthenticationError("Token authentication is enabled but no authentication token was found"))
    assert line is not None and "RAY_AUTH_TOKEN" in line and "RAY_AUTH_MODE=token" in line
    assert known_failure(RuntimeError("something else")) is None
