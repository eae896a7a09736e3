"""A data stop (too many bad files) ends `xtra pretrain` in one line naming the fraction, through
`stream_stop_error`, not Ray's wrapped traceback."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.reliability.conftest import own_ray_env, small_sets

pytestmark = pytest.mark.slow


def test_too_many_bad_files_end_pretrain_in_one_line(fmnist, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(fmnist, data)
    train = sorted((data / "train").rglob("*.png"))
    for p in train[: len(train) // 2]:  # half of the images are not images
        p.write_bytes(b"not an image")
    sets = small_sets(tmp_path, str(data), "datastop", **{"data.max_bad_fraction": 0.05,
                                                           "train.max_steps": 4})
    ray_tmp = Path(tempfile.mkdtemp(prefix="xd", dir="/tmp"))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "pipelines.cli", "pretrain",
             *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]],
            env={**own_ray_env(), "RAY_TMPDIR": str(ray_tmp)}, capture_output=True, text=True,
            timeout=600, cwd=Path(__file__).resolve().parents[2],
        )
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert err[-1].startswith("xtra: error: ") and "data.max_bad_fraction=0.05" in err[-1], err[-5:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]


def _failure_decisions(session: Path) -> set[tuple[str, str]]:
    """Ray Train's failure-policy decisions in the session's logs, as (decision, error count): the
    controller logs each one at INFO when xtra is verbose (a line can sit in several log files)."""
    found: set[tuple[str, str]] = set()
    for path in (session / "logs").rglob("*"):
        if path.is_file():
            found |= set(re.findall(r"\[FailurePolicy\] (\w+)\s+Source: [^\n]*\s+Error count: (\d+)",
                                    path.read_text(errors="replace")))
    return found


def test_a_data_stop_is_not_retried_by_automatic_restarts(ray_cluster, fmnist, tmp_path, monkeypatch):
    """With train.max_failures=3 Ray Train restarts the workers after any failure; a data stop
    would stop again on every restart. The restarted group ends at once and the run ends in the
    data's one line after one restart, not four attempts."""
    import ray

    from pipelines.errors import UserError
    from pipelines.pretrain import driver as pretrain
    from tests.reliability.conftest import make_cfg

    data = tmp_path / "data"
    shutil.copytree(fmnist, data)
    for p in sorted((data / "train").rglob("*.png"))[:32]:
        p.write_bytes(b"not an image")
    monkeypatch.setenv("XTRA_VERBOSE", "1")  # the controller logs its failure decisions
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    before = _failure_decisions(session)
    cfg = make_cfg(tmp_path, str(data), "stopretry", **{"data.max_bad_fraction": 0.05,
                                                         "train.max_steps": 4, "train.max_failures": 3})
    with pytest.raises(UserError, match=r"data.max_bad_fraction=0.05"):
        pretrain.run_pretraining(cfg)
    time.sleep(2)  # the controller's log lines reach their files
    decisions = _failure_decisions(session) - before
    assert decisions == {("RETRY", "1")}, decisions  # one restart, which ends at once; not 3
