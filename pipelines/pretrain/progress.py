"""The run's progress on the driver's console and in MLflow: a Ray Train callback that runs on
the controller and sees every report (rank 0's metrics are already averaged over ranks).

The controller is an actor in another process, and Ray forwards actors' output to the driver only
with `xtra --verbose`, so the callback sends its status lines to the driver through a queue
(`StatusRelay`) and the driver prints them.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

from ray.train.v2.api.callback import UserCallback

from pipelines.console import format_seconds
from pipelines.pretrain.plan import RunPlan
from pipelines.tracking import runs as tracking


class ProgressAndTracking(UserCallback):
    """On the Ray Train controller: a status line per report, and the metrics into MLflow."""

    def __init__(self, run_id: str | None, uri: str, plan: RunPlan, relay: StatusRelay) -> None:
        self.run_id, self.uri, self.plan, self.relay = run_id, uri, plan, relay
        self.t0 = 0.0  # the first report's time: start-up (Ray, DeepSpeed) is not a step
        self.first_step: int | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]  # rank 0's (already averaged over ranks)
        step = int(m["step"])
        if self.first_step is None:
            self.first_step, self.t0 = step, time.time()
        done = step - self.first_step
        rate = done / max(1e-9, time.time() - self.t0)
        eta = (self.plan.stop_step - step) / rate if rate > 0 else float("nan")
        self.relay.put(
            f"[xtra] step {step}/{self.plan.total_steps} | epoch {int(m['epoch'])} | "
            f"loss {m['loss']:.4f} | lr {m['lr']:.3e} | {m['images_per_s']:.1f} img/s | "
            f"bad files {int(m['bad_files'])} | ETA {format_seconds(eta)}"
            + (" | checkpoint saved" if checkpoint is not None else "")
        )
        if self.run_id:
            per_rank = {f"optimizer_state_mb/rank{i}": r.get("optimizer_state_mb", 0.0) for i, r in enumerate(metrics)}
            tracking.log_step_metrics(self.uri, self.run_id, {**m, **per_rank}, step)


class StatusRelay:
    """Status lines from the Ray Train controller to the driver's stdout: a Ray queue (an actor
    that takes no CPU) written by the callback and drained by a thread on the driver."""

    def __init__(self) -> None:
        import ray
        from ray.util.queue import Queue
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        # on the driver's node: a worker node lost mid-run must not take the status queue with it
        here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
        self.queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})

    def put(self, line: str) -> None:
        self.queue.put(line)

    @contextlib.contextmanager
    def printing(self) -> Iterator[None]:
        """Print the lines as they come while the block runs, then the rest, then shut down."""
        stop = threading.Event()

        def drain() -> None:
            while True:
                try:
                    print(self.queue.get(timeout=0.2), flush=True)
                except (queue.Empty, Exception):  # ray.util.queue.Empty on a timeout
                    if stop.is_set() and self._empty():
                        return

        thread = threading.Thread(target=drain, name="xtra-status", daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            thread.join(timeout=10)
            self.queue.shutdown()

    def _empty(self) -> bool:
        try:
            return self.queue.empty()
        except Exception:  # the queue actor is gone
            return True
