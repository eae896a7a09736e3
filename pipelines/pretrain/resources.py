"""CPUs and GPUs for the training workers, checked against the cluster before the fit.

Ray Data's decode tasks need CPUs of their own next to the workers: when the workers take every
CPU, the stream never starts and the fit waits forever. So before the fit, the request is sized
from the cluster when the user gave no `train.cpus_per_worker`, and a request that cannot be met
fails at once, naming the keys to change.
"""

from __future__ import annotations

import math

from pipelines.errors import UserError
from xtra_core.config import XTRAConfig

# the CPU share left to Ray Data's decode + augment tasks when sizing from the cluster
DECODE_SHARE = 0.25
MIN_DECODE_CPUS = 1.0


def worker_cpus(cfg: XTRAConfig, cluster: dict[str, float]) -> float:
    """CPUs per training worker: `train.cpus_per_worker` if given, else the cluster's CPUs minus
    a decoding share (a quarter, at least one CPU), split over `train.num_workers`, rounded down
    to a half CPU. Raises UserError naming the keys when the cluster cannot hold the request."""
    t = cfg.train
    cpus, gpus = float(cluster.get("CPU", 0.0)), float(cluster.get("GPU", 0.0))
    if t.use_gpu and gpus < t.num_workers:
        raise UserError(
            f"train.use_gpu=true with train.num_workers={t.num_workers} needs {t.num_workers} GPUs; "
            f"the Ray cluster has {gpus:g}: lower train.num_workers or add GPU nodes"
        )
    decode = max(MIN_DECODE_CPUS, DECODE_SHARE * cpus)
    if t.cpus_per_worker is None:
        per_worker = math.floor(2 * (cpus - decode) / t.num_workers) / 2
        if per_worker <= 0:
            per_worker = (cpus - decode) / t.num_workers
        if per_worker <= 0:
            raise UserError(
                f"the Ray cluster has {cpus:g} CPUs: not enough for train.num_workers={t.num_workers} "
                f"workers and {MIN_DECODE_CPUS:g} CPU of decoding; lower train.num_workers or add nodes"
            )
        return per_worker
    left = cpus - t.num_workers * t.cpus_per_worker
    if left < MIN_DECODE_CPUS:
        raise UserError(
            f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker:g} leaves "
            f"{max(left, 0):g} of the Ray cluster's {cpus:g} CPUs for decoding images (at least "
            f"{MIN_DECODE_CPUS:g} needed, else the run waits forever): lower train.cpus_per_worker "
            f"or train.num_workers, or leave train.cpus_per_worker unset to size it from the cluster"
        )
    return t.cpus_per_worker
