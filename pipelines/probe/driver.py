"""`xtra probe`: linear and attentive probes on a frozen XTRA encoder, scores into MLflow.

    xtra probe --model models:/xtra-encoder/3 --data s3://bucket/cifar10 --kind both
    ray job submit -- python -m pipelines.cli probe --model models:/xtra-encoder@champion --data ...

The job, one module per step:

1. `loading`: the frozen encoder from the registry (`models:/name/version`, `models:/name@alias`),
   an export directory, or `--random-init` (seeded by `probe.seed`).
2. `splits`: labelled train/test listings, a seeded val split carved out of train.
3. `views`: what the probes see, streamed by Ray Data: the eval view (resize, centre crop) and the
   attentive probe's augmented view (RandomResizedCrop bicubic, flip, RandAugment, erasing).
4. `features` + `linear`: the encoder once over the eval views (Ray Data actor pool), then the
   linear probe on those cached features: L-BFGS along the weight-decay path, chosen on val
   (`probe.linear_solver=adamw`: the reference's LR grid on augmented views instead).
5. `attentive`: the attentive probe, all `probe.lrs` trained side by side on each batch of
   augmented views (Table 2) or of the eval views' cached features, chosen on val. With
   `probe.attentive_features=cached` and both kinds, step 4's pass keeps its tokens too: one
   encoder pass over the data for both probes.
6. scores (`tracking.probe_scores`): metrics on the pretraining run of the model version (or a new run), tags on the
   version; one JSON line per kind on stdout (by the CLI).

No Ray Tune: the grids run in this process, so `probe()` also works inside a Tune trial.
Progress lines ("weight decay k/n", "epoch k/n" with the best val score so far) go to the
`xtra.probe` logger.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipelines import console
from pipelines.errors import UserError
from pipelines.probe.attentive import attentive_probe, probe_heads
from pipelines.probe.features import extract_shared_features
from pipelines.probe.linear import augmented_batches, linear_probe
from pipelines.probe.loading import (  # noqa: F401  (the probe's public names, kept importable here)
    encode_images,
    freeze,
    load_frozen_encoder,
    random_encoder,
    state_checksum,
)
from pipelines.probe.splits import (  # noqa: F401
    ProbeSplits,
    check_labels,
    probe_data_config,
    split_draws,
    split_listings,
)
from pipelines.tracking import store
from pipelines.tracking.probe_scores import log_scores
from xtra_core.config import XTRAConfig

logger = logging.getLogger("xtra.probe")


def check_probe_config(cfg: XTRAConfig, kinds: Sequence[str], depth: int) -> None:
    """Settings that depend on the probed encoder (known only once it is loaded)."""
    p = cfg.probe
    if "attentive" in kinds and not 1 <= p.attentive_last_n <= depth:
        raise UserError(f"probe.attentive_last_n={p.attentive_last_n} must be in "
                        f"1..{depth} (the encoder's depth)")
    if "attentive" in kinds and cfg.model.encoder_width % probe_heads(cfg):
        raise UserError(f"probe.attentive_heads={probe_heads(cfg)} does not divide the encoder "
                        f"width {cfg.model.encoder_width}")
    if p.eval_resize is not None and p.eval_resize < cfg.model.image_size:
        raise UserError(f"probe.eval_resize={p.eval_resize} is smaller than the encoder's image "
                        f"size {cfg.model.image_size}: the centre crop would not fit")


def probe_kind(
    cfg: XTRAConfig, kind: str, splits: ProbeSplits, encoder: Any,
    cached: tuple[dict[str, Any], dict[str, Any]], shared: bool,
) -> dict[str, Any]:
    """One probe of one draw: `cached` holds the draw's (features, tokens) of the feature pass."""
    features, tokens = cached
    if kind == "linear":
        return linear_probe(cfg.probe, features, splits.num_classes,
                            augmented_batches(cfg, splits, encoder)
                            if cfg.probe.linear_solver == "adamw" else None)
    return attentive_probe(cfg, splits, encoder, tokens if shared else None)


def choice_of(r: dict[str, Any]) -> str:
    """The hyperparameter the probe chose on val, in words."""
    if r.get("solver") == "lbfgs":
        return f"weight decay {r['best_weight_decay']:g}"
    return f"lr {r['best_lr']:g}"


def mean_of_draws(per_draw: list[dict[str, Any]]) -> dict[str, Any]:
    """One record for the draws of a probe: the mean scores, `top1_std` (sample std) and every
    draw's score and choice; the choice made most often stands as `best_lr` / `best_weight_decay`."""
    if len(per_draw) == 1:
        return per_draw[0]
    out = dict(per_draw[0])
    for key in ("top1", "top5", "val_top1", "val_top5"):
        values = [r.get(key) for r in per_draw]
        out[key] = None if None in values else float(np.mean(values))
    top1 = [r["top1"] for r in per_draw]
    out.update(draws=len(per_draw), top1_std=float(np.std(top1, ddof=1)), top1_by_draw=top1)
    for key in ("best_lr", "best_weight_decay"):
        chosen = [r.get(key) for r in per_draw]
        out[f"{key}_by_draw"] = chosen
        out[key] = max(chosen, key=chosen.count)
    return out


def probe(
    cfg: XTRAConfig, model_ref: str | None, kinds: Sequence[str], random_init: bool = False,
    run_id: str | None = None,
) -> list[dict[str, Any]]:
    """The whole job: load, split, probe each kind, log. Returns one result record per kind.
    The scores go to MLflow run `run_id` if given (a sweep trial's nested run), else to the
    model's pretraining run, else to a new run tagged with the model."""
    import ray

    uri = store.connect(cfg)
    encoder, model_cfg, info = load_frozen_encoder(cfg, model_ref, random_init, uri)
    pcfg = probe_data_config(cfg, model_cfg)
    check_probe_config(pcfg, kinds, len(encoder.blocks))
    draws = split_draws(pcfg)
    splits = draws[0]
    if not ray.is_initialized():
        ray.init(**console.ray_init_kwargs())
    console.quiet_ray_data()  # the probe prints its own progress lines
    logger.info("probing %s (random_init=%s): %d train, %d val, %d test images, %d classes%s",
                info.get("source"), random_init, len(splits.train), len(splits.val),
                len(splits.test), splits.num_classes,
                f", {len(draws)} seeded draws of train and val" if len(draws) > 1 else "")
    checksum = state_checksum(encoder)
    results = []
    # one feature pass for both probes when the attentive probe reads the eval views too
    shared = {"linear", "attentive"} <= set(kinds) and pcfg.probe.attentive_features == "cached"
    cached: list[Any] | None = None  # per draw: (features, tokens)
    for kind in kinds:
        t0 = time.perf_counter()
        if cached is None and (kind == "linear" or shared):
            cached, encoded = extract_shared_features(pcfg, draws, ray.put(encoder.state_dict()),
                                                      pcfg.probe.attentive_last_n if shared else 0)
            logger.info("%s: cached features of %d images in %.1f s",
                        "linear + attentive" if shared else "linear", encoded,
                        time.perf_counter() - t0)
        per_draw = []
        for k, splits in enumerate(draws):
            with console.quiet_logger(logger) if k else contextlib.nullcontext():
                per_draw.append(probe_kind(pcfg, kind, splits, encoder,
                                           cached[k] if cached else ({}, {}), shared))
            if len(draws) > 1:
                logger.info("%s: draw %d/%d: %s, val top-1 %.4f, test top-1 %.4f", kind, k + 1,
                            len(draws), choice_of(per_draw[-1]), per_draw[-1]["val_top1"],
                            per_draw[-1]["top1"])
        r = mean_of_draws(per_draw)
        spread = f" (std {r['top1_std']:.4f} over {len(draws)} draws)" if len(draws) > 1 else ""
        logger.info("%s: best %s, val top-1 %.4f, test top-1 %.4f%s (%.1f s)", kind, choice_of(r),
                    r["val_top1"], r["top1"], spread, time.perf_counter() - t0)
        r.update(random_init=random_init, model=info.get("source"))
        results.append(r)
    if state_checksum(encoder) != checksum:
        raise RuntimeError("the frozen encoder's weights changed during probing")
    logged_to = log_scores(uri, cfg, {**info, "run_id": run_id} if run_id else info, results)
    for r in results:
        r["mlflow_run_id"] = logged_to
    return results
