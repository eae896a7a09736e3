"""`xtra visualize`: the Figure-4 picture of a model on a dataset, or the mask of a config."""

from __future__ import annotations

import copy
import logging
from pathlib import Path
from typing import Any

from pipelines.errors import UserError
from pipelines.tracking import store
from pipelines.tracking.registry import resolve_full_model
from pipelines.tracking.runs import log_file
from pipelines.visualize.figure4 import figure4
from pipelines.visualize.mask import render_mask
from pipelines.visualize.samples import pick_images, pick_split
from xtra_core.config import XTRAConfig
from xtra_core.export import load_model, read_meta

logger = logging.getLogger("xtra.visualize")
PICTURES_ARTIFACT = "pictures"  # the MLflow run's folder for pictures


def normalization_of(meta: dict[str, Any], cfg: XTRAConfig) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The (mean, std) the exported model was trained with, else the config's `data.mean/std`."""
    norm = meta.get("normalization") or {}
    return tuple(norm.get("mean", cfg.data.mean)), tuple(norm.get("std", cfg.data.std))


def visualize(
    cfg: XTRAConfig, model_ref: str, out: str | Path, n: int = 8, split: str | None = None,
    head: int = 0,
) -> dict[str, Any]:
    """Draw the Figure-4 picture of `model_ref`'s head `head` on `n` images of `cfg.data.uri`
    into `out` (PNG) and, for a registered model, log it as an artifact of the run that trained it."""
    uri = store.connect(cfg) if model_ref.startswith("models:/") else store.tracking_uri(cfg)
    model_dir, info = resolve_full_model(model_ref, uri)
    model = load_model(model_dir)
    if not 0 <= head < model.cfg.blocks_ahead:
        raise UserError(f"--head {head}: {model_ref} has {model.cfg.blocks_ahead} head(s) "
                        f"(model.blocks_ahead); give 0..{model.cfg.blocks_ahead - 1}")
    mean, std = normalization_of(read_meta(model_dir), cfg)
    data = copy.deepcopy(cfg.data)
    split = pick_split(data, split)
    images, paths = pick_images(data, split, n, model.cfg.image_size)
    logger.info("predicting the next blocks of %d %s images of %s", len(images), split, data.uri)
    name = f"{info['name']} v{info['version']}" if "version" in info else str(model_ref)
    figure4(model, images, mean, std, out, title=f"{name} on {data.uri} ({split})", head=head)
    result: dict[str, Any] = {"out": str(out), "images": len(images), "split": split, "model": model_ref}
    if info.get("run_id"):
        log_file(uri, info["run_id"], out, PICTURES_ARTIFACT)
        result.update(run_id=info["run_id"], artifact=f"{PICTURES_ARTIFACT}/{Path(out).name}")
    return result


def draw_mask(cfg: XTRAConfig, out: str | Path) -> dict[str, Any]:
    """Draw the block-causal mask of `cfg.model` into `out` (PNG)."""
    render_mask(cfg.model, out)
    m = cfg.model
    return {"out": str(out), "tokens": m.num_patches, "blocks": m.num_blocks, "block_order": m.block_order}
