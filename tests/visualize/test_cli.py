"""`xtra visualize` end to end on local files (no Ray, no MLflow): a full-model export and an
image folder in, a picture of the layout's size out; bad input is one line and exit code 2."""

from __future__ import annotations

import json

import numpy as np
import torch
from PIL import Image

from pipelines.cli import main
from pipelines.config_io import load_config
from pipelines.visualize.figure4 import figure4_layout
from pipelines.visualize.mask import mask_layout
from xtra_core.config import build_config
from xtra_core.export import save_encoder, save_model
from xtra_core.model import build_model

SMALL = ["model.image_size=16", "model.patch_size=4", "model.block_size=2", "model.encoder_width=32",
         "model.encoder_depth=1", "model.encoder_heads=2", "model.projection_hidden=64",
         "model.decoder_width=32", "model.decoder_depth=1", "model.decoder_heads=2", "model.head_hidden=64"]


def image_folder(root, n: int = 5) -> str:
    rng = np.random.default_rng(0)
    for split in ("train", "test"):
        (root / split / "a").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(root / split / "a" / f"{i}.png")
    (root / "test" / "a" / "broken.png").write_bytes(b"not an image")
    return str(root)


def test_visualize_draws_n_rows_from_a_full_model_export(tmp_path, capsys):
    cfg = load_config("tiny", SMALL)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    save_model(model.state_dict(), cfg.model, tmp_path / "model_export")
    data = image_folder(tmp_path / "data")
    out = tmp_path / "fig.png"
    code = main(["visualize", "--model", str(tmp_path / "model_export"), "--data", data,
                 "--out", str(out), "--n", "6"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # 6 files in test/, one undecodable: skipped, 5 rows
    assert result["images"] == 5 and result["split"] == "test" and "run_id" not in result
    layout = figure4_layout(5, cfg.model)
    assert Image.open(out).size == (layout.width, layout.height)


def test_visualize_mask_uses_the_config(tmp_path, capsys):
    out = tmp_path / "mask.png"
    assert main(["visualize", "--mask", "--config", "tiny", "--set", "model.block_size=4", "--out", str(out)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result == {"out": str(out), "tokens": 64, "blocks": 4, "block_order": "raster"}
    cfg = build_config("tiny", None, {"model.block_size": 4}).model
    layout = mask_layout(cfg)
    assert Image.open(out).size == (layout.width, layout.height)


def test_visualize_an_encoder_only_export_is_one_clear_error(tmp_path, capsys):
    model = build_model("tiny")
    save_encoder(model.encoder.state_dict(), model.cfg, tmp_path / "enc")
    code = main(["visualize", "--model", str(tmp_path / "enc"), "--data", image_folder(tmp_path / "d"),
                 "--out", str(tmp_path / "x.png")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "model.safetensors" in err[0] and "xtra export --full" in err[0]
    assert not (tmp_path / "x.png").exists()


def test_visualize_without_model_or_data_names_what_is_missing(tmp_path, capsys):
    assert main(["visualize", "--out", str(tmp_path / "x.png")]) == 2
    assert "--model and --data" in capsys.readouterr().err


def test_reserved_alias_and_negative_visualize_every_are_config_errors(tmp_path, capsys):
    for bad, key in (("mlflow.alias=latest", "mlflow.alias"), ("mlflow.alias=v3", "mlflow.alias"),
                     ("train.visualize_every=-1", "train.visualize_every")):
        assert main(["visualize", "--mask", "--set", bad, "--out", str(tmp_path / "m.png")]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and key in err[0], err
    assert not (tmp_path / "m.png").exists()


def test_visualize_head_draws_the_next_next_block_head_and_refuses_a_missing_one(tmp_path, capsys):
    cfg = load_config("tiny", SMALL + ["model.blocks_ahead=2"])
    torch.manual_seed(0)
    save_model(build_model(cfg.model).state_dict(), cfg.model, tmp_path / "model_export")
    data = image_folder(tmp_path / "data")
    pictures = {}
    for head in (0, 1):
        out = tmp_path / f"head{head}.png"
        assert main(["visualize", "--model", str(tmp_path / "model_export"), "--data", data,
                     "--out", str(out), "--n", "2", "--head", str(head)]) == 0
        pictures[head] = np.asarray(Image.open(out).convert("RGB"))
    assert pictures[0].shape == pictures[1].shape and not np.array_equal(pictures[0], pictures[1])
    capsys.readouterr()
    assert main(["visualize", "--model", str(tmp_path / "model_export"), "--data", data,
                 "--out", str(tmp_path / "x.png"), "--head", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--head 2" in err[0] and "blocks_ahead" in err[0]
