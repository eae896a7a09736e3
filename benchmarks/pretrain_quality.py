"""Quality check: pretrain `tiny` on CIFAR-10 for a fixed CPU budget through the product
(`pipelines.pretrain`: Ray Data -> Ray Train + DeepSpeed -> MLflow registry), then probe the
registered encoder against its random-init baseline (`benchmarks/probe_quality.py`).

    .venv/bin/python benchmarks/pretrain_quality.py --minutes 25 [--workers 2] [--bf16]
        [--set model.decoder_depth=2 ...] [--steps N] [--probe-images 50000 --probe-kinds linear]

The `tiny` preset as it is (its LR, warmup, model), with `--lr`/`--batch`/`--set` on top. The
number of optimiser steps is fixed up front (the LR schedule needs it): a short calibration run
measures images/s, then steps = minutes * 60 * images/s / batch (`--steps N` skips the
calibration, for a shared machine where a calibration would under-count). DESIGN.md's reference (its
own modules in a plain PyTorch loop, bf16 autocast, batch 128): ~157 img/s, loss ~0.43 after 25
min, linear probe ~52% vs ~41% at random init. Prints a table, writes
benchmarks/results/pretrain_quality.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import mlflow  # noqa: E402
import ray  # noqa: E402

from pipelines.config_io import load_config  # noqa: E402
from pipelines.pretrain.driver import run_pretraining  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
RESULTS = ROOT / "benchmarks" / "results"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=25.0, help="pretraining budget (wall clock)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--lr", type=float, default=None, help="default: the preset's train.lr")
    p.add_argument("--bf16", action="store_true", help="DeepSpeed bf16 (CPU supports it)")
    p.add_argument("--calibration-steps", type=int, default=12)
    p.add_argument("--probe-images", type=int, default=5000)
    p.add_argument("--data", default=str(CIFAR))
    p.add_argument("--workdir", default=None, help="runs + MLflow store (default: a temp dir)")
    p.add_argument("--skip-probe", action="store_true")
    p.add_argument("--probe-kinds", nargs="+", default=["linear", "attentive"])
    p.add_argument("--pretrained-only", action="store_true", help="no random-init probe baseline")
    p.add_argument("--steps", type=int, default=None, help="optimiser steps (skips the calibration)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    return p.parse_args(argv)


def config(args: argparse.Namespace, workdir: Path, name: str, steps: int):
    return load_config("tiny", [
        f"data.uri={args.data}",
        f"train.num_workers={args.workers}",
        f"train.cpus_per_worker={1.0 / args.workers}",
        f"train.global_batch_size={args.batch}",
        f"train.max_steps={steps}",
        *([f"train.lr={args.lr}"] if args.lr is not None else []),
        f"train.bf16={'true' if args.bf16 else 'false'}",
        "train.zero_stage=2" if args.workers > 1 else "train.zero_stage=0",
        "train.log_every=10",
        f"train.checkpoint_every={max(10, steps // 4)}",
        f"train.run_name={name}",
        f"train.storage_path={workdir / 'runs'}",
        f"mlflow.tracking_uri=sqlite:///{workdir}/mlflow.db",
        "mlflow.experiment=quality",
        "mlflow.registered_model=xtra-quality",
        *args.sets,
    ])


def metric_history(cfg, run_id: str, key: str) -> dict[int, float]:
    client = mlflow.MlflowClient(tracking_uri=cfg.mlflow.tracking_uri)
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="xtra-quality-")).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, logging_level="WARNING")

    # 1. calibration: images/s of the whole pipeline at this config (skip the first interval)
    steps = args.steps
    if steps is None:
        calib_cfg = config(args, workdir, "calibration", args.calibration_steps)
        calib_cfg.train.log_every = 4
        t0 = time.time()
        calib = run_pretraining(calib_cfg)
        rates = metric_history(calib_cfg, calib["run_id"], "images_per_s")
        rate = sorted(v for s, v in rates.items() if s > 4)[len(rates) // 2 - 1] if len(rates) > 1 else list(rates.values())[0]
        steps = max(20, int(args.minutes * 60 * rate / args.batch))
        print(f"[quality] calibration: {rate:.1f} img/s ({time.time() - t0:.0f} s) -> {steps} steps", flush=True)

    # 2. the budgeted run
    cfg = config(args, workdir, "quality", steps)
    t0 = time.time()
    out = run_pretraining(cfg)
    train_s = time.time() - t0
    loss = metric_history(cfg, out["run_id"], "loss")
    ips = metric_history(cfg, out["run_id"], "images_per_s")
    last = [loss[s] for s in sorted(loss)[-5:]]
    record = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "load_avg": os.getloadavg()},
        "config": {"workers": args.workers, "batch": args.batch, "lr": cfg.train.lr, "bf16": args.bf16,
                   "warmup_steps": cfg.train.warmup_steps, "warmup_epochs": cfg.train.warmup_epochs,
                   "sets": args.sets, "steps": steps, "minutes_budget": args.minutes,
                   "model": dataclasses.asdict(cfg.model)},
        "pretrain": {"wall_s": train_s, "final_loss_mean5": sum(last) / len(last),
                     "images_per_s_median": sorted(ips.values())[len(ips) // 2],
                     "epochs": steps * args.batch / 50000, "model_uri": out["model_uri"]},
    }
    if not args.skip_probe:
        ray.shutdown()
        probe_json = RESULTS / "probe_quality.json"
        subprocess.run(
            [sys.executable, str(ROOT / "benchmarks" / "probe_quality.py"), "--model", out["export_dir"],
             "--max-train-images", str(args.probe_images), "--data", args.data, "--out", str(probe_json),
             "--kinds", *args.probe_kinds, *(["--pretrained-only"] if args.pretrained_only else [])],
            check=True,
            env={**os.environ, "MLFLOW_TRACKING_URI": cfg.mlflow.tracking_uri},
        )
        record["probes"] = json.loads(probe_json.read_text())
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "pretrain_quality.json").write_text(json.dumps(record, indent=2, default=str))
    p = record["pretrain"]
    print("\n| steps | epochs | wall (min) | img/s | final loss |")
    print("|---|---|---|---|---|")
    print(f"| {steps} | {p['epochs']:.2f} | {train_s / 60:.1f} | {p['images_per_s_median']:.1f} | {p['final_loss_mean5']:.3f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
