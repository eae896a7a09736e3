"""The attentive probe (Table 2 and the reference's attentive-probe configs).

`probe.attentive_features="augmented"` (Table 2): every epoch streams fresh augmented train views
(`views.train_stream`: RandomResizedCrop bicubic, flip, RandAugment, random erasing), runs the
frozen encoder once per batch (mean of the last `probe.attentive_last_n` blocks, [B, N, D]) and
steps one attentive head per `probe.lrs` value on those features (`LRGrid`: the encoder pass, the
expensive part, is shared by the whole grid). `"cached"`: the eval views of train, val and test
are encoded once (by the linear probe's feature pass when both probes run) and the epochs reshuffle
the train features (no augmentation): an epoch costs the heads' steps only, so a short budget (a
demo, a sweep trial, a small set) can afford the steps the probe needs; the features are held in
memory (N tokens x D floats per image).
AdamW, `probe.warmup_epochs` of linear warmup then cosine to `probe.min_lr`, clip
`probe.grad_clip`. After each epoch all heads are scored on the val eval views; the best val top-1
after the last epoch picks the head, which alone sees the test split.

Runs in the calling process (so it works inside a Ray Tune trial: no nested Tune run); with
`train.use_gpu` it runs as one Ray task holding a GPU.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from pipelines.console import EpochLines
from pipelines.data.listing import Listing
from pipelines.probe.loading import encode_images, freeze, state_checksum
from pipelines.probe.splits import ProbeSplits
from pipelines.probe.views import center_crop, eval_stream, train_stream
from xtra_core.config import XTRAConfig
from xtra_core.model import Encoder
from xtra_core.precision import local_precision
from xtra_core.probes import AttentiveProbe, LRGrid, best_index, evaluate

logger = logging.getLogger("xtra.probe")

ENCODE_CHUNK = 256  # images per frozen-encoder forward (bounds activation memory)


def probe_heads(cfg: XTRAConfig) -> int:
    """Attention-pooling heads: `probe.attentive_heads`, default the encoder's heads."""
    return cfg.probe.attentive_heads or cfg.model.encoder_heads


def _encode(encoder: Encoder, images: torch.Tensor, cfg: XTRAConfig) -> torch.Tensor:
    """uint8 [B, S, S, 3] -> features [B, N, D], in chunks of ENCODE_CHUNK images."""
    last_n = cfg.probe.attentive_last_n
    bf16 = local_precision(cfg.train.bf16, cfg.train.use_gpu).bf16
    parts = [encode_images(encoder, images[i : i + ENCODE_CHUNK], last_n, cfg.data.mean,
                           cfg.data.std, bf16) for i in range(0, len(images), ENCODE_CHUNK)]
    return torch.cat(parts)


def _eval_batches(
    encoder: Encoder, cfg: XTRAConfig, listing: Listing
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features [B, N, D], labels [B]) of the eval views of `listing`."""
    device = next(encoder.parameters()).device
    size = cfg.model.image_size
    for b in eval_stream(cfg, listing).iter_batches(batch_size=ENCODE_CHUNK, batch_format="numpy"):
        images = torch.from_numpy(center_crop(b["image"], size))
        yield _encode(encoder, images, cfg), torch.tensor(b["label"], dtype=torch.int64).to(device)


def _augmented_batches(
    encoder: Encoder, cfg: XTRAConfig, listing: Listing, epoch: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features [B, N, D], labels [B]) of this epoch's fresh augmented views of `listing`."""
    for b in train_stream(cfg, listing, epoch).iter_torch_batches(
        batch_size=cfg.probe.batch_size, device="cpu"
    ):
        yield _encode(encoder, b["image"], cfg), b["label"]


def _cached_batches(
    feats: torch.Tensor, labels: torch.Tensor, cfg: XTRAConfig
) -> Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]:
    """Cached train features [n, N, D], labels [n] -> epoch -> its batches, in a seeded order of
    its own."""

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(cfg.probe.seed * 100_003 + epoch))
        for i in range(0, len(order), cfg.probe.batch_size):
            idx = order[i : i + cfg.probe.batch_size].to(feats.device)
            yield feats[idx], labels[idx]

    return epoch_batches


def _encoded(
    encoder: Encoder, cfg: XTRAConfig, listing: Listing, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """The eval views of `listing` encoded once: (features [n, N, D], labels [n])."""
    parts = list(_eval_batches(encoder, cfg, listing))
    return torch.cat([f for f, _ in parts]).to(device), torch.cat([y for _, y in parts]).to(device)


def _chunked(cached: tuple[torch.Tensor, torch.Tensor]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    feats, labels = cached
    for i in range(0, len(labels), ENCODE_CHUNK):
        yield feats[i : i + ENCODE_CHUNK], labels[i : i + ENCODE_CHUNK]


def train_attentive(
    cfg: XTRAConfig, splits: ProbeSplits, encoder_state: dict[str, torch.Tensor],
    tokens: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """Train the LR grid, pick on val, score on test -> the result record (no MLflow).

    `tokens`: the eval views' features of every split from the linear probe's pass
    (`features.extract_shared_features`), used instead of encoding them here (cached mode)."""
    p = cfg.probe
    device = torch.device("cuda" if cfg.train.use_gpu and torch.cuda.is_available() else "cpu")
    encoder = Encoder(cfg.model)
    encoder.load_state_dict(encoder_state)
    freeze(encoder.to(device))
    checksum = state_checksum(encoder)
    dim, classes = cfg.model.encoder_width, splits.num_classes
    steps_per_epoch = max(1, math.ceil(len(splits.train) / p.batch_size))
    grid = LRGrid(lambda: AttentiveProbe(dim, classes, probe_heads(cfg)), p.lrs, p,
                  p.epochs * steps_per_epoch, round(p.warmup_epochs * steps_per_epoch),
                  seed=p.seed).to(device)
    cached: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    if p.attentive_features == "cached":  # every split's eval views encoded once
        for name, listing in (("train", splits.train), ("val", splits.val), ("test", splits.test)):
            cached[name] = ((torch.as_tensor(tokens[name][0]).to(device),
                             torch.as_tensor(tokens[name][1], dtype=torch.int64).to(device))
                            if tokens else _encoded(encoder, cfg, listing, device))
        logger.info("attentive: %s the features of %d train, %d val and %d test images",
                    "reused" if tokens else "cached", *(len(cached[k][1]) for k in cached))
        train_batches = _cached_batches(*cached["train"], cfg)
    else:
        def train_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return _augmented_batches(encoder, cfg, splits.train, epoch)

    def eval_batches(name: str, listing: Listing) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return _chunked(cached[name]) if cached else _eval_batches(encoder, cfg, listing)

    vals: list[dict[str, float]] = []
    lines = EpochLines(p.epochs)
    for epoch in range(p.epochs):
        t0 = time.perf_counter()
        losses = []
        for feats, labels in train_batches(epoch):
            if len(labels) < 2:  # BatchNorm needs two samples
                continue
            losses.append(grid.step(feats, labels.to(device)))
        vals = grid.evaluate(eval_batches("val", splits.val), classes)
        best = best_index(vals, grid.lrs)
        train_loss = float(np.mean([loss[best] for loss in losses])) if losses else float("nan")
        if lines.due(epoch):
            logger.info("attentive: epoch %d/%d: best val top-1 %.4f at lr %g (train loss %.4f, "
                        "%.1f s)", epoch + 1, p.epochs, vals[best]["top1"], grid.lrs[best],
                        train_loss, time.perf_counter() - t0)
    best = best_index(vals, grid.lrs)
    head = grid.heads[best]
    test = evaluate(head, eval_batches("test", splits.test), classes)
    if state_checksum(encoder) != checksum:
        raise RuntimeError("the frozen encoder's weights changed during probe training")
    return {
        "kind": "attentive",
        "top1": test["top1"],
        "top5": test.get("top5"),
        "best_lr": grid.lrs[best],
        "val_top1": vals[best]["top1"],
        "val_top5": vals[best].get("top5"),
        "val_top1_by_lr": {f"{lr:g}": v["top1"] for lr, v in zip(grid.lrs, vals)},
        "n_train": len(splits.train),
        "n_val": int(vals[best]["n"]),
        "n_test": int(test["n"]),
        "num_classes": classes,
        "epochs": p.epochs,
        "features": p.attentive_features,
    }


def attentive_probe(
    cfg: XTRAConfig, splits: ProbeSplits, encoder: Encoder,
    tokens: dict[str, tuple[np.ndarray, np.ndarray]] | None = None,
) -> dict[str, Any]:
    """`train_attentive` here, or as a Ray task holding one GPU when `train.use_gpu`."""
    state = {k: v.detach().cpu() for k, v in encoder.state_dict().items()}
    if not cfg.train.use_gpu:
        return train_attentive(cfg, splits, state, tokens)
    import ray

    task = ray.remote(num_gpus=1, num_cpus=1)(train_attentive)
    return ray.get(task.remote(cfg, splits, state, tokens))
