"""`train.bf16: auto` in a real run: a 2-step pretraining on the real local Ray cluster says which
precision it chose and why, and the engine computed in it (the DeepSpeed module weights of the
checkpoint are bf16 exactly when the run line says bf16)."""

from __future__ import annotations

import mlflow
import pytest
import torch

from pipelines.cli import main as cli_main
from pipelines.pretrain import driver as pretrain
from pipelines.pretrain.checkpoints import load_module_states
from tests.small_run import make_cfg
from xtra_core.precision import local_precision

pytestmark = pytest.mark.slow


def test_auto_precision_is_resolved_on_this_machine_and_stated_in_the_run_line(
    ray_cluster, tmp_path, capsys
):
    data = tmp_path / "fmnist"
    assert cli_main(["data", "prepare", "--source", "fashion-mnist", "--dest", str(data),
                     "--limit", "32"]) == 0
    cfg = make_cfg(tmp_path, str(data), "auto-precision",
                   **{"train.max_steps": 2, "train.checkpoint_every": 2, "train.bf16": "auto"})
    assert cfg.train.bf16 == "auto"
    expected = local_precision("auto", False)  # this machine's /proc/cpuinfo flags
    out = pretrain.run_pretraining(cfg)
    run_line = next(line for line in capsys.readouterr().out.splitlines()
                    if line.startswith("[xtra] run auto-precision"))
    assert run_line.endswith(f"CPU per worker, {expected.describe()}")
    module = load_module_states(out["checkpoint"])
    dtypes = {t.dtype for t in module.values() if t.is_floating_point()}
    assert dtypes == {torch.bfloat16 if expected.bf16 else torch.float32}
    params = mlflow.MlflowClient(cfg.mlflow.tracking_uri).get_run(out["run_id"]).data.params
    assert params["train.bf16"] == str(expected.bf16)  # MLflow records the resolved precision
