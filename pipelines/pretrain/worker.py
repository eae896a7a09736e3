"""The function every Ray Train worker runs: the trainer (`pipelines.pretrain.trainer`) wired to
Ray: this worker's shard of the image stream, the checkpoint Ray hands back on a resume or an
automatic restart, and `ray.train.report` for metrics and checkpoints."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray
import ray.train
import torch
from ray.train import Checkpoint

from pipelines.data.images import normalize
from pipelines.errors import UserError
from pipelines.pretrain import digests
from pipelines.pretrain.checkpoints import schedule_keys, seal
from pipelines.pretrain.plan import RunPlan
from pipelines.pretrain.trainer import build_engine, fit, resume, skip
from xtra_core.config import XTRAConfig, config_from_dict


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (torch.distributed is already initialised by Ray)."""
    quiet_worker()
    cfg = config_from_dict(loop_config["config"])
    plan = RunPlan(**loop_config["plan"])
    if plan.bad_files_actor and data_stopped(plan.bad_files_actor):
        return  # an earlier attempt stopped on the data: a retry would stop again; the driver says why
    rank = ray.train.get_context().get_world_rank()
    engine, scheduler = build_engine(cfg, plan)
    checkpoint = ray.train.get_checkpoint()  # the newest: a resumed run or an automatic restart
    with checkpoint.as_directory() if checkpoint else contextlib.nullcontext() as d:
        if d is not None and (loop_config.get("trust") or {}).get("verify"):  # before DeepSpeed unpickles
            verify_restored(d, Path(checkpoint.path).name, loop_config["trust"])
        step = resume(engine, d, plan)
    # the stream starts at plan.start_step; after an automatic restart Ray hands back a later
    # checkpoint than the one the stream was built for, so this worker passes over the difference
    batches = skip(micro_batches(cfg, ray.train.torch.get_device()),
                   (step - plan.start_step) * cfg.train.grad_accum_steps)
    bad_files = BadFileDelta(plan.bad_files_actor if rank == 0 else None)

    def extra_metrics() -> dict[str, float]:
        return {"bad_files": bad_files.since_last(),
                "optimizer_state_mb": optimizer_state_bytes(engine) / 2**20}  # this rank

    schedule = schedule_keys(cfg, plan.total_steps, plan.steps_per_epoch)

    def report_checkpoint(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        if checkpoint_dir is not None:
            if rank == 0:
                seal(checkpoint_dir, schedule)  # the resolved schedule, that a resume compares
            if loop_config.get("trust"):  # recorded before Ray registers the checkpoint
                record_digests(checkpoint_dir, checkpoint_name(metrics["step"]), rank, loop_config["trust"])
        report(metrics, checkpoint_dir)

    step = fit(engine, scheduler, batches, cfg, plan, step, report_checkpoint, rank, extra_metrics)
    if step < plan.stop_step:
        raise RuntimeError(
            f"the data stream ended at step {step} before step {plan.stop_step}: "
            f"rank {rank} got fewer batches than planned"
        )


def data_stopped(actor_name: str) -> bool:
    """True when the data stream stopped this run for a reason that does not go away (too many bad
    files, an unreadable file): Ray Train's automatic restarts (`train.max_failures`) retry every
    worker failure, so a restarted worker ends at once instead of reading the same data again."""
    try:
        return bool(ray.get(ray.get_actor(actor_name).stop_reason.remote()))
    except (ValueError, ray.exceptions.RayActorError):  # no such actor, or it is gone: nothing to go by
        return False


def record_digests(checkpoint_dir: str, name: str, rank: int, trust: dict[str, Any]) -> None:
    """Every rank hashes the files it wrote; rank 0 gathers them and records the checkpoint's digest
    on the MLflow run (its tag; kept in the outage backlog if MLflow is down) and its manifest,
    before `ray.train.report` uploads and registers it: a registered checkpoint always has one."""
    import torch.distributed as dist

    from pipelines.tracking import runs as tracking

    mine = digests.local_digests(checkpoint_dir)
    gathered: list[Any] = [mine]
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
    if rank != 0:
        return
    try:
        files = digests.merge_rank_digests(gathered)
    except ValueError as e:
        logging.getLogger("xtra").warning("xtra: checkpoint %s cannot be verified later: %s", name, e)
        return
    tracking.record_tag(trust["uri"], trust["run_id"], digests.tag_key(name), digests.manifest_digest(files))
    tracking.log_text(trust["uri"], trust["run_id"], digests.manifest(files), digests.manifest_artifact(name))


def verify_restored(directory: str, name: str, trust: dict[str, Any]) -> None:
    """The checkpoint Ray handed this worker, as downloaded, against the digest recorded for it:
    the one the driver checked (passed in `trust`), or, after an automatic restart from a later
    checkpoint, the MLflow run's tag."""
    try:
        digests.check_against_run(pafs.LocalFileSystem(), directory, name, trust["uri"], trust["run_id"],
                                  trust.get("checked", {}).get(name))
    except UserError:
        raise
    except Exception as e:  # MLflow unreachable: nothing to check against, nothing is loaded
        raise UserError(f"checkpoint {name}: its SHA-256 cannot be read from MLflow run {trust['run_id']} "
                        f"({type(e).__name__}); it is not loaded (--set "
                        "train.verify_checkpoints=false skips the check)") from None


def quiet_worker() -> None:
    """The driver prints one status line per report; the workers' own loggers stay at warnings."""
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)


def micro_batches(cfg: XTRAConfig, device: torch.device) -> Iterator[torch.Tensor]:
    """This worker's micro batches, normalised on the device, fp32 [B, 3, H, W]: the model casts
    them to its weights' dtype itself, and computes the per-block targets from the fp32 pixels."""
    shard = ray.train.get_dataset_shard("train")
    for batch in shard.iter_torch_batches(
        batch_size=cfg.train.micro_batch, drop_last=True, prefetch_batches=2, device=device
    ):
        yield normalize(batch["image"], cfg.data.mean, cfg.data.std)


def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
    if checkpoint_dir is None:
        ray.train.report(metrics)
    else:
        ray.train.report(metrics, checkpoint=Checkpoint.from_directory(checkpoint_dir),
                         checkpoint_dir_name=checkpoint_name(metrics["step"]))


def checkpoint_name(step: int) -> str:
    return f"checkpoint_step{int(step):09d}"


def optimizer_state_bytes(engine: Any) -> int:
    """Bytes this rank holds for the optimiser: the (master) parameters it updates plus their
    AdamW moments. Stage 0 holds all of them; ZeRO 1-3 hold a 1/N partition."""
    opt = engine.optimizer
    while hasattr(opt, "optimizer"):  # unwrap ZeRO / bf16 wrappers down to torch's AdamW
        opt = opt.optimizer
    seen: set[int] = set()
    total = 0
    for group in opt.param_groups:
        for p in group["params"]:
            tensors = [p, *(v for v in opt.state.get(p, {}).values() if torch.is_tensor(v))]
            for t in tensors:
                if id(t) not in seen and t.numel() > 1:
                    seen.add(id(t))
                    total += t.numel() * t.element_size()
    return total


class BadFileDelta:
    """Rank 0 reads the data pipeline's bad-file counter actor: files skipped since last read."""

    def __init__(self, actor_name: str | None) -> None:
        self.actor = ray.get_actor(actor_name) if actor_name else None
        self.last = 0

    def since_last(self) -> float:
        if self.actor is None:
            return 0.0
        count = ray.get(self.actor.count.remote())
        delta, self.last = count - self.last, count
        return float(delta)
