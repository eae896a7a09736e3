"""The console: Ray Data's own "progress bars disabled" warning and MLflow's registration prints only
with --verbose."""

from __future__ import annotations

import logging
import sys

import pytest

from pipelines import console


@pytest.mark.parametrize("verbose", [False, True])
def test_ray_datas_progress_bar_warning_shows_only_when_verbose(verbose: bool) -> None:
    from ray.data._internal.progress import get_progress_manager  # noqa: F401 (the real logger's module)

    console.configure(verbose)
    console.quiet_ray_data()
    progress_logger = logging.getLogger("ray.data._internal.progress")
    # Ray emits it with logger.warning on this logger (ray/data/_internal/progress/__init__.py)
    assert progress_logger.isEnabledFor(logging.WARNING) == verbose
    assert progress_logger.isEnabledFor(logging.ERROR)  # errors always reach the console
    console.configure(False)


@pytest.mark.parametrize("verbose", [False, True])
def test_mlflows_registration_prints_are_dropped_and_its_warnings_kept(
        verbose: bool, tmp_path, monkeypatch, capsys) -> None:
    """A real registration into a sqlite store: MLflow's own "Successfully registered model" /
    "Created version" lines only with --verbose; a warning MLflow writes meanwhile still shows."""
    import mlflow
    import torch

    from pipelines.tracking import registry, store
    from xtra_core.config import build_config
    from xtra_core.export import save_encoder
    from xtra_core.model import build_model

    monkeypatch.setenv(console.ENV, "1" if verbose else "0")
    cfg = build_config("tiny", None, {
        "model.image_size": 16, "model.encoder_width": 32, "model.encoder_depth": 1,
        "model.encoder_heads": 2, "model.projection_hidden": 32, "model.decoder_width": 32,
        "model.decoder_depth": 1, "model.decoder_heads": 2, "model.head_hidden": 32}).model
    torch.manual_seed(0)
    export = save_encoder(build_model(cfg).encoder.state_dict(), cfg, tmp_path / "export")
    real_requirements = registry.model_requirements

    def requirements_with_a_warning() -> list[str]:  # called inside the registration's block
        print("mlflow: a warning that matters", file=sys.stderr)
        return real_requirements()

    monkeypatch.setattr(registry, "model_requirements", requirements_with_a_warning)
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    exp = mlflow.MlflowClient(uri).create_experiment("t", artifact_location=(tmp_path / "a").as_uri())
    capsys.readouterr()
    with store.fluent_at(uri), mlflow.start_run(experiment_id=exp):
        info = registry.log_and_register_encoder(export, "enc", uri=uri)
    err = capsys.readouterr().err
    assert info["version"] == "1" and "mlflow: a warning that matters" in err, err
    assert ("Successfully registered model 'enc'" in err) == verbose, err
    assert ("Created version '1'" in err) == verbose, err


def test_epoch_lines_print_a_tenth_of_quick_epochs_the_last_and_every_slow_one(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr(console.time, "perf_counter", lambda: clock[0])
    quick = console.EpochLines(40)
    assert [e + 1 for e in range(40) if quick.due(e)] == [4, 8, 12, 16, 20, 24, 28, 32, 36, 40]
    few = console.EpochLines(3)
    assert [e + 1 for e in range(3) if few.due(e)] == [1, 2, 3]
    odd = console.EpochLines(25)  # stride 3, and the last epoch though 25 is not a multiple
    assert [e + 1 for e in range(25) if odd.due(e)] == [3, 6, 9, 12, 15, 18, 21, 24, 25]
    slow = console.EpochLines(100, every_s=30.0)  # stride 10, but each epoch takes 31 s
    due = []
    for e in range(5):
        clock[0] += 31.0
        due.append(slow.due(e))
    assert due == [True] * 5
    slow_then_quick = console.EpochLines(100, every_s=30.0)
    clock[0] += 31.0
    assert slow_then_quick.due(0)  # 31 s since the start
    clock[0] += 1.0
    assert not slow_then_quick.due(1)  # the clock restarted at the last line
