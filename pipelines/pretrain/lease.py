"""One run at a time per `train.run_name`: a lease file in the run's storage folder.

`<storage_path>/<run_name>/xtra_lease.json` names its holder (host, pid, a random id, when it was
taken and last renewed). A run takes it before anything else touches the run (checkpoints,
MLflow), renews it every `RENEW_S` while it lives and deletes it at the end; a second run with the
same name stops in one line naming the holder. A dead run's lease lets go by itself: after `TTL_S`
without renewal, or at once when its holder is a process of this host that no longer exists.

It works the same on a local folder and on S3 (pyarrow's filesystem), which has no atomic
create-if-absent there: the lease is written, read back after `SETTLE_S` and kept only if it still
names this run (S3's reads are strongly consistent with the last write). What that guarantees:
- a run started while another's live lease is there is refused;
- of runs that start together, the last to write keeps the lease and the others stop, provided
  each one's check-then-write takes less than `SETTLE_S` (one small request: normally
  milliseconds); two writes further apart than that can both pass, and the renewal of the one
  overwritten notices it and says so in the log (it cannot stop the other);
- expiry compares the holder's clock with the reader's: hosts' clocks must agree within a few
  seconds of `TTL_S`.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

from pipelines.errors import UserError

log = logging.getLogger("xtra.pretrain")

LEASE_FILE = "xtra_lease.json"
TTL_S = 120.0  # a lease not renewed for this long is free
RENEW_S = 20.0
SETTLE_S = 2.0  # written, then read back after this long


def _alive_here(holder: dict[str, Any]) -> bool:
    """False only when the holder is a process of this host that no longer exists."""
    if holder.get("host") != socket.gethostname():
        return True
    try:
        os.kill(int(holder.get("pid", 0)), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError, OverflowError):
        return True
    return True


class RunLease:
    """The lease of one run (`acquire` / `release`, or a `with` block)."""

    def __init__(self, fs: pafs.FileSystem, run_dir: str, run_name: str, *,
                 ttl_s: float = TTL_S, renew_s: float = RENEW_S, settle_s: float = SETTLE_S) -> None:
        self.fs, self.path, self.run_name = fs, f"{run_dir.rstrip('/')}/{LEASE_FILE}", run_name
        self.ttl_s, self.renew_s, self.settle_s = ttl_s, renew_s, settle_s
        self.me = {"id": uuid.uuid4().hex, "host": socket.gethostname(), "pid": os.getpid(),
                   "since": time.time()}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def read(self) -> dict[str, Any] | None:
        """The lease file's holder, None if there is none (or it is cut short: nobody's lease)."""
        if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
            return None
        try:
            with self.fs.open_input_stream(self.path) as f:
                raw = f.read()
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except ValueError:
            return None

    def _write(self) -> None:
        run_dir = self.path.rsplit("/", 1)[0]
        if not hasattr(self, "_made_dir"):  # a run refused before it wrote anything leaves no folder
            self._made_dir = self.fs.get_file_info(run_dir).type == pafs.FileType.NotFound
        self.fs.create_dir(run_dir, recursive=True)
        with self.fs.open_output_stream(self.path) as f:
            f.write(json.dumps({**self.me, "renewed": time.time(), "ttl_s": self.ttl_s}).encode())

    def _live_other(self, holder: dict[str, Any] | None) -> bool:
        if not holder or holder.get("id") == self.me["id"]:
            return False
        fresh = time.time() - float(holder.get("renewed", 0)) < float(holder.get("ttl_s", self.ttl_s))
        return fresh and _alive_here(holder)

    def _refusal(self, holder: dict[str, Any]) -> UserError:
        age = time.time() - float(holder.get("renewed", 0))
        left = max(0.0, float(holder.get("ttl_s", self.ttl_s)) - age)
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
        return UserError(
            f"run {self.run_name!r} is running elsewhere: host {holder.get('host')} pid {holder.get('pid')} "
            f"holds {self.path} since {since} (renewed {age:.0f} s ago; it expires {left:.0f} s after its "
            "holder stops); wait for it, or give another train.run_name"
        )

    def acquire(self) -> RunLease:
        try:
            current = self.read()
            if self._live_other(current):
                raise self._refusal(current)
            self._write()
            time.sleep(self.settle_s)
            back = self.read()
        except OSError as e:
            raise UserError(f"{self.path}: cannot take the run's lease ({e})") from None
        if not back or back.get("id") != self.me["id"]:
            raise self._refusal(back or {"host": "?", "pid": "?"})
        self._thread = threading.Thread(target=self._renew, name="xtra-run-lease", daemon=True)
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.renew_s):
            try:
                holder = self.read()
                if holder and holder.get("id") != self.me["id"]:
                    log.warning("xtra: the lease of run %s (%s) was taken by host %s pid %s; two "
                                "runs now write this run", self.run_name, self.path,
                                holder.get("host"), holder.get("pid"))
                    return
                self._write()
            except OSError as e:  # storage unreachable a moment: try again at the next renewal
                log.warning("xtra: cannot renew the lease %s: %s", self.path, e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
        try:
            holder = self.read()
            if holder and holder.get("id") == self.me["id"]:
                self.fs.delete_file(self.path)
                run_dir = self.path.rsplit("/", 1)[0]
                if getattr(self, "_made_dir", False) and not self.fs.get_file_info(
                        pafs.FileSelector(run_dir)):
                    self.fs.delete_dir(run_dir)  # the lease made it and nothing else was written
        except OSError as e:
            log.warning("xtra: cannot delete the lease %s (it expires by itself): %s", self.path, e)

    def __enter__(self) -> RunLease:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
