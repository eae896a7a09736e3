"""`vit_b16` training step on one GPU (H200): images/s and MFU, activation checkpointing off/on x
torch.compile off/on, DeepSpeed bf16, the faster attention path. One short call, for a lent GPU.

Measured in the same call:
- the bf16 matmul rate: the best of several large square bf16 matmuls (8192^3 on GPU), FLOP/s;
- the attention path: SDPA with the dense mask vs FlexAttention with the BlockMask, forward +
  backward at the model's shape; the faster one is used for the runs (on CPU only SDPA trains);
- per variant: warm-up steps (compilation happens there), then timed steps of the product's
  DeepSpeed engine on random 256 px images already on the device (the data pipeline is not part
  of this number).

The step timed is the product's (`benchmarks.mfu.time_product_step`: the trainer's `build_engine`
+ `train_step`: XTRA under the DeepSpeed engine with the preset's ZeRO stage, DeepSpeed bf16 and
`engine.compile()`, fused AdamW), on random images already on the device. FLOPs per image and
MFU as in `benchmarks.mfu` (matmul FLOPs only, model FLOPs: the recomputation of activation
checkpointing is not counted). Goal: >= 50% MFU for B/16 at 256 px.

On a machine without CUDA (or with --tiny) it runs the `tiny` preset at a small batch on CPU so
CI keeps the script working; those numbers say nothing about a GPU.

    .venv/bin/python -m benchmarks.gpu_h200 [--batch 128] [--steps 10] [--tiny] [--no-compile]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import load_avg, machine, markdown_table, write_result
from benchmarks.mfu import (  # noqa: F401 - train_flops_per_image re-exported
    matmul_rate,
    mfu,
    step_config,
    sync,
    time_product_step,
    train_flops_per_image,
)
from xtra_core.config import ModelConfig, preset
from xtra_core.model import block_causal_block_mask, compiled_flex_attention, flex_trains_on


def attention_choice(cfg: ModelConfig, batch: int, device: torch.device, repeats: int = 5
                     ) -> dict[str, Any]:
    """Forward + backward ms of both attention paths at the encoder's shape; the faster trains."""
    k2 = cfg.block_size**2
    n = cfg.num_patches - k2
    heads, hd = cfg.encoder_heads, cfg.encoder_width // cfg.encoder_heads
    slot = torch.arange(n, device=device) // k2
    dense = slot[None, :] <= slot[:, None]
    paths: dict[str, Callable] = {
        "sdpa": lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=dense),
    }
    if flex_trains_on(device):
        bm = block_causal_block_mask(n, k2, device)
        paths["flex"] = lambda q, k, v: compiled_flex_attention()(q, k, v, block_mask=bm)
    qkv = [torch.randn(batch, heads, n, hd, device=device, dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3)]
    ms: dict[str, float] = {}
    diff = None
    outs = {}
    for name, fn in paths.items():
        for _ in range(2):
            outs[name] = fn(*qkv)
            outs[name].sum().backward()
        sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*qkv).sum().backward()
            sync(device)
            times.append(time.perf_counter() - t0)
        ms[name] = 1e3 * statistics.median(times)
    if "flex" in outs:
        diff = (outs["flex"].float() - outs["sdpa"].float()).abs().max().item()
    return {"fwd_bwd_ms": ms, "chosen": min(ms, key=ms.get), "max_abs_diff_bf16": diff,
            "shape": [batch, heads, n, hd]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batch", type=int, default=None, help="default 128 on GPU, 4 on CPU")
    ap.add_argument("--steps", type=int, default=None, help="timed steps (default 10 GPU, 2 CPU)")
    ap.add_argument("--warmup", type=int, default=None, help="default 3 GPU, 1 CPU")
    ap.add_argument("--tiny", action="store_true", help="tiny preset on CPU (automatic without CUDA)")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)

    on_gpu = torch.cuda.is_available() and not args.tiny
    device = torch.device("cuda" if on_gpu else "cpu")
    cfg = preset("vit_b16" if on_gpu else "tiny").model
    batch = args.batch or (128 if on_gpu else 4)
    steps = args.steps or (10 if on_gpu else 2)
    warmup = args.warmup or (3 if on_gpu else 1)
    info = machine()
    if on_gpu:
        torch.backends.cuda.matmul.allow_tf32 = True
        info["cuda"] = torch.version.cuda
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30

    peak = matmul_rate(device, 8192 if on_gpu else 1024)
    stage = preset("vit_b16" if on_gpu else "tiny").train.zero_stage
    attn = attention_choice(cfg, batch, device)
    cfg.attention = attn["chosen"]
    flops = train_flops_per_image(cfg)

    variants = {}
    for compile_ in (False, True):
        if compile_ and args.no_compile:
            continue
        for ckpt in (False, True):
            name = f"checkpointing {'on' if ckpt else 'off'}, compile {'on' if compile_ else 'off'}"
            vcfg = dataclasses.replace(cfg, activation_checkpointing=ckpt)
            v = time_product_step(step_config(vcfg, batch, True, compile_, stage), device, warmup, steps)
            v.update(mfu(flops["total"], v, peak))
            v["mfu"] = v["mfu_wall"]
            variants[name] = v
    rows = [[name, v["images_per_s"], v["achieved_flops_per_s"] / 1e12, 100 * v["mfu"],
             v.get("peak_allocated_gib", "")] for name, v in variants.items()]
    table = markdown_table(["variant", "images/s", "TFLOP/s", "MFU %", "peak GiB"], rows)
    best = max(variants.values(), key=lambda v: v["mfu"])
    title = (f"{info['gpu']}: vit_b16, 256 px, batch {batch}, the product's DeepSpeed bf16 step" if on_gpu
             else f"CPU smoke run (tiny preset, batch {batch}): not a GPU measurement")
    print(f"\n### {title}, attention={cfg.attention}\n")
    print(f"bf16 matmul {peak['shape'][0]}^3: {peak['flops_per_s'] / 1e12:.2f} TFLOP/s measured; "
          f"{flops['total'] / 1e9:.2f} GFLOP per image (train)\n")
    print(table)
    print(f"\nbest MFU {100 * best['mfu']:.1f}% (goal >= 50%: {'met' if best['mfu'] >= 0.5 else 'NOT met'})")
    payload = {
        "name": "gpu_h200" if on_gpu else "gpu_h200_cpu_tiny",
        "machine": info,
        "load_avg_at_end": load_avg(),
        "config": {"model": dataclasses.asdict(cfg), "batch": batch, "steps": steps,
                   "warmup": warmup, "device": str(device), "zero_stage": stage,
                   "precision": "DeepSpeed bf16 (bf16 weights, fp32 master in the optimiser)",
                   "step": "pipelines.pretrain.trainer.build_engine + train_step",
                   "optimizer": "xtra_core.optim.adamw (fused) under DeepSpeed"},
        "bf16_matmul": peak,
        "attention": attn,
        "train_flops_per_image": flops,
        "variants": variants,
        "goal": {"best_mfu": best["mfu"], "met": best["mfu"] >= 0.5},
        "table_markdown": table,
    }
    write_result(payload["name"], payload, args.results_dir)
    return payload


if __name__ == "__main__":
    main()
