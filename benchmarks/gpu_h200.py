"""`vit_b16` training step on one GPU (H200): images/s and MFU, activation checkpointing off/on x
torch.compile off/on, bf16 autocast, the faster attention path. One short call, for a lent GPU.

Measured in the same call:
- the bf16 matmul rate: the best of several large square bf16 matmuls (8192^3 on GPU), FLOP/s;
- the attention path: SDPA with the dense mask vs FlexAttention with the BlockMask, forward +
  backward at the model's shape; the faster one is used for the runs (on CPU only SDPA trains);
- per variant: warm-up steps (compilation happens there), then timed steps of fused AdamW on
  random 256 px images already on the device (the data pipeline is not part of this number).

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
MFU = train FLOPs per image x images/s / measured bf16 matmul FLOP/s. Goal: >= 50% MFU.

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
from xtra_core.accel import autocast, maybe_compile
from xtra_core.config import ModelConfig, preset
from xtra_core.model import XTRA, block_causal_block_mask, compiled_flex_attention, flex_trains_on
from xtra_core.optim import adamw


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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def matmul_rate(device: torch.device, size: int, repeats: int = 10) -> dict[str, float]:
    """Best bf16 FLOP/s of a [size, size] @ [size, size] matmul on `device`."""
    a = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    b = torch.randn(size, size, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"size": size, "best_s": best, "flops_per_s": 2 * size**3 / best}


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
        _sync(device)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn(*qkv).sum().backward()
            _sync(device)
            times.append(time.perf_counter() - t0)
        ms[name] = 1e3 * statistics.median(times)
    if "flex" in outs:
        diff = (outs["flex"].float() - outs["sdpa"].float()).abs().max().item()
    return {"fwd_bwd_ms": ms, "chosen": min(ms, key=ms.get), "max_abs_diff_bf16": diff,
            "shape": [batch, heads, n, hd]}


def run_variant(cfg: ModelConfig, batch: int, device: torch.device, warmup: int, steps: int
                ) -> dict[str, Any]:
    torch.manual_seed(0)
    model = XTRA(cfg).to(device).train()
    for n in (cfg.num_patches - cfg.block_size**2, cfg.num_patches):
        model.layout.mask(n, device)  # build (and cache) the BlockMasks outside the compiled graph
    step_model = maybe_compile(model, cfg)
    opt = adamw(model, lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size, device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        with autocast(device, bf16=True):
            loss = step_model(x)
        loss.backward()
        opt.step()
        return loss.item()  # a host sync: the step is finished

    t0 = time.perf_counter()
    for _ in range(warmup):
        step()
    warmup_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    out = {"step_s_median": med, "step_s_all": times, "images_per_s": batch / med,
           "warmup_s_incl_compile": warmup_s, "last_loss": loss}
    if device.type == "cuda":
        out["peak_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    torch._dynamo.reset()
    return out


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
    attn = attention_choice(cfg, batch, device)
    cfg.attention = attn["chosen"]
    flops = train_flops_per_image(cfg)

    variants = {}
    for compile_ in (False, True):
        if compile_ and args.no_compile:
            continue
        for ckpt in (False, True):
            name = f"checkpointing {'on' if ckpt else 'off'}, compile {'on' if compile_ else 'off'}"
            vcfg = dataclasses.replace(cfg, activation_checkpointing=ckpt, compile=compile_)
            v = run_variant(vcfg, batch, device, warmup, steps)
            v["achieved_flops_per_s"] = flops["total"] * v["images_per_s"]
            v["mfu"] = v["achieved_flops_per_s"] / peak["flops_per_s"]
            variants[name] = v
    rows = [[name, v["images_per_s"], v["achieved_flops_per_s"] / 1e12, 100 * v["mfu"],
             v.get("peak_allocated_gib", "")] for name, v in variants.items()]
    table = markdown_table(["variant", "images/s", "TFLOP/s", "MFU %", "peak GiB"], rows)
    best = max(variants.values(), key=lambda v: v["mfu"])
    title = (f"{info['gpu']}: vit_b16, 256 px, batch {batch}, bf16 autocast" if on_gpu
             else f"CPU smoke run (tiny preset, batch {batch}): not a GPU measurement")
    print(f"\n### {title}, attention={cfg.attention}\n")
    print(f"bf16 matmul {peak['size']}^3: {peak['flops_per_s'] / 1e12:.2f} TFLOP/s measured; "
          f"{flops['total'] / 1e9:.2f} GFLOP per image (train)\n")
    print(table)
    print(f"\nbest MFU {100 * best['mfu']:.1f}% (goal >= 50%: {'met' if best['mfu'] >= 0.5 else 'NOT met'})")
    payload = {
        "name": "gpu_h200" if on_gpu else "gpu_h200_cpu_tiny",
        "machine": info,
        "load_avg_at_end": load_avg(),
        "config": {"model": dataclasses.asdict(cfg), "batch": batch, "steps": steps,
                   "warmup": warmup, "device": str(device), "precision": "bf16 autocast, fp32 master",
                   "optimizer": "xtra_core.optim.adamw (fused)"},
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
