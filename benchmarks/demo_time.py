"""`make demo`'s stages timed: prepare, pretrain, probe the pretrained encoder, probe the random-init
one; each stage's seconds and the four top-1 figures (linear / attentive x pretrained /
random-init), appended to benchmarks/results/demo_time.json with the machine and its load.

    .venv/bin/python -m benchmarks.demo_time [--out /tmp/xtra_demo_bench] [--steps 400]
                                        [--probe-images 300] [--test-images 2000]

It runs the demo's own function (`pipelines.demo.run_demo`) with the demo's defaults. The goal
(issue 26): the stages <= 600 s in all on the 2-core machine (the install's time is not a stage),
and pretrained beats random-init by >= 8 points top-1 on both probes. A fresh `--out` each run:
the Fashion-MNIST preparation is part of the time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_model  # noqa: E402
from pipelines import console, demo  # noqa: E402
from xtra_core.precision import local_precision  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "demo_time.json"
BUDGET_S, MARGIN = 600.0, 0.08


def _commit() -> str | None:
    """The checkout's commit (`+` if it has uncommitted changes), or None outside git."""
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None
    return head + ("+" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/tmp/xtra_demo_bench", help="demo folder (emptied first)")
    ap.add_argument("--steps", type=int, default=demo.STEPS)
    ap.add_argument("--probe-images", type=int, default=demo.PROBE_IMAGES)
    ap.add_argument("--probe-draws", type=int, default=demo.PROBE_DRAWS)
    ap.add_argument("--test-images", type=int, default=demo.TEST_IMAGES)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    shutil.rmtree(args.out, ignore_errors=True)
    console.configure(False)
    load_before = os.getloadavg()
    r = demo.run_demo(argparse.Namespace(out=args.out, steps=args.steps,
                                         probe_images=args.probe_images,
                                         probe_draws=args.probe_draws,
                                         test_images=args.test_images, verbose=False))
    demo.print_summary(r)
    t = r["top1"]
    margins = {k: t[f"{k}_pretrained"] - t[f"{k}_random_init"] for k in ("linear", "attentive")}
    record = {
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        "commit": _commit(),
        "data": r["data"],  # the crops are keyed below it: any folder gives the same encoder
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                    "load_before": load_before, "load_after": os.getloadavg(),
                    # what the demo's `train.bf16: auto` resolves to on this machine
                    "precision": local_precision("auto", False).describe()},
        "config": {"steps": args.steps, "batch": demo.BATCH, "lr": demo.LR,
                   "crop_scale": list(demo.CROP_SCALE), "probe_images": args.probe_images,
                   "probe_draws": args.probe_draws, "test_images": args.test_images},
        "stages_s": r["stages"], "total_s": r["total_s"], "top1": t, "top1_std": r["top1_std"],
        "top5": r["top5"],
        "margins": margins,
        "goals": {"total_le_600_s": r["total_s"] <= BUDGET_S,
                  "margin_ge_8_points_both": all(m >= MARGIN for m in margins.values())},
    }
    path = Path(args.results)
    path.parent.mkdir(parents=True, exist_ok=True)
    runs = json.loads(path.read_text())["runs"] if path.exists() else []
    path.write_text(json.dumps({"runs": [*runs, record]}, indent=2))
    print("\n| stage | s |\n|---|---|")
    for k, v in r["stages"].items():
        print(f"| {k} | {v:.1f} |")
    print(f"| **total** | **{r['total_s']:.1f}** |")
    print(f"\nmargins: linear {100 * margins['linear']:+.1f}, attentive "
          f"{100 * margins['attentive']:+.1f} points; goals {record['goals']}; -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
