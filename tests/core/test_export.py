"""Export: the encoder (and the whole XTRA) leave the repository as safetensors + config.json and
come back with torch + safetensors alone."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

import xtra_core
from xtra_core.config import build_config
from xtra_core.export import CONFIG, MODEL_WEIGHTS, WEIGHTS, save_encoder, save_model
from xtra_core.model import build_model

ROOT = Path(__file__).resolve().parents[2]

# run in a fresh interpreter: ray, mlflow and deepspeed cannot even be imported there
FRESH_LOADER = r"""
import importlib.abc, sys
class Blocked(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"ray", "mlflow", "deepspeed", "pipelines"}:
            raise ImportError(f"{name} is blocked in this test")
        return None
sys.meta_path.insert(0, Blocked())
import torch, xtra_core
export, x_path, out_path = sys.argv[1:4]
x = torch.load(x_path)
enc = xtra_core.load_encoder(export)
model = xtra_core.load_model(export)
with torch.no_grad():
    out = {"features": enc(x, last_n=2), "predict": model.predict(x)}
torch.save(out, out_path)
leaked = sorted(m for m in sys.modules if m.split(".")[0] in {"ray", "mlflow", "deepspeed", "pipelines"})
assert not leaked, leaked
print("loaded", type(enc).__name__, type(model).__name__)
"""


def test_exported_model_reloads_in_a_process_without_ray_mlflow_deepspeed(tmp_path):
    torch.manual_seed(0)
    cfg = build_config("tiny", None, {"model.block_order": "random"}).model
    model = build_model(cfg).eval()
    trained_with = dataclasses.replace(cfg, attention="flex", compile=True)  # training-only switches
    save_encoder(model.encoder.state_dict(), trained_with, tmp_path / "export")
    save_model(model.state_dict(), trained_with, tmp_path / "export", extra={"normalization": {"mean": [0.5] * 3}})
    assert {p.name for p in (tmp_path / "export").iterdir()} == {WEIGHTS, MODEL_WEIGHTS, CONFIG}
    meta = json.loads((tmp_path / "export" / CONFIG).read_text())
    assert meta["model"]["attention"] == "sdpa" and meta["model"]["compile"] is False
    assert meta["model"]["block_order"] == "random" and meta["normalization"]["mean"] == [0.5] * 3
    x = torch.randn(2, 3, 32, 32)
    torch.save(x, tmp_path / "x.pt")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_LOADER, str(tmp_path / "export"), str(tmp_path / "x.pt"), str(tmp_path / "out.pt")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "loaded Encoder XTRA" in proc.stdout
    out = torch.load(tmp_path / "out.pt")
    with torch.no_grad():
        assert torch.equal(out["features"], model.encode(x, last_n=2))
        assert torch.equal(out["predict"], model.predict(x))


def test_load_encoder_reads_the_encoder_out_of_a_full_model_export(tmp_path):
    torch.manual_seed(1)
    model = build_model("tiny").eval()
    save_model(model.state_dict(), model.cfg, tmp_path)
    enc = xtra_core.load_encoder(tmp_path)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(enc(x), model.encode(x))
