"""Training step (forward + backward + AdamW step) in images/s: the product against the reference.

Same config, same batch, one process, the variants alternated round by round (the machine is
shared: see below; load average recorded). Variants, each a full step:

- `reference`: `xtra_core.reference.reference_loss` (raster token order, the dense block-causal
  mask built on every forward, the tokens of each block gathered by index, all K blocks) and
  torch's default AdamW (on CPU: the per-parameter for-loop; foreach kernels are GPU-only).
- `product {fp32,bf16}[ + compile]`: THE PRODUCT'S STEP: `pipelines.pretrain.trainer.build_engine`
  (XTRA under the DeepSpeed engine, ZeRO stage of the preset, `train.bf16`, `model.compile`,
  fused AdamW) and `trainer.train_step`, one rank (`benchmarks.mfu.time_product_step`), timed
  after the interleaved rounds, one engine at a time.
- model-level rungs in the same plain torch loop as the reference (attribution, not the product's
  step): `XTRA.loss` (block-major order, cached mask, the never-attended last block dropped) with
  `xtra_core.optim.adamw` (fused AdamW) = `model + fused AdamW`; the same with all K blocks and
  the for-loop AdamW (block-major order + cached mask alone), and with the last block dropped
  (+ for-loop AdamW); under bf16 autocast (`xtra_core.accel.autocast`) too.

MFU (`benchmarks.mfu`): train FLOPs per image x images per second of the product's step / the
bf16 matmul rate measured in the same run (a 1024^3 matmul; and, as what bounds the model on
this CPU, the rate at the shape of its own MLP matmul [batch x tokens, width] @ [width, 4 width]),
by process CPU time and by wall time.

One AdamW serves the plain-loop variants (its param groups are switched between the fused kernel
and the for-loop: the same state tensors, so the big B/16 objective fits in memory once). Ratio =
product images/s / reference images/s at the same precision. Goal: >= 1.3x.

The machine is shared (load average 5-13 on 2 cores while these ran), so wall time measures
mostly the other processes. The headline is the process CPU time per step (user + system, all
threads; OpenMP threads wait passively, see benchmarks/__init__.py): the work a variant does,
which sharing barely changes. images per CPU-second x cores is the wall rate on an idle machine
with perfect thread scaling. The best wall time of the interleaved rounds is reported next to it.

    .venv/bin/python -m benchmarks.train_step [--configs tiny vit_b16] [--repeats N]
        [--compile-configs tiny vit_b16]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import mfu
from benchmarks.common import load_avg, machine, markdown_table, write_result
from xtra_core.accel import autocast
from xtra_core.config import ModelConfig, preset
from xtra_core.model import XTRA, count_parameters
from xtra_core.optim import adamw
from xtra_core.reference import reference_loss

DEFAULT_BATCH = {"tiny": 64, "vit_b16": 2}
DEFAULT_REPEATS = {"tiny": 15, "vit_b16": 3}


def smoke_config() -> ModelConfig:
    """A ~0.1M-parameter model for the CI smoke test (16 px, 16 tokens)."""
    return ModelConfig(
        image_size=16, patch_size=4, block_size=2, encoder_width=32, encoder_depth=1,
        encoder_heads=2, projection_hidden=64, decoder_width=32, decoder_depth=1,
        decoder_heads=2, head_hidden=64,
    )


def full_blocks_loss(model: XTRA, x: torch.Tensor) -> torch.Tensor:
    """The product model on all K blocks (no last-block drop): an attribution rung."""
    z = model.decoder_output_by_block(x)
    return model.forward_loss([h(z) for h in model.heads], model.targets(x))


def make_step(
    model: XTRA,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[XTRA, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    fused: bool,
    bf16: bool,
    records: list[dict[str, float]],
) -> Callable[[], None]:
    """One training step; appends its wall and process-CPU seconds, forward+backward and
    optimiser apart, to `records`."""

    def step() -> None:
        for g in opt.param_groups:
            g["fused"], g["foreach"] = fused, False
        opt.zero_grad(set_to_none=True)
        w0, c0 = time.perf_counter(), time.process_time()
        with autocast(x.device, bf16):
            loss = loss_fn(model, x)
        loss.backward()
        w1, c1 = time.perf_counter(), time.process_time()
        opt.step()
        w2, c2 = time.perf_counter(), time.process_time()
        records.append({"wall": w2 - w0, "cpu": c2 - c0, "fwd_bwd_cpu": c1 - c0,
                        "optimizer_cpu": c2 - c1, "fwd_bwd_wall": w1 - w0, "optimizer_wall": w2 - w1})

    return step


def bench_config(
    name: str, cfg: ModelConfig, batch: int, repeats: int, precisions: list[str],
    with_compile: bool = False, zero_stage: int = 2,
) -> dict[str, Any]:
    torch.manual_seed(0)
    model = XTRA(cfg).train()
    opt = adamw(model, lr=1e-4, weight_decay=0.05)
    x = torch.randn(batch, 3, cfg.image_size, cfg.image_size)
    variants: dict[str, tuple[Callable, bool, bool]] = {}
    for precision in precisions:
        bf16 = precision == "bf16"
        variants[f"reference {precision}"] = (reference_loss, False, bf16)
        if not bf16:
            variants["rung: model, all blocks, for-loop AdamW fp32"] = (full_blocks_loss, False, bf16)
            variants["rung: model, for-loop AdamW fp32"] = (XTRA.loss, False, bf16)
        variants[f"rung: model + fused AdamW {precision}"] = (XTRA.loss, True, bf16)
    records: dict[str, list[dict[str, float]]] = {v: [] for v in variants}
    steps = {
        v: make_step(model, opt, fn, x, fused, bf16, records[v])
        for v, (fn, fused, bf16) in variants.items()
    }
    for step in steps.values():  # warm-up round: optimiser state, allocator, kernels, compiling
        step()
    for r in records.values():
        r.clear()
    for _ in range(repeats):
        for step in steps.values():
            step()
    out: dict[str, Any] = {"config": name, "batch": batch, "parameters": count_parameters(model),
                           "model": dataclasses.asdict(cfg), "variants": {}}
    for v, recs in records.items():
        col = {k: [r[k] for r in recs] for k in recs[0]}
        out["variants"][v] = {
            "cpu_s_per_step_median": statistics.median(col["cpu"]),
            "images_per_cpu_s": batch / statistics.median(col["cpu"]),
            "fwd_bwd_cpu_s_median": statistics.median(col["fwd_bwd_cpu"]),
            "optimizer_cpu_s_median": statistics.median(col["optimizer_cpu"]),
            "wall_s_best": min(col["wall"]),
            "wall_s_median": statistics.median(col["wall"]),
            "images_per_s_wall_best": batch / min(col["wall"]),
            "all_runs": col,
        }
    del model, opt, steps
    # the product's step: the DeepSpeed engine the trainer builds, one engine at a time
    device = torch.device("cpu")
    rate = mfu.matmul_rate(device, 1024)
    tokens = cfg.num_patches - cfg.block_size**2  # the last block is dropped in training
    model_gemm = mfu.matmul_rate(device, batch * tokens, cfg.encoder_width, 4 * cfg.encoder_width)
    flops = mfu.train_flops_per_image(cfg)["total"]
    out.update(matmul_1024=rate, matmul_model_mlp=model_gemm, train_flops_per_image=flops)
    for precision in precisions:
        for compile_ in (False, True) if with_compile else (False,):
            step_cfg = mfu.step_config(cfg, batch, precision == "bf16", compile_, zero_stage)
            r = mfu.time_product_step(step_cfg, device, warmup=1, steps=repeats)
            r.update(mfu.mfu(flops, r, rate))
            r["mfu_cpu_time_vs_model_gemm"] = flops * r["images_per_cpu_s"] / model_gemm["flops_per_cpu_s"]
            r["images_per_s_wall_best"] = r["images_per_s_best"]
            out["variants"][f"product {precision}" + (" + compile" if compile_ else "")] = r
    out["ratios_cpu_time"] = {}
    out["ratios_wall_best"] = {}
    for p in precisions:
        prod, ref = out["variants"][f"product {p}"], out["variants"][f"reference {p}"]
        out["ratios_cpu_time"][p] = prod["images_per_cpu_s"] / ref["images_per_cpu_s"]
        out["ratios_wall_best"][p] = prod["images_per_s_wall_best"] / ref["images_per_s_wall_best"]
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "vit_b16"])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=None, help="default: tiny 15, vit_b16 3")
    ap.add_argument("--batch", type=int, default=None, help="default: tiny 64, vit_b16 2")
    ap.add_argument("--compile-configs", nargs="*", default=["tiny"],
                    help="configs that also time the product under torch.compile (default tiny)")
    ap.add_argument("--smoke", action="store_true", help="a very small model, for CI")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)

    info = machine()
    configs = {"smoke": smoke_config()} if args.smoke else {
        c: preset(c).model for c in args.configs
    }
    results = []
    for name, cfg in configs.items():
        batch = args.batch or DEFAULT_BATCH.get(name, 4)
        repeats = args.repeats or DEFAULT_REPEATS.get(name, 3)
        stage = preset(name).train.zero_stage if name in ("tiny", "vit_b16", "vit_h14") else 2
        results.append(bench_config(name, cfg, batch, repeats, args.precision,
                                    with_compile=name in args.compile_configs, zero_stage=stage))

    rows = []
    for r in results:
        ref = {p: r["variants"][f"reference {p}"] for p in args.precision}
        for v, m in r["variants"].items():
            p = "bf16" if "bf16" in v else "fp32"
            rows.append([
                r["config"], r["batch"], v, m["images_per_cpu_s"],
                m.get("fwd_bwd_cpu_s_median", ""), m.get("optimizer_cpu_s_median", ""),
                m["images_per_cpu_s"] / ref[p]["images_per_cpu_s"],
                m["images_per_s_wall_best"],
                m["images_per_s_wall_best"] / ref[p]["images_per_s_wall_best"],
                f"{100 * m['mfu_cpu_time']:.1f}" if "mfu_cpu_time" in m else "",
                f"{100 * m['mfu_wall']:.1f}" if "mfu_wall" in m else "",
            ])
    table = markdown_table(
        ["config", "batch", "variant", "img per CPU-s", "fwd+bwd CPU-s", "AdamW CPU-s",
         "x ref (CPU time)", "img/s wall best", "x ref (wall best)", "MFU % (CPU time)",
         "MFU % (wall)"], rows
    )
    mfu_lines = [
        f"{r['config']}: bf16 matmul 1024^3 {r['matmul_1024']['flops_per_cpu_s'] / 1e9:.0f} GFLOP "
        f"per CPU-s ({r['matmul_1024']['flops_per_s'] / 1e9:.0f} GFLOP/s best wall); at the model's "
        f"MLP shape {r['matmul_model_mlp']['shape']}: "
        f"{r['matmul_model_mlp']['flops_per_cpu_s'] / 1e9:.0f} GFLOP per CPU-s; "
        f"{r['train_flops_per_image'] / 1e9:.3f} GFLOP per image (train)" for r in results]
    goals = {f"{r['config']} {p}": {"ratio_cpu_time": x, "ratio_wall_best": r["ratios_wall_best"][p],
                                    "met": x >= 1.3}
             for r in results for p, x in r["ratios_cpu_time"].items()}
    print("\n### Training step: product vs reference (medians of CPU time; best wall time)\n")
    print("\n".join(mfu_lines) + "\n")
    print(table)
    print("\n" + "\n".join(
        f"{k}: {g['ratio_cpu_time']:.2f}x by CPU time, {g['ratio_wall_best']:.2f}x by best wall "
        f"time (goal >= 1.3x {'met' if g['met'] else 'NOT met'})" for k, g in goals.items()))
    payload = {
        "name": "train_step",
        "machine": info,
        "load_avg_at_end": load_avg(),
        "config": {"repeats": {r["config"]: len(next(iter(r["variants"].values()))["all_runs"]["cpu"])
                               for r in results},
                   "precisions": args.precision,
                   "timing": "median process CPU seconds per step (all threads), and best wall",
                   "device": "cpu", "threads": torch.get_num_threads()},
        "results": results,
        "goals": goals,
        "mfu_notes": mfu_lines,
        "table_markdown": table,
    }
    write_result("train_step_smoke" if args.smoke else "train_step", payload, args.results_dir)
    return payload


if __name__ == "__main__":
    main()
