"""A data stop (too many bad files) ends `xtra pretrain` in one line naming the fraction, through
`stream_stop_error`, not Ray's wrapped traceback."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
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
