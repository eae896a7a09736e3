"""The status line's ETA counts training steps only, not the run's start-up."""

from __future__ import annotations

import re
import time

from pipelines.pretrain.plan import RunPlan
from pipelines.pretrain.progress import ProgressAndTracking


class Lines:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def put(self, line: str) -> None:
        self.lines.append(line)


def test_eta_comes_from_the_step_rate_not_the_start_up() -> None:
    plan = RunPlan(total_steps=103, steps_per_epoch=50, rows_per_epoch=100, start_step=0, stop_step=103)
    relay = Lines()
    progress = ProgressAndTracking(None, "", plan, relay)
    time.sleep(1.0)  # workers start, DeepSpeed builds: no step yet
    for step in (1, 2, 3):  # then 10 steps/s
        progress.after_report(None, [{"step": step, "epoch": 0, "loss": 1.0, "lr": 1e-3,
                                      "images_per_s": 1.0, "bad_files": 0}], None)
        time.sleep(0.1)
    assert relay.lines[0].endswith("ETA ?")
    m = re.search(r"ETA (\d+)m(\d+)s$", relay.lines[-1])
    eta = int(m.group(1)) * 60 + int(m.group(2))
    assert 7 <= eta <= 11, relay.lines[-1]  # 100 steps at ~10/s; counting the start-up gave ~60 s
