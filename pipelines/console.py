"""What the user sees on the console: the product's status lines (`[xtra] ...`, loggers named
`xtra.*`) and warnings that matter; Ray's own output (worker and actor logs forwarded to the
driver, Ray Data progress bars, deprecation warnings, library progress bars) only with
`xtra --verbose`. Ray's output is still written to its log files (`/tmp/ray/session_*/logs`).

The CLI calls `configure(verbose)` once; jobs ask `verbose()` and `ray_init_kwargs()` when they
start Ray. The choice travels in the `XTRA_VERBOSE` environment variable, so a job started from
the CLI (or a Tune trial it launches) sees it too.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import sys
import time
import warnings
from collections.abc import Iterator
from typing import Any

from pipelines import redaction

ENV = "XTRA_VERBOSE"


def format_seconds(s: float) -> str:
    """`1h05m`, `3m07s`, or `?` for an unknown (nan) duration."""
    if s != s:  # nan
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


PROGRESS_EVERY_S = 30.0  # a status line at least this often during long work


class EpochLines:
    """When a per-epoch status line is due: every `ceil(epochs / lines)`-th epoch, the last one,
    and any epoch that ends `every_s` seconds or more after the previous line (so 40 quick epochs
    print 10 lines, and slow ones each print theirs)."""

    def __init__(self, epochs: int, lines: int = 10, every_s: float = PROGRESS_EVERY_S) -> None:
        self.epochs, self.every_s = epochs, every_s
        self.stride = max(1, math.ceil(epochs / max(1, lines)))
        self.last = time.perf_counter()

    def due(self, epoch: int) -> bool:
        """Whether zero-based `epoch`, just finished, gets its line (if so, the clock restarts)."""
        now = time.perf_counter()
        due = ((epoch + 1) % self.stride == 0 or epoch + 1 >= self.epochs
               or now - self.last >= self.every_s)
        if due:
            self.last = now
        return due


def configure(verbose: bool) -> None:
    """Logging for the `xtra` command: the product's loggers at INFO on stderr; the libraries'
    chatter off unless `verbose`."""
    os.environ[ENV] = "1" if verbose else "0"
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(name)s: %(message)s")
    logging.getLogger("xtra").setLevel(logging.INFO)
    redaction.protect_logging()  # the handler basicConfig made: every record redacted
    if verbose:
        return
    for name in ("mlflow", "ray", "DeepSpeed", "filelock"):
        logging.getLogger(name).setLevel(logging.ERROR if name == "ray" else logging.WARNING)
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # DeepSpeed's "Loading checkpoint shards" bar


def verbose() -> bool:
    """True when the user asked for Ray's output (`xtra --verbose`); False by default."""
    return os.environ.get(ENV, "0") == "1"


def ray_init_kwargs() -> dict[str, Any]:
    """`ray.init` arguments: workers' and actors' output forwarded to the driver only when
    verbose (the product's status lines are printed by the driver itself)."""
    return {"logging_level": logging.WARNING if verbose() else logging.ERROR,
            "log_to_driver": verbose()}


def quiet_ray_data() -> None:
    """Ray Data's progress bars and per-execution plan lines only when verbose."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = verbose()
    ctx.print_on_execution_start = verbose()
    # "Dataset ... execution finished in ..." lines of datasets the driver itself runs (probes)
    logging.getLogger("ray.data").setLevel(logging.INFO if verbose() else logging.WARNING)
    # its "Progress bars disabled. To enable, set ..." warning answers our own setting above
    logging.getLogger("ray.data._internal.progress").setLevel(
        logging.NOTSET if verbose() else logging.ERROR)


@contextlib.contextmanager
def captured_unless_verbose() -> Iterator[None]:
    """Swallow what a library prints to stdout/stderr in the block (progress bars, "Processing
    ..." lines) unless verbose; an exception still propagates with its message."""
    if verbose():
        yield
        return
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


@contextlib.contextmanager
def dropping_lines(*prefixes: str) -> Iterator[None]:
    """A library's own stderr lines that start with one of `prefixes` dropped unless verbose;
    whatever else it writes to stderr in the block (its warnings) is written out at the end."""
    if verbose():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        kept = [line for line in buffer.getvalue().splitlines(keepends=True)
                if not line.startswith(prefixes)]
        if kept:
            sys.stderr.write("".join(kept))
            sys.stderr.flush()


@contextlib.contextmanager
def quiet_logger(logger: logging.Logger) -> Iterator[None]:
    """`logger`'s info lines held back in the block unless verbose (a probe's later draws print
    one summary line each instead of their per-step lines); warnings still show."""
    if verbose():
        yield
        return
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)
