"""`train.bf16` resolved on the workers' hardware (`xtra_core.precision` holds the rule).

`auto` depends on the machine the model runs on: a GPU worker's GPU, not the driver's (a CPU-only
head node must not turn bf16 off for the GPU workers, nor a laptop's CPU on for a cluster). So the
driver asks one Ray task scheduled with a training worker's resources; on a one-node cluster
without GPUs the driver's own CPU is that worker's CPU, and no task is started."""

from __future__ import annotations

from typing import Any

from xtra_core.config import XTRAConfig
from xtra_core.precision import AUTO, Hardware, Precision, local_hardware, resolve_bf16


def resolve_on_workers(cfg: XTRAConfig, resources: dict[str, Any] | None = None) -> Precision:
    """The precision the training workers will compute in (`train.bf16` true/false/auto)."""
    t = cfg.train
    if t.bf16 != AUTO:
        return resolve_bf16(t.bf16, Hardware())
    import ray

    if not t.use_gpu and len([n for n in ray.nodes() if n.get("Alive")]) <= 1:
        return resolve_bf16(AUTO, local_hardware(False))
    task = ray.remote(_worker_hardware).options(
        num_cpus=(resources or {}).get("CPU", 1), num_gpus=1 if t.use_gpu else 0)
    return resolve_bf16(AUTO, ray.get(task.remote(t.use_gpu)))


def _worker_hardware(use_gpu: bool) -> Hardware:
    """What a worker's machine runs natively (a plain function: Ray cannot take the cached one)."""
    return local_hardware(use_gpu)
