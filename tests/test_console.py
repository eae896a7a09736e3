"""The console: Ray Data's own "progress bars disabled" warning only with --verbose."""

from __future__ import annotations

import logging

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
