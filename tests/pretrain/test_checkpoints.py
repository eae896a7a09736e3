"""Reading Ray Train's checkpoint snapshot while a running job rewrites it (no Ray: files only)."""

from __future__ import annotations

import json
import threading

import pytest

from pipelines.errors import UserError
from pipelines.pretrain.checkpoints import SNAPSHOT_FILE, latest_checkpoint_step
from xtra_core.config import build_config


def snapshot(step: int) -> str:
    return json.dumps({"latest_checkpoint_result": {"metrics": {"step": step},
                                                    "checkpoint_dir_name": f"checkpoint_step{step:09d}"}})


def test_a_snapshot_caught_mid_write_is_read_again(tmp_path):
    cfg = build_config("tiny", None, {})
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / SNAPSHOT_FILE).write_text("")  # Ray truncated it and has not written it yet
    writer = threading.Timer(0.15, lambda: (run / SNAPSHOT_FILE).write_text(snapshot(8)))
    writer.start()
    try:
        assert latest_checkpoint_step(str(tmp_path / "runs"), "r", cfg) == 8
    finally:
        writer.cancel()


def test_a_snapshot_that_stays_broken_is_named(tmp_path):
    cfg = build_config("tiny", None, {})
    run = tmp_path / "runs" / "r"
    run.mkdir(parents=True)
    (run / SNAPSHOT_FILE).write_text('{"latest_checkpoint_result": {"metr')
    with pytest.raises(UserError, match=f"{SNAPSHOT_FILE}: not valid JSON"):
        latest_checkpoint_step(str(tmp_path / "runs"), "r", cfg)
    assert latest_checkpoint_step(str(tmp_path / "runs"), "other", cfg) == 0  # no snapshot: none
