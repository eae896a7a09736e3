"""Memory per rank under DeepSpeed ZeRO stages 0/1/2/3 with 2 workers, against the ZeRO model.

Each (precision, stage) case spawns 2 fresh processes (gloo on 127.0.0.1, one thread each) that
build the product's engine (`pipelines.pretrain.trainer.build_engine`: XTRA under DeepSpeed with
the product's DeepSpeed config, `trainer.deepspeed_config`, and optimiser, fused AdamW) for the
same model and take two training steps on a fixed batch.
After the second backward (gradients, moments and parameters all alive) each rank counts the bytes
of every live tensor storage (`gc`, deduplicated by storage, so views are not counted twice) and
sorts them by what holds them:

- parameters: the model's parameters as this rank holds them (ZeRO-3: its `ds_tensor` partition);
- optimizer: the inner torch AdamW's parameters when they are not the model's (DeepSpeed's fp32
  master partitions) and its state (`exp_avg`, `exp_avg_sq`);
- gradients: `.grad` of both, and the gradient partitions DeepSpeed keeps in its optimiser
  (attributes whose name contains "grad");
- other: everything else alive (reduce/gather buckets, the batch, ...).

"state" = parameters + gradients + optimizer. Peak RSS is `ru_maxrss` of the rank's process
(includes ~0.5 GB of libraries; `rss_delta` subtracts the RSS after import + process-group init).

The ZeRO memory model (Rajbhandari et al. 2020), Psi parameters, N ranks, bytes:
- bf16 mixed precision (K = 12: fp32 master + two fp32 moments): stage 0: (2 + 2 + 12) Psi;
  stage 1: (2 + 2 + 12/N) Psi; stage 2: (2 + (2 + 12)/N) Psi; stage 3: 16 Psi / N.
- fp32 (no separate master in the model): 16 Psi at stage 0 (4 + 4 + 8), and DeepSpeed's ZeRO
  optimisers still clone an fp32 master partition, so stage 3 holds (4 + 4 + 4 + 8) Psi / N.

Goal: stage-3 state per rank <= 1.1 x (stage-0 state / N).

    .venv/bin/python -m benchmarks.zero_memory [--precision bf16 fp32] [--stages 0 1 2 3]
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.multiprocessing as mp

from benchmarks.common import load_avg, machine, markdown_table, write_result
from pipelines.pretrain.plan import RunPlan
from pipelines.pretrain.trainer import build_engine, deepspeed_config
from xtra_core.config import ModelConfig, XTRAConfig, build_config
from xtra_core.model import XTRA, count_parameters

WORLD = 2
BUCKET = 2**22  # elements: reduce / all-gather / prefetch buckets (DeepSpeed default 5e8 = 2 GB fp32)


def bench_model_config() -> ModelConfig:
    """~21M parameters: large enough that the model's state dwarfs DeepSpeed's bookkeeping,
    small enough for two CPU processes (32 px, 64 tokens)."""
    return ModelConfig(
        encoder_width=384, encoder_depth=6, encoder_heads=6, projection_hidden=1536,
        decoder_width=384, decoder_depth=4, decoder_heads=6, head_hidden=1536,
    )


def smoke_model_config() -> ModelConfig:
    """A ~0.3M-parameter model for the CI smoke test."""
    return ModelConfig(
        image_size=16, patch_size=4, block_size=2, encoder_width=64, encoder_depth=2,
        encoder_heads=2, projection_hidden=128, decoder_width=64, decoder_depth=1,
        decoder_heads=2, head_hidden=128,
    )


def run_config(stage: int, bf16: bool, micro_batch: int, model: ModelConfig) -> XTRAConfig:
    """The product's config for one case: WORLD workers, `micro_batch` each, ZeRO `stage`."""
    cfg = build_config("tiny", None, {
        "train.num_workers": WORLD, "train.global_batch_size": micro_batch * WORLD,
        "train.zero_stage": stage, "train.bf16": bf16, "train.zero_bucket_size": BUCKET,
        "train.lr": 1e-4, "train.warmup_steps": 0, "train.max_steps": 2})
    cfg.model = model
    return cfg


# --------------------------------------------------------------------------- counting bytes

# where DeepSpeed's optimiser wrappers keep the fp32 master copies their torch optimiser updates
MASTER_ATTRS = (
    "single_partition_of_fp32_groups",  # ZeRO 1/2
    "fp32_partitioned_groups_flat",  # ZeRO 3
    "fp32_groups_flat_partition",  # BF16_Optimizer
    "fp32_groups_flat",  # FP16_Optimizer (bf16 at stage 0)
)


def _storage(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        s = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    if s.nbytes() == 0 or t.device.type == "meta":
        return None
    return s.data_ptr(), s.nbytes()


def _grad_tensors(obj: Any, depth: int = 0, under_grad: bool = False) -> list[torch.Tensor]:
    """Tensors reachable from a DeepSpeed optimiser through attributes named *grad*."""
    out: list[torch.Tensor] = []
    if depth > 4:
        return out
    if isinstance(obj, torch.Tensor):
        return [obj] if under_grad else []
    if isinstance(obj, dict):
        for v in obj.values():
            out += _grad_tensors(v, depth + 1, under_grad)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            out += _grad_tensors(v, depth + 1, under_grad)
    elif depth == 0 or under_grad:
        for name, v in getattr(obj, "__dict__", {}).items():
            if isinstance(v, (torch.Tensor, dict, list, tuple)):
                out += _grad_tensors(v, depth + 1, under_grad or "grad" in name.lower())
    return out


def tensor_bytes(engine: Any, model: torch.nn.Module) -> dict[str, int]:
    """Bytes of live tensor storages on this rank, by category (see the module docstring)."""
    gc.collect()
    live = {}
    for o in gc.get_objects():
        try:
            is_tensor = isinstance(o, torch.Tensor)
        except Exception:  # noqa: BLE001 - lazy proxies may raise on __class__
            continue
        if is_tensor and (key := _storage(o)) is not None:
            live[key[0]] = key[1]
    inner = engine.optimizer
    wrapper = inner
    while hasattr(inner, "optimizer"):
        inner = inner.optimizer
    params = list(model.parameters())
    params += [p.ds_tensor for p in model.parameters() if hasattr(p, "ds_tensor")]
    master = [p for g in inner.param_groups for p in g["params"]]
    for attr in MASTER_ATTRS:  # ZeRO-3 puts its partitions into the param groups only per step
        master += [t for t in getattr(wrapper, attr, None) or [] if isinstance(t, torch.Tensor)]
    states = [v for s in inner.state.values() for v in s.values() if isinstance(v, torch.Tensor)]
    grads = [t.grad for t in params + master if t.grad is not None]
    grads += _grad_tensors(wrapper) if wrapper is not inner else []
    out: dict[str, int] = {}
    seen: set[int] = set()
    for name, tensors in (("parameters", params), ("optimizer", master + states), ("gradients", grads)):
        total = 0
        for t in tensors:
            key = _storage(t)
            if key is not None and key[0] not in seen and key[0] in live:
                seen.add(key[0])
                total += key[1]
        out[name] = total
    out["state"] = out["parameters"] + out["optimizer"] + out["gradients"]
    out["all_live_tensors"] = sum(live.values())
    out["other"] = out["all_live_tensors"] - sum(live[k] for k in seen)
    return out


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


# --------------------------------------------------------------------------- one case (2 ranks)


def _worker(rank: int, port: int, spec: dict[str, Any], out_dir: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD), DS_ACCELERATOR="cpu",
    )
    torch.set_num_threads(1)
    import warnings

    warnings.filterwarnings("ignore")
    import deepspeed
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel("ERROR")
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)
    rss_before = rss_bytes()
    run = run_config(spec["stage"], spec["bf16"], spec["micro_batch"], ModelConfig(**spec["model"]))
    cfg = run.model
    plan = RunPlan(total_steps=2, steps_per_epoch=2, rows_per_epoch=10**6, start_step=0, stop_step=2)
    engine, _ = build_engine(run, plan)
    model = engine.module
    dtype = torch.bfloat16 if spec["bf16"] else torch.float32
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(spec["micro_batch"], 3, cfg.image_size, cfg.image_size, generator=g).to(dtype)
    losses = []
    after_backward: dict[str, int] = {}
    t0 = time.perf_counter()
    for step in range(2):
        loss = engine(x)
        engine.backward(loss)
        if step == 1:
            after_backward = tensor_bytes(engine, model)
        engine.step()
        losses.append(float(loss))
    after_step = tensor_bytes(engine, model)
    result = {
        "rank": rank,
        "after_backward": after_backward,
        "after_step_all_live_tensors": after_step["all_live_tensors"],
        "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "rss_after_init": rss_before,
        "losses": losses,
        "seconds_two_steps": time.perf_counter() - t0,
        "optimizer": type(engine.optimizer).__name__,
    }
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    deepspeed.comm.barrier()
    torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_case(stage: int, bf16: bool, model_cfg: ModelConfig, micro_batch: int) -> list[dict[str, Any]]:
    """Spawn 2 ranks for one (stage, precision); return each rank's measurements."""
    spec = {"stage": stage, "bf16": bf16, "micro_batch": micro_batch,
            "model": dataclasses.asdict(model_cfg)}
    with tempfile.TemporaryDirectory() as out_dir:
        mp.spawn(_worker, args=(_free_port(), spec, out_dir), nprocs=WORLD, join=True)
        return [json.loads(Path(out_dir, f"rank{r}.json").read_text()) for r in range(WORLD)]


def memory_model(psi: int, n: int, stage: int, bf16: bool) -> dict[str, float]:
    """Expected bytes per rank (module docstring): parameters, gradients, optimizer, state."""
    if bf16:
        p, g, o = 2.0 * psi, 2.0 * psi, 12.0 * psi
    else:
        p, g, o = 4.0 * psi, 4.0 * psi, 8.0 * psi
        if stage > 0:
            o += 4.0 * psi  # DeepSpeed's fp32 master partition (a clone even in fp32)
    if stage >= 1:
        o /= n
    if stage >= 2:
        g /= n
    if stage >= 3:
        p /= n
    return {"parameters": p, "gradients": g, "optimizer": o, "state": p + g + o}


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", nargs="+", default=["bf16", "fp32"], choices=["bf16", "fp32"])
    ap.add_argument("--stages", nargs="+", type=int, default=[0, 1, 2, 3])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--smoke", action="store_true", help="a tiny model, for CI")
    ap.add_argument("--results-dir", default=None)
    args = ap.parse_args(argv)

    model_cfg = smoke_model_config() if args.smoke else bench_model_config()
    psi = count_parameters(XTRA(model_cfg))
    info = machine()
    cases = []
    for precision in args.precision:
        for stage in args.stages:
            ranks = run_case(stage, precision == "bf16", model_cfg, args.micro_batch)
            cases.append({
                "precision": precision, "stage": stage, "ranks": ranks,
                "model": memory_model(psi, WORLD, stage, precision == "bf16"),
            })
            print(f"  zero_memory: {precision} stage {stage} done", file=sys.stderr)

    rows, goals = [], {}
    mib = 2**20
    for precision in args.precision:
        by_stage = {c["stage"]: c for c in cases if c["precision"] == precision}
        for stage, c in by_stage.items():
            m = [r["after_backward"] for r in c["ranks"]]
            worst = max(m, key=lambda r: r["state"])  # the rank holding the most
            rows.append([
                precision, stage, worst["parameters"] / mib, worst["gradients"] / mib,
                worst["optimizer"] / mib, worst["state"] / mib, c["model"]["state"] / mib,
                worst["other"] / mib, max(r["peak_rss"] for r in c["ranks"]) / mib,
                max(r["peak_rss"] - r["rss_after_init"] for r in c["ranks"]) / mib,
            ])
            c["state_per_rank_max"] = worst["state"]
        if 0 in by_stage and 3 in by_stage:
            s0 = by_stage[0]["state_per_rank_max"]
            s3 = by_stage[3]["state_per_rank_max"]
            goals[precision] = {
                "stage0_state": s0, "stage3_state": s3,
                "stage3_over_stage0_div_N": s3 / (s0 / WORLD),
                "met": s3 <= 1.1 * s0 / WORLD,
            }
    headers = ["precision", "ZeRO", "params MiB", "grads MiB", "optim MiB", "state MiB",
               "model MiB", "other MiB", "peak RSS MiB", "RSS delta MiB"]
    table = markdown_table(headers, rows)
    goal_lines = [
        f"{p}: stage-3 state/rank = {g['stage3_over_stage0_div_N']:.3f} x (stage-0 state / {WORLD})"
        f" -> goal <= 1.1 {'met' if g['met'] else 'NOT met'}"
        for p, g in goals.items()
    ]
    print(f"\n### ZeRO memory per rank ({WORLD} ranks, {psi / 1e6:.2f}M parameters, most-loaded rank)\n")
    print(table)
    print("\n" + "\n".join(goal_lines))
    payload = {
        "name": "zero_memory",
        "machine": info,
        "load_avg_at_end": load_avg(),
        "config": {
            "model": dataclasses.asdict(model_cfg), "parameters": psi, "world_size": WORLD,
            "micro_batch": args.micro_batch, "bucket_elements": BUCKET,
            "deepspeed_config_stage3": deepspeed_config(run_config(3, True, args.micro_batch, model_cfg)),
            "engine": "pipelines.pretrain.trainer.build_engine (the product's DeepSpeed config)",
            "optimizer": "xtra_core.optim.adamw (torch AdamW, fused on CPU)",
            "measured_at": "after the second backward, before its optimiser step",
        },
        "cases": cases,
        "goals": goals,
        "table_markdown": table,
    }
    write_result("zero_memory_smoke" if args.smoke else "zero_memory", payload, args.results_dir)
    return payload


if __name__ == "__main__":
    main()
