"""One run per `train.run_name` at a time: the lease file in the run's storage folder, on a local
folder and on a real S3 server (moto). Fast: short settle/renew times, no Ray."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time

import pyarrow.fs as pafs
import pytest

from pipelines.errors import UserError
from pipelines.pretrain.lease import LEASE_FILE, RunLease
from pipelines.pretrain.plan import open_storage
from xtra_core.config import build_config

FAST = {"settle_s": 0.05, "renew_s": 0.1}


def test_a_second_run_of_the_same_name_gets_one_line_naming_the_holder(tmp_path) -> None:
    fs = pafs.LocalFileSystem()
    with RunLease(fs, str(tmp_path / "run"), "run", **FAST):
        with pytest.raises(UserError) as e:
            RunLease(fs, str(tmp_path / "run"), "run", **FAST).acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"host {socket.gethostname()}" in msg and "train.run_name" in msg
        with RunLease(fs, str(tmp_path / "other"), "other", **FAST):  # another name: free
            pass
    assert not (tmp_path / "run" / LEASE_FILE).exists()  # released
    with RunLease(fs, str(tmp_path / "run"), "run", **FAST):  # and free again
        pass


def test_the_lease_is_renewed_while_the_run_lives(tmp_path) -> None:
    lease = RunLease(pafs.LocalFileSystem(), str(tmp_path), "run", **FAST).acquire()
    try:
        first = lease.read()["renewed"]
        time.sleep(0.5)
        assert lease.read()["renewed"] > first
    finally:
        lease.release()


def test_a_dead_runs_lease_lets_go(tmp_path) -> None:
    fs = pafs.LocalFileSystem()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    holder = {"id": "x", "host": socket.gethostname(), "pid": int(dead.stdout), "since": time.time(),
              "renewed": time.time(), "ttl_s": 120}
    (tmp_path / LEASE_FILE).write_text(json.dumps(holder))
    RunLease(fs, str(tmp_path), "run", **FAST).acquire().release()  # a process of this host, gone
    (tmp_path / LEASE_FILE).write_text(json.dumps({**holder, "host": "elsewhere"}))
    with pytest.raises(UserError, match="host elsewhere"):  # another host: it may be alive
        RunLease(fs, str(tmp_path), "run", **FAST).acquire()
    (tmp_path / LEASE_FILE).write_text(json.dumps({**holder, "host": "elsewhere", "renewed": time.time() - 121}))
    RunLease(fs, str(tmp_path), "run", **FAST).acquire().release()  # not renewed for its TTL: expired


def test_on_s3_of_runs_starting_together_exactly_one_holds_the_lease(s3_server) -> None:
    bucket = s3_server.make_bucket("lease")
    cfg = build_config("tiny", None, {"data.s3_endpoint": s3_server.endpoint})
    fs, root = open_storage(f"s3://{bucket}/runs", cfg)
    outcomes: list[str] = []
    held: list[RunLease] = []
    lock = threading.Lock()

    def start() -> None:
        lease = RunLease(fs, f"{root}/run", "run", settle_s=1.0, renew_s=30)
        try:
            lease.acquire()
            with lock:
                outcomes.append("held")
                held.append(lease)
        except UserError:
            with lock:
                outcomes.append("refused")

    threads = [threading.Thread(target=start) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(outcomes) == ["held", "refused", "refused", "refused"]
    with pytest.raises(UserError, match="is running elsewhere"):  # and a late one is refused too
        RunLease(fs, f"{root}/run", "run", **FAST).acquire()
    held[0].release()
    assert fs.get_file_info(f"{root}/run/{LEASE_FILE}").type == pafs.FileType.NotFound
