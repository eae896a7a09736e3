"""The outage backlog: a run's metrics, tags and final status that MLflow could not take, kept in a
JSONL file and sent with the next call that gets through.

MLflow trouble never stops training: `flush` gets one short try (`store.short_mlflow_retries`), keeps
what it could not send in `backlog_path(run_id)` (on the driver's node, where Ray Train's controller
runs too), logs one warning per outage, and one line when MLflow is back.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from pipelines.redaction import redact
from pipelines.tracking.store import client, no_url_printing, short_mlflow_retries

logger = logging.getLogger("xtra.tracking")

BACKLOG_DIR_ENV = "XTRA_TRACKING_BACKLOG_DIR"  # default ~/.cache/xtra/tracking-backlog
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit


def backlog_path(run_id: str, kind: str = "") -> Path:
    root = os.environ.get(BACKLOG_DIR_ENV) or Path("~/.cache/xtra/tracking-backlog").expanduser()
    return Path(root, f"{run_id}{'.' + kind if kind else ''}.jsonl")


class Backlog:
    """One run's metrics not yet in MLflow (oldest first) and its pending final status, kept in a
    JSONL file: the controller (which logs the steps) and the driver (which sets the final
    status) are two processes on the same node, and a restarted controller finds it too."""

    def __init__(self, run_id: str, kind: str = "") -> None:
        """`kind`: a separate file for another writer (rank 0's checkpoint-digest tags, "tags"),
        so that two processes never rewrite one file."""
        self.path = backlog_path(run_id, kind)
        self.metrics: list[Any] = []
        self.tags: dict[str, str] = {}
        self.status: str | None = None
        if self.path.exists():  # left by an earlier process
            from mlflow.entities import Metric

            for line in self.path.read_text().splitlines():
                rec = json.loads(line)
                if "status" in rec:
                    self.status = rec["status"]
                elif "tag" in rec:
                    self.tags[rec["tag"]] = rec["value"]
                else:
                    self.metrics.append(Metric(rec["key"], rec["value"], rec["timestamp"], rec["step"]))

    def add(self, batch: list[Any]) -> None:
        self.metrics.extend(batch)

    def add_tags(self, tags: dict[str, str]) -> None:
        self.tags.update(tags)

    def set_status(self, status: str) -> None:
        self.status = status

    def empty(self, with_status: bool) -> bool:
        return not self.metrics and not self.tags and not (with_status and self.status)

    def sent(self, n: int) -> None:
        del self.metrics[:n]

    def save(self) -> None:
        if self.empty(with_status=True):
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = [
            json.dumps({"key": m.key, "value": m.value, "timestamp": m.timestamp, "step": m.step})
            for m in self.metrics
        ]
        lines += [json.dumps({"tag": k, "value": v}) for k, v in self.tags.items()]
        if self.status:
            lines.append(json.dumps({"status": self.status}))
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(self.path)


_WARNED: set[str] = set()  # runs whose outage this process has already warned about


def flush(uri: str, run_id: str, backlog: Backlog, set_status: bool, quiet: bool) -> bool:
    """Send the backlog's metrics (and, with `set_status`, its final status) in one short try;
    keep what fails on disk. True when nothing is left; never raises."""
    if backlog.empty(with_status=set_status):
        return True
    try:
        with short_mlflow_retries(), no_url_printing(uri):
            c = client(uri)
            if backlog.tags:
                from mlflow.entities import RunTag

                c.log_batch(run_id, tags=[RunTag(k, v) for k, v in backlog.tags.items()])
                backlog.tags = {}
            while backlog.metrics:
                chunk = backlog.metrics[:MAX_METRICS_PER_BATCH]
                c.log_batch(run_id, metrics=chunk)
                backlog.sent(len(chunk))
            if set_status and backlog.status:
                c.set_terminated(run_id, status=backlog.status)
                backlog.status = None
    except Exception as e:  # an outage, a 5xx, a timeout: keep everything, training goes on
        if run_id not in _WARNED and not quiet:
            _WARNED.add(run_id)
            logger.warning(
                "xtra: MLflow at %s cannot be reached (%s); training goes on, metrics are kept "
                "in %s and sent when it is back",
                redact(uri), redact(_first_line(e)), backlog.path,
            )
        backlog.save()
        return False
    if run_id in _WARNED:
        _WARNED.discard(run_id)
        logger.warning("xtra: MLflow at %s is back; buffered metrics sent", redact(uri))
    backlog.save()  # removes the file once nothing (no metric, no pending status) is left
    return True


def flush_patiently(uri: str, run_id: str, backlog: Backlog, attempts: int) -> bool:
    """`attempts` tries, 2 s, 4 s, ... apart: the end of a run may wait a little for MLflow."""
    for i in range(attempts):
        if flush(uri, run_id, backlog, set_status=True, quiet=i < attempts - 1):
            return True
        if i < attempts - 1:
            time.sleep(2.0 * 2**i)
    return False


def flush_backlog(uri: str, run_id: str, set_status: bool = True, quiet: bool = False) -> bool:
    """Send a run's buffered metrics (and, with `set_status`, its pending final status).
    Returns True when nothing is left; never raises."""
    return flush(uri, run_id, Backlog(run_id), set_status, quiet)


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:160]
