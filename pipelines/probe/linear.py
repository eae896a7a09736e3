"""The linear probe (BatchNorm without affine + Linear on the token mean of the last block).

`probe.linear_solver="lbfgs"` (default): on cached features [n, D] of the eval views
(`features.extract_features`), the probe of a frozen trunk on fixed views is L2-regularised
multinomial logistic regression, a convex problem. The `probe.linear_weight_decays` path is solved
by full-batch L-BFGS on the standardised train features, strongest weight decay first, each
warm-started from the previous solution and stopped when every gradient entry is below
`probe.linear_tolerance` (at most `probe.linear_max_iter` iterations); the best val top-1 picks
the weight decay. The result is a `LinearProbe` with the train mean / variance as its BatchNorm
statistics. Seconds on CPU for tens of thousands of images, and no learning-rate or epoch budget
that could leave it short of the optimum.

`probe.linear_solver="adamw"`: the reference's linear-probe recipe: BatchNorm + Linear trained by
AdamW with weight decay 0 at every `probe.lrs` value side by side for `probe.epochs` epochs of
`probe.batch_size`, warmup + cosine, on fresh RandomResizedCrop (`probe.crop_scale`,
`probe.crop_ratio`) + flip views every epoch (`augmented_batches`: no RandAugment, no erasing);
the best val top-1 (eval views) picks the LR. For long budgets: each epoch runs the encoder over
the train split again.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.console import EpochLines
from xtra_core.config import ProbeConfig, XTRAConfig
from xtra_core.probes import (
    LinearProbe,
    LRGrid,
    best_index,
    evaluate,
    fit_logistic_regression,
    linear_probe_from_solution,
    standardize,
    standardize_stats,
)

logger = logging.getLogger("xtra.probe")

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]
# epoch -> that epoch's (features [B, D], labels [B]) train batches
EpochBatches = Callable[[int], Iterator[tuple[torch.Tensor, torch.Tensor]]]


def chunks(x: torch.Tensor, y: torch.Tensor, size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    for i in range(0, len(y), size):
        yield x[i : i + size], y[i : i + size]


def _tensors(features: Arrays, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = features[split]
    return torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.int64)


def solve_lbfgs(
    cfg: ProbeConfig, features: Arrays, num_classes: int
) -> tuple[LinearProbe, dict[str, Any]]:
    """The weight-decay path by L-BFGS -> (best LinearProbe, record fields)."""
    x_train, y_train = _tensors(features, "train")
    x_val, y_val = _tensors(features, "val")
    mean, var = standardize_stats(x_train)
    z_train, z_val = standardize(x_train, mean, var), standardize(x_val, mean, var)
    wds = sorted(cfg.linear_weight_decays, reverse=True)  # strong -> weak: warm starts help
    solutions, vals = [], []
    best = None
    for k, wd in enumerate(wds):
        prev = solutions[-1] if solutions else None
        sol = fit_logistic_regression(z_train, y_train, num_classes, wd, cfg.linear_max_iter,
                                      tol=cfg.linear_tolerance, init=prev)
        logits = z_val @ sol.weight.T + sol.bias  # [n_val, C]
        val = {"top1": float((logits.argmax(1) == y_val).double().mean()),
               "loss": float(F.cross_entropy(logits, y_val))}
        solutions.append(sol)
        vals.append(val)
        best = best_index(vals, [-w for w in wds[: k + 1]])  # ties: the stronger weight decay
        logger.info("linear: weight decay %d/%d (%.0e): val top-1 %.4f (%d L-BFGS iterations, "
                    "|grad| %.1e); best so far %.4f at %.0e", k + 1, len(wds), wd, val["top1"],
                    sol.iterations, sol.grad_norm, vals[best]["top1"], wds[best])
    head = linear_probe_from_solution(solutions[best], mean, var)
    val = evaluate(head, chunks(x_val, y_val, 4096), num_classes)
    return head, {
        "solver": "lbfgs",
        "best_lr": None,
        "best_weight_decay": wds[best],
        "val_top1": val["top1"],
        "val_top5": val.get("top5"),
        "val_top1_by_weight_decay": {f"{w:g}": v["top1"] for w, v in zip(wds, vals)},
        "lbfgs_iterations": solutions[best].iterations,
    }


def linear_view_config(cfg: XTRAConfig) -> XTRAConfig:
    """The reference linear probe's train views: the probe's RandomResizedCrop and flip, without
    the attentive probe's RandAugment and random erasing."""
    out = copy.deepcopy(cfg)
    out.probe.rand_augment, out.probe.random_erasing = "", 0.0
    return out


def augmented_batches(cfg: XTRAConfig, splits: Any, encoder: torch.nn.Module) -> EpochBatches:
    """epoch -> the frozen encoder's features [B, D] (token mean of the last block) of that
    epoch's fresh RandomResizedCrop + flip views of the train split, with their labels."""
    from pipelines.probe.loading import encode_images
    from pipelines.probe.views import train_stream
    from xtra_core.precision import local_precision

    view_cfg = linear_view_config(cfg)
    bf16 = local_precision(cfg.train.bf16, cfg.train.use_gpu).bf16

    def epoch_batches(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for b in train_stream(view_cfg, splits.train, epoch).iter_torch_batches(
            batch_size=cfg.probe.batch_size, device="cpu"
        ):
            feats = encode_images(encoder, b["image"], 1, cfg.data.mean, cfg.data.std, bf16)
            yield feats.mean(1).cpu(), b["label"]  # [B, D]

    return epoch_batches


def train_adamw(
    cfg: ProbeConfig, features: Arrays, num_classes: int, train_batches: EpochBatches | None = None
) -> tuple[LinearProbe, dict[str, Any]]:
    """The reference's recipe: AdamW (weight decay 0) over the LR grid on `train_batches` (the
    augmented views; default: the cached train features reshuffled) -> (best LinearProbe, record)."""
    x_train, y_train = _tensors(features, "train")
    x_val, y_val = _tensors(features, "val")
    dim = x_train.shape[1]
    g = torch.Generator().manual_seed(cfg.seed)

    def cached(epoch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        out = list(torch.randperm(len(y_train), generator=g).split(cfg.batch_size))
        if len(out) > 1 and len(out[-1]) < 2:  # BatchNorm needs 2 samples: fold into the previous
            out[-2] = torch.cat([out[-2], out.pop()])
        return ((x_train[i], y_train[i]) for i in out)

    batches = train_batches or cached
    steps_per_epoch = max(1, -(-len(y_train) // cfg.batch_size))
    grid = LRGrid(lambda: LinearProbe(dim, num_classes), cfg.lrs, cfg,
                  cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch),
                  seed=cfg.seed, weight_decay=0.0)
    vals: list[dict[str, float]] = []
    lines = EpochLines(cfg.epochs)
    for epoch in range(cfg.epochs):
        for x, y in batches(epoch):
            if len(y) >= 2:  # BatchNorm needs two samples
                grid.step(x.float(), y.long())
        vals = grid.evaluate(chunks(x_val, y_val, 4096), num_classes)
        best = best_index(vals, grid.lrs)
        if lines.due(epoch):
            logger.info("linear (adamw): epoch %d/%d: best val top-1 %.4f at lr %g", epoch + 1,
                        cfg.epochs, vals[best]["top1"], grid.lrs[best])
    best = best_index(vals, grid.lrs)
    return grid.heads[best].eval(), {
        "solver": "adamw",
        "best_lr": grid.lrs[best],
        "val_top1": vals[best]["top1"],
        "val_top5": vals[best].get("top5"),
        "val_top1_by_lr": {f"{lr:g}": v["top1"] for lr, v in zip(grid.lrs, vals)},
        "epochs": cfg.epochs,
        "weight_decay": 0.0,
    }


def linear_probe(
    cfg: ProbeConfig, features: Arrays, num_classes: int, train_batches: EpochBatches | None = None
) -> dict[str, Any]:
    """Fit on train, choose on val, score on test once -> the result record (no logging).
    `train_batches`: the adamw solver's train views (`augmented_batches`)."""
    if cfg.linear_solver == "lbfgs":
        head, record = solve_lbfgs(cfg, features, num_classes)
    else:
        head, record = train_adamw(cfg, features, num_classes, train_batches)
    x_test, y_test = _tensors(features, "test")
    test = evaluate(head, chunks(x_test, y_test, 4096), num_classes)
    return {
        "kind": "linear",
        "top1": test["top1"],
        "top5": test.get("top5"),
        **record,
        "n_train": len(features["train"][1]),
        "n_val": len(features["val"][1]),
        "n_test": int(test["n"]),
        "num_classes": num_classes,
        "features": "cached" if cfg.linear_solver == "lbfgs" or train_batches is None
        else "augmented",
    }
