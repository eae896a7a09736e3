"""The pretraining trainer: what one Ray Train worker runs, in small named steps.

    engine, scheduler = build_engine(cfg, plan, device)      # XTRA under a DeepSpeed ZeRO engine
    step = resume(engine, checkpoint_dir, plan)               # weights, AdamW moments, LR, step
    fit(engine, scheduler, micro_batches, cfg, plan, step, report)

`fit` is the paper's algorithm: for each micro batch of normalised images, the engine predicts
every next block from the blocks before it (`XTRA.loss`), backpropagates, and every
`train.grad_accum_steps` micro batches takes one AdamW step (clip 1.0, warmup + cosine); every
`train.log_every` steps it reports the rank-averaged loss, every `train.checkpoint_every` steps a
checkpoint. `benchmarks/train_step.py`, `zero_memory.py` and `gpu_h200.py` time `build_engine`
and `train_step` themselves, so each figure is the product's own step.

The loss stays on the device: `train_step` adds it to a device tensor and `IntervalStats.reduce`
reads it back once per report (`IntervalStats.readbacks` counts those host synchronisations).
"""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import torch

from pipelines.pretrain.checkpoints import DS_TAG, STATE_FILE, checkpoint_state
from pipelines.pretrain.plan import RunPlan
from xtra_core.config import XTRAConfig
from xtra_core.model import build_model, flex_trains_on
from xtra_core.optim import adamw, warmup_cosine_lr
from xtra_core.precision import local_precision

# report(metrics, checkpoint_dir or None): ray.train.report on a worker, anything in a test
Report = Callable[[dict[str, Any], str | None], None]


# --------------------------------------------------------------------------- the engine


def deepspeed_config(cfg: XTRAConfig) -> dict[str, Any]:
    """The DeepSpeed config for this run: batch sizes, ZeRO stage, clipping, precision."""
    t = cfg.train
    zero: dict[str, Any] = {"stage": t.zero_stage}
    if t.zero_stage > 0:
        # DeepSpeed's default buckets (5e8 elements) cost ~2 GB of fp32 buffer per rank
        zero.update({"reduce_bucket_size": t.zero_bucket_size, "allgather_bucket_size": t.zero_bucket_size})
    if t.zero_stage == 3:
        # gather whole parameters for small models too (the default thresholds are tuned for GPUs)
        zero.update({"stage3_param_persistence_threshold": 0,
                     "stage3_prefetch_bucket_size": t.zero_bucket_size,
                     "stage3_gather_16bit_weights_on_model_save": False})
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": local_precision(t.bf16, t.use_gpu).bf16},  # the driver resolved "auto"
        "steps_per_print": 10**12,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,
    }


def lr_lambda(cfg: XTRAConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier for torch's LambdaLR: warmup from `train.warmup_start_lr`, then cosine from
    `train.lr` to `train.min_lr`."""
    t = cfg.train
    warmup = t.warmup_steps if t.warmup_steps is not None else round(t.warmup_epochs * steps_per_epoch)
    warmup = min(warmup, max(0, total_steps - 1))

    def f(step: int) -> float:
        return warmup_cosine_lr(step, total_steps, warmup, t.lr, t.min_lr, t.warmup_start_lr) / t.lr

    return f


def skip_inference_comm_op() -> None:
    """DeepSpeed's communication backend compiles (~40 s with g++ and ninja, on the first run on
    a machine) or loads a shared-memory all-reduce op when it starts on a CPU; only its inference
    all-reduce (AutoTP) calls that op, and training's collectives go through torch.distributed.
    Marked incompatible, the op is neither built nor loaded."""
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def build_engine(cfg: XTRAConfig, plan: RunPlan) -> tuple[Any, Any]:
    """XTRA under DeepSpeed (ZeRO `train.zero_stage`, bf16 per `train.bf16`, `torch.compile` if
    `model.compile`) with fused AdamW and the warmup + cosine schedule: (engine, LR scheduler).

    torch.distributed must be initialised (Ray Train does it on a worker; a benchmark does it for
    one process). Every rank builds the same initial weights (seeded by `train.seed`)."""
    import deepspeed

    skip_inference_comm_op()
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model)
    optimizer = adamw(model, cfg.train.lr, cfg.train.weight_decay, cfg.train.betas)
    schedule = lr_lambda(cfg, plan.total_steps, plan.steps_per_epoch)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        optimizer=optimizer,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule),
        config=deepspeed_config(cfg),
        dist_init_required=False,
    )
    if cfg.model.attention == "flex" and flex_trains_on(engine.device):
        for n in (cfg.model.num_patches - cfg.model.block_size**2, cfg.model.num_patches):
            model.layout.mask(n, engine.device)  # build the BlockMasks outside a compiled graph
    if cfg.model.compile:
        engine.compile()
    engine.train()
    return engine, scheduler


def resume(engine: Any, checkpoint_dir: str | None, plan: RunPlan) -> int:
    """Load a checkpoint (weights, optimiser shards, LR schedule) into `engine`; its step (0 for
    a fresh run). The checkpoint comes from the run's own storage (Ray hands it to the worker)."""
    step = 0
    if checkpoint_dir is not None:
        _, client_state = engine.load_checkpoint(checkpoint_dir, tag=DS_TAG)
        step = int(client_state["step"])
    if step < plan.start_step:
        raise RuntimeError(f"checkpoint step {step} is older than the run's start step {plan.start_step}")
    return step


def train_step(engine: Any, images: torch.Tensor, stats: IntervalStats) -> None:
    """One micro step: forward (the block-causal next-block loss), backward, and DeepSpeed's
    step (an AdamW update on the last micro batch of an accumulation). No host sync."""
    loss = engine(images)  # fp32 images [B, 3, H, W] -> scalar loss (cast inside the model)
    engine.backward(loss)
    engine.step()
    stats.add(loss.detach(), images.shape[0])


def save_checkpoint(engine: Any, step: int, metrics: dict[str, Any], cfg: XTRAConfig,
                    report: Report, rank: int) -> None:
    """Every rank writes its DeepSpeed state into a fresh directory and reports it; rank 0 adds
    the run state (step, metrics, and the model and batch config that resuming checks)."""
    with tempfile.TemporaryDirectory() as d:
        engine.save_checkpoint(d, tag=DS_TAG, client_state={"step": step})
        if rank == 0:
            Path(d, STATE_FILE).write_text(json.dumps(checkpoint_state(cfg, step, metrics)))
        report(metrics, d)


# --------------------------------------------------------------------------- the loop


def fit(engine: Any, scheduler: Any, micro_batches: Iterable[torch.Tensor], cfg: XTRAConfig,
        plan: RunPlan, step: int, report: Report, rank: int = 0,
        extra_metrics: Callable[[], dict[str, float]] = dict) -> int:
    """Train steps `step` .. `plan.stop_step` on `micro_batches` (normalised images [B, 3, H, W]);
    returns the last step reached. `extra_metrics()` adds to each report (bad files, memory)."""
    t = cfg.train
    resumed_from, micro = step, 0
    stats = IntervalStats(engine.device)
    for images in micro_batches:
        if step >= plan.stop_step:
            break
        train_step(engine, images, stats)
        micro += 1
        if micro % t.grad_accum_steps:
            continue  # DeepSpeed accumulates: no optimiser step yet
        step += 1
        checkpoint_now = step % t.checkpoint_every == 0 or step == plan.stop_step
        if step % t.log_every and not checkpoint_now:
            continue
        metrics = {**stats.reduce(), **extra_metrics(), "step": step,
                   "epoch": step * t.global_batch_size // plan.rows_per_epoch,
                   "lr": scheduler.get_last_lr()[0], "total_steps": plan.total_steps,
                   "resumed_from_step": resumed_from}
        if checkpoint_now:
            save_checkpoint(engine, step, metrics, cfg, report, rank)
        else:
            report(metrics, None)
    return step


def skip(batches: Iterable[Any], n: int) -> Iterator[Any]:
    """`batches` without its first `n` items."""
    it = iter(batches)
    for _ in range(n):
        next(it, None)
    return it


class IntervalStats:
    """Loss and image sums since the last report; the loss is summed on the device and read back
    (all-reduced over ranks) only in `reduce`, once per report."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self.readbacks = 0  # host synchronisations on the loss, counted for tests/benchmarks
        self.reset()

    def reset(self) -> None:
        self.loss_sum = torch.zeros((), dtype=torch.float32, device=self.device)
        self.n, self.images, self.t0 = 0, 0, time.perf_counter()

    def add(self, loss: torch.Tensor, images: int) -> None:
        self.loss_sum += loss.float()  # on the device, no sync
        self.n += 1
        self.images += images

    def reduce(self) -> dict[str, float]:
        """Mean loss over every micro step of every rank since the last call, and images/s."""
        import torch.distributed as dist

        t = torch.stack([self.loss_sum.double(), torch.tensor(float(self.n), dtype=torch.float64,
                                                               device=self.device),
                         torch.tensor(float(self.images), dtype=torch.float64, device=self.device)])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(t)
        loss_sum, n, images = t.tolist()  # the one read-back of this interval
        self.readbacks += 1
        seconds = time.perf_counter() - self.t0
        self.reset()
        return {"loss": loss_sum / max(1.0, n), "images_per_s": images / max(seconds, 1e-9)}
