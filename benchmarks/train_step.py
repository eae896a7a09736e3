"""Training step (forward + backward + AdamW step) in images/s: the product against the reference.

Same config, same batch, one process, the variants alternated round by round (the machine is
shared: medians of interleaved runs, load average recorded). Variants, each a full step:

- `reference`: `xtra_core.reference.reference_loss` (raster token order, the dense block-causal
  mask built on every forward, the tokens of each block gathered by index, all K blocks) and
  torch's default AdamW (on CPU: the per-parameter for-loop; foreach kernels are GPU-only).
- `product`: `XTRA.loss` (block-major order, cached mask, the never-attended last block dropped)
  and `xtra_core.optim.adamw` (fused AdamW). This is the product's step.
- two attribution rungs between them: the product model with all K blocks and the for-loop AdamW
  (block-major order + cached mask alone), and with the last block dropped (+ for-loop AdamW).
- the same pair under bf16 autocast (`xtra_core.accel.autocast`), parameters and AdamW in fp32.

One AdamW serves all variants (its param groups are switched between the fused kernel and the
for-loop: the same state tensors, so the big B/16 objective fits in memory once). Ratio = product
images/s / reference images/s at the same precision. Goal: >= 1.3x.

    .venv/bin/python -m benchmarks.train_step [--configs tiny vit_b16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks.common import load_avg, machine, markdown_table, write_result
from xtra_core.accel import autocast
from xtra_core.config import ModelConfig, preset
from xtra_core.model import XTRA, count_parameters
from xtra_core.optim import adamw
from xtra_core.reference import reference_loss

DEFAULT_BATCH = {"tiny": 64, "vit_b16": 2}


def smoke_config() -> ModelConfig:
    """A ~0.1M-parameter model for the CI smoke test (16 px, 16 tokens)."""
    return ModelConfig(
        image_size=16, patch_size=4, block_size=2, encoder_width=32, encoder_depth=1,
        encoder_heads=2, projection_hidden=64, decoder_width=32, decoder_depth=1,
        decoder_heads=2, head_hidden=64,
    )


def full_blocks_loss(model: XTRA, x: torch.Tensor) -> torch.Tensor:
    """The product model on all K blocks (no last-block drop): an attribution rung."""
    z = model.forward_features(x)
    return model.forward_loss([h(z) for h in model.heads], model.targets(x))


def make_step(
    model: XTRA,
    opt: torch.optim.Optimizer,
    loss_fn: Callable[[XTRA, torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    fused: bool,
    bf16: bool,
    segments: list[tuple[float, float]],
) -> Callable[[], None]:
    """One training step; appends (forward+backward s, optimiser s) to `segments`."""

    def step() -> None:
        for g in opt.param_groups:
            g["fused"], g["foreach"] = fused, False
        opt.zero_grad(set_to_none=True)
        t0 = time.perf_counter()
        with autocast(x.device, bf16):
            loss = loss_fn(model, x)
        loss.backward()
        t1 = time.perf_counter()
        opt.step()
        segments.append((t1 - t0, time.perf_counter() - t1))

    return step


def bench_config(
    name: str, cfg: ModelConfig, batch: int, repeats: int, precisions: list[str]
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
            variants["product model, all blocks, for-loop AdamW fp32"] = (full_blocks_loss, False, bf16)
            variants["product model, for-loop AdamW fp32"] = (XTRA.loss, False, bf16)
        variants[f"product {precision}"] = (XTRA.loss, True, bf16)
    segments: dict[str, list[tuple[float, float]]] = {v: [] for v in variants}
    steps = {
        v: make_step(model, opt, fn, x, fused, bf16, segments[v])
        for v, (fn, fused, bf16) in variants.items()
    }
    for step in steps.values():  # warm-up round: optimiser state, allocator, oneDNN kernels
        step()
    for s in segments.values():
        s.clear()
    for _ in range(repeats):
        for step in steps.values():
            step()
    out: dict[str, Any] = {"config": name, "batch": batch, "parameters": count_parameters(model),
                           "model": dataclasses.asdict(cfg), "variants": {}}
    for v, segs in segments.items():
        total = [a + b for a, b in segs]
        med = statistics.median(total)
        out["variants"][v] = {
            "step_s_median": med,
            "step_s_all": total,
            "fwd_bwd_s_median": statistics.median(a for a, _ in segs),
            "optimizer_s_median": statistics.median(b for _, b in segs),
            "images_per_s": batch / med,
        }
    out["ratios"] = {
        p: out["variants"][f"product {p}"]["images_per_s"] / out["variants"][f"reference {p}"]["images_per_s"]
        for p in precisions
    }
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", nargs="+", default=["tiny", "vit_b16"])
    ap.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None, help="default: tiny 64, vit_b16 2")
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
        results.append(bench_config(name, cfg, batch, args.repeats, args.precision))

    rows = []
    for r in results:
        ref = {p: r["variants"][f"reference {p}"]["images_per_s"] for p in args.precision}
        for v, m in r["variants"].items():
            p = "bf16" if v.endswith("bf16") else "fp32"
            rows.append([r["config"], r["batch"], v, m["images_per_s"], m["fwd_bwd_s_median"],
                         m["optimizer_s_median"], m["images_per_s"] / ref[p]])
    table = markdown_table(
        ["config", "batch", "variant", "images/s", "fwd+bwd s", "AdamW s", "x reference"], rows
    )
    goals = {f"{r['config']} {p}": {"ratio": x, "met": x >= 1.3}
             for r in results for p, x in r["ratios"].items()}
    print("\n### Training step: product vs reference (median of interleaved runs)\n")
    print(table)
    print("\n" + "\n".join(f"{k}: {g['ratio']:.2f}x (goal >= 1.3x {'met' if g['met'] else 'NOT met'})"
                           for k, g in goals.items()))
    payload = {
        "name": "train_step",
        "machine": info,
        "load_avg_at_end": load_avg(),
        "config": {"repeats": args.repeats, "precisions": args.precision,
                   "device": "cpu", "threads": torch.get_num_threads()},
        "results": results,
        "goals": goals,
        "table_markdown": table,
    }
    write_result("train_step_smoke" if args.smoke else "train_step", payload, args.results_dir)
    return payload


if __name__ == "__main__":
    main()
