"""Config: presets, YAML + --set overrides, errors that name the problem, and export round trip."""

from __future__ import annotations

import pytest
import torch

from pipelines.cli import main as cli_main
from pipelines.config_io import load_config, parse_set
from xtra_core import build_model
from xtra_core.config import ConfigError, build_config, config_from_dict, preset
from xtra_core.export import load_encoder, save_encoder


def test_presets_match_table_1():
    b = preset("vit_b16").model
    assert (b.image_size, b.patch_size, b.block_size * b.patch_size) == (256, 16, 64)
    assert (b.encoder_width, b.encoder_depth, b.encoder_heads) == (768, 12, 12)
    assert (b.projection_hidden, b.decoder_width, b.decoder_depth, b.head_hidden) == (4096, 768, 8, 6144)
    h = preset("vit_h14").model
    assert (h.image_size, h.patch_size, h.block_size * h.patch_size) == (224, 14, 56)
    assert (h.encoder_width, h.encoder_depth, h.encoder_heads) == (1280, 32, 16)
    assert (h.projection_hidden, h.decoder_width, h.decoder_depth) == (5120, 640, 8)
    t = preset("vit_b16").train
    assert (t.lr, t.min_lr, t.weight_decay, t.betas, t.grad_clip) == (1e-3, 1e-6, 0.05, (0.9, 0.95), 1.0)
    assert preset("tiny").model.num_blocks == 16


def test_set_overrides_yaml_which_overrides_preset(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("preset: tiny\ntrain:\n  lr: 1e-4\n  max_steps: 7\nmodel:\n  loss: l1\n")
    cfg = load_config(str(f), ["train.max_steps=9", "probe.lrs=[0.001,0.003]"])
    assert cfg.train.lr == 1e-4 and cfg.model.loss == "l1"
    assert cfg.train.max_steps == 9
    assert cfg.probe.lrs == (0.001, 0.003)


def test_unknown_key_names_the_valid_keys():
    with pytest.raises(ConfigError, match=r"train\.'bogus'.*max_steps"):
        load_config("tiny", ["train.bogus=1"])
    with pytest.raises(ConfigError, match="valid sections"):
        load_config("tiny", ["nope.x=1"])


def test_wrong_type_is_an_error_naming_the_key():
    with pytest.raises(ConfigError, match="train.max_steps must be an integer"):
        load_config("tiny", ["train.max_steps=abc"])


@pytest.mark.parametrize(
    "sets, words",
    [
        (["model.image_size=30"], ["image_size=30", "patch_size=4"]),
        (["model.block_size=3"], ["block_size=3", "8x8"]),
        (["model.blocks_ahead=16"], ["blocks_ahead=16", "16 blocks"]),
        (["model.block_order=spiral"], ["block_order", "spiral"]),
    ],
)
def test_impossible_combinations_say_which_values_clash(sets, words):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", sets)
    for w in words:
        assert w in str(e.value)


def test_parse_set_reads_yaml_values():
    assert parse_set(["a.b=[1, 2]", "a.c=true", "a.d=null", "a.e=x"]) == {
        "a.b": [1, 2], "a.c": True, "a.d": None, "a.e": "x",
    }
    # YAML 1.2 floats (PyYAML's YAML 1.1 reads `1e-3` as a string); dates and words stay as they were
    assert parse_set(["a.lr=1e-3", "a.x=-2E+2", "a.y=1.5e-4", "a.v=1e", "a.w=e3", "a.z=3"]) == {
        "a.lr": 1e-3, "a.x": -200.0, "a.y": 1.5e-4, "a.v": "1e", "a.w": "e3", "a.z": 3,
    }


def test_a_config_file_reads_1e_minus_3_as_a_number(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("preset: tiny\ntrain:\n  lr: 3e-4\n  min_lr: 1e-7\n")
    cfg = load_config(str(path))
    assert cfg.train.lr == 3e-4 and isinstance(cfg.train.lr, float) and cfg.train.min_lr == 1e-7


def test_cli_reports_config_errors_in_one_line(capsys):
    assert cli_main(["pretrain", "--set", "train.bogus=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bogus" in err[0]


def test_config_round_trips_through_dict():
    cfg = build_config("vit_h14", None, {"model.blocks_ahead": 2})
    back = config_from_dict(cfg.to_dict())
    assert back == cfg


def test_encoder_export_round_trip_gives_identical_features(tmp_path):
    model = build_model(build_config("tiny", None, {"model.block_order": "random"})).eval()
    save_encoder(model.encoder.state_dict(), model.cfg, tmp_path / "enc")
    enc = load_encoder(tmp_path / "enc")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(x, last_n=2), model.encode(x, last_n=2))


@pytest.mark.parametrize("name", ["tiny", "vit_b16_in1k", "vit_h14_in21k"])
def test_shipped_yaml_configs_load_and_keep_their_preset_model(name):
    cfg = load_config(name)
    assert cfg.model == preset(cfg.preset).model or name == "vit_h14_in21k"
    if name != "tiny":
        assert cfg.train.global_batch_size == 2048 and cfg.data.crop_scale == (0.3, 1.0)
