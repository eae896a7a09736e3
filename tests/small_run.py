"""The small pretraining run the integration tests share: a 16 px, 2-block-deep XTRA, 2 workers
of 0.5 CPU under ZeRO-2 in fp32, its runs and MLflow store under the test's tmp path."""

from __future__ import annotations

from pathlib import Path

from xtra_core.config import build_config

SMALL_MODEL = {
    "model.image_size": 16, "model.patch_size": 4, "model.block_size": 2,
    "model.encoder_width": 64, "model.encoder_depth": 2, "model.encoder_heads": 2,
    "model.projection_hidden": 128, "model.decoder_width": 64, "model.decoder_depth": 1,
    "model.decoder_heads": 2, "model.head_hidden": 128,
}


def small_sets(tmp_path: Path, data: str, name: str, **sets) -> dict:
    dotted = {
        **SMALL_MODEL,
        "data.uri": data,
        "train.global_batch_size": 16,
        "train.num_workers": 2,
        "train.cpus_per_worker": 0.5,
        "train.zero_stage": 2,
        "train.max_steps": 8,
        "train.warmup_steps": 2,
        "train.lr": 3e-3,
        "train.log_every": 1,
        # fp32 on every machine: the tests compare runs step by step (a resume, a killed worker, a
        # registered encoder vs its checkpoint); `auto` would pick bf16 on a CPU with AVX512-BF16
        # and fp32 elsewhere. test_precision_run.py sets `auto` itself.
        "train.bf16": False,
        "train.checkpoint_every": 4,
        "train.run_name": name,
        "train.storage_path": str(tmp_path / "runs"),
        "mlflow.tracking_uri": f"sqlite:///{tmp_path}/mlflow.db",
        "mlflow.experiment": "test",
        "mlflow.registered_model": f"enc-{name}",
    }
    dotted.update(sets)
    return dotted


def make_cfg(tmp_path: Path, data: str, name: str, **sets):
    return build_config("tiny", None, small_sets(tmp_path, data, name, **sets))
