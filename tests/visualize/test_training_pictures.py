"""The Figure-4 picture during pretraining (real Ray Train + DeepSpeed + MLflow), and
`xtra visualize` on the registered version, which finds the full model through its run."""

from __future__ import annotations

import json

import mlflow
import pytest
from PIL import Image

from pipelines.cli import main as cli_main
from pipelines.pretrain import driver as pretrain
from pipelines.visualize.command import PICTURES_ARTIFACT
from pipelines.visualize.during_training import IMAGE_KEY, PINNED_DIR
from pipelines.visualize.figure4 import figure4_layout
from tests.small_run import SMALL_MODEL
from xtra_core.config import build_config

pytestmark = pytest.mark.slow



@pytest.fixture(scope="module")
def fmnist(tmp_path_factory) -> str:
    dest = tmp_path_factory.mktemp("fmnist")
    assert cli_main(["data", "prepare", "--source", "fashion-mnist", "--dest", str(dest), "--limit", "48"]) == 0
    return str(dest)


def test_pictures_every_n_steps_and_visualize_of_the_registered_version(ray_cluster, fmnist, tmp_path, capsys):
    db = f"sqlite:///{tmp_path}/mlflow.db"
    cfg = build_config("tiny", None, {
        **SMALL_MODEL, "data.uri": fmnist, "train.global_batch_size": 16, "train.num_workers": 2,
        "train.cpus_per_worker": 0.5, "train.zero_stage": 3, "train.max_steps": 5,
        "train.warmup_steps": 1, "train.checkpoint_every": 2, "train.log_every": 1,
        "train.visualize_every": 2, "train.visualize_images": 3, "train.run_name": "pics",
        "train.storage_path": str(tmp_path / "runs"), "mlflow.tracking_uri": db,
        "mlflow.experiment": "test", "mlflow.registered_model": "enc-pics",
    })
    out = pretrain.run_pretraining(cfg)
    # checkpoints at 2, 4 and 5 (the end): pictures at 2 and 4 (multiples of 2) and 5 (the end)
    assert [p["step"] for p in out["pictures"]] == [2, 4, 5], out["pictures"]
    # train.num_to_keep=2: checkpoint 2 is deleted when 5 is registered, its picture was drawn
    # from the pinned links, which are gone afterwards
    runs = tmp_path / "runs" / "pics"
    assert not (runs / "checkpoint_step000000002").exists()
    assert not any((runs / PINNED_DIR).iterdir())
    layout = figure4_layout(3, cfg.model)
    for p in out["pictures"]:
        assert "error" not in p, p
        assert Image.open(p["png"]).size == (layout.width, layout.height)
    client = mlflow.MlflowClient(tracking_uri=db)
    images = [a.path for a in client.list_artifacts(out["run_id"], "images")]
    for step in (2, 4, 5):
        assert any(f"{IMAGE_KEY}+step+{step}+" in path and path.endswith(".png") for path in images), images

    # the registered version carries the alias; its run keeps the full model
    assert out["alias"] == "challenger"
    mlflow.set_tracking_uri(db)
    assert str(client.get_model_version_by_alias("enc-pics", "challenger").version) == out["version"]
    assert {a.path for a in client.list_artifacts(out["run_id"], "full_model")} == {
        "full_model/config.json", "full_model/model.safetensors"}

    png = tmp_path / "fig4.png"
    code = cli_main(["visualize", "--model", "models:/enc-pics@challenger", "--data", fmnist, "--n", "2",
                     "--out", str(png), "--set", f"mlflow.tracking_uri={db}"])
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["run_id"] == out["run_id"] and result["images"] == 2
    assert Image.open(png).size == (figure4_layout(2, cfg.model).width, figure4_layout(2, cfg.model).height)
    logged = [a.path for a in client.list_artifacts(out["run_id"], PICTURES_ARTIFACT)]
    assert logged == [f"{PICTURES_ARTIFACT}/fig4.png"]
