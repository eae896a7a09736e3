"""Block-causal attention paths, checked equal and timed at 256 tokens (B/16, H/14) and 1024.

Paths (all compute the exact block-causal attention, blocks of k*k = 16 tokens):

- `sdpa raster, mask per call`: the reference's way: raster token order, the dense bool mask
  [N, N] built on every call (`block_causal_mask`), SDPA with it.
- `sdpa block-major, cached mask`: the product's "sdpa" path: block-major order, the mask built
  once (the model's `Layout.attn_mask`).
- `sdpa block-major, 2 query chunks`: block-sparse by hand: the first half of the queries attends
  to the first half of the keys only (the skipped quarter of the score matrix is all masked).
- `flex BlockMask`: the product's "flex" path: FlexAttention compiled, with the BlockMask of
  `xtra_core.model.block_causal_block_mask`; tiles above the block diagonal are never visited.
  torch 2.13 has no FlexAttention backward on CPU, so on CPU it is timed forward-only.

Timed per call: forward + backward (training) and forward only (inference), fp32, variants
alternated round by round, median of the process CPU time (all threads; the machine is shared,
so wall time mostly measures the other processes: it is in the JSON too). Equality: max |difference| of outputs (and input gradients)
against the block-major cached-mask SDPA, after mapping raster outputs to block-major order
(the mapping is outside the timed call).

    .venv/bin/python -m benchmarks.attention [--repeats 7] [--no-flex]
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import interleaved_times, load_avg, machine, markdown_table, write_result
from xtra_core.masks import block_causal_mask, block_major_permutation, block_order
from xtra_core.model import block_causal_block_mask, compiled_flex_attention, flex_trains_on

# name -> (tokens, heads, head_dim, block_size in patches); k = 4 -> 16 tokens per block
SHAPES: dict[str, tuple[int, int, int, int]] = {
    "vit_b16 encoder (256 tok)": (256, 12, 64, 4),
    "vit_h14 encoder (256 tok)": (256, 16, 80, 4),
    "1024 tok (B/16 width, 512 px)": (1024, 12, 64, 4),
}
SMOKE_SHAPES = {"smoke (64 tok)": (64, 2, 16, 2)}


def chunked_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
                 chunks: int, block_tokens: int) -> torch.Tensor:
    """Block-causal SDPA in block-major order with the queries cut into `chunks` groups of whole
    blocks; group g attends only to keys up to its own end. q, k, v: [B, H, N, d] -> [B, H, N, d]."""
    n = q.shape[2]
    blocks = n // block_tokens
    bounds = [round(blocks * i / chunks) * block_tokens for i in range(chunks + 1)]
    outs = [
        F.scaled_dot_product_attention(q[:, :, s:e], k[:, :, :e], v[:, :, :e], attn_mask=mask[s:e, :e])
        for s, e in zip(bounds[:-1], bounds[1:])
    ]
    return torch.cat(outs, dim=2)


def bench_shape(name: str, shape: tuple[int, int, int, int], batch: int, repeats: int,
                with_flex: bool) -> dict[str, Any]:
    n, heads, head_dim, block = shape
    grid = int(round(n**0.5))
    k2 = block * block
    device = torch.device("cpu")
    perm = block_major_permutation(grid, block, block_order((grid // block) ** 2))  # [N]
    slot = torch.arange(n) // k2
    cached = slot[None, :] <= slot[:, None]  # [N, N] block-major
    bm = block_causal_block_mask(n, k2, device) if with_flex else None

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(batch, heads, n, head_dim, generator=g) for _ in range(3))  # block-major
    inv = torch.argsort(perm)
    qr, kr, vr = (t[:, :, inv] for t in (q, k, v))  # the same tokens in raster order
    grad_out = torch.randn(batch, heads, n, head_dim, generator=g)  # block-major
    grad_out_raster = grad_out[:, :, inv]

    paths: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
        "sdpa raster, mask per call": lambda a, b, c: F.scaled_dot_product_attention(
            a, b, c, attn_mask=block_causal_mask(grid, block)),
        "sdpa block-major, cached mask": lambda a, b, c: F.scaled_dot_product_attention(
            a, b, c, attn_mask=cached),
        "sdpa block-major, 2 query chunks": lambda a, b, c: chunked_sdpa(a, b, c, cached, 2, k2),
    }
    if with_flex:
        paths["flex BlockMask"] = lambda a, b, c: compiled_flex_attention()(a, b, c, block_mask=bm)
    raster = {"sdpa raster, mask per call"}

    def inputs(path: str, grad: bool) -> tuple[torch.Tensor, ...]:
        src = (qr, kr, vr) if path in raster else (q, k, v)
        return tuple(t.detach().requires_grad_(grad) for t in src)

    def out_grad(path: str) -> torch.Tensor:
        return grad_out_raster if path in raster else grad_out

    # equality against the cached-mask SDPA (outputs in block-major order)
    ref_in = inputs("sdpa block-major, cached mask", True)
    ref_out = paths["sdpa block-major, cached mask"](*ref_in)
    ref_out.backward(grad_out)
    ref_grad = ref_in[0].grad
    max_diff: dict[str, dict[str, float]] = {}
    trainable = {p for p in paths if p != "flex BlockMask" or flex_trains_on(device)}
    for p, fn in paths.items():
        train = p in trainable
        a = inputs(p, train)
        out = fn(*a)
        d = {"output": ((out[:, :, perm] if p in raster else out) - ref_out).abs().max().item()}
        if train:
            out.backward(out_grad(p))
            gq = a[0].grad[:, :, perm] if p in raster else a[0].grad
            d["grad_q"] = (gq - ref_grad).abs().max().item()
        max_diff[p] = {k_: float(v_) for k_, v_ in d.items()}

    def fwd_bwd(p: str) -> Callable[[], None]:
        def run() -> None:
            paths[p](*inputs(p, True)).backward(out_grad(p))
        return run

    def fwd(p: str) -> Callable[[], None]:
        def run() -> None:
            with torch.no_grad():
                paths[p](*inputs(p, False))
        return run

    t_train = interleaved_times({p: fwd_bwd(p) for p in trainable}, repeats)
    t_infer = interleaved_times({p: fwd(p) for p in paths}, repeats)
    def ms(times: dict[str, list[float]]) -> dict[str, float]:
        return {p: 1e3 * statistics.median(t) for p, t in times.items()}

    return {
        "shape": name, "tokens": n, "heads": heads, "head_dim": head_dim, "batch": batch,
        "block_tokens": k2,
        "max_abs_diff_vs_cached_sdpa": max_diff,
        "fwd_bwd_ms_median": ms(t_train["cpu"]),  # process CPU ms (the headline)
        "fwd_ms_median": ms(t_infer["cpu"]),
        "fwd_bwd_wall_ms_median": ms(t_train["wall"]),
        "fwd_wall_ms_median": ms(t_infer["wall"]),
        "fwd_bwd_s_all": t_train, "fwd_s_all": t_infer,
        "flex_block_sparsity_pct": float(bm.sparsity()) if bm is not None else None,
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--no-flex", action="store_true", help="skip FlexAttention (compiles ~25 s/shape)")
    ap.add_argument("--smoke", action="store_true", help="one small shape, for CI")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)

    info = machine()
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    results = [bench_shape(n, s, args.batch, args.repeats, not args.no_flex) for n, s in shapes.items()]
    rows = []
    for r in results:
        base_t = r["fwd_bwd_ms_median"]["sdpa raster, mask per call"]
        base_f = r["fwd_ms_median"]["sdpa raster, mask per call"]
        for p, f_ms in r["fwd_ms_median"].items():
            t_ms = r["fwd_bwd_ms_median"].get(p)
            diff = r["max_abs_diff_vs_cached_sdpa"][p]
            rows.append([
                r["shape"], p,
                f"{t_ms:.2f}" if t_ms is not None else "n/a (no CPU backward)",
                f"{base_t / t_ms:.2f}" if t_ms is not None else "",
                f"{f_ms:.2f}", f"{base_f / f_ms:.2f}",
                f"{max(diff.values()):.1e}",
            ])
    table = markdown_table(
        ["shape", "path", "fwd+bwd CPU-ms", "x raster", "fwd CPU-ms", "x raster", "max |diff|"], rows
    )
    print(f"\n### Block-causal attention paths (batch {args.batch}, fp32, CPU, median CPU time)\n")
    print(table)
    payload = {
        "name": "attention",
        "machine": info,
        "load_avg_at_end": load_avg(),
        "config": {"batch": args.batch, "repeats": args.repeats, "dtype": "float32",
                   "device": "cpu", "shapes": shapes},
        "results": results,
        "table_markdown": table,
    }
    write_result("attention_smoke" if args.smoke else "attention", payload, args.results_dir)
    return payload


if __name__ == "__main__":
    main()
