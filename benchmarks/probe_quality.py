"""Probe quality on CIFAR-10: linear and attentive probes of an encoder against the random-init
baseline (the same ModelConfig, freshly initialised), through the product's own `xtra probe` path
(Ray Data feature extraction; the linear probe solved by L-BFGS over its weight-decay grid; the
attentive probe's LR grid trained side by side on augmented views; test split once).

    .venv/bin/python benchmarks/probe_quality.py                       # random-init only
    .venv/bin/python benchmarks/probe_quality.py --model models:/xtra-encoder/1 \
        [--max-train-images 4000] [--attentive-epochs 10] [--attentive-lrs 1e-3 3e-3 1e-2] \
        [--set probe.linear_solver=adamw --linear-epochs 100 --linear-lrs 1e-3 3e-3] [--set ...]

Data: ../shared/data/cifar10 (train/<class>/*.jpg, test/<class>/*.jpg); a seeded subsample of
`--max-train-images` train images (10% of them carved out for validation), the full 10k test split.
Prints a table and writes benchmarks/results/probe_quality.json. Pretraining is not part of this
script; pass the encoder it produced with `--model` (a registry URI or an export directory).
A pretrained encoder that does not clearly beat its random-init baseline has a bug somewhere.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
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
from pipelines.probe.driver import probe  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10"
RESULTS = ROOT / "benchmarks" / "results" / "probe_quality.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="models:/name/version|@alias or an export dir")
    p.add_argument("--config", default="tiny", help="config for the random-init encoder (no --model)")
    p.add_argument("--data", default=str(CIFAR))
    p.add_argument("--max-train-images", type=int, default=4000)
    p.add_argument("--linear-epochs", type=int, default=100)
    p.add_argument("--attentive-epochs", type=int, default=10)
    p.add_argument("--linear-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2, 3e-2])
    p.add_argument("--attentive-lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--kinds", nargs="+", default=["linear", "attentive"], choices=["linear", "attentive"])
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--pretrained-only", action="store_true", help="skip the random-init baseline")
    p.add_argument("--out", default=str(RESULTS))
    return p.parse_args(argv)


def run(args: argparse.Namespace, work: Path) -> list[dict]:
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    if not (args.model or "").startswith("models:/") and not tracking:
        tracking = f"sqlite:///{work}/mlflow.db"  # scores of a local export / random init
    base_sets = [
        f"data.uri={args.data}",
        f"probe.max_train_images={args.max_train_images}",
        f"probe.batch_size={args.batch_size}",
        f"train.storage_path={work}/tune",
        *([f"mlflow.tracking_uri={tracking}"] if tracking else []),
        *args.sets,
    ]
    plan = {
        "linear": (args.linear_epochs, args.linear_lrs),
        "attentive": (args.attentive_epochs, args.attentive_lrs),
    }
    inits = ([False] if args.pretrained_only else [False, True]) if args.model else [True]
    rows = []
    for random_init in inits:
        for kind in args.kinds:
            epochs, lrs = plan[kind]
            sets = [*base_sets, f"probe.epochs={epochs}", f"probe.lrs={json.dumps(lrs)}"]
            cfg = load_config(args.config, sets)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(sys.stderr):  # Ray's chatter; stdout: JSON + table
                (r,) = probe(cfg, args.model, [kind], random_init=random_init)
            r["seconds"] = round(time.perf_counter() - t0, 1)
            rows.append(r)
            print(json.dumps(r), flush=True)
    return rows


def chosen(r: dict) -> str:
    """The hyper-parameter val picked: `wd 1e-04` (L-BFGS linear) or `lr 3e-03`."""
    if r.get("best_weight_decay") is not None:
        return f"wd {r['best_weight_decay']:.0e}"
    return f"lr {r['best_lr']:.0e}"


def table(rows: list[dict]) -> str:
    head = f"{'kind':<10} {'encoder':<12} {'top1':>7} {'top5':>7} {'val_top1':>8} {'chosen':>12} {'epochs':>6} {'n_train':>7} {'n_test':>6} {'s':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        enc = "random-init" if r["random_init"] else "pretrained"
        top5 = f"{r['top5']:.4f}" if r.get("top5") is not None else "-"
        lines.append(
            f"{r['kind']:<10} {enc:<12} {r['top1']:>7.4f} {top5:>7} {r['val_top1']:>8.4f} "
            f"{chosen(r):>12} {r.get('epochs', '-'):>6} {r['n_train']:>7} {r['n_test']:>6} {r['seconds']:>6}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="xpq", dir="/tmp") as work:
        ray.init(include_dashboard=False, _temp_dir=f"{work}/ray", log_to_driver=False)
        try:
            rows = run(args, Path(work))
        finally:
            ray.shutdown()
    print(table(rows))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "benchmark": "probe_quality",
        "model": args.model,
        "data": args.data,
        "settings": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "machine": {"cpus": os.cpu_count(), "torch": torch.__version__, "ray": ray.__version__,
                    "python": platform.python_version()},
        "results": rows,
    }, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
