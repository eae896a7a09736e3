"""Sweep quality check on CIFAR-10: the paper's Table 6 ablations with `xtra sweep`'s own code
(`tune.sweep.run_sweep`), `configs/tiny.yaml`, block size 1 vs 2 and raster vs random order, the same step
budget for every trial, linear probe (val top-1 the metric, test top-1 beside it).

    .venv/bin/python benchmarks/sweep_quality.py --minutes 120          # the whole check
    .venv/bin/python benchmarks/sweep_quality.py --steps 2 --limit 200 --seeds 1   # a smoke run
    .venv/bin/python benchmarks/sweep_quality.py --steps 300 --seeds 1 --name recipe \
        --axis train.lr=1e-3,2e-3 --axis decoder_depth=2,4 --out benchmarks/results/recipe.json
                                            # any other grid: the tiny recipe search

`--minutes` is the budget of the whole sweep: each trial gets the same number of steps,
minutes x 60 / trials x `--images-per-s` / global batch (minus `--probe-share` of its time for
probing); `--steps` sets it directly. `--limit N` first writes a seeded subset of N images per split
(train and test) with `xtra data prepare`; without it the full 50k/10k folders are used (the probe
then uses `--probe-images` train images and the whole test split).

Prints the table next to the paper's Table 6 deltas (block 1x1 -> 4x4: +3.0 points; raster vs
random order: +11.9 points) and writes benchmarks/results/sweep_quality.json.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import ray  # noqa: E402
import torch  # noqa: E402

from pipelines.config_io import load_config  # noqa: E402
from pipelines.data.commands import prepare  # noqa: E402
from tune.sweep import SweepOptions, run_sweep  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "sweep_quality.json"
PAPER_TABLE6 = {"block_size 1x1 -> 4x4": "+3.0 points", "order random -> raster": "+11.9 points"}
AXES = ["block_size=1,2", "order=raster,random"]


def find_cifar() -> str:
    """../shared/data/cifar10 from the checkout or from a worktree one level deeper."""
    for base in (ROOT.parent, ROOT.parent.parent):
        path = base / "shared" / "data" / "cifar10"
        if path.is_dir():
            return str(path)
    return str(ROOT.parent / "shared" / "data" / "cifar10")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=find_cifar())
    p.add_argument("--minutes", type=float, default=120.0, help="budget of the whole sweep")
    p.add_argument("--steps", type=int, default=None, help="steps per trial (overrides --minutes)")
    p.add_argument("--images-per-s", type=float, default=120.0,
                   help="pretraining throughput assumed for --minutes (2 workers, 2 cores)")
    p.add_argument("--probe-share", type=float, default=0.25, help="share of a trial spent probing")
    p.add_argument("--seeds", type=int, default=2)
    p.add_argument("--limit", type=int, default=None, help="images per split (a seeded subset)")
    p.add_argument("--probe-images", type=int, default=5000, help="train images for the probe")
    p.add_argument("--batch", type=int, default=128, help="global batch size")
    p.add_argument("--axis", dest="axes", action="append", default=None, metavar="NAME=V1,V2",
                   help=f"as `xtra sweep --axis`; default: {' '.join(AXES)}")
    p.add_argument("--name", default="sweep-quality", help="sweep name (MLflow parent run)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def steps_per_trial(args: argparse.Namespace, trials: int) -> int:
    if args.steps:
        return args.steps
    seconds = args.minutes * 60 / trials * (1 - args.probe_share)
    return max(1, int(seconds * args.images_per_s / args.batch))


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.axes = args.axes or AXES
    trials = args.seeds * math.prod(len(a.split("=", 1)[1].split(",")) for a in args.axes)
    steps = steps_per_trial(args, trials)
    with tempfile.TemporaryDirectory(prefix="xsq", dir="/tmp") as work:
        data = args.data
        if args.limit:
            data = f"{work}/cifar10-{args.limit}"
            prepare(args.data, data, limit=args.limit)
        sets = [
            f"data.uri={data}", f"train.max_steps={steps}", f"train.global_batch_size={args.batch}",
            f"train.warmup_steps={max(1, steps // 10)}", f"train.checkpoint_every={max(1, steps)}",
            f"train.log_every={max(1, steps // 10)}", f"train.storage_path={work}/runs",
            f"mlflow.tracking_uri=sqlite:///{work}/mlflow.db",
            f"probe.max_train_images={args.probe_images}", *args.sets,
        ]
        cfg = load_config(str(ROOT / "configs" / "tiny.yaml"), sets)  # 2 workers x 0.5 CPU
        ray.init(include_dashboard=False, _temp_dir=f"{work}/ray", log_to_driver=False)
        t0 = time.time()
        try:
            out = run_sweep(cfg, args.axes, SweepOptions(name=args.name, seeds=args.seeds,
                                                    out_dir=str(Path(args.out).with_suffix(""))))
        finally:
            ray.shutdown()
        minutes = (time.time() - t0) / 60
    print(f"paper, Table 6 (ViT, ImageNet): {PAPER_TABLE6}")
    print(f"{trials} trials x {steps} steps (batch {args.batch}) in {minutes:.1f} min")
    result = Path(args.out)
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_text(json.dumps({
        "benchmark": "sweep_quality",
        "data": args.data,
        "settings": {**{k: v for k, v in vars(args).items() if k != "out"}, "steps_per_trial": steps},
        "minutes": round(minutes, 1),
        "paper_table6": PAPER_TABLE6,
        "table_markdown": out["markdown"],
        "summary": out["summary"],
        "trials": out["rows"],
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
                    "python": platform.python_version()},
    }, indent=2, default=str))
    print(f"wrote {result}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
