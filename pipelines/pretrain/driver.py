"""Pretraining: Ray Train workers run XTRA under DeepSpeed ZeRO, fed by Ray Data, tracked in MLflow.

    xtra pretrain --config tiny --data /path/or/s3://bucket/prefix --set train.max_steps=200
    ray job submit --working-dir . -- python -m pipelines.cli pretrain --config configs/vit_b16_in1k.yaml ...

One optimiser step consumes `train.global_batch_size` images: each of the N workers takes micro
batches of `train.micro_batch` and DeepSpeed accumulates `train.grad_accum_steps` of them.

Checkpoints: every `train.checkpoint_every` steps (and at the end) every rank writes its DeepSpeed
state (model, optimiser shards, LR schedule, step) and reports it with `ray.train.report`; Ray
merges the ranks' files into one checkpoint directory in `<storage_path>/<run_name>/`. Running again
with the same `train.run_name` and `train.storage_path` resumes from the newest one: the data
stream restarts at the checkpoint's image row, so the run continues as if never interrupted.
`train.max_failures` lets Ray restart a failed worker group automatically from the latest checkpoint.

At the end the driver consolidates the full-precision encoder from the final checkpoint (ZeRO
shards included), exports it (safetensors + config) and registers it in the MLflow Model Registry.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch
from ray.train import Checkpoint, CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.train.v2.api.config import LoggingConfig

from pipelines.config_validation import validate_values
from pipelines.data.images import normalize
from pipelines.data.stream import bad_file_counter
from pipelines.errors import UserError
from pipelines.pretrain.stream import TrainStream, build_train_stream
from pipelines.tracking import runs as tracking
from xtra_core.config import XTRAConfig, config_from_dict
from xtra_core.export import save_encoder
from xtra_core.model import build_model, count_parameters
from xtra_core.optim import adamw, warmup_cosine_lr

STATE_FILE = "xtra_state.json"  # written by rank 0 into every checkpoint
DS_TAG = "ds"  # DeepSpeed checkpoint tag (sub-directory) inside a Ray checkpoint


# --------------------------------------------------------------------------- DeepSpeed wiring


def deepspeed_config(cfg: XTRAConfig) -> dict[str, Any]:
    """The DeepSpeed config for this run: batch sizes, ZeRO stage, clipping, precision."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage > 0:
        # DeepSpeed's default buckets (5e8 elements) cost ~2 GB of fp32 buffer per rank
        zero.update({"reduce_bucket_size": t.zero_bucket_size, "allgather_bucket_size": t.zero_bucket_size})
    if t.zero_stage == 3:
        # gather whole parameters for small models too (the default thresholds are tuned for GPUs)
        zero.update({"stage3_param_persistence_threshold": 0, "stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": bool(t.bf16)},
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def lr_lambda(cfg: XTRAConfig, total_steps: int, steps_per_epoch: int):
    """Multiplier for torch's LambdaLR: warmup + cosine from `train.lr` to `train.min_lr`."""
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, max(0, total_steps - 1))

    def f(step: int) -> float:
        return warmup_cosine_lr(step, total_steps, warmup, t.lr, t.min_lr) / t.lr

    return f


# --------------------------------------------------------------------------- the worker loop


def train_loop_per_worker(loop_config: dict[str, Any]) -> None:
    """Runs on every Ray Train worker (torch.distributed is already initialised by Ray)."""
    import warnings

    import deepspeed

    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # one status line per report is ours
    cfg = config_from_dict(loop_config["config"])
    plan = RunPlan(**loop_config["plan"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank

    model = build_model(cfg.model)
    # fused AdamW over the no-decay/decay groups (torch's CPU default is a per-parameter loop)
    optimizer = adamw(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    schedule = lr_lambda(cfg, plan.total_steps, plan.steps_per_epoch)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=deepspeed_config(cfg),
        dist_init_required=False,
    )
    if cfg.model.compile:
        engine.compile()

    step = 0
    checkpoint = ray.train.get_checkpoint()  # the newest: a resumed run or an automatic restart
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            _, client_state = engine.load_checkpoint(d, tag=DS_TAG)
        step = int(client_state["step"])
    resumed_from = step
    if step < plan.start_step:
        raise RuntimeError(
            f"checkpoint step {step} is older than the run's start step {plan.start_step}"
        )
    # micro batches this worker must pass over: the stream starts at plan.start_step, and after an
    # automatic restart Ray hands back a later checkpoint than the one the stream was built for
    skip = (step - plan.start_step) * cfg.train.grad_accum_steps

    mean, std = cfg.data.mean, cfg.data.std
    dtype = torch.bfloat16 if cfg.train.bf16 else torch.float32
    shard = ray.train.get_dataset_shard("train")
    log = IntervalStats()
    bad_files = BadFileDelta(plan.bad_files_actor if rank == 0 else None)
    micro = 0
    engine.train()
    for batch in shard.iter_torch_batches(
        batch_size=cfg.train.micro_batch, drop_last=True, prefetch_batches=2, device=device
    ):
        if skip:
            skip -= 1
            continue
        if step >= plan.stop_step:
            break
        images = normalize(batch["image"], mean, std).to(dtype)  # [B, 3, H, W]
        loss = engine(images)
        engine.backward(loss)
        engine.step()
        micro += 1
        log.add(loss.detach().float().item(), images.shape[0])
        if micro % cfg.train.grad_accum_steps:
            continue
        step += 1
        do_ckpt = step % cfg.train.checkpoint_every == 0 or step == plan.stop_step
        if step % cfg.train.log_every == 0 or do_ckpt:
            metrics = log.reduce(world, device)
            metrics["bad_files"] = bad_files.since_last()
            metrics["optimizer_state_mb"] = optimizer_state_bytes(engine) / 2**20  # this rank
            metrics.update(
                step=step,
                epoch=step * cfg.train.global_batch_size // plan.rows_per_epoch,
                lr=scheduler.get_last_lr()[0],
                total_steps=plan.total_steps,
                resumed_from_step=resumed_from,
            )
            if do_ckpt:
                with tempfile.TemporaryDirectory() as d:
                    engine.save_checkpoint(d, tag=DS_TAG, client_state={"step": step})
                    if rank == 0:
                        Path(d, STATE_FILE).write_text(json.dumps({"step": step, **metrics}))
                    ray.train.report(
                        metrics,
                        checkpoint=Checkpoint.from_directory(d),
                        checkpoint_dir_name=f"checkpoint_step{step:09d}",
                    )
            else:
                ray.train.report(metrics)
    if step < plan.stop_step:
        raise RuntimeError(
            f"the data stream ended at step {step} before step {plan.stop_step}: "
            f"rank {rank} got fewer batches than planned"
        )


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


class IntervalStats:
    """Loss and image sums since the last report, averaged over all ranks on reduce."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.loss_sum, self.n, self.images, self.t0 = 0.0, 0, 0, time.perf_counter()

    def add(self, loss: float, images: int) -> None:
        self.loss_sum += loss
        self.n += 1
        self.images += images

    def reduce(self, world: int, device: torch.device) -> dict[str, float]:
        import torch.distributed as dist

        t = torch.tensor([self.loss_sum, self.n, self.images], dtype=torch.float64)
        if world > 1:
            t = t.to(device)
            dist.all_reduce(t)
            t = t.cpu()
        seconds = time.perf_counter() - self.t0
        out = {
            "loss": float(t[0] / max(1.0, float(t[1]))),
            "images_per_s": float(t[2]) / max(seconds, 1e-9),
        }
        self.reset()
        return out


# --------------------------------------------------------------------------- the driver


@dataclass
class RunPlan:
    """What this invocation trains: steps [start_step, stop_step) of a run of total_steps."""

    total_steps: int
    steps_per_epoch: int
    rows_per_epoch: int
    start_step: int
    stop_step: int
    bad_files_actor: str = ""


class ProgressAndTracking(UserCallback):
    """On the Ray Train controller: a status line per report, and the metrics into MLflow."""

    def __init__(self, run_id: str | None, uri: str, plan: RunPlan) -> None:
        self.run_id, self.uri, self.plan = run_id, uri, plan
        self.t0 = time.time()
        self.first_step: int | None = None

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        m = metrics[0]  # rank 0's (already averaged over ranks)
        step = int(m["step"])
        if self.first_step is None:
            self.first_step = step
        done = step - self.first_step
        rate = done / max(1e-9, time.time() - self.t0)
        eta = (self.plan.stop_step - step) / rate if rate > 0 else float("nan")
        print(
            f"[xtra] step {step}/{self.plan.total_steps} | epoch {int(m['epoch'])} | "
            f"loss {m['loss']:.4f} | lr {m['lr']:.3e} | {m['images_per_s']:.1f} img/s | "
            f"bad files {int(m['bad_files'])} | ETA {_fmt_s(eta)}"
            + (" | checkpoint saved" if checkpoint is not None else ""),
            flush=True,
        )
        if self.run_id:
            per_rank = {f"optimizer_state_mb/rank{i}": r.get("optimizer_state_mb", 0.0) for i, r in enumerate(metrics)}
            tracking.log_step_metrics(self.uri, self.run_id, {**m, **per_rank}, step)


def _fmt_s(s: float) -> str:
    if s != s:  # nan
        return "?"
    s = int(s)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def plan_run(cfg: XTRAConfig, num_images: int, start_step: int) -> RunPlan:
    t = cfg.train
    steps_per_epoch = t.steps_per_epoch or num_images // t.global_batch_size
    if steps_per_epoch < 1:
        raise UserError(
            f"{cfg.data.uri}: {num_images} images is less than one global batch "
            f"(train.global_batch_size={t.global_batch_size})"
        )
    total = t.max_steps or t.epochs * steps_per_epoch
    stop = min(total, t.stop_at_step) if t.stop_at_step else total
    if start_step >= stop:
        raise UserError(
            f"run {t.run_name!r} already reached step {start_step} of {stop}; nothing to train"
        )
    return RunPlan(total, steps_per_epoch, num_images, start_step, stop,
                   bad_files_actor=f"xtra-bad-files-{t.run_name}-{uuid.uuid4().hex[:8]}")


def run_pretraining(
    cfg: XTRAConfig,
    *,
    callbacks: Sequence[UserCallback] = (),
    parent_run_id: str | None = None,
    register: bool = True,
) -> dict[str, Any]:
    """Driver: plan, start MLflow, fit the TorchTrainer, export + register the encoder.

    `callbacks`: more Ray Train callbacks on the controller (a Tune trial reports through one);
    `parent_run_id`: the MLflow run is created nested under it (a sweep's parent run);
    `register=False`: the encoder is exported and logged to the run, not registered."""
    if not cfg.data.uri:
        raise UserError("no dataset: give --data <uri> (or data.uri in the config)")
    validate_values(cfg)  # types and ranges (pydantic), before any compute
    run_name = cfg.train.run_name or f"xtra-{cfg.preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    cfg.train.run_name = run_name
    storage = cfg.train.storage_path or str(Path("~/xtra_runs").expanduser())
    cfg.train.storage_path = storage

    uri = tracking.tracking_uri(cfg)
    tracking.check_tracking(uri)  # before any compute

    stream: TrainStream = build_train_stream(cfg)  # lists the files: a bad URI fails here, first
    if not ray.is_initialized():
        ray.init(logging_level="WARNING")
    # the driver prints one status line per report; Ray Data's per-operator bars would interleave
    ray.data.DataContext.get_current().enable_progress_bars = False
    start_step = latest_checkpoint_step(storage, run_name, cfg)
    plan = plan_run(cfg, stream.num_images, start_step)
    rows = (plan.stop_step - plan.start_step) * cfg.train.global_batch_size
    bad_files = bad_file_counter(plan.bad_files_actor)  # held by the driver for the whole fit
    dataset = stream.dataset(plan.start_step * cfg.train.global_batch_size, rows, bad_files)

    run_id = tracking.start_or_resume_run(uri, cfg, run_name, parent_run_id)
    model = build_model(cfg.model)
    print(
        f"[xtra] run {run_name}: {count_parameters(model) / 1e6:.2f}M parameters, "
        f"{stream.num_images} images, steps {plan.start_step}->{plan.stop_step} of {plan.total_steps} "
        f"({plan.steps_per_epoch}/epoch), {cfg.train.num_workers} workers x micro batch "
        f"{cfg.train.micro_batch} x accum {cfg.train.grad_accum_steps}, ZeRO-{cfg.train.zero_stage}",
        flush=True,
    )
    del model

    from pipelines.pretrain.stream import open_storage

    storage_fs, storage_root = open_storage(storage, cfg)  # s3:// -> (S3 filesystem, bucket/prefix)
    if storage_fs.type_name == "local":
        storage_fs = None
    resources = {"CPU": cfg.train.cpus_per_worker}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "plan": plan.__dict__},
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources
        ),
        torch_config=ray.train.torch.TorchConfig(backend="nccl" if cfg.train.use_gpu else "gloo"),
        run_config=RunConfig(
            name=run_name,
            storage_path=storage_root,
            storage_filesystem=storage_fs,
            checkpoint_config=CheckpointConfig(num_to_keep=cfg.train.num_to_keep),
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            callbacks=[ProgressAndTracking(run_id, uri, plan), *callbacks],
            logging_config=LoggingConfig(log_level="WARNING"),
        ),
        datasets={"train": dataset},
        dataset_config=stream.rank_split(plan.start_step, plan.stop_step - plan.start_step, bad_files),
    )
    try:
        result = trainer.fit()
        if result.error:
            raise result.error
    except BaseException:
        if run_id:
            tracking.finish_run(uri, run_id, "FAILED")
        raise
    out: dict[str, Any] = {"run_name": run_name, "run_id": run_id, "step": plan.stop_step,
                           "metrics": result.metrics, "checkpoint": result.checkpoint.path}
    if plan.stop_step == plan.total_steps:
        out.update(export_and_register(cfg, result.checkpoint, uri, run_id, register))
    elif run_id:
        tracking.finish_run(uri, run_id, "KILLED")  # stopped early on purpose; resumable
    return out


SNAPSHOT_FILE = "checkpoint_manager_snapshot.json"  # Ray Train's record of registered checkpoints


def latest_checkpoint_step(storage: str, run_name: str, cfg: XTRAConfig) -> int:
    """Step of the newest checkpoint Ray Train registered for this run (0 if none).

    Ray registers a checkpoint once every rank has uploaded its files, and hands exactly that one
    to the workers (`ray.train.get_checkpoint()`), so the stream is started at the same step."""
    import pyarrow.fs as pafs

    from pipelines.pretrain.stream import open_storage

    fs, root = open_storage(storage, cfg)
    path = f"{root}/{run_name}/{SNAPSHOT_FILE}"
    if fs.get_file_info(path).type != pafs.FileType.File:
        return 0
    with fs.open_input_stream(path) as f:
        snapshot = json.loads(f.read())
    latest = snapshot.get("latest_checkpoint_result") or {}
    return int((latest.get("metrics") or {}).get("step", 0))


def consolidate_encoder(checkpoint_dir: str) -> dict[str, torch.Tensor]:
    """Full-precision encoder weights from a DeepSpeed checkpoint of any ZeRO stage."""
    ds_dir = Path(checkpoint_dir) / DS_TAG
    if any(ds_dir.glob("*zero_pp_rank_*optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        full = get_fp32_state_dict_from_zero_checkpoint(checkpoint_dir, tag=DS_TAG)
    else:
        full = torch.load(ds_dir / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]
    return {k[len("encoder.") :]: v.float() for k, v in full.items() if k.startswith("encoder.")}


def export_and_register(
    cfg: XTRAConfig, checkpoint: Checkpoint, uri: str, run_id: str | None, register: bool = True
) -> dict[str, Any]:
    with checkpoint.as_directory() as d:
        state = consolidate_encoder(d)
    storage = cfg.train.storage_path or ""
    if "://" in storage:  # remote run storage: export locally; MLflow keeps the durable copy
        export_dir = Path(tempfile.mkdtemp(prefix="xtra-export-"))
    else:
        export_dir = Path(storage, str(cfg.train.run_name), "encoder_export")
    save_encoder(state, cfg.model, export_dir, extra={"run_name": cfg.train.run_name})
    if not register:
        tracking.log_encoder_files(uri, run_id, export_dir)
        return {"export_dir": str(export_dir)}
    info = tracking.register_encoder(uri, run_id, export_dir, cfg.mlflow.registered_model)
    print(f"[xtra] encoder registered as {info['model_uri']}", flush=True)
    return {"export_dir": str(export_dir), **info}
