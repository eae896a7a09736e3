"""`make demo`: the whole product on one machine, in minutes, on CPU.

1. `xtra data prepare --source fashion-mnist` into `<out>/fashion-mnist` (Debian's package files).
2. `xtra pretrain` of the `tiny` preset with 2 Ray workers under DeepSpeed ZeRO-2, in the fastest
   precision the hardware has (`train.bf16: auto`): 400 steps of 32 images at peak LR 1.5e-3,
   random crops of 60-100% of the image (the preset's 30-100% wastes a short run on small crops);
   the encoder is registered in the MLflow Model Registry (sqlite store in `<out>/mlflow.db`), with
   the Figure-4 picture logged at the end.
3. `xtra probe --kind both` with the `tiny` preset's probe defaults as typed (linear: L-BFGS path;
   attentive: cached features, one feature pass for both) on the registered encoder, on 300
   labelled images in 5 seeded draws (`probe.draws`: the scores are the mean over the draws),
4. and on a random-init encoder of the same config; printed side by side.

Each stage prints its time, and the demo ends with the total and the two commands that show what
it made (the MLflow UI, `xtra visualize` on the registered encoder).

    python -m pipelines.demo [--out demo_out] [--steps 400] [--probe-images 300]
                             [--probe-draws 5] [--test-images 2000] [--verbose]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from pipelines import console
from pipelines.config_io import load_config
from pipelines.pretrain.plan import default_run_name

# The pretraining recipe, chosen on the 2-core AVX2 machine in fp32 (benchmarks/README.md, "Demo
# time"): for about the same images seen, smaller steps at a higher LR on milder crops train further
# (probe margins over random-init, linear / attentive: 192 steps of 64 at LR 1e-3, +7.5 / +6.0
# points; 400 of 32 at 1e-3, +8.5 / +6.2; this recipe, +9.8 / +8.5).
BATCH = 32  # images per pretraining step (2 workers x 16)
STEPS = 400
LR = 1.5e-3
CROP_SCALE = (0.6, 1.0)
PROBE_IMAGES = 300  # labelled train images for the probes (10% of them val)
# seeded draws of those 300 (and their val split), each probed; the table shows their mean: one
# draw's margin moved from +7 to +11 points between draws for the same encoder (benchmarks/README.md)
PROBE_DRAWS = 5
TEST_IMAGES = 2000  # a seeded subsample of Fashion-MNIST's 10,000 test images
PREPARE_LIMIT = 20_000  # Fashion-MNIST images prepared per split (train: a seeded subsample)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m pipelines.demo", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="demo_out", help="folder for data, runs and the MLflow store")
    p.add_argument("--steps", type=int, default=STEPS,
                   help=f"pretraining optimiser steps (batch {BATCH})")
    p.add_argument("--probe-images", type=int, default=PROBE_IMAGES,
                   help="labelled train images for the probes (10%% of them for val)")
    p.add_argument("--probe-draws", type=int, default=PROBE_DRAWS,
                   help="seeded draws of the probe images, each probed; the scores are the mean")
    p.add_argument("--test-images", type=int, default=TEST_IMAGES,
                   help="test images the probes are scored on (a seeded subsample of 10,000)")
    p.add_argument("--verbose", action="store_true", help="show Ray's own output too")
    return p.parse_args(argv)


class Stages:
    """`[demo] k/n <what>` when a stage starts, `[demo] k/n done in 12.3 s` when it ends."""

    def __init__(self, total: int) -> None:
        self.total, self.k, self.times = total, 0, {}
        self.t0 = time.perf_counter()

    def run(self, name: str, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.k += 1
        print(f"[demo] {self.k}/{self.total} {what}", flush=True)
        t0 = time.perf_counter()
        out = fn(*args, **kwargs)
        self.times[name] = round(time.perf_counter() - t0, 1)
        print(f"[demo] {self.k}/{self.total} done in {self.times[name]:.1f} s", flush=True)
        return out

    @property
    def elapsed(self) -> float:
        return round(time.perf_counter() - self.t0, 1)


def pretrain_sets(steps: int, run_name: str) -> list[str]:
    """The demo's pretraining recipe as `--set`s on the `tiny` preset."""
    return [
        "train.num_workers=2",
        "train.zero_stage=2",
        f"train.global_batch_size={BATCH}",
        f"train.max_steps={steps}",
        f"train.lr={LR}",
        f"data.crop_scale=[{CROP_SCALE[0]},{CROP_SCALE[1]}]",
        f"train.warmup_steps={max(1, steps // 10)}",
        "train.log_every=20",
        f"train.checkpoint_every={steps}",  # one checkpoint, at the end
        f"train.visualize_every={steps}",  # the Figure-4 picture of the final model
        f"train.run_name={run_name}",
    ]


def run_demo(args: argparse.Namespace) -> dict[str, Any]:
    """The demo's stages -> {"stages": {name: seconds}, "total_s", "top1": {...}, the run}."""
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "fashion-mnist"
    tracking = f"sqlite:///{out}/mlflow.db"
    stages = Stages(4)

    def prepare_data() -> None:
        if (data / "test").is_dir():
            print(f"[demo]     Fashion-MNIST already in {data}", flush=True)
            return
        from pipelines.data.commands import prepare

        # pretraining reads each train image about once: no need to write all 60,000
        prepare("fashion-mnist", str(data), None, PREPARE_LIMIT)

    stages.run("prepare", f"preparing Fashion-MNIST ({PREPARE_LIMIT:,} train images, the 10,000 "
               f"test images) into {data}", prepare_data)

    from pipelines.pretrain.driver import run_pretraining
    from pipelines.probe.driver import probe

    run_name = default_run_name("demo")
    common = [
        f"data.uri={data}",
        f"mlflow.tracking_uri={tracking}",
        "mlflow.experiment=xtra-demo",
        f"train.storage_path={out / 'runs'}",
    ]
    cfg = load_config("tiny", common + pretrain_sets(args.steps, run_name))
    result = stages.run(
        "pretrain", f"pretraining tiny XTRA for {args.steps} steps of {BATCH} images (2 workers, "
        "ZeRO-2)", run_pretraining, cfg)
    model_uri = result["model_uri"]

    # the tiny preset's probe defaults as `xtra probe --kind both` types them
    cfg_probe = load_config("tiny", common + [f"probe.max_train_images={args.probe_images}",
                                              f"probe.draws={args.probe_draws}",
                                              f"probe.max_test_images={args.test_images}"])
    kinds = ["linear", "attentive"]
    trained = stages.run("probe_pretrained", f"probing {model_uri} (linear + attentive)",
                         probe, cfg_probe, model_uri, kinds)
    random = stages.run("probe_random_init", "probing a random-init encoder of the same config",
                        probe, cfg_probe, model_uri, kinds, random_init=True)
    top1 = {f"{kind}_{which}": r["top1"] for which, rs in (("pretrained", trained),
                                                             ("random_init", random))
            for kind, r in zip(kinds, rs)}
    return {"stages": stages.times, "total_s": stages.elapsed, "top1": top1,
            "top5": {f"{k}_{w}": r.get("top5") for w, rs in (("pretrained", trained),
                                                              ("random_init", random))
                     for k, r in zip(kinds, rs)},
            "top1_std": {f"{k}_{w}": r.get("top1_std") for w, rs in (("pretrained", trained),
                                                                      ("random_init", random))
                         for k, r in zip(kinds, rs)},
            "steps": args.steps, "probe_images": args.probe_images, "probe_draws": args.probe_draws,
            "test_images": args.test_images, "model_uri": model_uri,
            "run_id": result["run_id"], "tracking_uri": tracking, "data": str(data),
            "checkpoints": str(out / "runs" / run_name),
            "run_line_precision": cfg.train.bf16}


def print_summary(r: dict[str, Any]) -> None:
    t, t5, sd = r["top1"], r["top5"], r.get("top1_std", {})

    def top1(key: str) -> str:
        return f"{t[key]:.3f}" + (f" ± {sd[key]:.3f}" if sd.get(key) is not None else "")

    draws = r.get("probe_draws", 1)
    print(f"\n{r['probe_images']} labelled images ({draws} seeded draws: mean ± std over them), "
          f"{r['test_images']} test images" if draws > 1 else "")
    print("| probe | pretrained top-1 | random-init top-1 | margin | pretrained top-5 | "
          "random-init top-5 |")
    print("|---|---|---|---|---|---|")
    for kind in ("linear", "attentive"):
        p, q = t[f"{kind}_pretrained"], t[f"{kind}_random_init"]
        print(f"| {kind} | {top1(f'{kind}_pretrained')} | {top1(f'{kind}_random_init')} | "
              f"{100 * (p - q):+.1f} points | "
              f"{t5[f'{kind}_pretrained']:.3f} | {t5[f'{kind}_random_init']:.3f} |")
    print("\n[demo] " + ", ".join(f"{k} {v:.0f} s" for k, v in r["stages"].items())
          + f"; total {r['total_s']:.0f} s ({r['total_s'] / 60:.1f} min)")
    print(
        f"\nMLflow run {r['run_id']} (experiment xtra-demo), encoder {r['model_uri']}; "
        f"checkpoints in {r['checkpoints']}.\nSee what it made:\n"
        f"  .venv/bin/mlflow ui --backend-store-uri {r['tracking_uri']}\n"
        f"  .venv/bin/xtra visualize --model {r['model_uri']} --data {r['data']} "
        f"--set mlflow.tracking_uri={r['tracking_uri']} --out fig4.png",
        flush=True,
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console.configure(args.verbose)
    print_summary(run_demo(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
