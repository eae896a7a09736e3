"""MFU of the product's training step: the FLOP count of a step, the matmul rate of the device
measured in the same run, and the product's own step timed on it.

The step timed is the trainer's (`pipelines.pretrain.trainer`): `build_engine` (XTRA under the
DeepSpeed engine the product runs, with its ZeRO stage, bf16 and `torch.compile` settings, fused
AdamW, warmup + cosine) and `train_step` (forward, backward, engine step), one process (a
torch.distributed group of one: gloo on CPU, NCCL on GPU), random images already on the device
(the data pipeline is not part of this number).

FLOPs per image, counted from the config (a training step = forward + backward = 3 x forward).
With N = (image/patch)^2 tokens, blocks of k x k patches, K = N / k^2 blocks, and the last block
dropped (it is seen by no token and predicts nothing, so the step never computes it):
n = N - k^2 tokens and K' = K - 1 block rows.

    forward = 2 * [ n * (C*p^2*D)                                   patch embedding
                  + L_enc * n * (4 + 2r) * D^2                       qkv, proj, mlp (ratio r)
                  + n * (D*H_p + H_p*D_dec)                          projection
                  + L_dec * n * (4 + 2r) * D_dec^2                   decoder
                  + n_ahead * K' * (k^2*D_dec*H_h + H_h*P) ]         heads (P = 3*(k*p)^2)
            + (L_enc * D + L_dec * D_dec) * 2 * n * k^2 * (K' + 1)   attention: QK^T and AV
                                                                     over the block-causal keys
    train  = 3 * forward  (= 6 x params-in-matmuls x rows + 3 x attention)

Only matmul FLOPs are counted (norms, GELU, softmax, bias adds and the loss are left out), and
the recomputation of activation checkpointing is not counted (model FLOPs, not hardware FLOPs).
MFU = train FLOPs per image x images/s / the bf16 matmul FLOP/s measured in the same run on the same
device. On a shared CPU both are also taken per process-CPU-second (user + system, all threads),
which load from other processes barely changes; wall-clock figures sit next to them.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import statistics
import time
from typing import Any

import torch
import torch.distributed as dist

from pipelines.pretrain.plan import RunPlan
from pipelines.pretrain.trainer import IntervalStats, build_engine, train_step
from xtra_core.config import ModelConfig, XTRAConfig, build_config


def train_flops_per_image(cfg: ModelConfig) -> dict[str, float]:
    """Training FLOPs per image by part (the docstring's formula); `total` = 3 x forward."""
    k2 = cfg.block_size**2
    n = cfg.num_patches - k2
    blocks = n // k2  # K' = K - 1
    r = cfg.mlp_ratio
    d, dd = cfg.encoder_width, cfg.decoder_width
    keys_sum = n * k2 * (blocks + 1) / 2  # sum over queries of visible keys
    fwd = {
        "patch_embed": 2 * n * cfg.in_chans * cfg.patch_size**2 * d,
        "encoder_matmuls": 2 * cfg.encoder_depth * n * (4 + 2 * r) * d * d,
        "encoder_attention": cfg.encoder_depth * 4 * keys_sum * d,
        "projection": 2 * n * (d * cfg.projection_hidden + cfg.projection_hidden * dd),
        "decoder_matmuls": 2 * cfg.decoder_depth * n * (4 + 2 * r) * dd * dd,
        "decoder_attention": cfg.decoder_depth * 4 * keys_sum * dd,
        "heads": 2 * cfg.blocks_ahead * blocks
        * (k2 * dd * cfg.head_hidden + cfg.head_hidden * cfg.block_pixels),
    }
    out = {k: 3.0 * v for k, v in fwd.items()}
    out["total"] = sum(out.values())
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, m: int, k: int | None = None, n: int | None = None,
                repeats: int = 10) -> dict[str, float]:
    """bf16 FLOP/s of [m, k] @ [k, n] (square by default) on `device`: the best wall time, and on
    CPU the median per process-CPU-second."""
    k, n = k or m, n or m
    a = torch.randn(m, k, device=device, dtype=torch.bfloat16)
    b = torch.randn(k, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    sync(device)
    wall, cpu = [], []
    for _ in range(repeats):
        w0, c0 = time.perf_counter(), time.process_time()
        a @ b
        sync(device)
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    flops = 2 * m * k * n
    return {"shape": [m, k, n], "best_s": min(wall), "flops_per_s": flops / min(wall),
            "flops_per_cpu_s": flops / max(statistics.median(cpu), 1e-9)}


def single_process_group(device: torch.device) -> None:
    """A torch.distributed group of one process (what DeepSpeed needs outside Ray Train)."""
    if dist.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.setdefault("DS_ACCELERATOR", device.type)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts it is set
    # the address in init_method, not in RANK/MASTER_* variables that later processes would inherit
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


def end_process_group() -> None:
    """Destroy the group through DeepSpeed's comm when DeepSpeed used it: `torch.distributed`'s own
    destroy leaves DeepSpeed's cached groups pointing at the dead group, and the next engine built in
    this process fails with "Group ... is not registered"."""
    if not dist.is_initialized():
        return
    import deepspeed.comm.comm

    if deepspeed.comm.comm.cdb is not None and deepspeed.comm.comm.cdb.is_initialized():
        deepspeed.comm.comm.destroy_process_group()
    else:
        dist.destroy_process_group()


def step_config(model: ModelConfig, batch: int, bf16: bool, compile_: bool, zero_stage: int = 0
                ) -> XTRAConfig:
    """The product's config for one rank taking `batch` images per optimiser step."""
    cfg = build_config("tiny", None, {"train.num_workers": 1, "train.global_batch_size": batch,
                                      "train.bf16": bf16, "train.zero_stage": zero_stage,
                                      "train.warmup_steps": 1})
    cfg.model = dataclasses.replace(model, compile=compile_)
    return cfg


def time_product_step(cfg: XTRAConfig, device: torch.device, warmup: int, steps: int
                      ) -> dict[str, Any]:
    """`build_engine` + `train_step` on random images [B, 3, H, W] in the engine's dtype: seconds
    per step (wall and process CPU), with the one loss read-back the trainer does per report."""
    single_process_group(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.cuda.reset_peak_memory_stats(device)
    plan = RunPlan(total_steps=warmup + steps + 1, steps_per_epoch=warmup + steps + 1,
                   rows_per_epoch=10**9, start_step=0, stop_step=warmup + steps + 1)
    engine, _ = build_engine(cfg, plan)
    batch, size = cfg.train.global_batch_size, cfg.model.image_size
    images = torch.randn(batch, 3, size, size, device=engine.device)  # fp32, as the workers feed it
    stats = IntervalStats(engine.device)
    t0 = time.perf_counter()
    for _ in range(warmup):  # compiling happens here
        train_step(engine, images, stats)
    loss = stats.reduce()["loss"]
    warmup_s = time.perf_counter() - t0
    wall, cpu = [], []
    for _ in range(steps):
        w0, c0 = time.perf_counter(), time.process_time()
        train_step(engine, images, stats)
        loss = stats.reduce()["loss"]  # a host sync: the step is finished
        wall.append(time.perf_counter() - w0)
        cpu.append(time.process_time() - c0)
    out = {"step_s_median": statistics.median(wall), "step_s_best": min(wall),
           "cpu_s_per_step_median": statistics.median(cpu), "step_s_all": wall, "cpu_s_all": cpu,
           "images_per_s": batch / statistics.median(wall), "images_per_s_best": batch / min(wall),
           "images_per_cpu_s": batch / max(statistics.median(cpu), 1e-9),
           "warmup_s_incl_compile": warmup_s, "last_loss": loss,
           "engine": {"zero_stage": cfg.train.zero_stage, "bf16": cfg.train.bf16,
                      "compile": cfg.model.compile, "optimizer": type(engine.optimizer).__name__}}
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    del engine
    torch._dynamo.reset()
    return out


def mfu(flops_per_image: float, step: dict[str, Any], rate: dict[str, float]) -> dict[str, float]:
    """MFU by wall time (median step / best matmul) and by process CPU time (both medians)."""
    return {"mfu_wall": flops_per_image * step["images_per_s"] / rate["flops_per_s"],
            "mfu_cpu_time": flops_per_image * step["images_per_cpu_s"] / rate["flops_per_cpu_s"],
            "achieved_flops_per_s": flops_per_image * step["images_per_s"]}
