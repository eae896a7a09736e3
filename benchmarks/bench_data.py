"""Images/s through decode + RandomResizedCrop + flip: Ray Data vs a plain PyTorch DataLoader.

Both read the same JPEG files from a local directory and run the same per-image code
(`pipelines.data.images.train_transform`, PIL), so the comparison is between the two ways of running it:

- Ray Data: `pipelines.data.build_dataset(...).iter_torch_batches(batch_size)` on a local Ray
  cluster with `num_cpus = cores` (decode tasks, object store, batches to the driver).
- DataLoader: a map-style Dataset doing the same transform, `num_workers = cores`, the same batch
  size, uint8 batches collated by the default collate function.

Data: CIFAR-10 JPEGs (32 px, output 32 px) from ../shared/data/cifar10 (a class-balanced subset),
and the same images upscaled to 256 px (JPEG q90 in a temp dir, output 224 px). Each measurement is
a stream of `--epochs` epochs, as training consumes it (Ray: one dataset with num_epochs; DataLoader:
that many passes), after a warm-up epoch (process start-up excluded, Ray's per-stream start-up
included); the best of `--repeats` runs, alternating the two loaders. Prints a table and writes
benchmarks/results/data.json. The machine's load average is recorded: other work on the same cores
skews both columns.

    .venv/bin/python benchmarks/bench_data.py [--images 10000] [--large-images 1000] [--epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import PIL
import pyarrow as pa
import ray
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import cpu_model  # noqa: E402
from pipelines.data.images import file_rng, train_transform  # noqa: E402
from pipelines.data.listing import list_split  # noqa: E402
from pipelines.data.stream import build_dataset  # noqa: E402
from xtra_core.config import XTRAConfig  # noqa: E402

CIFAR = ROOT.parent / "shared" / "data" / "cifar10" / "train"
RESULTS = ROOT / "benchmarks" / "results" / "data.json"


def cifar_subset(n: int) -> list[Path]:
    """`n` CIFAR-10 train JPEGs, the same number from each class (sorted, deterministic)."""
    classes = sorted(p for p in CIFAR.iterdir() if p.is_dir())
    per = -(-n // len(classes))
    files = [f for c in classes for f in sorted(c.glob("*.jpg"))[:per]]
    return files[:n]


def write_dataset(files: list[Path], root: Path, upscale: int | None) -> None:
    """`root/train/<class>/<name>.jpg`: copies, or upscaled to `upscale` px (bicubic, JPEG q90)."""
    for f in files:
        out = root / "train" / f.parent.name / f.name
        out.parent.mkdir(parents=True, exist_ok=True)
        if upscale is None:
            shutil.copyfile(f, out)
        else:
            Image.open(f).convert("RGB").resize((upscale, upscale), Image.Resampling.BICUBIC).save(
                out, quality=90
            )


class TransformDataset(Dataset):
    """The DataLoader side: path -> the same train_transform as the Ray pipeline."""

    def __init__(self, paths: list[str], cfg: XTRAConfig, epoch: int) -> None:
        self.paths, self.cfg, self.epoch = paths, cfg, epoch

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        d, path = self.cfg.data, self.paths[i]
        with open(path, "rb") as f:
            data = f.read()
        img = train_transform(
            data,
            file_rng(d.seed, self.epoch, path),
            self.cfg.model.image_size,
            d.crop_scale,
            d.crop_ratio,
            d.hflip_prob,
            d.max_image_pixels,
        )
        return {"image": torch.from_numpy(img)}


def time_ray(
    cfg: XTRAConfig, listing: object, epoch: int, epochs: int, batch_size: int
) -> tuple[float, int, float]:
    """(seconds, images, seconds to the first batch) for `epochs` epochs in one stream."""
    ds = build_dataset(cfg.data, cfg.model.image_size, "train", epoch, train=True, listing=listing,
                       num_epochs=epochs)
    n, first, t0 = 0, None, time.perf_counter()
    for batch in ds.iter_torch_batches(batch_size=batch_size):
        n += batch["image"].shape[0]
        first = first if first is not None else time.perf_counter() - t0
    return time.perf_counter() - t0, n, first or 0.0


def time_torch(loader_factory, epoch: int, epochs: int) -> tuple[float, int]:
    n, t0 = 0, time.perf_counter()
    for e in range(epoch, epoch + epochs):
        for batch in loader_factory(e):
            n += batch["image"].shape[0]
    return time.perf_counter() - t0, n


def bench(
    name: str, root: Path, size: int, cores: int, batch: int, epochs: int, repeats: int
) -> dict[str, object]:
    cfg = XTRAConfig()
    cfg.data.uri = str(root)
    cfg.model.image_size = size
    listing = list_split(cfg.data, "train")
    paths = listing.table.column("path").to_pylist()

    # DataLoader with persistent workers: start-up paid once in the warm-up epoch
    ds_torch = TransformDataset(paths, cfg, 0)
    loader = DataLoader(
        ds_torch, batch_size=batch, shuffle=True, num_workers=cores, persistent_workers=True,
        generator=torch.Generator().manual_seed(0),
    )

    def torch_epoch(epoch: int) -> DataLoader:
        ds_torch.epoch = epoch  # workers hold copies: epoch only changes the crops in the parent
        return loader

    time_torch(torch_epoch, 0, 1)  # warm-up
    time_ray(cfg, listing, 0, 1, batch)  # warm-up (worker processes, imports)
    ray_s, torch_s, first_batch = [], [], []
    for r in range(repeats):
        t, n, first = time_ray(cfg, listing, 1 + r * epochs, epochs, batch)
        ray_s.append(n / t)
        first_batch.append(first)
        t, n = time_torch(torch_epoch, 1 + r * epochs, epochs)
        torch_s.append(n / t)
    ray_best, torch_best = max(ray_s), max(torch_s)
    return {
        "dataset": name,
        "images": len(paths),
        "source_px": int(Image.open(paths[0]).size[0]),
        "output_px": size,
        "batch_size": batch,
        "epochs_per_run": epochs,
        "ray_data_first_batch_s": round(min(first_batch), 3),
        "ray_data_images_per_s": round(ray_best, 1),
        "dataloader_images_per_s": round(torch_best, 1),
        "ratio_ray_over_dataloader": round(ray_best / torch_best, 3),
        "ray_data_images_per_s_per_core": round(ray_best / cores, 1),
        "dataloader_images_per_s_per_core": round(torch_best / cores, 1),
        "ray_data_runs": [round(x, 1) for x in ray_s],
        "dataloader_runs": [round(x, 1) for x in torch_s],
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=10000, help="CIFAR-10 JPEGs at 32 px")
    p.add_argument("--large-images", type=int, default=1000, help="the same, upscaled to 256 px")
    p.add_argument("--epochs", type=int, default=3, help="epochs per timed stream")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args()
    if not CIFAR.is_dir():
        print(f"bench_data: {CIFAR} not found (CIFAR-10 JPEGs in train/<class>/)", file=sys.stderr)
        return 2

    cores = len(os.sched_getaffinity(0))
    load_start = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="xbd", dir="/tmp"))
    results = []
    try:
        small, large = tmp / "cifar32", tmp / "cifar256"
        write_dataset(cifar_subset(args.images), small, upscale=None)
        write_dataset(cifar_subset(args.large_images), large, upscale=256)
        ray.init(num_cpus=cores, include_dashboard=False, _temp_dir=str(tmp / "ray"),
                 log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        for name, root, size in (("cifar10 32px", small, 32), ("cifar10 upscaled 256px", large, 224)):
            results.append(
                bench(name, root, size, cores, args.batch_size, args.epochs, args.repeats)
            )
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    header = f"{'dataset':<24}{'images':>7}{'src->out':>10}{'Ray Data img/s':>16}{'DataLoader img/s':>18}{'ratio':>7}"
    print(
        f"decode + RandomResizedCrop + flip, {cores} cores (Ray num_cpus = DataLoader workers = "
        f"{cores}), {args.epochs} epochs per stream, load average {os.getloadavg()[0]:.1f}"
    )
    print(header)
    for r in results:
        print(
            f"{r['dataset']:<24}{r['images']:>7}{str(r['source_px']) + '->' + str(r['output_px']):>10}"
            f"{r['ray_data_images_per_s']:>16.1f}{r['dataloader_images_per_s']:>18.1f}"
            f"{r['ratio_ray_over_dataloader']:>7.2f}"
        )
    report = {
        "benchmark": "decode + RandomResizedCrop(0.3-1, 3/4-4/3) + hflip, uint8 batches",
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_model(),
            "cores": cores,
            "load_average_at_start": load_start,
            "load_average_at_end": os.getloadavg(),
        },
        "versions": {
            "python": platform.python_version(),
            "ray": ray.__version__,
            "torch": torch.__version__,
            "pillow": PIL.__version__,
            "numpy": np.__version__,
            "pyarrow": pa.__version__,
        },
        "settings": {
            "repeats": args.repeats,
            "epochs_per_run": args.epochs,
            "batch_size": args.batch_size,
            "figure": "best of repeats, images/s over the whole stream",
        },
        "results": results,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0



if __name__ == "__main__":
    sys.exit(main())
