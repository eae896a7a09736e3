"""Run the performance benchmarks in turn (what `make bench` calls):

    .venv/bin/python -m benchmarks.run_all [--only train_step attention] [--smoke] [--results-dir D]

Each prints its Markdown table and writes benchmarks/results/<name>.json. Without CUDA the GPU
script runs its tiny CPU variant, without the torch.compile variants (minutes of compiling on
CPU; run `python -m benchmarks.gpu_h200 --tiny` to include them). `--smoke` runs every script at
its smallest size (what tests/test_benchmarks.py checks), writing *_smoke.json files.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any

import torch

from benchmarks import attention, gpu_h200, train_step, zero_memory

BENCHMARKS: dict[str, Callable[[list[str] | None], dict[str, Any]]] = {
    "train_step": train_step.main,
    "attention": attention.main,
    "zero_memory": zero_memory.main,
    "gpu_h200": gpu_h200.main,
}


def arguments(name: str, smoke: bool) -> list[str]:
    args: list[str] = []
    if name == "gpu_h200" and not torch.cuda.is_available():
        args += ["--tiny", "--no-compile"]
    if smoke:
        args += {
            "train_step": ["--smoke", "--repeats", "1"],
            "attention": ["--smoke", "--repeats", "1"],
            "zero_memory": ["--smoke", "--precision", "bf16", "--stages", "0", "3"],
            "gpu_h200": ["--steps", "1", "--warmup", "1", "--batch", "2"],
        }[name]
    return args


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--only", nargs="+", choices=list(BENCHMARKS), default=list(BENCHMARKS))
    ap.add_argument("--smoke", action="store_true")
    ap.add_argument("--results-dir", default=None, help="default benchmarks/results")
    args = ap.parse_args(argv)
    extra = ["--results-dir", args.results_dir] if args.results_dir else []
    for name in args.only:
        t0 = time.perf_counter()
        print(f"\n## {name}", flush=True)
        BENCHMARKS[name](arguments(name, args.smoke) + extra)
        print(f"({name}: {time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
