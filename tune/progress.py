"""Console progress of a sweep: one line per trial event (started, step k/n, probed, failed).

A Ray Tune callback on the driver, so the lines come from one process in order; Tune's own
status tables stay off (verbose=0) unless `xtra sweep --verbose`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from ray.tune import Callback

from tune.space import axis_label


def _line(text: str) -> None:
    print(f"[xtra] {text}", flush=True)


def last_error_line(trial) -> str:
    """The last line of a failed trial's error (the exception's own message)."""
    err = None
    try:  # Tune writes error.txt next to the trial locally first, then syncs it to storage
        if trial.error_file and Path(trial.error_file).is_file():
            err = Path(trial.error_file).read_text()
        else:
            err = trial.get_pickled_error() or trial.get_error()
    except Exception:  # noqa: BLE001 - the error file may not be readable yet
        pass
    lines = [ln for ln in str(err or "").strip().splitlines() if ln.strip()]
    return lines[-1].strip()[:300] if lines else f"see {trial.error_file or 'the trial directory'}"


class TrialEvents(Callback):
    """Names a trial by its axis values, e.g. `trial 2/4 (block_size=2 order=raster seed=0)`."""

    def __init__(self, axes: list, total_trials: int) -> None:
        self.axes = axes
        self.total = total_trials
        self.index: dict[str, int] = {}
        self.t0: dict[str, float] = {}

    def _name(self, trial) -> str:
        # Tune's trial ids end in the grid index (`b719b_00001`), also after a resume
        tail = trial.trial_id.rsplit("_", 1)[-1]
        i = int(tail) + 1 if tail.isdigit() else self.index.setdefault(trial.trial_id, len(self.index) + 1)
        return f"trial {i}/{self.total} ({axis_label(self.axes, trial.config)})"

    def on_trial_start(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.t0[trial.trial_id] = time.time()
        _line(f"{self._name(trial)}: started")

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        if result.get("phase") == "pretrain":
            _line(f"{self._name(trial)}: step {int(result['step'])}/{int(result['total_steps'])} "
                  f"loss {result['loss']:.4f}")
        elif result.get("phase") == "probe":
            kinds = sorted({k.split("/")[0] for k in result if k.endswith("/val_top1")})
            scores = ", ".join(f"{k} val top-1 {result[f'{k}/val_top1']:.4f} test top-1 "
                               f"{result[f'{k}/top1']:.4f}" for k in kinds)
            _line(f"{self._name(trial)}: probed: {scores} "
                  f"({time.time() - self.t0.get(trial.trial_id, time.time()):.0f} s)")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        reason = last_error_line(trial)
        _line(f"{self._name(trial)}: failed: {reason[:300]}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        last = trial.last_result or {}
        if last.get("phase") != "probe":
            _line(f"{self._name(trial)}: stopped early at step {last.get('step', 0)} (scheduler)")
