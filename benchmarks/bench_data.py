"""Data path images/s per core: the product's decode + augment vs the PIL recipe users would
otherwise write, and Ray Data vs a DataLoader running the product's transform, side by side.

Loader variants (each reads the same files and draws the same crop boxes and flips: the product's
`file_rng(seed, epoch, draw_key(path, root))` and `random_resized_crop_params`, epochs in
`epoch_order`):
- `DataLoader, PIL recipe`: what users would otherwise write, torchvision's ImageNet recipe on PIL
  (torchvision does not import here, so its steps are spelt out in `PilRecipe`): full decode
  (`Image.open().convert("RGB")`), RandomResizedCrop (crop, then bicubic resize, as the reference
  code's `interpolation=3`), horizontal flip, ToTensor + Normalize in the worker (float32 out).
- `DataLoader, product transform`: `pipelines.data.images.train_transform` in the workers, uint8
  out (normalisation happens on the training worker's device: `images.normalize`).
- `Ray Data, product`: the product's stream, `pipelines.data.stream.build_dataset(...)
  .iter_torch_batches(batch_size)`, Ray started with `num_cpus = cores`.
DataLoaders: `num_workers = cores`, persistent workers, the same batch size, default collate.

Headline: **images per CPU-second** of the processes a loader runs in (psutil, user + system):
this process + the DataLoader workers, or this process + Ray's workers + Ray's own daemons
(raylet, GCS, agents), i.e. images/s per core: the work a variant costs, which other engineers'
load on the shared cores barely changes. Variants are
alternated round by round (as `benchmarks.common.interleaved_times`); each run is a stream of
`--epochs` epochs after a warm-up stream (process start-up and imports excluded; Ray's per-stream
start-up included); median of `--repeats`. The best wall images/s is shown next to it.

In-process table: CPU ms per image on one thread for the recipe and the product, and the
product's stages (header, libjpeg-turbo decode, torch resize), from the product's own functions.

Data (say how, reproducibly): CIFAR-10 train JPEGs from shared/data/cifar10 (class-balanced,
sorted), 32 px -> 32 px; and "ImageNet-like" JPEGs: the same images upscaled (bicubic) to 500x375
(3 in 4) or 375x500, plus 1/f ("pink") texture and sensor noise so that the entropy decoder has
photo-like work, saved at quality 90. Their bits per pixel are printed next to a real photo
re-encoded the same way (matplotlib's sample `grace_hopper.jpg` at 500x375, q90), 500x375 ->
224 px (H/14) and -> 256 px (B/16).

Cores per GPU: images/s one H200 consumes at the 50% MFU goal (989 TFLOP/s dense bf16 spec x 0.5 /
the training FLOPs per image of `benchmarks.gpu_h200.train_flops_per_image`) / images per CPU-s.

    .venv/bin/python -m benchmarks.bench_data [--images 4000] [--large-images 500] [--epochs 3]
        [--repeats 3] [--smoke] [--results-dir D]

Prints Markdown tables and writes benchmarks/results/data.json (data_smoke.json with --smoke).
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import ray
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, Sampler

from benchmarks.common import load_avg, machine, markdown_table, write_result
from benchmarks.gpu_h200 import train_flops_per_image
from pipelines.data.images import (
    ImageSource,
    dct_reduction,
    draw_key,
    file_rng,
    random_resized_crop_params,
    resize,
    train_transform,
)
from pipelines.data.listing import list_split
from pipelines.data.stream import build_dataset, epoch_order
from xtra_core.config import XTRAConfig, preset

ROOT = Path(__file__).resolve().parents[1]
CIFAR_CANDIDATES = (ROOT.parent / "shared" / "data" / "cifar10", Path("/work/shared/data/cifar10"))
PHOTO = Path(__import__("matplotlib").get_data_path()) / "sample_data" / "grace_hopper.jpg"
H200_BF16_DENSE_FLOPS = 989e12  # spec sheet, dense (no sparsity)
MFU_GOAL = 0.5
RAY_AGENTS = ("ray::DashboardA", "ray::RuntimeEnv")  # per-node agents: daemons, not workers
RECIPE, PRODUCT_DL, PRODUCT_RAY = "DataLoader, PIL recipe", "DataLoader, product", "Ray Data, product"
PROCESS_KINDS = {  # whose CPU each loader is charged with (see tree_cpu_seconds)
    RECIPE: ("driver", "dataloader workers"),
    PRODUCT_DL: ("driver", "dataloader workers"),
    PRODUCT_RAY: ("driver", "ray workers", "ray daemons"),
}


# --------------------------------------------------------------------------- data


def cifar_subset(cifar: Path, n: int) -> list[Path]:
    """`n` CIFAR-10 train JPEGs, the same number from each class (sorted, deterministic)."""
    classes = sorted(p for p in (cifar / "train").iterdir() if p.is_dir())
    per = -(-n // len(classes))
    files = [f for c in classes for f in sorted(c.glob("*.jpg"))[:per]]
    return files[:n]


def pink_textures(count: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    """`count` float32 [h, w] fields with a 1/f amplitude spectrum (natural images' statistics),
    unit standard deviation."""
    rng = np.random.default_rng(seed)
    fy, fx = np.fft.fftfreq(h)[:, None], np.fft.rfftfreq(w)[None, :]
    falloff = 1.0 / np.maximum(np.hypot(fx, fy), 1.0 / max(h, w))
    out = []
    for _ in range(count):
        field = np.fft.irfft2(np.fft.rfft2(rng.standard_normal((h, w))) * falloff, s=(h, w))
        out.append((field / field.std()).astype(np.float32))
    return out


def imagenet_like(src: Path, i: int, textures: list[np.ndarray], texture_std: float) -> Image.Image:
    """CIFAR image -> 500x375 (or 375x500 for every 4th) RGB: bicubic upscale + a texture (rolled
    by a per-image offset, partly per channel) + sensor noise."""
    rng = np.random.default_rng(i)
    w, h = (375, 500) if i % 4 == 3 else (500, 375)
    base = np.asarray(Image.open(src).convert("RGB").resize((w, h), Image.Resampling.BICUBIC),
                      dtype=np.float32)
    t = textures[i % len(textures)]
    t = np.roll(t, (int(rng.integers(0, 500)), int(rng.integers(0, 500))), (0, 1))
    t = t[:h, :w] if t.shape[0] >= h else t.T[:h, :w]
    tint = rng.uniform(0.7, 1.3, 3).astype(np.float32)
    img = base + texture_std * t[..., None] * tint + 2.0 * rng.standard_normal((h, w, 3), np.float32)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def write_datasets(files: list[Path], large: list[Path], small_root: Path, large_root: Path,
                   texture_std: float) -> dict[str, Any]:
    """`small_root/train/<class>/x.jpg` copies; `large_root/...` ImageNet-like at q90. Stats."""
    for f in files:
        out = small_root / "train" / f.parent.name / f.name
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, out)
    textures = pink_textures(16, 500, 500, seed=0)
    sizes = []
    for i, f in enumerate(large):
        out = large_root / "train" / f.parent.name / f.name
        out.parent.mkdir(parents=True, exist_ok=True)
        imagenet_like(f, i, textures, texture_std).save(out, format="JPEG", quality=90)
        sizes.append(out.stat().st_size)
    photo = Image.open(PHOTO).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    photo.save(buf, format="JPEG", quality=90)
    bpp = 8 / (500 * 375)
    return {
        "imagenet_like_mean_bytes": float(np.mean(sizes)) if sizes else 0.0,
        "imagenet_like_bits_per_pixel": float(np.mean(sizes)) * bpp if sizes else 0.0,
        "real_photo_bits_per_pixel": len(buf.getvalue()) * bpp,
        "real_photo": f"matplotlib sample_data/{PHOTO.name} at 500x375, q90",
        "texture_std": texture_std,
    }


# --------------------------------------------------------------------------- the two transforms


class PilRecipe:
    """torchvision's `Compose([RandomResizedCrop(size, scale, ratio, interpolation=BICUBIC),
    RandomHorizontalFlip(), ToTensor(), Normalize(mean, std)])` after `default_loader`, spelt out
    on PIL with the product's (= torchvision's) crop sampler: bytes -> float32 [3, S, S]."""

    def __init__(self, cfg: XTRAConfig) -> None:
        d = cfg.data
        self.size, self.scale, self.ratio, self.p = cfg.model.image_size, d.crop_scale, d.crop_ratio, d.hflip_prob
        self.mean = torch.tensor(d.mean).view(3, 1, 1)
        self.std = torch.tensor(d.std).view(3, 1, 1)

    def pil(self, data: bytes, rng: np.random.Generator) -> Image.Image:
        img = Image.open(io.BytesIO(data)).convert("RGB")  # full decode
        top, left, h, w = random_resized_crop_params(rng, *img.size, self.scale, self.ratio)
        flip = rng.random() < self.p
        img = img.crop((left, top, left + w, top + h)).resize(
            (self.size, self.size), Image.Resampling.BICUBIC)
        return img.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if flip else img

    def __call__(self, data: bytes, rng: np.random.Generator) -> torch.Tensor:
        img = self.pil(data, rng)
        x = torch.from_numpy(np.array(img, np.uint8, copy=True))  # ToTensor: [S, S, 3] ->
        x = x.permute(2, 0, 1).contiguous().to(torch.float32).div(255)  # [3, S, S] float
        return (x - self.mean) / self.std  # Normalize


def product_transform(cfg: XTRAConfig, data: bytes, rng: np.random.Generator) -> torch.Tensor:
    d = cfg.data
    return torch.from_numpy(train_transform(
        data, rng, cfg.model.image_size, d.crop_scale, d.crop_ratio, d.hflip_prob, d.max_image_pixels))


# --------------------------------------------------------------------------- loaders


class EpochSampler(Sampler):
    """(epoch, row) keys for `epochs`, each epoch in the product's order (`epoch_order`). Runs in
    the main process, so setting `epochs` between streams reaches persistent workers."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epochs = n, seed, range(1)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        for e in self.epochs:
            for row in epoch_order(self.n, self.seed, e):
                yield e, int(row)

    def __len__(self) -> int:
        return self.n * len(self.epochs)


class FileDataset(Dataset):
    def __init__(self, paths: list[str], root: str, seed: int, transform: Callable) -> None:
        self.paths, self.root, self.seed, self.transform = paths, root, seed, transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key: tuple[int, int]) -> dict[str, torch.Tensor]:
        epoch, row = key
        path = self.paths[row]
        with open(path, "rb") as f:
            data = f.read()
        return {"image": self.transform(data, file_rng(self.seed, epoch, draw_key(path, self.root)))}


def tree_cpu_seconds() -> dict[int, tuple[str, float]]:
    """{pid: (kind, user + system CPU s)} of this process and all its descendants. Kinds:
    "driver" (this process), "dataloader workers" (forked children: this process's command line),
    "ray workers" (`ray::...` processes: the decode tasks and Ray Data's helper actors), "ray
    daemons" (raylet, GCS, the dashboard and runtime-env agents, log monitor, ...)."""
    me = psutil.Process()
    my_cmdline = me.cmdline()
    out: dict[int, tuple[str, float]] = {}
    for p in [me, *me.children(recursive=True)]:
        try:
            t = p.cpu_times()
            name, cmdline = p.name(), p.cmdline()
            title = (cmdline or [""])[0]  # Ray sets its workers' process titles to ray::...
            if p.pid == me.pid:
                kind = "driver"
            elif p.ppid() == me.pid and cmdline == my_cmdline:
                kind = "dataloader workers"
            elif (name.startswith("ray::") or title.startswith("ray::")) and not any(
                    x.startswith(RAY_AGENTS) for x in (name, title)):
                kind = "ray workers"
            else:
                kind = "ray daemons"
            out[p.pid] = (kind, t.user + t.system)
        except psutil.Error:
            pass
    return out


def measure(stream: Callable[[], int], kinds: tuple[str, ...]) -> dict[str, Any]:
    """Run `stream`; its CPU is that of the process `kinds` it runs in (a DataLoader is not
    charged for the idle Ray cluster next to it, nor Ray for idle DataLoader workers)."""
    c0, w0 = tree_cpu_seconds(), time.perf_counter()
    n = stream()
    wall, c1 = time.perf_counter() - w0, tree_cpu_seconds()
    by_kind: dict[str, float] = {}
    for pid, (kind, t) in c1.items():
        by_kind[kind] = by_kind.get(kind, 0.0) + t - c0.get(pid, (kind, 0.0))[1]
    return {"images": n, "wall_s": wall, "cpu_s": sum(by_kind.get(k, 0.0) for k in kinds),
            "cpu_s_by_process": by_kind}


def loader_streams(cfg: XTRAConfig, cores: int, batch: int) -> dict[str, Callable[[int, int], int]]:
    """name -> stream(first_epoch, epochs) -> images seen."""
    listing = list_split(cfg.data, "train")
    paths = listing.table.column("path").to_pylist()
    seed = cfg.data.seed
    streams: dict[str, Callable[[int, int], int]] = {}
    for name, transform in ((RECIPE, PilRecipe(cfg)), (PRODUCT_DL, partial(product_transform, cfg))):
        sampler = EpochSampler(len(paths), seed)
        loader = DataLoader(FileDataset(paths, listing.root, seed, transform), batch_size=batch, sampler=sampler,
                            num_workers=cores, persistent_workers=True)

        def dl_stream(first: int, epochs: int, loader=loader, sampler=sampler) -> int:
            sampler.epochs = range(first, first + epochs)
            return sum(b["image"].shape[0] for b in loader)

        streams[name] = dl_stream

    def ray_stream(first: int, epochs: int) -> int:
        ds = build_dataset(cfg.data, cfg.model.image_size, "train", first, train=True, listing=listing, num_epochs=epochs)
        return sum(b["image"].shape[0] for b in ds.iter_torch_batches(batch_size=batch))

    streams[PRODUCT_RAY] = ray_stream
    return streams


def bench_loaders(cfg: XTRAConfig, name: str, cores: int, batch: int, epochs: int, repeats: int
                  ) -> dict[str, Any]:
    streams = loader_streams(cfg, cores, batch)
    for stream in streams.values():
        stream(0, 1)  # warm-up: worker start-up, imports
    runs: dict[str, list[dict[str, float]]] = {k: [] for k in streams}
    for r in range(repeats):
        for k, stream in streams.items():
            runs[k].append(measure(partial(stream, 1 + r * epochs, epochs), PROCESS_KINDS[k]))
    variants = {}
    for k, rs in runs.items():
        per_cpu = [x["images"] / x["cpu_s"] for x in rs]
        variants[k] = {
            "images_per_cpu_s_median": statistics.median(per_cpu),
            "images_per_s_wall_best": max(x["images"] / x["wall_s"] for x in rs),
            "images_per_run": rs[0]["images"],
            "cpu_share_by_process": {  # of the CPU charged to the variant
                kind: sum(x["cpu_s_by_process"].get(kind, 0.0) for x in rs) / sum(x["cpu_s"] for x in rs)
                for kind in PROCESS_KINDS[k]
            },
            "runs": rs,
        }
    recipe, dl, ray_ = (variants[k]["images_per_cpu_s_median"] for k in (RECIPE, PRODUCT_DL, PRODUCT_RAY))
    return {
        "dataset": name,
        "output_px": cfg.model.image_size,
        "images": len(list_split(cfg.data, "train")),
        "epochs_per_run": epochs,
        "batch_size": batch,
        "variants": variants,
        "ray_over_recipe_cpu": ray_ / recipe,
        "dataloader_product_over_recipe_cpu": dl / recipe,
        "ray_over_dataloader_product_cpu": ray_ / dl,
    }


# --------------------------------------------------------------------------- in-process costs


def transform_costs(cfg: XTRAConfig, root: Path, count: int, repeats: int) -> dict[str, float]:
    """CPU ms per image on one thread: recipe (float, uint8), product, product stages."""
    files = sorted(root.rglob("*.jpg"))[:count]
    blobs = [f.read_bytes() for f in files]
    d, size = cfg.data, cfg.model.image_size
    recipe = PilRecipe(cfg)
    rngs = lambda: [file_rng(d.seed, 0, str(f)) for f in files]  # noqa: E731

    boxes = []
    for blob, rng in zip(blobs, rngs()):
        src = ImageSource.open(blob, d.max_image_pixels)
        boxes.append(random_resized_crop_params(rng, src.width, src.height, d.crop_scale, d.crop_ratio))
    pixels = [ImageSource.open(b, d.max_image_pixels).pixels(dct_reduction(box, size))
              for b, box in zip(blobs, boxes)]
    crops = [p[t:t + h, x:x + w] for p, (t, x, h, w) in zip(pixels, boxes)]  # reduction 1 here

    fns: dict[str, Callable[[], Any]] = {
        "recipe: decode + crop + bicubic + flip + ToTensor + Normalize (float out)":
            lambda: [recipe(b, r) for b, r in zip(blobs, rngs())],
        "recipe without ToTensor + Normalize (uint8 out)":
            lambda: [np.asarray(recipe.pil(b, r)) for b, r in zip(blobs, rngs())],
        "product train_transform (uint8 out)":
            lambda: [product_transform(cfg, b, r) for b, r in zip(blobs, rngs())],
        "  product: header + crop draw": lambda: [
            random_resized_crop_params(r, *(lambda s: (s.width, s.height))(
                ImageSource.open(b, d.max_image_pixels)), d.crop_scale, d.crop_ratio)
            for b, r in zip(blobs, rngs())],
        "  product: libjpeg-turbo decode": lambda: [
            ImageSource.open(b, d.max_image_pixels).pixels(dct_reduction(box, size))
            for b, box in zip(blobs, boxes)],
        "  product: torch bicubic resize of the crop": lambda: [resize(c, size) for c in crops],
        "  PIL: full decode": lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in blobs],
        "  PIL: crop + bicubic resize": lambda: [
            crop_resize_pil(Image.fromarray(p), box, size) for p, box in zip(pixels, boxes)],
    }
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for fn in fns.values():  # warm-up
        fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            c0 = time.process_time()
            fn()
            cpu[k].append(time.process_time() - c0)
    return {k: 1e3 * statistics.median(v) / len(files) for k, v in cpu.items()}


def crop_resize_pil(img: Image.Image, box: tuple[int, int, int, int], size: int) -> Image.Image:
    top, left, h, w = box
    return img.crop((left, top, left + w, top + h)).resize((size, size), Image.Resampling.BICUBIC)


# --------------------------------------------------------------------------- main


def cores_per_gpu(per_core: dict[int, dict[str, float]]) -> list[dict[str, Any]]:
    """Decode cores one H200 needs at the MFU goal, for B/16 at 256 px and H/14 at 224 px."""
    rows = []
    for name in ("vit_b16", "vit_h14"):
        m = preset(name).model
        if m.image_size not in per_core:
            continue
        gpu_images_per_s = MFU_GOAL * H200_BF16_DENSE_FLOPS / train_flops_per_image(m)["total"]
        rows.append({
            "model": name,
            "image_size": m.image_size,
            "gpu_images_per_s_at_goal": gpu_images_per_s,
            **{f"cores_{k}": gpu_images_per_s / v for k, v in per_core[m.image_size].items()},
        })
    return rows


def find_cifar(arg: Path | None) -> Path | None:
    for c in ([arg] if arg else list(CIFAR_CANDIDATES)):
        if (c / "train").is_dir():
            return c
    return None


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=4000, help="CIFAR-10 JPEGs at 32 px")
    p.add_argument("--large-images", type=int, default=500, help="ImageNet-like 500x375 JPEGs")
    p.add_argument("--epochs", type=int, default=3, help="epochs per timed stream")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--texture-std", type=float, default=20.0, help="1/f texture, grey levels")
    p.add_argument("--cifar", type=Path, default=None, help="CIFAR-10 JPEG root (train/<class>/)")
    p.add_argument("--smoke", action="store_true", help="a few images, 1 epoch, 1 repeat")
    p.add_argument("--results-dir", default=None)
    args = p.parse_args(argv)
    if args.smoke:
        args.images, args.large_images, args.epochs, args.repeats, args.batch_size = 64, 24, 1, 1, 16
    cifar = find_cifar(args.cifar)
    if cifar is None:
        raise SystemExit(f"bench_data: no CIFAR-10 JPEGs (train/<class>/*.jpg) in {args.cifar or CIFAR_CANDIDATES}")

    torch.set_num_threads(1)  # the in-process table is per core; DataLoader workers use 1 anyway
    cores = len(os.sched_getaffinity(0))
    info = machine()
    tmp = Path(tempfile.mkdtemp(prefix="xbd", dir="/tmp"))
    results, costs = [], {}
    try:
        small, large = tmp / "cifar32", tmp / "imagenet_like"
        t0 = time.perf_counter()
        data_stats = write_datasets(cifar_subset(cifar, args.images), cifar_subset(cifar, args.large_images),
                                    small, large, args.texture_std)
        data_stats["generate_s"] = time.perf_counter() - t0
        print(f"data: {args.images} CIFAR-10 JPEGs, {args.large_images} ImageNet-like 500x375 q90 at "
              f"{data_stats['imagenet_like_bits_per_pixel']:.2f} bits/pixel (a real photo at 500x375 "
              f"q90: {data_stats['real_photo_bits_per_pixel']:.2f}), {data_stats['generate_s']:.0f} s",
              flush=True)
        for size in (224, 256):
            cfg = XTRAConfig()
            cfg.data.uri, cfg.model.image_size = str(large), size
            costs[size] = transform_costs(cfg, large, min(args.large_images, 200), args.repeats)
        ray.init(num_cpus=cores, include_dashboard=False, _temp_dir=str(tmp / "ray"),
                 log_to_driver=False, configure_logging=False)
        logging.getLogger("ray.data").setLevel(logging.ERROR)  # Ray's chatter stays in its logs
        ray.data.DataContext.get_current().enable_progress_bars = False
        for name, root, size in (("cifar10 32 px", small, 32), ("ImageNet-like 500x375", large, 224),
                                 ("ImageNet-like 500x375", large, 256)):
            cfg = XTRAConfig()
            cfg.data.uri, cfg.model.image_size = str(root), size
            results.append(bench_loaders(cfg, name, cores, args.batch_size, args.epochs, args.repeats))
            print(f"  {name} -> {size} px done, load {load_avg()}", flush=True)
    finally:
        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    rows = []
    for r in results:
        for k, v in r["variants"].items():
            share = v["cpu_share_by_process"]
            rows.append([
                r["dataset"], r["output_px"], k, v["images_per_cpu_s_median"],
                v["images_per_cpu_s_median"] / r["variants"][RECIPE]["images_per_cpu_s_median"],
                v["images_per_s_wall_best"],
                f"{100 * share.get('driver', 0):.0f}% / {100 * share.get('ray daemons', 0):.0f}%",
            ])
    table = markdown_table(
        ["data", "out px", "loader", "img per CPU-s (= img/s per core)", "x recipe (CPU)",
         "img/s wall best", "CPU in driver / Ray daemons"], rows)
    cost_rows = [[k, *(round(costs[s][k], 3) for s in sorted(costs))] for k in costs[224]]
    cost_table = markdown_table(["CPU ms per image, one thread", *(f"{s} px" for s in sorted(costs))],
                                cost_rows)
    per_core = {r["output_px"]: {k: v["images_per_cpu_s_median"] for k, v in r["variants"].items()}
                for r in results}
    gpu_rows = cores_per_gpu(per_core)
    gpu_table = markdown_table(
        ["model", "px", "H200 img/s at 50% MFU", "cores: PIL recipe", "cores: product (DataLoader)",
         "cores: product (Ray Data)"],
        [[g["model"], g["image_size"], g["gpu_images_per_s_at_goal"], g[f"cores_{RECIPE}"],
          g[f"cores_{PRODUCT_DL}"], g[f"cores_{PRODUCT_RAY}"]] for g in gpu_rows])
    goals = {}
    for r in results:
        if r["output_px"] in (224, 256):
            goals[f"{r['output_px']} px: Ray Data product >= 1.5x recipe per core"] = r["ray_over_recipe_cpu"] >= 1.5
            goals[f"{r['output_px']} px: Ray Data overhead <= 10% vs DataLoader (product)"] = (
                r["ray_over_dataloader_product_cpu"] >= 1 / 1.1)
    print(f"\ndecode + RandomResizedCrop + flip, {cores} cores, {args.epochs} epochs per stream, "
          f"median of {args.repeats}; load {info['load_avg_1_5_15_at_start']} -> {load_avg()}")
    print(table)
    print("\n" + cost_table)
    print("\n" + gpu_table)
    for k, ok in goals.items():
        print(f"goal {k}: {'met' if ok else 'NOT met'}")
    report = {
        "machine": info,
        "load_avg_at_end": load_avg(),
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "data": data_stats,
        "results": results,
        "transform_cpu_ms_per_image": {str(k): v for k, v in costs.items()},
        "cores_per_gpu": gpu_rows,
        "goals": goals,
        "table_markdown": table,
        "cost_table_markdown": cost_table,
        "gpu_table_markdown": gpu_table,
    }
    path = write_result("data_smoke" if args.smoke else "data", report, args.results_dir)
    print(f"wrote {path}")
    return report


if __name__ == "__main__":
    main()
